"""`ft.kernel_fn`: a model's own `__call__`, run on kernels.

The model is applied to a `Kernel` inside `flax.linen.intercept_methods`.
Every module call that receives a kernel is intercepted: a module with a
registered rule is replaced by its rule; any other module (user modules,
`nn.Sequential`) is lifted: its code is traced, submodule calls kept opaque,
and the trace is evaluated on kernels (`lifting`), so plain functions such
as `nn.relu` or `x.reshape` need no rewrite. No parameters are created.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import call_args
from flax_tangents._src.analytic import front_end
from flax_tangents._src.analytic import inputs
from flax_tangents._src.analytic import lineage
from flax_tangents._src.analytic import masking
from flax_tangents._src.analytic import mixture_units
from flax_tangents._src.analytic import registry
from flax_tangents._src.analytic import requirements
from flax_tangents._src.analytic import rule_checks
from flax_tangents._src.analytic.errors import KernelRuleError
from flax_tangents._src.analytic.errors import PlainFunctionError
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.lifting import dispatch
from flax_tangents._src.analytic.lifting import paths
from flax_tangents._src.typing import AnalyticKernelFn
from flax_tangents._src.typing import Get

__all__ = ["kernel_fn"]

call_args.register_front_end_arg("mask_constant")  # taken by `kernel_fn_`

# The front end's helpers, under the names this module's code uses.
_call_signature = front_end.call_signature
_canonical_get = front_end.canonical_get
_check_diagonal_arg = front_end.check_diagonal_arg
_check_kernel_layout = front_end.check_kernel_layout
_check_model = front_end.check_model
_choose_layout = front_end.choose_layout
_input_kernels = front_end.input_kernels
_positional = front_end.positional
_route_kwargs = front_end.route_kwargs
_select = front_end.select
_structure_key = front_end.structure_key

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
    setattr(error, "_flax_tangents_noted", True)


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
        with lineage.layer(paths.full_path(module)):
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


def _run_model(model: nn.Module, inputs: Any, passed: dict[str, Any],
               offered: dict[str, Any]) -> Any:
  """Runs `model` on input kernels; every offered argument must be used."""
  with call_args.offering(offered) as ledger, lineage.run():
    with nn.intercept_methods(_interceptor):
      output = model.apply({}, *_positional(model, inputs), **passed)
  call_args.check_all_used(ledger, type(model).__name__)
  return output


def _requirement_pass(model: nn.Module,
                      cache: dict[Any, tuple[requirements.Recording, bool]],
                      x1: Any, x2: Any, passed: dict[str, Any],
                      offered: dict[str, Any], compute_ntk: bool
                      ) -> tuple[requirements.Recording, bool]:
  """What the model needs (`Recording`) and whether its output is spatial.

  Runs the model under `jax.eval_shape` on full covariances; the result is
  kept in `cache` per input shapes and keyword-argument structure.
  """
  spec = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
  specs = (jax.tree.map(spec, x1),
           None if x2 is None else jax.tree.map(spec, x2))
  kwargs_key = _structure_key((passed, offered))
  key = (_structure_key(specs), compute_ntk, kwargs_key)
  cacheable = kwargs_key is not None and key[0] is not None
  if cacheable and key in cache:
    return cache[key]

  def probe(a, b):
    kernels = _input_kernels(a, b, diagonal_batch=False,
                             diagonal_spatial=False, compute_ntk=compute_ntk)
    return _run_model(model, kernels, passed, offered)

  with requirements.recording() as recorded:
    output = jax.eval_shape(probe, *specs)
  spatial_output = any(len(k.shape1) > 2 for k in _kernels_in(output))
  if cacheable:
    cache[key] = (recorded, spatial_output)
  return recorded, spatial_output


def _given_kernels(x1_or_kernel: Any, mask_constant: Any,
                   compute_ntk: bool) -> Any:
  """The kernels a call continues from, with a zero NTK if one is needed
  and their masks re-applied.

  Raises:
    ValueError: if `mask_constant` is given too.
  """
  if mask_constant is not None:
    raise ValueError(
        "mask_constant masks entries of input arrays; a Kernel carries "
        "its masks in mask1/mask2 (see `Kernel.mask`).")

  def zero_ntk(part: Kernel) -> Kernel:
    assert part.nngp is not None, "every Kernel has an NNGP"
    return part.replace(ntk=jnp.zeros_like(part.nngp))

  def with_ntk(k):
    if isinstance(k, Kernel) and compute_ntk and k.ntk is None:
      k = mixture_units.map_units(k, zero_ntk)  # Keeps a mixture's parts.
    if isinstance(k, Kernel):
      k = masking.remask(k, "the Kernel passed in")
    return k
  return jax.tree.map(with_ntk, x1_or_kernel, is_leaf=_is_kernel)


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
      call of the kernel function, which may override them), including
      `diagonal_batch`/`diagonal_spatial`.

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
  # Front-end arguments given here are defaults of every call.
  front_defaults = {k: apply_kwargs.pop(k) for k in list(apply_kwargs)
                    if k in call_args.front_end_args()}
  layout_cache: dict[Any, tuple[requirements.Recording, bool]] = {}

  def kernel_fn_(x1_or_kernel: Any, x2: Any = None, get: Get = None, *,
                 diagonal_batch: Optional[bool] = None,
                 diagonal_spatial: Optional[bool] = None,
                 mask_constant: Any = None, **kwargs: Any) -> Any:
    if diagonal_batch is None:
      diagonal_batch = front_defaults.get("diagonal_batch")
    if diagonal_spatial is None:
      diagonal_spatial = front_defaults.get("diagonal_spatial")
    if mask_constant is None:
      mask_constant = front_defaults.get("mask_constant")
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
      kernels = _given_kernels(x1_or_kernel, mask_constant, compute_ntk)
      return _select(_run_model(model, kernels, passed, offered), get)

    (x1, masks1), (x2, masks2) = (inputs.masked_inputs(x, mask_constant)
                                  for x in (x1_or_kernel, x2))
    x1, x2 = inputs.input_leaves(x1, x2)
    inputs.check_finite_inputs(x1, x2)
    recorded, spatial_output = _requirement_pass(
        model, layout_cache, x1, x2, passed, offered, compute_ntk)
    layout = _choose_layout(recorded, spatial_output, diagonal_batch,
                            diagonal_spatial)
    kernels = _input_kernels(x1, x2, diagonal_batch=layout[0],
                             diagonal_spatial=layout[1],
                             compute_ntk=compute_ntk)
    kernels = inputs.with_masks(kernels, masks1, masks2)
    output = _select(_run_model(model, kernels, passed, offered), get)
    inputs.check_finite_output(output, x1, x2)
    return output

  return kernel_fn_
