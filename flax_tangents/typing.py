"""Type names of flax_tangents, after Neural Tangents' `typing` module.

NT's names are kept where they describe the same thing in Flax. Those that
describe `stax` layer triples do not apply to Linen modules and are not
defined: `InitFn` is here only for NT's `(init_fn, apply_fn)` pairs, which
`ft.monte_carlo_kernel_fn` accepts; NT's `LayerKernelFn` corresponds to a
`KernelRule` (a rule receives its module too); `InternalLayer`,
`InternalLayerMasked`, `Layer` and `MaskFn` (stax layer tuples and their
mask functions) have no counterpart, a Linen module being the layer.

>>> import flax_tangents as ft
>>> from flax_tangents import typing as ftt
>>> def describe(kernel_fn: ftt.AnalyticKernelFn, get: ftt.Get = 'ntk'):
...   return kernel_fn
"""

from flax_tangents._src import typing as _typing
from flax_tangents._src.typing import AnalyticKernelFn
from flax_tangents._src.typing import ApplyFn
from flax_tangents._src.typing import EmpiricalGetKernelFn
from flax_tangents._src.typing import EmpiricalKernelFn
from flax_tangents._src.typing import InitFn
from flax_tangents._src.typing import KernelRule
from flax_tangents._src.typing import MonteCarloKernelFn

__all__ = [
    "AnalyticKernelFn",
    "ApplyFn",
    "Axes",
    "EmpiricalGetKernelFn",
    "EmpiricalKernelFn",
    "Get",
    "InitFn",
    "KernelFn",
    "KernelOrInput",
    "KernelRule",
    "Kernels",
    "MonteCarloKernelFn",
    "NTTree",
    "NTTrees",
    "PyTree",
    "Shapes",
    "VMapAxes",
    "VMapAxisTriple",
]

PyTree = _typing.PyTree
"""A JAX pytree: nested lists, tuples, dicts (and Flax variable
collections) of arrays."""

Axes = _typing.Axes
"""One axis (`-1`) or several (`(1, 3)`), counted as for NumPy."""

NTTree = _typing.NTTree
"""NT's tree: a `T`, or lists and tuples of `NTTree[T]` (one level is
spelled out here, as in NT, since documentation tools cannot show recursive
types)."""

NTTrees = _typing.NTTrees
"""A list or tuple of `NTTree`s."""

Shapes = _typing.Shapes
"""A shape, or an `NTTree` of shapes."""

Get = _typing.Get
"""What a kernel function returns: `None` for the whole `ft.Kernel`, a
field name (`'nngp'`, `'ntk'`, ...) for that array, or a tuple of names for
a namedtuple of them."""

KernelOrInput = _typing.KernelOrInput
"""The first argument of an analytic kernel function: inputs, or a
`Kernel` to continue from."""

Kernels = _typing.Kernels
"""Several kernels, as the branches `ftn.FanInSum`, `ftn.FanInConcat` and
`ftn.FanInProd` take."""

VMapAxisTriple = _typing.VMapAxisTriple
"""`(in_axes, out_axes, kwargs_axes)`: the batch axes of `x`, of `f(x)` and
of each keyword argument of `f`, for `vmap_axes` of the empirical kernels.
"""

VMapAxes = _typing.VMapAxes
"""`vmap_axes` of `ft.empirical_ntk_fn`: `None`, one pytree of axes for
inputs and outputs alike, or a `VMapAxisTriple`."""

KernelFn = _typing.KernelFn
"""Any kernel function (what `ft.batch` takes)."""
