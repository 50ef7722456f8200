"""The registry of kernel rules: which function gives a module its limit."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar

from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic.kernel import Kernel

__all__ = ["find_rule", "fresh_affine_types", "kernel_rule",
           "register_fresh_affine", "register_kernel_rule",
           "registered_modules", "requires"]

KernelRule = Callable[..., Any]
ModuleT = TypeVar("ModuleT", bound=type)

_RULES: dict[type, KernelRule] = {}
_FRESH_AFFINE: list[type] = []


def register_kernel_rule(module_type: type, rule: KernelRule) -> None:
  """Gives every module of `module_type` (and its subclasses) a kernel rule.

  Use it for classes you do not own; for your own classes the decorator
  `kernel_rule` reads better.

  Args:
    module_type: a `flax.linen.Module` subclass.
    rule: a pure function `rule(module, kernel, **kwargs) -> kernel`. It is
      called with the bound module (so its attributes are available) in place
      of `module.__call__` whenever the module is called on a `Kernel`.
      `kwargs` are the keyword arguments of that call.

  A rule must return every covariance it changes (`nngp`, `ntk`, `cov1`,
  and `cov2`, which is `None` when `x2` is `None`) and the new `shape1`/
  `shape2`. After each call of a user's rule, `ft.kernel_fn` checks that
  the shapes agree with the layout and (outside `jit`) that `cov1`/`cov2`
  are symmetric and `cov1` matches the diagonal of `nngp` when `x1` is
  `x2`, naming the rule when they do not. A rule may name keyword
  arguments of the kernel function's call (`rule(module, k, *, pattern=None,
  **kwargs)`) to receive them, as NT passes them to every layer.

  Raises:
    TypeError: if `module_type` is not a class or `rule` is not callable.

  >>> import flax.linen as nn
  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> class Double(nn.Module):  # y = 2 x, no parameters
  ...   def __call__(self, x):
  ...     return 2 * x
  >>> def double_rule(module, k, **kwargs):
  ...   times4 = lambda a: None if a is None else 4 * a
  ...   return k.replace(nngp=times4(k.nngp), ntk=times4(k.ntk),
  ...                    cov1=times4(k.cov1), cov2=times4(k.cov2))
  >>> ft.register_kernel_rule(Double, double_rule)
  >>> k = ft.kernel_fn(Double())(jnp.ones((1, 3)), 2 * jnp.ones((2, 3)))
  >>> float(k.nngp[0, 0]), float(k.cov2[0])
  (8.0, 16.0)
  """
  if not isinstance(module_type, type):
    raise TypeError(f"`module_type` must be a class, got {module_type!r}.")
  if not callable(rule):
    raise TypeError(f"`rule` must be callable, got {rule!r}.")
  _RULES[module_type] = rule


def kernel_rule(rule: KernelRule) -> Callable[[ModuleT], ModuleT]:
  """Class decorator form of `register_kernel_rule`.

  Args:
    rule: a pure function `rule(module, kernel, **kwargs) -> kernel`.

  Returns:
    A decorator that registers `rule` for the decorated module class and
    returns the class unchanged.

  >>> import flax.linen as nn
  >>> import flax_tangents as ft
  >>> @ft.kernel_rule(lambda module, k, **kwargs: k)
  ... class MyIdentity(nn.Module):
  ...   def __call__(self, x):
  ...     return x
  """

  def register(module_type: ModuleT) -> ModuleT:
    register_kernel_rule(module_type, rule)
    return module_type

  return register


def register_fresh_affine(*module_types: type) -> None:
  """Marks layers whose output is `W x + b` with fresh centred i.i.d. weights.

  Lifting's provenance (`lifting/dispatch.py`) records such a layer's
  output as independent of everything before it.

  Args:
    *module_types: `flax.linen.Module` subclasses (their subclasses count).

  >>> from flax_tangents import nn as ftn
  >>> ftn.Dense in fresh_affine_types()
  True
  """
  _FRESH_AFFINE.extend(t for t in module_types if t not in _FRESH_AFFINE)


def fresh_affine_types() -> tuple[type, ...]:
  """The classes given to `register_fresh_affine`, in order."""
  return tuple(_FRESH_AFFINE)


def registered_modules() -> tuple[type, ...]:
  """Every module class with a kernel rule, in order of registration.

  Subclasses of a listed class inherit its rule without being listed.

  Returns:
    The classes given to `register_kernel_rule` or `kernel_rule` (the
    library's own layers, stock Flax modules with rules, and the user's).

  >>> import flax.linen as nn
  >>> import flax_tangents as ft
  >>> from flax_tangents import nn as ftn
  >>> ftn.Dense in ft.registered_modules(), nn.Dense in ft.registered_modules()
  (True, True)
  """
  return tuple(_RULES)


def find_rule(module_type: type) -> Optional[KernelRule]:
  """The rule for `module_type`, looked up along its method resolution order."""
  for base in module_type.__mro__:
    rule = _RULES.get(base)
    if rule is not None:
      return rule
  return None


def requires(*, diagonal_batch: bool = True,
             diagonal_spatial: bool = True) -> Callable[[KernelRule],
                                                        KernelRule]:
  """Declares which covariances a custom kernel rule needs (NT's `requires`).

  `ft.kernel_fn` stores only the covariances that the whole network needs
  (for example just spatial diagonals when nothing mixes locations). A rule
  that mixes locations must declare `diagonal_spatial=False`; one that mixes
  inputs of a batch, `diagonal_batch=False`; the model's kernels then carry
  full covariances from the inputs up to the rule. The built-in layers
  declare their needs themselves.

  Args:
    diagonal_batch: whether the rule works with only the batch diagonals of
      `cov1`/`cov2` (`False`: it needs input-input covariances).
    diagonal_spatial: whether it works with only spatial diagonals
      (`False`: it needs location-location covariances).

  Returns:
    A decorator for a rule `(module, kernel_or_kernels, **kwargs) -> kernel`.

  >>> import flax.linen as nn
  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> from flax_tangents import nn as ftn
  >>> @ft.requires(diagonal_spatial=False)
  ... def flip_rule(module, k, **kwargs):   # reverses the (one) spatial axis
  ...   return k.replace(nngp=k.nngp[:, :, ::-1, ::-1],
  ...                    ntk=k.ntk[:, :, ::-1, ::-1],
  ...                    cov1=k.cov1[..., ::-1, ::-1])
  >>> @ft.kernel_rule(flip_rule)
  ... class Flip(nn.Module):
  ...   def __call__(self, x):
  ...     return x[:, ::-1]
  >>> model = nn.Sequential([ftn.Conv(8, (2,)), Flip(), ftn.Flatten()])
  >>> ft.kernel_fn(model)(jnp.ones((2, 5, 3))).diagonal_spatial
  False
  """

  def decorate(rule: KernelRule) -> KernelRule:
    layer = getattr(rule, "__qualname__", repr(rule))

    @functools.wraps(rule)
    def rule_with_requirements(module: Any, kernel: Any,
                               **kwargs: Any) -> Any:
      kernels = (kernel if isinstance(kernel, (list, tuple)) else [kernel])
      for k in kernels:
        if not isinstance(k, Kernel):
          continue
        if not diagonal_spatial:
          covariance.require_spatial_covariances(k, layer)
        if not diagonal_batch:
          covariance.require_batch_covariances(k, layer)
      return rule(module, kernel, **kwargs)

    return rule_with_requirements

  return decorate
