"""The `Kernel`: covariances of a layer's outputs at infinite width.

`ft.Kernel` is defined in `flax_tangents/_src/analytic/kernel.py`; its rule
methods (`k[idx]`, `k * c`, `k1 + k2`, `Kernel.mask`, ...) get their math
from `flax_tangents/_src/analytic/kernel_methods.py`, imported here.

>>> import jax.numpy as jnp
>>> from flax_tangents.kernel import Kernel
>>> (Kernel.from_inputs(jnp.ones((2, 3))) * 2.0).nngp
Array([[4., 4.],
       [4., 4.]], dtype=float...)
"""

from flax_tangents._src.analytic import kernel_methods as _kernel_methods
from flax_tangents._src.analytic.kernel import Kernel

__all__ = ["Kernel"]

del _kernel_methods  # Imported for its side effect: installs the methods.
