"""Training state and records of `ft.train.fit` in an orbax checkpoint."""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from flax_tangents._src.typing import PyTree

__all__ = ["Checkpointer"]


class Checkpointer:
  """Training state and records in an orbax `CheckpointManager`.

  Args:
    directory: the manager's directory (created if missing).
    max_to_keep: how many checkpoints to keep.

  >>> import tempfile, numpy as np
  >>> directory = tempfile.mkdtemp()
  >>> checkpointer = Checkpointer(directory)
  >>> checkpointer.save(3, {"w": np.ones(2)}, {"steps": [np.asarray(0)]})
  >>> state, records = checkpointer.restore(3, {"w": np.zeros(2)})
  >>> checkpointer.latest_step(), state["w"].tolist(), len(records["steps"])
  (3, [1.0, 1.0], 1)
  >>> checkpointer.close()
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           create=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory),
                                         options=options)

  def latest_step(self) -> Optional[int]:
    """The step of the newest checkpoint, or None."""
    return self.manager.latest_step()

  def save(self, step: int, state: PyTree, records: dict[str, list]) -> None:
    """Saves `state` and `records` (lists of arrays) at `step`, and waits."""
    stacked = {k: np.stack(v) for k, v in records.items()}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        records=ocp.args.StandardSave(stacked)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, state_like: PyTree):
    """`(state, records)` saved at `step`; `state_like` gives the structure."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      state_like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        records=ocp.args.StandardRestore()))
    records = {k: list(np.asarray(v)) for k, v in out["records"].items()}
    return out["state"], records

  def close(self) -> None:
    """Closes the manager."""
    self.manager.close()
