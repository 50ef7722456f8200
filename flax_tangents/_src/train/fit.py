"""`ft.train.fit`: a network and its linearization, trained side by side."""

from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_tangents._src import nnx_adapter
from flax_tangents._src.empirical.linearize import linearize
from flax_tangents._src.train import loop
from flax_tangents._src.train import predictions
from flax_tangents._src.train import results
from flax_tangents._src.typing import PyTree

_AUTO = predictions.AUTO


def _split_variables(variables: PyTree):
  """`(trainable, rebuild)`: the `'params'` collection of Flax variables.

  Other collections (`batch_stats`, ...) are held fixed. A pytree without a
  `'params'` key is trained whole.
  """
  if hasattr(variables, "keys") and "params" in variables:
    fixed = {k: v for k, v in variables.items() if k != "params"}
    return variables["params"], lambda p: {**fixed, "params": p}
  return variables, lambda p: p


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
    apply_fn, variables = nnx_adapter.as_apply(apply_fn, variables, "variables")
  apply_kwargs = dict(apply_kwargs or {})
  loss_fn = results.resolve_loss(loss)
  data = _Data.of(x_train, y_train, x_test, y_test)
  schedule = loop.Schedule.of(data.x_train.shape[0], batch_size, steps,
                              record_steps, stop_at, checkpoint_every)
  params_0, rebuild = _split_variables(variables)
  models = _models(apply_fn, rebuild, apply_kwargs, params_0, linearized)
  run = loop.training_program(models, optimizer, loss_fn, data.x_train,
                              data.y_train, batch_size, seed)
  state = loop.initial_state(models, optimizer, params_0)
  state, records, done = loop.train(
      run, loop.outputs_program(models, data.x_train, data.x_test), state,
      schedule, checkpoint_dir,
      _progress_report(steps, loss_fn, data.y_train) if progress else None)
  recorded = np.asarray(records["steps"], dtype=int)
  curves = {name: data.curves(loss_fn, records, name) for name in models}
  ntk_empirical = ntk_analytic = None
  if learning_rate is not None:
    predict_kwargs = data.predict_kwargs(records, loss, loss_fn, recorded,
                                         learning_rate, momentum)
    if empirical_ntk:
      ntk_empirical = predictions.empirical_curves(
          models["network"], params_0, ntk_trace_axes, data.x_train,
          data.x_test, **predict_kwargs)
    ntk_analytic = predictions.analytic_curves(
        kernel_fn, apply_fn, data.x_train, data.x_test, **predict_kwargs)
  result = _result(recorded, learning_rate, curves, ntk_empirical,
                   ntk_analytic, rebuild, state, done == steps)
  return nnx_adapter.with_states(result) if nnx_module else result


class _Data(NamedTuple):
  """Training and test data as arrays; the test data are both or None."""
  x_train: jax.Array
  y_train: jax.Array
  x_test: Optional[jax.Array]
  y_test: Optional[jax.Array]

  @classmethod
  def of(cls, x_train: Any, y_train: Any, x_test: Any,
         y_test: Any) -> "_Data":
    """The data of `fit`'s arguments."""
    if x_test is None or y_test is None:
      return cls(jnp.asarray(x_train), jnp.asarray(y_train), None, None)
    return cls(jnp.asarray(x_train), jnp.asarray(y_train),
               jnp.asarray(x_test), jnp.asarray(y_test))

  def curves(self, loss_fn: results.LossFn, records: dict[str, list],
             name: str) -> results.Curves:
    """The recorded `Curves` of model `name`."""
    fx_test = (None if self.x_test is None else
               np.stack(records[f"{name}/fx_test"]))
    return results.Curves.from_outputs(
        loss_fn, np.stack(records[f"{name}/fx_train"]), self.y_train,
        fx_test, self.y_test)

  def predict_kwargs(self, records: dict[str, list], loss: Any,
                     loss_fn: results.LossFn, recorded: np.ndarray,
                     learning_rate: float,
                     momentum: Optional[float]) -> dict[str, Any]:
    """Keyword arguments of `predictions.predicted_curves`."""
    fx_test_0 = (None if self.x_test is None else
                 jnp.asarray(records["network/fx_test"][0]))
    return dict(loss=loss, loss_fn=loss_fn, y_train=self.y_train,
                y_test=self.y_test, steps=recorded,
                learning_rate=learning_rate, momentum=momentum,
                fx_train_0=jnp.asarray(records["network/fx_train"][0]),
                fx_test_0=fx_test_0)


def _models(apply_fn: Callable[..., Any], rebuild: Callable[[PyTree], PyTree],
            apply_kwargs: dict[str, Any], params_0: PyTree,
            linearized: bool) -> dict[str, Callable[..., Any]]:
  """`{'network': f, 'linearized': f_lin}`, functions of `(params, x)`."""

  def network(params, inputs):
    return apply_fn(rebuild(params), inputs, **apply_kwargs)

  models: dict[str, Callable[..., Any]] = {"network": network}
  if linearized:
    models["linearized"] = linearize(network, params_0)
  return models


def _result(recorded: np.ndarray, learning_rate: Optional[float],
            curves: dict[str, results.Curves],
            ntk_empirical: Optional[results.Curves],
            ntk_analytic: Optional[results.Curves],
            rebuild: Callable[[PyTree], PyTree], state: PyTree,
            completed: bool) -> results.TrainResult:
  """The `TrainResult` of the curves and the final state."""
  network, lin = curves["network"], curves.get("linearized")
  times = recorded * (1. if learning_rate is None else learning_rate)
  return results.TrainResult(
      steps=recorded, times=times, network=network, linearized=lin,
      ntk_empirical=ntk_empirical, ntk_analytic=ntk_analytic,
      distance_train=(None if lin is None else
                      results.rms_distance(network.fx_train, lin.fx_train)),
      distance_test=(None if lin is None else
                     results.rms_distance(network.fx_test, lin.fx_test)),
      variables=rebuild(state["network"]["params"]),
      linearized_variables=(rebuild(state["linearized"]["params"])
                            if lin is not None else None),
      completed=completed)


def _progress_report(steps: int, loss_fn: results.LossFn,
                     y_train: jax.Array) -> Callable[..., None]:
  """`report(step, records, elapsed)`, printing a progress line."""
  return lambda step, records, elapsed: _print_progress(
      step, steps, records, loss_fn, y_train, elapsed)


def _print_progress(step, steps, records, loss_fn, y_train, elapsed):
  parts = [f"[ft.train] step {step}/{steps}"]
  for name in ("network", "linearized"):
    key = f"{name}/fx_train"
    if key in records:
      value = float(loss_fn(jnp.asarray(records[key][-1]), y_train))
      parts.append(f"{name} loss {value:.4g}")
  parts.append(f"{elapsed:.1f}s")
  print("  ".join(parts), file=sys.stderr, flush=True)
