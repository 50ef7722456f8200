"""`ft.batch`: compute large kernels tile by tile over every device.

The wrapped kernel function is evaluated on `batch_size x batch_size` tiles
of the kernel, one tile per device of a `jax.sharding.Mesh` at a time, and
the tiles are stitched into the kernel the unbatched call would return.
Under `jax.distributed.initialize` the same code runs on every process and
each computes the tiles of its own devices; see `docs/multihost.md`.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Optional, TypeVar, Union, cast

import jax
from jax.sharding import Mesh
import numpy as np

from flax_tangents._src.analytic import requirements
from flax_tangents._src.scale.batched import BatchedKernelFn
from flax_tangents._src.scale.progress import ProgressArg
from flax_tangents._src.scale.tile_checkpoint import CheckpointInUseError
from flax_tangents._src.scale.tile_checkpoint import CheckpointMismatchError
from flax_tangents._src.scale.tile_checkpoint import CheckpointWriteError
from flax_tangents._src.scale.tile_plan import leading_size

__all__ = ["CheckpointInUseError", "CheckpointMismatchError",
           "CheckpointWriteError", "batch"]

KernelFnT = TypeVar("KernelFnT", bound=Callable[..., Any])


def batch(kernel_fn: KernelFnT,
          batch_size: int = 0,
          mesh: Union[Mesh, int, None] = None,
          store_on_device: bool = True,
          checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
          progress: ProgressArg = None,
          *,
          device_count: Optional[int] = None) -> KernelFnT:
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
  - Networks whose outputs for one input depend on other inputs
    (`FanInConcat(axis=0)`, `Index` or `ImageResize` of the batch axis,
    `DotGeneral` over the batch axis) cannot be tiled and raise
    `ValueError` when called.

  Neural Tangents' `nt.batch(kernel_fn, batch_size=0, device_count=-1,
  store_on_device=True)` calls work unchanged: `batch_size=0` means no
  tiling, and `device_count` (also accepted positionally in place of
  `mesh`) picks the devices: `-1` all of them, `0` one, `k` the first `k`
  local devices.

  Args:
    kernel_fn: a kernel function `kernel_fn(x1, x2=None, *args, **kwargs)`
      whose outputs have leading batch axes `(len(x1), len(x2))`
      (`nngp`, `ntk`), `len(x1)` (`cov1`) or `len(x2)` (`cov2`).
    batch_size: rows and columns of a tile (per device). `0` (NT's
      default) means no tiling: on one device `kernel_fn` itself is
      returned; on several, the rows of `x1` are split evenly over them.
    mesh: the devices to use, all of them (tiles are spread over the
      flattened mesh). Default: every device (of every process). An `int`
      here is NT's positional `device_count`.
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
      shared. Needs a positive `batch_size`.
    progress: `True` shows tiles done and time left on stderr, `False`
      nothing, `None` shows it when stderr is a terminal; a callable is
      called as `progress(tiles_done, tiles_total)` after every round.
    device_count: NT's argument, instead of `mesh`: `-1` for all devices,
      `0` for one (the default device), `k > 0` for the first `k` local
      devices.

  Returns:
    A function with the signature and outputs of `kernel_fn`.

  Raises:
    ValueError: for a negative `batch_size`, a `device_count` out of range,
      both `mesh` and `device_count`, or `checkpoint_dir` without tiles;
      (when called) for a network that mixes inputs along the batch axis.
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
  >>> ft.batch(rbf, 0, 0) is rbf   # NT's call: no tiling, one device
  True
  """
  if isinstance(mesh, (int, np.integer)) and not isinstance(mesh, bool):
    if device_count is not None:
      raise ValueError("ft.batch: got a device count both positionally "
                       "(in place of `mesh`) and as `device_count`.")
    mesh, device_count = None, int(mesh)
  if device_count is not None:
    if mesh is not None:
      raise ValueError("ft.batch: pass either `mesh` or `device_count`, "
                       "not both.")
    mesh = _mesh_from_device_count(device_count)
  # An int `mesh` became `device_count` above; other values are used as is.
  mesh = cast(Optional[Mesh], mesh)
  if (isinstance(batch_size, bool) or
      not isinstance(batch_size, (int, np.integer)) or batch_size < 0):
    raise ValueError(f"`batch_size` must be a non-negative integer, got "
                     f"{batch_size!r}.")
  checkpoint_dir = (None if checkpoint_dir is None else
                    os.fspath(checkpoint_dir))
  if batch_size == 0:
    if checkpoint_dir is not None:
      raise ValueError("ft.batch: `checkpoint_dir` stores tiles; give a "
                       "positive `batch_size` to use it.")
    n_devices = (mesh if mesh is not None else
                 Mesh(np.asarray(jax.devices()), ("tiles",))).size
    if n_devices == 1:
      return kernel_fn
    # Callable like `kernel_fn`, with its outputs.
    return cast(KernelFnT, _RowsPerDevice(
        _refuse_batch_mixing(kernel_fn), n_devices, mesh, store_on_device,
        progress))
  return cast(KernelFnT, BatchedKernelFn(
      _refuse_batch_mixing(kernel_fn), int(batch_size), mesh, store_on_device,
      checkpoint_dir, progress))


def _mesh_from_device_count(device_count: int) -> Optional[Mesh]:
  """NT's `device_count` as a mesh: -1 all, 0 one, k the first k local."""
  if (isinstance(device_count, bool) or
      not isinstance(device_count, (int, np.integer)) or device_count < -1):
    raise ValueError(f"`device_count` must be -1 (all devices), 0 (one) or "
                     f"a positive count, got {device_count!r}.")
  if device_count == -1:
    return None
  local = jax.local_devices()
  if device_count > len(local):
    raise ValueError(f"`device_count`={device_count} exceeds the "
                     f"{len(local)} local devices.")
  if jax.process_count() > 1:
    raise ValueError("`device_count` selects local devices; under "
                     "multi-host give a `mesh` over the devices to use.")
  return Mesh(np.asarray(local[:max(device_count, 1)]), ("tiles",))


def _refuse_batch_mixing(kernel_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`kernel_fn`, raising if a layer met on the way mixes batch entries."""

  @functools.wraps(kernel_fn)
  def refusing(*args: Any, **kwargs: Any) -> Any:
    with requirements.watching_batch_mixing() as mixing:
      try:
        out = kernel_fn(*args, **kwargs)
      except Exception as e:  # pylint: disable=broad-except
        # A tile's batch size may itself break such a layer; say why.
        if mixing:
          raise _mixing_error(mixing) from e
        raise
    if mixing:
      raise _mixing_error(mixing)
    return out

  # `ft.batch` keys its compiled tile programs by the user's function (and by
  # a digest of what it computes), not by this wrapper.
  setattr(refusing, "ft_cache_owner",
          getattr(kernel_fn, "ft_cache_owner", kernel_fn))
  return refusing


def _mixing_error(layers: list[str]) -> ValueError:
  return ValueError(
      f"ft.batch cannot tile this kernel: {', '.join(sorted(set(layers)))} "
      "combine(s) inputs along the batch axis, so the kernel of a tile of "
      "inputs is not a tile of the kernel. Call the kernel function on all "
      "inputs at once (without ft.batch, or with batch_size=0 on one "
      "device).")


class _RowsPerDevice:
  """`batch_size=0` on several devices: the rows of `x1` split over them."""

  def __init__(self, kernel_fn: Callable[..., Any], n_devices: int,
               mesh: Optional[Mesh], store_on_device: bool,
               progress: ProgressArg):
    self._batched = functools.lru_cache(maxsize=None)(
        lambda size: BatchedKernelFn(kernel_fn, size, mesh, store_on_device,
                                     None, progress))
    self._n_devices = n_devices
    functools.update_wrapper(self, kernel_fn)

  def __call__(self, x1: Any, x2: Any = None, *args: Any, **kwargs: Any):
    size = max(1, math.ceil(leading_size(x1, "x1") / self._n_devices))
    return self._batched(size)(x1, x2, *args, **kwargs)
