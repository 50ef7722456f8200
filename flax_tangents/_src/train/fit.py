"""`ft.train.fit`: a network and its linearization, trained side by side."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from flax_tangents._src import nnx_adapter
from flax_tangents._src.analytic.errors import KernelRuleError
from flax_tangents._src.empirical.api import empirical_ntk_fn
from flax_tangents._src.empirical.linearize import linearize
from flax_tangents._src.predict import gradient_descent as predict
from flax_tangents._src.train import results
from flax_tangents._src.typing import PyTree

_AUTO = "auto"


def _split_variables(variables: PyTree):
  """`(trainable, rebuild)`: the `'params'` collection of Flax variables.

  Other collections (`batch_stats`, ...) are held fixed. A pytree without a
  `'params'` key is trained whole.
  """
  if hasattr(variables, "keys") and "params" in variables:
    fixed = {k: v for k, v in variables.items() if k != "params"}
    return variables["params"], lambda p: {**fixed, "params": p}
  return variables, lambda p: p


def _record_steps(record_steps: Union[None, int, Sequence[int]],
                  steps: int) -> list[int]:
  if record_steps is None:
    record_steps = max(steps // 20, 1)
  if isinstance(record_steps, (int, np.integer)):
    if record_steps <= 0:
      raise ValueError(f"record_steps must be positive; got {record_steps}.")
    chosen = set(range(0, steps + 1, int(record_steps)))
  else:
    chosen = {int(s) for s in record_steps}
    bad = [s for s in chosen if not 0 <= s <= steps]
    if bad:
      raise ValueError(f"record_steps {sorted(bad)} are outside [0, {steps}].")
  return sorted(chosen | {0, steps})


def _analytic_kernel_fn(apply_fn: Callable[..., Any]) -> Optional[Callable]:
  """`ft.kernel_fn` of the module behind `model.apply`, if it has one."""
  module = getattr(apply_fn, "__self__", None)
  if module is None:
    return None
  try:
    from flax_tangents._src.analytic.interceptor import kernel_fn as ft_kernel
    return ft_kernel(module)
  except Exception:  # pylint: disable=broad-except
    # Not built from layers with kernel rules: no infinite-width limit.
    return None


class _Checkpointer:
  """Training state and records in an orbax `CheckpointManager`."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           create=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory),
                                         options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: PyTree, records: dict[str, list]) -> None:
    stacked = {k: np.stack(v) for k, v in records.items()}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        records=ocp.args.StandardSave(stacked)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, state_like: PyTree):
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      state_like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        records=ocp.args.StandardRestore()))
    records = {k: list(np.asarray(v)) for k, v in out["records"].items()}
    return out["state"], records

  def close(self) -> None:
    self.manager.close()


def fit(
    apply_fn: Callable[..., jax.Array],
    variables: PyTree,
    optimizer: optax.GradientTransformation,
    x_train: jax.typing.ArrayLike,
    y_train: jax.typing.ArrayLike,
    x_test: Optional[jax.typing.ArrayLike] = None,
    y_test: Optional[jax.typing.ArrayLike] = None,
    *,
    steps: int,
    loss: Union[str, results.LossFn] = "mse",
    batch_size: Optional[int] = None,
    record_steps: Union[None, int, Sequence[int]] = None,
    learning_rate: Optional[float] = None,
    momentum: Optional[float] = None,
    linearized: bool = True,
    empirical_ntk: bool = True,
    ntk_trace_axes: Sequence[int] = (),
    kernel_fn: Union[None, str, Callable[..., Any]] = _AUTO,
    seed: int = 0,
    apply_kwargs: Optional[dict[str, Any]] = None,
    checkpoint_dir: Optional[str] = None,
    checkpoint_every: Optional[int] = None,
    stop_at: Optional[int] = None,
    progress: bool = False,
) -> results.TrainResult:
  """Trains a network and its linearization; compares with NTK predictions.

  Both the network `apply_fn(variables, x)` and its linearization around the
  initial `variables` start from the same parameters and take the same
  optimizer steps on the same (mini)batches. At `record_steps` it records the
  loss, accuracy and outputs of both, and their distance in function space.
  Given the `learning_rate` of (momentum) SGD, it also predicts the outputs
  at the matching gradient-flow times `t = step * learning_rate` with
  `ft.predict` from the empirical NTK at initialization and, when the model is
  built from `flax_tangents.nn`, from the infinite-width NTK.

  Only the `'params'` collection of Flax variables is trained; other
  collections are held fixed. Outputs must have shape `(N, O)`.

  A Flax NNX module is trained functionally: `fit(model, None, ...)` starts
  from its current state and leaves the module unchanged; only its
  `nnx.Param` variables are trained. `result.variables` is then an
  `nnx.State` (`nnx.update(model, result.variables)` loads it) and
  `result.linearized_variables` one for `ft.linearize(model)`.

  Args:
    apply_fn: `apply_fn(variables, x, **apply_kwargs) -> (N, O)`, e.g.
      `model.apply`; or an `nnx.Module` called as `model(x, **apply_kwargs)`.
    variables: initial variables (e.g. `model.init(key, x)`); for an
      `nnx.Module`, None (its current state), a module or an `nnx.State`.
    optimizer: any `optax.GradientTransformation` (SGD, momentum, Adam, ...).
    x_train: training inputs.
    y_train: training targets `(N, O)` (one-hot for cross-entropy).
    x_test: optional test inputs.
    y_test: optional test targets.
    steps: number of optimizer steps.
    loss: `'mse'` (`||f - y||^2 / (2 * y.size)`, NT's convention),
      `'cross_entropy'` (softmax, averaged over examples), or a function
      `loss(fx, y)`; for the NTK predictions it should be a mean over examples.
    batch_size: minibatch size (examples drawn without replacement each
      epoch, reshuffled by `seed`); `None` for full-batch training.
    record_steps: an int to record every that many steps, or a list of
      steps; step 0 and the last step are always recorded. By default 20
      records.
    learning_rate: the SGD learning rate, which maps steps to gradient-flow
      time. Without it there are no NTK predictions (they describe (momentum)
      gradient descent, not adaptive optimizers such as Adam).
    momentum: momentum of the SGD optimizer, for the predictions.
    linearized: whether to train the linearization too.
    empirical_ntk: whether to predict with the empirical NTK at init.
    ntk_trace_axes: `()` for the exact empirical NTK of shape
      `(N, N, O, O)`; `(-1,)` for the output-averaged `(N, N)` kernel, which
      needs `O` times less memory (and is exact in the infinite-width limit).
    kernel_fn: the analytic kernel function for the infinite-width
      prediction; `'auto'` takes `ft.kernel_fn` of the module behind
      `apply_fn` when it has one; `None` skips it.
    seed: seed of the minibatch order.
    apply_kwargs: keyword arguments passed to `apply_fn`.
    checkpoint_dir: directory of an orbax `CheckpointManager`. A run finding
      a checkpoint there resumes from its latest step (with the recorded
      history), giving the same final parameters as an uninterrupted run.
    checkpoint_every: steps between checkpoints (default: at every record).
    stop_at: stop (and checkpoint) after this step, as if interrupted; a
      later call with the same `checkpoint_dir` continues.
    progress: print a progress line to stderr at every record.

  Returns:
    A `TrainResult`.

  Raises:
    ValueError: for inconsistent arguments.

  >>> import jax, jax.numpy as jnp, optax
  >>> import flax.linen as nn
  >>> import flax_tangents as ft
  >>> model = nn.Dense(2)
  >>> # Four distinct inputs: equal ones would make the NTK singular (a
  >>> # warning would say so).
  >>> x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
  >>> y = jnp.zeros((4, 2))
  >>> variables = model.init(jax.random.PRNGKey(0), x)
  >>> result = ft.train.fit(model.apply, variables, optax.sgd(0.1), x, y,
  ...                       steps=10, record_steps=5, learning_rate=0.1)
  >>> result.steps.tolist(), result.network.train_loss.shape
  ([0, 5, 10], (3,))
  """
  nnx_module = nnx_adapter.is_module(apply_fn)
  if nnx_module:
    apply_fn, variables = nnx_adapter.as_apply(apply_fn, variables,
                                               "variables")
  apply_kwargs = dict(apply_kwargs or {})
  loss_fn = results.resolve_loss(loss)
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
  has_test = x_test is not None and y_test is not None
  if has_test:
    x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
  n_train = x_train.shape[0]
  if batch_size is not None and not 0 < batch_size <= n_train:
    raise ValueError(f"batch_size must be in [1, {n_train}]; got "
                     f"{batch_size}.")
  if steps < 0:
    raise ValueError(f"steps must be non-negative; got {steps}.")
  records_at = _record_steps(record_steps, steps)
  stop = steps if stop_at is None else min(int(stop_at), steps)

  params_0, rebuild = _split_variables(variables)
  f = lambda p, x: apply_fn(rebuild(p), x, **apply_kwargs)
  f_lin = linearize(f, params_0) if linearized else None
  models = {"network": f}
  if linearized:
    models["linearized"] = f_lin

  # ------------------------------------------------------------ the step ---
  key = jax.random.PRNGKey(seed)
  steps_per_epoch = 1 if batch_size is None else n_train // batch_size

  def batch_at(step):
    if batch_size is None:
      return x_train, y_train
    epoch, position = jnp.divmod(step, steps_per_epoch)
    order = jax.random.permutation(jax.random.fold_in(key, epoch), n_train)
    index = jax.lax.dynamic_slice(order, (position * batch_size,),
                                  (batch_size,))
    return x_train[index], y_train[index]

  def one_step(step, state):
    xb, yb = batch_at(step)
    new = {}
    for name, fn in models.items():
      params, opt_state = state[name]["params"], state[name]["opt_state"]
      grads = jax.grad(lambda p: loss_fn(fn(p, xb), yb))(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      new[name] = {"params": optax.apply_updates(params, updates),
                   "opt_state": opt_state}
    return {**state, **new}

  @jax.jit
  def run(state, start, end):
    # Dynamic bounds: one compilation for every segment length.
    return jax.lax.fori_loop(start, end, one_step, state)

  @jax.jit
  def outputs(state):
    out = {}
    for name, fn in models.items():
      out[name] = (fn(state[name]["params"], x_train),
                   fn(state[name]["params"], x_test) if has_test else None)
    return out

  state = {name: {"params": params_0, "opt_state": optimizer.init(params_0)}
           for name in models}
  records: dict[str, list] = {"steps": []}
  done = 0

  checkpointer = None
  if checkpoint_dir is not None:
    checkpointer = _Checkpointer(checkpoint_dir)
    latest = checkpointer.latest_step()
    if latest is not None:
      state, records = checkpointer.restore(latest, state)
      done = latest
  saves_at = set()
  if checkpointer is not None:
    saves_at = (set(range(0, steps + 1, checkpoint_every)) if checkpoint_every
                else set(records_at)) | {stop}

  def record(step):
    records["steps"].append(np.asarray(step))
    for name, (fx_tr, fx_te) in outputs(state).items():
      records.setdefault(f"{name}/fx_train", []).append(np.asarray(fx_tr))
      if fx_te is not None:
        records.setdefault(f"{name}/fx_test", []).append(np.asarray(fx_te))

  start_time = time.time()
  if done == 0 and not records["steps"]:
    record(0)
  boundaries = sorted(b for b in set(records_at) | saves_at
                      if done < b <= stop)
  for boundary in boundaries:
    state = run(state, done, boundary)
    done = boundary
    if boundary in records_at:
      record(boundary)
      if progress:
        _print_progress(boundary, steps, records, loss_fn, y_train,
                        time.time() - start_time)
    if boundary in saves_at:
      checkpointer.save(boundary, state, records)
  if checkpointer is not None:
    checkpointer.close()

  # ----------------------------------------------------------- summaries ---
  recorded = np.asarray(records["steps"], dtype=int)
  curves = {}
  for name in models:
    curves[name] = results.Curves.from_outputs(
        loss_fn, np.stack(records[f"{name}/fx_train"]), y_train,
        np.stack(records[f"{name}/fx_test"]) if has_test else None, y_test)

  times = recorded * (1. if learning_rate is None else learning_rate)
  ntk_empirical = ntk_analytic = None
  if learning_rate is not None:
    fx_train_0 = jnp.asarray(records["network/fx_train"][0])
    fx_test_0 = (jnp.asarray(records["network/fx_test"][0]) if has_test else
                 None)
    predict_kwargs = dict(loss=loss, loss_fn=loss_fn, y_train=y_train,
                          y_test=y_test, steps=recorded,
                          learning_rate=learning_rate, momentum=momentum,
                          fx_train_0=fx_train_0, fx_test_0=fx_test_0)
    if empirical_ntk:
      trace = tuple(ntk_trace_axes)
      if trace not in ((), (-1,), (1,)):
        raise ValueError("ntk_trace_axes must be () or (-1,); got "
                         f"{ntk_trace_axes}.")
      # Examples are independent at initialization (inference mode), so
      # Jacobians are taken example by example.
      ntk_fn = empirical_ntk_fn(f, trace_axes=trace, vmap_axes=0)
      k_dd = ntk_fn(x_train, None, params_0)
      k_td = ntk_fn(x_test, x_train, params_0) if has_test else None
      ntk_empirical = _predicted_curves(k_dd, k_td, trace_axes=trace or (),
                                        **predict_kwargs)
    analytic = None
    if kernel_fn == _AUTO:
      auto_fn = _analytic_kernel_fn(apply_fn)
      if auto_fn is not None:
        try:
          analytic = _analytic_ntk(auto_fn, x_train,
                                   x_test if has_test else None)
        except KernelRuleError:
          pass  # Some layer has no infinite-width rule: no analytic limit.
    elif kernel_fn is not None:
      analytic = _analytic_ntk(kernel_fn, x_train, x_test if has_test else None)
    if analytic is not None:
      ntk_analytic = _predicted_curves(*analytic, trace_axes=(-1,),
                                       **predict_kwargs)

  network, lin = curves["network"], curves.get("linearized")
  result = results.TrainResult(
      steps=recorded, times=times, network=network, linearized=lin,
      ntk_empirical=ntk_empirical, ntk_analytic=ntk_analytic,
      distance_train=(None if lin is None else
                      results.rms_distance(network.fx_train, lin.fx_train)),
      distance_test=(None if lin is None else
                     results.rms_distance(network.fx_test, lin.fx_test)),
      variables=rebuild(state["network"]["params"]),
      linearized_variables=(rebuild(state["linearized"]["params"])
                            if linearized else None),
      completed=done == steps)
  return nnx_adapter.with_states(result) if nnx_module else result


def _analytic_ntk(kernel_fn, x_train, x_test):
  """Train-train and test-train NTKs, compiled when `kernel_fn` allows."""

  def kernels(x_tr, x_te):
    k_dd = kernel_fn(x_tr, None, "ntk")
    return k_dd, (None if x_te is None else kernel_fn(x_te, x_tr, "ntk"))

  try:
    return jax.jit(kernels)(x_train, x_test)
  except (jax.errors.ConcretizationTypeError, TypeError):
    # A kernel function that needs concrete inputs runs eagerly.
    return kernels(x_train, x_test)


def _predicted_curves(k_dd, k_td, *, trace_axes, loss, loss_fn, y_train, y_test,
                      steps, learning_rate, momentum, fx_train_0, fx_test_0):
  """Curves of the NTK prediction at the recorded steps."""
  if loss == "mse" and momentum is None:
    predict_fn = predict.gradient_descent_mse(
        k_dd, y_train, learning_rate=learning_rate, trace_axes=trace_axes)
  else:
    predict_fn = predict.gradient_descent(
        loss_fn, k_dd, y_train, learning_rate=learning_rate,
        momentum=momentum, trace_axes=trace_axes)
  t = jnp.asarray(steps, fx_train_0.dtype)
  if fx_test_0 is None:
    fx_train = predict_fn(t, fx_train_0)
    fx_test = None
  else:
    fx_train, fx_test = predict_fn(t, fx_train_0, fx_test_0, k_td)
  return results.Curves.from_outputs(loss_fn, fx_train, y_train, fx_test,
                                     y_test)


def _print_progress(step, steps, records, loss_fn, y_train, elapsed):
  parts = [f"[ft.train] step {step}/{steps}"]
  for name in ("network", "linearized"):
    key = f"{name}/fx_train"
    if key in records:
      value = float(loss_fn(jnp.asarray(records[key][-1]), y_train))
      parts.append(f"{name} loss {value:.4g}")
  parts.append(f"{elapsed:.1f}s")
  print("  ".join(parts), file=sys.stderr, flush=True)
