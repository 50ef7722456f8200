"""flax_tangents: infinite-width and empirical neural tangent kernels for Flax.

Public API; the implementation lives in private modules.
"""

from flax_tangents import checkpoint
from flax_tangents import nn
from flax_tangents import predict
from flax_tangents import train
from flax_tangents import typing
from flax_tangents._src.analytic.errors import KernelRuleError
from flax_tangents._src.analytic.interceptor import kernel_fn
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.analytic.registry import register_kernel_rule
from flax_tangents._src.analytic.registry import registered_modules
from flax_tangents._src.analytic.registry import requires
from flax_tangents._src.empirical.api import empirical_kernel_fn
from flax_tangents._src.empirical.api import empirical_nngp_fn
from flax_tangents._src.empirical.api import empirical_ntk_fn
from flax_tangents._src.empirical.api import empirical_ntk_vp_fn
from flax_tangents._src.empirical.implementation import NtkImplementation
from flax_tangents._src.empirical.linearize import linearize
from flax_tangents._src.empirical.linearize import taylor_expand
from flax_tangents._src.empirical.plan import empirical_ntk_plan
from flax_tangents._src.masked_array import MaskedArray
from flax_tangents._src.masked_array import supports_masking
from flax_tangents._src.masked_array import unmask_fn
from flax_tangents.batching import batch
from flax_tangents.kernel import Kernel
from flax_tangents.monte_carlo import monte_carlo_kernel_fn

__version__ = "0.1.0"

__all__ = (
    "Kernel",
    "KernelRuleError",
    "MaskedArray",
    "NtkImplementation",
    "batch",
    "checkpoint",
    "empirical_kernel_fn",
    "empirical_nngp_fn",
    "empirical_ntk_fn",
    "empirical_ntk_plan",
    "empirical_ntk_vp_fn",
    "kernel_fn",
    "kernel_rule",
    "linearize",
    "monte_carlo_kernel_fn",
    "nn",
    "predict",
    "register_kernel_rule",
    "registered_modules",
    "requires",
    "supports_masking",
    "taylor_expand",
    "train",
    "typing",
    "unmask_fn",
)
