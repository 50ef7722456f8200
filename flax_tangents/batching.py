"""`ft.batch`: compute large kernels tile by tile over every device.

The wrapped kernel function is evaluated on `batch_size x batch_size` tiles
of the kernel, one tile per device of a `jax.sharding.Mesh` at a time, and
the tiles are stitched into the kernel the unbatched call would return.
Under `jax.distributed.initialize` the same code runs on every process and
each computes the tiles of its own devices; see `docs/multihost.md`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, TypeVar, Union

from jax.sharding import Mesh

from flax_tangents._src.scale.batched import BatchedKernelFn
from flax_tangents._src.scale.progress import ProgressArg
from flax_tangents._src.scale.tile_checkpoint import CheckpointInUseError
from flax_tangents._src.scale.tile_checkpoint import CheckpointMismatchError
from flax_tangents._src.scale.tile_checkpoint import CheckpointWriteError

__all__ = ["CheckpointInUseError", "CheckpointMismatchError",
           "CheckpointWriteError", "batch"]

KernelFnT = TypeVar("KernelFnT", bound=Callable[..., Any])


def batch(kernel_fn: KernelFnT,
          batch_size: int,
          mesh: Optional[Mesh] = None,
          store_on_device: bool = True,
          checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
          progress: ProgressArg = None) -> KernelFnT:
  """Returns `kernel_fn` computed in tiles over all devices of a mesh.

  The result has the signature of `kernel_fn`: `(x1, x2=None, *args,
  **kwargs)`, for analytic (`ft.kernel_fn`), empirical
  (`ft.empirical_kernel_fn`, with its `params` argument) and Monte Carlo
  kernel functions alike, and returns what `kernel_fn` returns (an array, a
  namedtuple of arrays, or an `ft.Kernel` whose `nngp`/`ntk` are stitched
  along both batch axes and `cov1`/`cov2` along theirs).

  - Any sizes of `x1` and `x2`: the last tiles are padded and trimmed.
  - `x2=None` (a symmetric kernel): diagonal tiles are computed with
    `x2=None` and each off-diagonal tile once, its mirror being its
    transpose (when the layout of every output is known; otherwise mirror
    tiles are computed too).
  - Array arguments (parameters, keys) are copied to every device; other
    arguments (`get`, flags) are fixed when the per-tile program is compiled
    (once per tile shape). A keyword argument given as a pair
    `(for_x1, for_x2)` of arrays with leading sizes `len(x1)`, `len(x2)` is
    tiled like the inputs.
  - The per-tile function is compiled with `jax.jit`; do not `jit` the
    batched function (its purpose is to run in steps).

  Args:
    kernel_fn: a kernel function `kernel_fn(x1, x2=None, *args, **kwargs)`
      whose outputs have leading batch axes `(len(x1), len(x2))`
      (`nngp`, `ntk`), `len(x1)` (`cov1`) or `len(x2)` (`cov2`).
    batch_size: rows and columns of a tile (per device).
    mesh: the devices to use, all of them (tiles are spread over the
      flattened mesh). Default: every device (of every process).
    store_on_device: keep the result as a `jax.Array` on the mesh (`True`;
      sharded by rows, or columns, when the device count divides their
      number, else replicated), or gather tiles to host numpy arrays as they
      finish (`False`: the kernel can then exceed device memory).
    checkpoint_dir: if given, finished tiles are written there (one file
      per tile, by a background thread while the next round computes), and
      a rerun with the same arguments computes only the missing tiles. A
      directory written for other inputs, tiling, `get`, computation (the
      kernel function's traced program) or parameters is refused. Damaged
      tile files are reported and recomputed. Under multi-host it must be
      shared.
    progress: `True` shows tiles done and time left on stderr, `False`
      nothing, `None` shows it when stderr is a terminal; a callable is
      called as `progress(tiles_done, tiles_total)` after every round.

  Returns:
    A function with the signature and outputs of `kernel_fn`.

  Raises:
    ValueError: for a non-positive `batch_size`.
    CheckpointMismatchError: (when called) if `checkpoint_dir` holds tiles
      of another kernel.
    CheckpointInUseError: (when called) if another computation is writing
      into `checkpoint_dir`.
    CheckpointWriteError: (when called) if tiles are missing and
      `checkpoint_dir` is not writable (raised before computing), or a write
      fails (e.g. a full disk; what was written resumes).
    NotImplementedError: (when called) for a `Kernel` with
      `diagonal_batch=False`, or a `Kernel` passed instead of inputs.

  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> def rbf(x1, x2=None, get=None):
  ...   x2 = x1 if x2 is None else x2
  ...   return jnp.exp(-((x1[:, None] - x2[None]) ** 2).sum(-1))
  >>> x = jnp.linspace(0., 1., 14).reshape(7, 2)
  >>> batched = ft.batch(rbf, batch_size=3)
  >>> bool(jnp.allclose(batched(x), rbf(x)))
  True
  """
  return BatchedKernelFn(kernel_fn, batch_size, mesh, store_on_device,
                         None if checkpoint_dir is None else
                         os.fspath(checkpoint_dir), progress)
