"""The training loop of `ft.train.fit`: steps, records and checkpoints.

Every model (the network, its linearization) takes the same optimizer steps
on the same (mini)batches, in compiled segments between the steps where
outputs are recorded or the state is checkpointed.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_tangents._src.train import results
from flax_tangents._src.train.checkpointer import Checkpointer
from flax_tangents._src.typing import PyTree

__all__ = ["Schedule", "initial_state", "outputs_program", "record_steps_of",
           "train", "training_program"]


def record_steps_of(record_steps: Union[None, int, Sequence[int]],
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


class Schedule(NamedTuple):
  """When `fit` records, checkpoints and stops."""
  steps: int
  records_at: list[int]
  stop: int
  checkpoint_every: Optional[int]

  @classmethod
  def of(cls, n_train: int, batch_size: Optional[int], steps: int,
         record_steps: Union[None, int, Sequence[int]],
         stop_at: Optional[int],
         checkpoint_every: Optional[int]) -> "Schedule":
    """Checks `fit`'s sizes and steps; see `fit` for the arguments."""
    if batch_size is not None and not 0 < batch_size <= n_train:
      raise ValueError(f"batch_size must be in [1, {n_train}]; got "
                       f"{batch_size}.")
    if steps < 0:
      raise ValueError(f"steps must be non-negative; got {steps}.")
    records_at = record_steps_of(record_steps, steps)
    stop = steps if stop_at is None else min(int(stop_at), steps)
    return cls(steps, records_at, stop, checkpoint_every)

  def saves_at(self) -> set[int]:
    """The steps at which a checkpoint is written."""
    if self.checkpoint_every:
      saves = set(range(0, self.steps + 1, self.checkpoint_every))
    else:
      saves = set(self.records_at)
    return saves | {self.stop}


def initial_state(models: dict[str, Callable[..., Any]],
                  optimizer: optax.GradientTransformation,
                  params_0: PyTree) -> dict[str, Any]:
  """`{name: {'params', 'opt_state'}}` of every model at step 0."""
  return {name: {"params": params_0, "opt_state": optimizer.init(params_0)}
          for name in models}


def training_program(models: dict[str, Callable[..., Any]],
                      optimizer: optax.GradientTransformation,
                      loss_fn: results.LossFn, x_train: jax.Array,
                      y_train: jax.Array, batch_size: Optional[int],
                      seed: int) -> Callable[..., Any]:
  """`run(state, start, end)`: steps `start` to `end` of every model."""
  key = jax.random.PRNGKey(seed)
  n_train = x_train.shape[0]
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

  return run


def outputs_program(models: dict[str, Callable[..., Any]],
                     x_train: jax.Array,
                     x_test: Optional[jax.Array]) -> Callable[..., Any]:
  """`outputs(state)`: `{name: (fx_train, fx_test or None)}`, compiled."""

  @jax.jit
  def outputs(state):
    out = {}
    for name, fn in models.items():
      out[name] = (fn(state[name]["params"], x_train),
                   None if x_test is None else fn(state[name]["params"],
                                                  x_test))
    return out

  return outputs


def train(run: Callable[..., Any], outputs: Callable[..., Any],
           state: PyTree, schedule: Schedule,
           checkpoint_dir: Optional[str],
           report: Optional[Callable[..., None]]):
  """`(state, records, last step)`, trained up to `schedule.stop`.

  Resumes from the latest checkpoint in `checkpoint_dir`, records the
  outputs at `schedule.records_at` (calling `report`), and checkpoints at
  `schedule.saves_at()`.
  """
  records: dict[str, list] = {"steps": []}
  done = 0
  checkpointer, saves_at = None, set()
  if checkpoint_dir is not None:
    checkpointer = Checkpointer(checkpoint_dir)
    latest = checkpointer.latest_step()
    if latest is not None:
      state, records = checkpointer.restore(latest, state)
      done = latest
    saves_at = schedule.saves_at()

  start_time = time.time()
  if done == 0 and not records["steps"]:
    _record(records, 0, outputs, state)
  boundaries = sorted(b for b in set(schedule.records_at) | saves_at
                      if done < b <= schedule.stop)
  for boundary in boundaries:
    state = run(state, done, boundary)
    done = boundary
    if boundary in schedule.records_at:
      _record(records, boundary, outputs, state)
      if report is not None:
        report(boundary, records, time.time() - start_time)
    if checkpointer is not None and boundary in saves_at:
      checkpointer.save(boundary, state, records)
  if checkpointer is not None:
    checkpointer.close()
  return state, records, done


def _record(records: dict[str, list], step: int,
            outputs: Callable[..., Any], state: PyTree) -> None:
  """Appends `step` and the models' outputs in `state` to `records`."""
  records["steps"].append(np.asarray(step))
  for name, (fx_tr, fx_te) in outputs(state).items():
    records.setdefault(f"{name}/fx_train", []).append(np.asarray(fx_tr))
    if fx_te is not None:
      records.setdefault(f"{name}/fx_test", []).append(np.asarray(fx_te))
