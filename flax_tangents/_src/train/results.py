"""Losses, metrics and the result containers of `ft.train.fit`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def mse_loss(fx: jax.Array, y: jax.Array) -> jax.Array:
  """`||fx - y||^2 / (2 * y.size)`: the MSE that `ft.predict` assumes."""
  return 0.5 * jnp.mean((fx - y)**2)


def cross_entropy_loss(fx: jax.Array, y: jax.Array) -> jax.Array:
  """Softmax cross-entropy over the last axis, averaged over examples.

  `y` holds one-hot (or soft) targets of the shape of `fx`.
  """
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(fx) * y, axis=-1))


LOSSES = {"mse": mse_loss, "cross_entropy": cross_entropy_loss}


def resolve_loss(loss: Union[str, LossFn]) -> LossFn:
  if callable(loss):
    return loss
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {tuple(LOSSES)} or a function "
                     f"loss(fx, y); got {loss!r}.")
  return LOSSES[loss]


def accuracy(fx: jax.Array, y: jax.Array) -> jax.Array:
  """Argmax agreement for several outputs; sign agreement for one."""
  if fx.shape[-1] > 1:
    return jnp.mean(jnp.argmax(fx, -1) == jnp.argmax(y, -1))
  return jnp.mean(jnp.sign(fx) == jnp.sign(y))


@functools.lru_cache(None)
def _metrics_fn(loss_fn: LossFn):
  """Compiled `(losses, accuracies)` of outputs stacked along records."""

  def metrics(fx, y):
    loss = jax.vmap(lambda f: loss_fn(f, y))(fx)
    acc = jax.vmap(lambda f: accuracy(f, y))(fx)
    return loss, acc

  return jax.jit(metrics)


@dataclasses.dataclass(frozen=True)
class Curves:
  """One model's metrics at the recorded steps (leading axis: record index).

  Attributes:
    train_loss: training loss, shape `(R,)`.
    train_accuracy: argmax (or, for one output, sign) accuracy, `(R,)`.
    fx_train: outputs on the training set, `(R, N_train, O)`.
    test_loss: test loss, `(R,)`, or `None` without test data.
    test_accuracy: test accuracy, `(R,)`, or `None`.
    fx_test: outputs on the test set, `(R, N_test, O)`, or `None`.
  """
  train_loss: np.ndarray
  train_accuracy: np.ndarray
  fx_train: np.ndarray
  test_loss: Optional[np.ndarray] = None
  test_accuracy: Optional[np.ndarray] = None
  fx_test: Optional[np.ndarray] = None

  @classmethod
  def from_outputs(cls, loss_fn: LossFn, fx_train: Any, y_train: Any,
                   fx_test: Any = None, y_test: Any = None) -> "Curves":
    """Metrics of outputs stacked along a leading record axis."""
    metrics = _metrics_fn(loss_fn)
    kwargs = {}
    if fx_test is not None and y_test is not None:
      test_loss, test_accuracy = metrics(jnp.asarray(fx_test), y_test)
      kwargs = dict(test_loss=np.asarray(test_loss),
                    test_accuracy=np.asarray(test_accuracy),
                    fx_test=np.asarray(fx_test))
    train_loss, train_accuracy = metrics(jnp.asarray(fx_train), y_train)
    return cls(train_loss=np.asarray(train_loss),
               train_accuracy=np.asarray(train_accuracy),
               fx_train=np.asarray(fx_train), **kwargs)


def rms_distance(a: Optional[np.ndarray],
                 b: Optional[np.ndarray]) -> Optional[np.ndarray]:
  """Root-mean-square distance per record between two `(R, ...)` outputs."""
  if a is None or b is None:
    return None
  diff = np.asarray(a) - np.asarray(b)
  return np.sqrt(np.mean(diff**2, axis=tuple(range(1, diff.ndim))))


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What `ft.train.fit` recorded.

  Attributes:
    steps: the recorded steps, `(R,)`, from 0 to the last step run.
    times: the matching gradient-flow times `steps * learning_rate` (equal to
      `steps` when no learning rate was given).
    network: metrics of the network itself.
    linearized: metrics of its linearization around the initial parameters,
      trained the same way (or `None` with `linearized=False`).
    ntk_empirical: the closed-form / ODE prediction with the empirical NTK at
      initialization (equal to the linearization in the gradient-flow limit),
      or `None`.
    ntk_analytic: the prediction with the infinite-width NTK (from
      `ft.kernel_fn`), or `None`.
    distance_train: RMS distance, per record, between the outputs of the
      network and of its linearization on the training set.
    distance_test: the same on the test set (or `None`).
    variables: the network's final variables.
    linearized_variables: the linearization's final variables (or `None`).
    completed: `False` when the run stopped early at `stop_at`.
  """
  steps: np.ndarray
  times: np.ndarray
  network: Curves
  linearized: Optional[Curves]
  ntk_empirical: Optional[Curves]
  ntk_analytic: Optional[Curves]
  distance_train: Optional[np.ndarray]
  distance_test: Optional[np.ndarray]
  variables: Any
  linearized_variables: Any
  completed: bool = True

  def final_gaps(self) -> dict[str, float]:
    """RMS output distances and loss gaps at the last recorded step.

    Returns:
      A dict with, for each pair of available models among `network`,
      `linearized`, `ntk_empirical` and `ntk_analytic`, the RMS distance of
      their train (and test) outputs and the absolute gap of their train (and
      test) losses, keyed like `"network-linearized/fx_test"`.
    """
    models = {name: getattr(self, name) for name in
              ("network", "linearized", "ntk_empirical", "ntk_analytic")}
    models = {k: v for k, v in models.items() if v is not None}
    names = list(models)
    gaps = {}
    for i, a in enumerate(names):
      for b in names[i + 1:]:
        ca, cb = models[a], models[b]
        key = f"{a}-{b}"
        gaps[f"{key}/fx_train"] = _last_distance(ca.fx_train, cb.fx_train)
        gaps[f"{key}/train_loss"] = float(
            abs(ca.train_loss[-1] - cb.train_loss[-1]))
        if ca.fx_test is not None and cb.fx_test is not None:
          gaps[f"{key}/fx_test"] = _last_distance(ca.fx_test, cb.fx_test)
          gaps[f"{key}/test_loss"] = float(
              abs(ca.test_loss[-1] - cb.test_loss[-1]))
    return gaps


def _last_distance(a: np.ndarray, b: np.ndarray) -> float:
  """The RMS distance of the last records of two `(R, ...)` outputs."""
  distance = rms_distance(a[-1:], b[-1:])
  assert distance is not None  # Both outputs are given.
  return float(distance[0])
