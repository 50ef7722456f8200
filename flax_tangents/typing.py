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

from __future__ import annotations

from typing import Any, Generator, Optional, Protocol, Sequence, TypeVar, Union

import jax

from flax_tangents.kernel import Kernel

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

T = TypeVar("T")

PyTree = Any
"""A JAX pytree: nested lists, tuples, dicts (and Flax variable
collections) of arrays."""

Axes = Union[int, Sequence[int]]
"""One axis (`-1`) or several (`(1, 3)`), counted as for NumPy."""

NTTree = Union[list[T], tuple[T, ...], T]
"""NT's tree: a `T`, or lists and tuples of `NTTree[T]` (one level is
spelled out here, as in NT, since documentation tools cannot show recursive
types)."""

NTTrees = Union[list[T], tuple[T, ...]]
"""A list or tuple of `NTTree`s."""

Shapes = NTTree[tuple[int, ...]]
"""A shape, or an `NTTree` of shapes."""

Get = Union[None, str, tuple[str, ...]]
"""What a kernel function returns: `None` for the whole `ft.Kernel`, a
field name (`'nngp'`, `'ntk'`, ...) for that array, or a tuple of names for
a namedtuple of them."""

KernelOrInput = Union[NTTree[Kernel], NTTree[jax.Array]]
"""The first argument of an analytic kernel function: inputs, or a
`Kernel` to continue from."""

Kernels = Union[list[Kernel], tuple[Kernel, ...]]
"""Several kernels, as the branches `ftn.FanInSum`, `ftn.FanInConcat` and
`ftn.FanInProd` take."""

_VMapAxis = Optional[PyTree]

VMapAxisTriple = tuple[_VMapAxis, _VMapAxis, dict[str, _VMapAxis]]
"""`(in_axes, out_axes, kwargs_axes)`: the batch axes of `x`, of `f(x)` and
of each keyword argument of `f`, for `vmap_axes` of the empirical kernels.
"""

VMapAxes = Union[_VMapAxis, VMapAxisTriple]
"""`vmap_axes` of `ft.empirical_ntk_fn`: `None`, one pytree of axes for
inputs and outputs alike, or a `VMapAxisTriple`."""


class InitFn(Protocol):
  """NT's initialization function, `init_fn(rng, input_shape)`.

  Returns `(output_shape, params)`. Flax models use `model.init(key, x)`
  instead; this type describes NT's `(init_fn, apply_fn)` pairs, which
  `ft.monte_carlo_kernel_fn` accepts.
  """

  def __call__(self, rng: jax.Array, input_shape: Shapes,
               **kwargs: Any) -> tuple[Shapes, PyTree]:
    ...


class ApplyFn(Protocol):
  """A finite network's forward pass, `f(params, x, **kwargs)`.

  `model.apply` of a Flax module is one (`params` then being its variables,
  of which only the `'params'` collection is differentiated by the
  empirical kernels); so is NT's `apply_fn`.
  """

  def __call__(self, params: PyTree, inputs: PyTree, *args: Any,
               **kwargs: Any) -> PyTree:
    ...


class KernelRule(Protocol):
  """A module's infinite-width rule, `rule(module, kernel, **kwargs)`.

  Given the bound module (for its attributes) and the `Kernel` (or list of
  kernels) it is called on, returns the `Kernel` of its outputs; `kwargs`
  are the call's keyword arguments. Register one with
  `ft.register_kernel_rule` or `@ft.kernel_rule`. NT's `LayerKernelFn` is
  the same without the module.
  """

  def __call__(self, module: Any, kernel: Union[Kernel, Kernels],
               **kwargs: Any) -> Union[Kernel, Kernels]:
    ...


class AnalyticKernelFn(Protocol):
  """`ft.kernel_fn(model)`: `kernel_fn(x1_or_kernel, x2=None, get=None,
  **kwargs)`.

  Takes inputs (or a `Kernel` to continue from) and returns the `Kernel`
  (`get=None`), one array (`get` a name) or a namedtuple of arrays (`get` a
  tuple of names) of the model's infinite-width limit.
  """

  def __call__(self, x1: KernelOrInput, x2: Optional[PyTree] = None,
               get: Get = None, **kwargs: Any) -> Any:
    ...


class EmpiricalGetKernelFn(Protocol):
  """`ft.empirical_kernel_fn(f)`: `kernel_fn(x1, x2, get, params,
  **kwargs)`.

  The finite network's kernels at `params`; `get` as for
  `AnalyticKernelFn` (`'nngp'`, `'ntk'` or both).
  """

  def __call__(self, x1: PyTree, x2: Optional[PyTree], get: Get,
               params: PyTree, **kwargs: Any) -> PyTree:
    ...


class EmpiricalKernelFn(Protocol):
  """`ft.empirical_ntk_fn(f)` or `ft.empirical_nngp_fn(f)`: `kernel_fn(x1,
  x2, params, **kwargs)`, one kernel of the finite network at `params`."""

  def __call__(self, x1: PyTree, x2: Optional[PyTree], params: PyTree,
               **kwargs: Any) -> PyTree:
    ...


class MonteCarloKernelFn(Protocol):
  """`ft.monte_carlo_kernel_fn(...)`: `kernel_fn(x1, x2=None, get=None,
  **kwargs)`.

  The estimate averaged over sampled networks, or a generator of estimates
  when `n_samples` is a list.
  """

  def __call__(self, x1: PyTree, x2: Optional[PyTree] = None,
               get: Get = None, **kwargs: Any
               ) -> Union[PyTree, Generator[PyTree, None, None]]:
    ...


KernelFn = Union[AnalyticKernelFn, EmpiricalKernelFn, EmpiricalGetKernelFn,
                 MonteCarloKernelFn]
"""Any kernel function (what `ft.batch` takes)."""
