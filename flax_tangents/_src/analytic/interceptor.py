"""`ft.kernel_fn`: a model's own `__call__`, run on kernels.

The model is applied to a `Kernel` inside `flax.linen.intercept_methods`.
Every module call that receives a kernel is intercepted: a module with a
registered rule is replaced by its rule; any other module (user modules,
`nn.Sequential`) is lifted: its code is traced, submodule calls kept opaque,
and the trace is evaluated on kernels (`lifting`), so plain functions such
as `nn.relu` or `x.reshape` need no rewrite. No parameters are created.
"""

from __future__ import annotations

import collections
import functools
import inspect
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.analytic import call_args
from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic import inputs
from flax_tangents._src.analytic import masking
from flax_tangents._src.analytic import registry
from flax_tangents._src.analytic import requirements
from flax_tangents._src.analytic import rule_checks
from flax_tangents._src.analytic.errors import KernelRuleError
from flax_tangents._src.analytic.errors import PlainFunctionError
from flax_tangents._src.analytic.lifting import dispatch
from flax_tangents._src.analytic.lifting import paths
from flax_tangents._src.masked_array import MaskedArray
from flax_tangents.kernel import Kernel
from flax_tangents.typing import AnalyticKernelFn
from flax_tangents.typing import Get

__all__ = ["kernel_fn"]

call_args.register_front_end_arg("mask_constant")  # taken by `kernel_fn_`

_KERNEL_FIELDS = tuple(Kernel.__dataclass_fields__)

# Stock Flax modules that only call their submodules: lifted as user modules.
_TRANSPARENT_STOCK_MODULES = (nn.Sequential,)


def _is_kernel(x: Any) -> bool:
  return isinstance(x, Kernel)


def _kernels_in(tree: Any) -> list[Kernel]:
  return [x for x in jax.tree.leaves(tree, is_leaf=_is_kernel)
          if isinstance(x, Kernel)]


def _describe(module: nn.Module) -> str:
  # Full paths: lifted modules apply their submodules in nested `apply`s.
  return paths.describe(module)


def _no_rule_error(module: nn.Module) -> KernelRuleError:
  hint = ""
  if isinstance(module, nn.Embed):
    hint = (" An embedding is a dense layer on one-hot vectors: feed "
            "`jax.nn.one_hot(ids, num_embeddings)` to `ftn.Dense` instead.")
  return KernelRuleError(
      f"{_describe(module)} has no infinite-width kernel rule. Use the "
      "matching layer from `flax_tangents.nn` (e.g. `ftn.Dense`, "
      "`ftn.Relu`), or register a rule with "
      f"`ft.register_kernel_rule(ModuleType, rule)`.{hint}")


def _note_once(error: BaseException, module: nn.Module) -> None:
  # Only the innermost module adds its path: that is where the error arose.
  if not getattr(error, "_flax_tangents_noted", False):
    error.add_note(f"(raised while computing the kernel of "
                   f"{_describe(module)})")
    error._flax_tangents_noted = True  # pylint: disable=protected-access


dispatch.set_no_rule_error(_no_rule_error)


def _setup(next_fun: Callable[..., Any], module: nn.Module) -> Any:
  """Runs a module's `setup` on kernels: skipped when a rule replaces it."""
  if registry.find_rule(type(module)) is not None:
    # The rule reads the module's attributes only; its `setup` would look
    # for parameters, which a kernel computation never creates.
    return None
  try:
    return next_fun()
  except (flax.errors.ScopeParamNotFoundError,
          flax.errors.ScopeCollectionNotFound) as e:
    # Raised while the parent calls this module, so name this module here.
    raise _no_rule_error(module) from e


@functools.lru_cache(maxsize=None)
def _call_signature(module_type: type) -> Optional[inspect.Signature]:
  try:
    return inspect.signature(module_type.__call__)
  except (TypeError, ValueError):
    return None


def _check_call(module: nn.Module, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> None:
  """Refuses a call that the finite module would refuse (unknown kwargs)."""
  if not kwargs:
    return
  signature = _call_signature(type(module))
  if signature is None:
    return
  try:
    signature.bind(module, *args, **kwargs)
  except TypeError as e:
    raise TypeError(
        f"{_describe(module)} was called with keyword arguments "
        f"{sorted(kwargs)}, which its `__call__` does not accept ({e}); the "
        "finite network would fail the same way. If they were given to "
        "`kernel_fn`, note that `nn.Sequential` passes call arguments to its "
        "first layer only.") from e


def _interceptor(next_fun: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any],
                 context: nn.module.InterceptorContext) -> Any:
  if dispatch.tracing():
    # Lifting is tracing a module on arrays: the real code runs.
    return next_fun(*args, **kwargs)
  if context.method_name == "setup":
    return _setup(lambda: next_fun(*args, **kwargs), context.module)
  if not _kernels_in((args, kwargs)):
    return next_fun(*args, **kwargs)
  module = context.module
  dispatch.check_transform(module)
  rule = registry.find_rule(type(module))
  if rule is None:
    is_stock = type(module).__module__.startswith("flax.")
    if is_stock and not isinstance(module, _TRANSPARENT_STOCK_MODULES):
      raise _no_rule_error(module)
  elif context.method_name != "__call__":
    raise KernelRuleError(
        f"{_describe(module)}: its method `{context.method_name}` was called "
        "on a kernel, but kernel rules replace `__call__` only.")
  try:
    with dispatch.call_depth():
      if rule is not None:
        _check_call(module, args, kwargs)
        output = rule(module, *args, **call_args.rule_kwargs(rule, kwargs))
        rule_checks.check_rule_output(rule, module, output)
        output = masking.remask_output(output, type(module).__name__)
        dispatch.record_rule_output(module, (args, kwargs), output)
        return output
      return dispatch.lift(module, context.method_name, args, kwargs)
  except PlainFunctionError as e:
    raise KernelRuleError(
        f"{_describe(module)} passed a Kernel to a plain function (such as "
        "`nn.relu` or `jnp.tanh`) outside code that lifting traces. Use a "
        "layer from `flax_tangents.nn` instead (e.g. `ftn.Relu()` for "
        "`nn.relu`), or give your module a rule with "
        "`ft.register_kernel_rule`.") from e
  except KernelRuleError:
    raise
  except (flax.errors.ScopeParamNotFoundError,
          flax.errors.ScopeCollectionNotFound) as e:
    # A user module that creates parameters itself has no rule.
    raise _no_rule_error(module) from e
  except (AttributeError, TypeError) as e:
    if rule is not None and args and isinstance(args[0], (tuple, list, dict)):
      raise TypeError(
          f"{_describe(module)} received a {type(args[0]).__name__} of "
          "kernels but takes one input (inputs are never stacked). For a "
          "model of several inputs, split them in your module's `__call__` "
          "and give each to its own layers.") from e
    _note_once(e, module)
    raise
  except Exception as e:  # pylint: disable=broad-except
    _note_once(e, module)
    raise


def _first_callee(model: nn.Module) -> Any:
  """The module (or function) that receives `model.apply`'s arguments."""
  target = model
  while isinstance(target, nn.Sequential) and target.layers:
    target = target.layers[0]
  return target


def _signature(target: Any) -> Optional[inspect.Signature]:
  if isinstance(target, nn.Module):
    return _call_signature(type(target))
  try:
    return inspect.signature(target)
  except (TypeError, ValueError):
    return None


def _route_kwargs(model: nn.Module, kwargs: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits keyword arguments into those for `model.apply` and the offered.

  See `call_args`: an argument named by the `__call__` that `model.apply`
  reaches (through `nn.Sequential`, its first layer's) goes there, as in
  the finite network; the others are offered to every rule.
  """
  target = _first_callee(model)
  signature = _signature(target)
  if isinstance(target, nn.Sequential) or signature is None:
    return {}, dict(kwargs)
  parameters = list(signature.parameters.values())
  if any(p.kind == p.VAR_KEYWORD for p in parameters):
    return dict(kwargs), {}  # The user's `__call__` forwards them itself.
  skip = 1 if isinstance(target, nn.Module) else 0
  named = {p.name for p in parameters[skip + 1:]
           if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
  passed = {k: v for k, v in kwargs.items() if k in named}
  offered = {k: v for k, v in kwargs.items() if k not in named}
  return passed, offered


def _positional(model: nn.Module, inputs: Any) -> tuple[Any, ...]:
  """`model.apply`'s positional arguments for `inputs`.

  A tuple or list goes as one argument (NT's NTTree inputs), unless the
  receiving `__call__` requires that many positional arguments; then it is
  unpacked, as `nn.Sequential` unpacks a tuple between layers.
  """
  if not isinstance(inputs, (tuple, list)):
    return (inputs,)
  target = _first_callee(model)
  signature = _signature(target)
  if signature is None:
    return (inputs,)
  skip = 1 if isinstance(target, nn.Module) else 0
  required = [p for p in list(signature.parameters.values())[skip:]
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
              and p.default is p.empty]
  if len(required) >= 2 and len(required) == len(inputs):
    return tuple(inputs)
  return (inputs,)


def _run_model(model: nn.Module, inputs: Any, passed: dict[str, Any],
               offered: dict[str, Any]) -> Any:
  """Runs `model` on input kernels; every offered argument must be used."""
  with call_args.offering(offered) as ledger:
    with nn.intercept_methods(_interceptor):
      output = model.apply({}, *_positional(model, inputs), **passed)
  call_args.check_all_used(ledger, type(model).__name__)
  return output


@functools.lru_cache(maxsize=None)
def _namedtuple(fields: tuple[str, ...]) -> type:
  return collections.namedtuple("Kernel", fields)


def _canonical_get(get: Get) -> Optional[tuple[str, ...]]:
  if get is None:
    return None
  fields = (get,) if isinstance(get, str) else tuple(get)
  for field in fields:
    if field not in _KERNEL_FIELDS:
      raise ValueError(
          f"`get` names unknown field {field!r}; choose from "
          f"{_KERNEL_FIELDS}, e.g. get=('nngp', 'ntk').")
  return fields


def _select(output: Any, get: Get) -> Any:
  fields = _canonical_get(get)
  if fields is None:
    return output

  def pick(k: Any) -> Any:
    if not isinstance(k, Kernel):
      return k
    if isinstance(get, str):
      return getattr(k, get)
    return _namedtuple(fields)(*(getattr(k, f) for f in fields))

  return jax.tree.map(pick, output, is_leaf=_is_kernel)


def _structure_key(tree: Any) -> Optional[tuple[Any, ...]]:
  """A hashable key of `tree` with arrays replaced by shapes and dtypes."""
  def spec(x):
    if isinstance(x, (jax.Array, np.ndarray)):
      return ("array", tuple(x.shape), str(x.dtype))
    return x
  leaves, treedef = jax.tree.flatten(tree)
  key = (treedef, tuple(spec(x) for x in leaves))
  try:
    hash(key)
  except TypeError:
    return None
  return key


def _check_model(model: Any) -> None:
  """Refuses what is not a Linen module, with the fix."""
  if isinstance(model, nn.Module):
    return
  owner = getattr(model, "__self__", None)
  if isinstance(owner, nn.Module):
    raise TypeError(
        f"ft.kernel_fn takes the module itself, not its method "
        f"`{getattr(model, '__name__', 'method')}`: write "
        "`ft.kernel_fn(model)`. (For the finite-width kernel of "
        "`model.apply`, use `ft.empirical_kernel_fn(model.apply)`.)")
  raise TypeError(
      f"ft.kernel_fn expects a flax.linen.Module built from layers with "
      f"kernel rules, got {type(model).__name__}. For any function "
      "`f(params, x)` use `ft.empirical_kernel_fn(f)` (finite width) or "
      "`ft.monte_carlo_kernel_fn`.")


def _check_diagonal_arg(name: str, value: Any) -> None:
  if value is not None and not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be True, False or None (the cheapest "
                    f"layout the model allows), got {value!r}.")


def _choose_layout(recorded: requirements.Recording, spatial_output: bool,
                   diagonal_batch: Optional[bool],
                   diagonal_spatial: Optional[bool]) -> tuple[bool, bool]:
  """The covariance layout: the cheapest one, or the one asked for.

  Raises:
    ValueError: if the layout asked for lacks covariances a layer needs.
  """
  needs_batch = sorted(set(recorded.full_batch))
  needs_spatial = sorted(set(recorded.full_spatial))
  if diagonal_batch and needs_batch:
    raise ValueError(
        f"diagonal_batch=True was asked for, but {', '.join(needs_batch)} "
        "need covariances between different inputs in `cov1`/`cov2`. Omit "
        "`diagonal_batch` (or pass False).")
  if diagonal_spatial and needs_spatial:
    raise ValueError(
        f"diagonal_spatial=True was asked for, but {', '.join(needs_spatial)}"
        " need covariances between different locations. Omit "
        "`diagonal_spatial` (or pass False).")
  auto_batch = not needs_batch
  auto_spatial = not needs_spatial and not spatial_output
  return (auto_batch if diagonal_batch is None else bool(diagonal_batch),
          auto_spatial if diagonal_spatial is None else bool(diagonal_spatial))


def _check_kernel_layout(kernels: list[Kernel],
                         diagonal_batch: Optional[bool],
                         diagonal_spatial: Optional[bool]) -> None:
  for kernel in kernels:
    for name, asked in (("diagonal_batch", diagonal_batch),
                        ("diagonal_spatial", diagonal_spatial)):
      if asked is not None and bool(asked) != getattr(kernel, name):
        raise ValueError(
            f"{name}={asked} was asked for, but the Kernel passed in has "
            f"{name}={getattr(kernel, name)}; its layout is fixed. Build it "
            f"with `{name}={asked}` (e.g. `ft.Kernel.from_inputs(x, {name}="
            f"{asked})`), or omit `{name}`.")


def kernel_fn(model: nn.Module, **apply_kwargs: Any) -> AnalyticKernelFn:
  """The analytic NNGP / NTK function of `model`'s infinite-width limit.

  The model's own `__call__` runs on kernels instead of arrays: each module
  with a kernel rule (every layer of `flax_tangents.nn`, stock `nn.Dense`,
  `nn.Conv`, ...) is replaced by its rule; other modules are entered. Which
  covariances to store is discovered from the whole model: if no layer mixes
  spatial locations and the output has no spatial axes (a CNN ending in
  `Flatten`), only spatial diagonals are computed.

  Args:
    model: a Linen module built from layers with kernel rules.
    **apply_kwargs: keyword arguments for every call (as if passed to each
      call of the kernel function).

  Returns:
    `kernel_fn(x1_or_kernel, x2=None, get=None, *, diagonal_batch=None,
    diagonal_spatial=None, mask_constant=None, **kwargs)`.

    - `x1`, `x2`: arrays of shape `(N, *spatial, C)`; `x2=None` means
      `x2 = x1`. For a model whose `__call__` takes a tuple, list or dict of
      arrays (NT's NTTree), pass such a container (and `x2` of the same
      structure): each array gets its own input kernel. Passing an
      `ft.Kernel` (or a container of them) instead of `x1` continues from it.
    - `get`: a field name (returns an array), a tuple of names (returns a
      namedtuple), or `None` (returns the `ft.Kernel`).
    - `diagonal_batch`, `diagonal_spatial`: NT's layout arguments. `None`
      chooses the cheapest layout the model allows; `False` forces full
      covariances; `True` is refused if a layer needs full covariances.
    - `mask_constant`: NT's masking. Input entries equal to it (NaN: NaN
      entries) are padding: they read as zeros, masks follow every layer,
      and pooling, attention and layer norm skip padded locations
      (variable-length sequences). `ft.MaskedArray` inputs carry their
      masks instead.
    - `kwargs`: an argument that the model's `__call__` names goes there
      (for `nn.Sequential`: if its first layer names it, as Flax does); any
      other is offered to every layer whose rule names it, as NT passes
      arguments to every layer (`pattern=` for `Aggregate`,
      `deterministic=` for `Dropout`). One that nothing takes raises
      `TypeError`.

    The function is jit-able (mark `get` static) and differentiable in the
    inputs. In an eager call, inputs must be finite and the kernel returned
    is checked finite (an overflow raises); under `jit` only shapes are
    checked (see `flax_tangents._src.analytic.inputs`).

  Raises:
    TypeError: if `model` is not a Linen module (e.g. `model.apply`).

  The returned function raises `KernelRuleError` when a module without a
  rule, or a plain function such as `nn.relu`, receives a kernel;
  `TypeError` for a keyword argument no layer takes; `ValueError` for
  mismatched inputs, NaN inputs, a nonlinearity applied to a non-Gaussian
  input, or branches that cannot be combined exactly; `FloatingPointError`
  for a kernel that overflows its dtype.

  >>> import flax.linen as nn
  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> from flax_tangents import nn as ftn
  >>> model = nn.Sequential([ftn.Dense(512, W_std=1.5, b_std=0.05),
  ...                        ftn.Relu(), ftn.Dense(1)])
  >>> kernel_fn = ft.kernel_fn(model)
  >>> x1, x2 = jnp.ones((3, 4)), jnp.ones((2, 4))
  >>> nngp, ntk = kernel_fn(x1, x2, ('nngp', 'ntk'))
  >>> nngp.shape, ntk.shape
  ((3, 2), (3, 2))
  """
  _check_model(model)
  layout_cache: dict[Any, tuple[requirements.Recording, bool]] = {}

  def requirement_pass(x1, x2, passed, offered, compute_ntk):
    spec = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    specs = (jax.tree.map(spec, x1),
             None if x2 is None else jax.tree.map(spec, x2))
    kwargs_key = _structure_key((passed, offered))
    key = (_structure_key(specs), compute_ntk, kwargs_key)
    cacheable = kwargs_key is not None and key[0] is not None
    if cacheable and key in layout_cache:
      return layout_cache[key]

    def probe(a, b):
      kernels = _input_kernels(a, b, diagonal_batch=False,
                               diagonal_spatial=False, compute_ntk=compute_ntk)
      return _run_model(model, kernels, passed, offered)

    with requirements.recording() as recorded:
      output = jax.eval_shape(probe, *specs)
    spatial_output = any(len(k.shape1) > 2 for k in _kernels_in(output))
    if cacheable:
      layout_cache[key] = (recorded, spatial_output)
    return recorded, spatial_output

  def kernel_fn_(x1_or_kernel: Any, x2: Any = None, get: Get = None, *,
                 diagonal_batch: Optional[bool] = None,
                 diagonal_spatial: Optional[bool] = None,
                 mask_constant: Any = None, **kwargs: Any) -> Any:
    _check_diagonal_arg("diagonal_batch", diagonal_batch)
    _check_diagonal_arg("diagonal_spatial", diagonal_spatial)
    passed, offered = _route_kwargs(model, {**apply_kwargs, **kwargs})
    fields = _canonical_get(get)
    compute_ntk = fields is None or "ntk" in fields
    given_kernels = _kernels_in(x1_or_kernel)
    if given_kernels:
      if x2 is not None:
        raise ValueError("Pass either a Kernel or inputs x1 (and x2), not "
                         "a Kernel and x2.")
      _check_kernel_layout(given_kernels, diagonal_batch, diagonal_spatial)
      if mask_constant is not None:
        raise ValueError(
            "mask_constant masks entries of input arrays; a Kernel carries "
            "its masks in mask1/mask2 (see `Kernel.mask`).")

      def with_ntk(k):
        if isinstance(k, Kernel) and compute_ntk and k.ntk is None:
          k = k.replace(ntk=jnp.zeros_like(k.nngp))
        if isinstance(k, Kernel):
          k = masking.remask(k, "the Kernel passed in")
        return k
      kernels = jax.tree.map(with_ntk, x1_or_kernel, is_leaf=_is_kernel)
      return _select(_run_model(model, kernels, passed, offered), get)

    (x1, masks1), (x2, masks2) = (_masked_inputs(x, mask_constant)
                                  for x in (x1_or_kernel, x2))
    x1, x2 = inputs.input_leaves(x1, x2)
    inputs.check_finite_inputs(x1, x2)
    recorded, spatial_output = requirement_pass(x1, x2, passed, offered,
                                                compute_ntk)
    layout = _choose_layout(recorded, spatial_output, diagonal_batch,
                            diagonal_spatial)
    kernels = _input_kernels(x1, x2, diagonal_batch=layout[0],
                             diagonal_spatial=layout[1],
                             compute_ntk=compute_ntk)
    kernels = _with_masks(kernels, masks1, masks2)
    output = _select(_run_model(model, kernels, passed, offered), get)
    inputs.check_finite_output(output, x1, x2)
    return output

  return kernel_fn_


def _masked_inputs(x: Any, mask_constant: Any
                   ) -> tuple[Any, list[Optional[jax.Array]]]:
  """Inputs with padding zeroed, and the masks of their array leaves.

  Padding is given by `mask_constant` (entries equal to it) or by
  `ft.MaskedArray` leaves; masks come in the order of `jax.tree.leaves`.
  """
  if x is None:
    return None, []
  leaves, tree = jax.tree.flatten(
      x, is_leaf=lambda a: isinstance(a, MaskedArray))
  values, masks = [], []
  for leaf in leaves:
    if isinstance(leaf, MaskedArray):
      if mask_constant is not None:
        raise ValueError("Pass either MaskedArray inputs or mask_constant, "
                         "not both.")
      value = jnp.asarray(leaf.masked_value)
      mask = None if leaf.mask is None else jnp.broadcast_to(
          jnp.asarray(leaf.mask, bool), value.shape)
    elif mask_constant is None or isinstance(leaf, Kernel):
      value, mask = leaf, None
    else:
      value = jnp.asarray(leaf)
      mask = masking.from_mask_constant(value, mask_constant)
    values.append(masking.zero_masked(value, mask))
    masks.append(mask)
  return jax.tree.unflatten(tree, values), masks


def _with_masks(kernels: Any, masks1: list[Optional[jax.Array]],
                masks2: list[Optional[jax.Array]]) -> Any:
  """Input kernels with their masks (in the order of the inputs' leaves)."""
  if not any(m is not None for m in masks1 + masks2):
    return kernels
  leaves, tree = jax.tree.flatten(kernels, is_leaf=_is_kernel)
  masks2 = masks2 or [None] * len(leaves)
  leaves = [k.replace(mask1=m1, mask2=m2)
            for k, m1, m2 in zip(leaves, masks1, masks2)]
  return jax.tree.unflatten(tree, leaves)


def _input_kernels(x1: Any, x2: Any, **layout: bool) -> Any:
  """One input kernel per array of `x1` (paired with `x2`'s)."""
  if not inputs.is_tree(x1):
    return covariance.inputs_to_kernel(x1, x2, **layout)
  if x2 is None:
    return jax.tree.map(
        lambda a: covariance.inputs_to_kernel(a, None, **layout), x1)
  return jax.tree.map(
      lambda a, b: covariance.inputs_to_kernel(a, b, **layout), x1, x2)
