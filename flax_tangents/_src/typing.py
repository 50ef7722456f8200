"""The type names of flax_tangents, defined for `_src`; documented and
re-exported by the public `flax_tangents/typing.py` (which see)."""

from __future__ import annotations

from typing import Any, Generator, Optional, Protocol, Sequence, TypeVar, Union

import jax

from flax_tangents._src.analytic.kernel import Kernel

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

Axes = Union[int, Sequence[int]]

NTTree = Union[list[T], tuple[T, ...], T]

NTTrees = Union[list[T], tuple[T, ...]]

Shapes = NTTree[tuple[int, ...]]

Get = Union[None, str, tuple[str, ...]]

KernelOrInput = Union[NTTree[Kernel], NTTree[jax.Array]]

Kernels = Union[list[Kernel], tuple[Kernel, ...]]

_VMapAxis = Optional[PyTree]

VMapAxisTriple = tuple[_VMapAxis, _VMapAxis, dict[str, _VMapAxis]]

VMapAxes = Union[_VMapAxis, VMapAxisTriple]


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

  def __call__(self, params: PyTree, inputs: PyTree, /, *args: Any,
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

  def __call__(self, x1_or_kernel: KernelOrInput,
               x2: Optional[PyTree] = None, get: Get = None,
               **kwargs: Any) -> Any:
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
