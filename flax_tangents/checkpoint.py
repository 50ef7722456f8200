"""`ft.checkpoint`: kernels, variables and training state through orbax.

- `save(path, tree)` / `restore(path, target=None, sharding=None)`: any
  pytree of arrays (Flax variables, a `TrainState`, optax states), as plain
  orbax checkpoints.
- `save_kernel(path, kernel)` / `restore_kernel(path, sharding=None)`: an
  `ft.Kernel` with its static fields.

Restoring can place arrays on another mesh or sharding than the one they
were saved from, e.g. a kernel computed on 8 devices restored onto 2.
Tiles of a running `ft.batch` computation are checkpointed by `ft.batch`
itself (its `checkpoint_dir` argument).
"""

from flax_tangents._src.scale.kernel_io import restore
from flax_tangents._src.scale.kernel_io import restore_kernel
from flax_tangents._src.scale.kernel_io import save
from flax_tangents._src.scale.kernel_io import save_kernel

__all__ = ["restore", "restore_kernel", "save", "save_kernel"]
