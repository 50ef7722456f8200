"""Saving and restoring kernels and other pytrees with orbax.

Pytrees (Flax variables, `TrainState`s, optax states) are written as plain
orbax `StandardCheckpointer` checkpoints, readable by orbax directly. A
`Kernel` is an orbax composite checkpoint of two items: `arrays` (its array
fields) and `static` (JSON: the static fields and a format version).

Restoring places every array on a sharding chosen per leaf: the caller's
`sharding` (one for all leaves, or a pytree of them); else the target leaf's
own sharding; else the default device. A `NamedSharding` that cannot split a
leaf (a scalar, an axis the device count does not divide) replicates that
leaf over the same mesh instead, so one sharding serves a whole training
state.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Union

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
from jax.sharding import Sharding
import numpy as np
import orbax.checkpoint as ocp

from flax_tangents._src.analytic.kernel import Kernel

__all__ = ["restore", "restore_kernel", "save", "save_kernel"]

PathLike = Union[str, os.PathLike]
ShardingArg = Union[None, Sharding, Any]

_KERNEL_FORMAT = "flax_tangents.Kernel"
_KERNEL_FORMAT_VERSION = 1
_ARRAY_FIELDS = ("nngp", "ntk", "cov1", "cov2", "mask1", "mask2")


def _path(path: PathLike) -> str:
  return os.path.abspath(os.fspath(path))


def _fits(sharding: Sharding, shape: tuple[int, ...]) -> bool:
  if not isinstance(sharding, NamedSharding):
    return True
  spec = tuple(sharding.spec)
  if len(spec) > len(shape):
    return False
  for size, axes in zip(shape, spec):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    n_shards = int(np.prod([sharding.mesh.shape[a] for a in axes]))
    if size % n_shards:
      return False
  return True


def _leaf_sharding(requested: Optional[Sharding], leaf: Any,
                   shape: tuple[int, ...]) -> Sharding:
  sharding = requested
  if sharding is None:
    sharding = getattr(leaf, "sharding", None)
  if not isinstance(sharding, Sharding):  # None, or orbax's metadata.
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(sharding, NamedSharding) and not _fits(sharding, shape):
    return NamedSharding(sharding.mesh, PartitionSpec())
  return sharding


def _is_array_like(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct,
                        np.generic))


def _abstract(reference: Any, sharding: ShardingArg) -> Any:
  """Restore target: `ShapeDtypeStruct`s carrying the chosen shardings."""
  if sharding is None or isinstance(sharding, Sharding):
    shardings = jax.tree.map(lambda _: sharding, reference)
  else:
    shardings = jax.tree.broadcast(sharding, reference,
                                   is_leaf=lambda x: isinstance(x, Sharding))

  def leaf_target(leaf, requested):
    if not _is_array_like(leaf) and not hasattr(leaf, "shape"):
      return leaf  # Python scalars restore as themselves.
    shape = tuple(leaf.shape)
    return jax.ShapeDtypeStruct(shape, leaf.dtype,
                                sharding=_leaf_sharding(requested, leaf,
                                                        shape))

  return jax.tree.map(leaf_target, reference, shardings)


def save(path: PathLike, tree: Any, *, force: bool = False) -> None:
  """Saves a pytree of arrays (variables, training state) with orbax.

  Args:
    path: the checkpoint directory to create.
    tree: a pytree of arrays and scalars (sharded arrays are written shard by
      shard, by every process under multi-host).
    force: overwrite an existing checkpoint at `path`.

  Raises:
    ValueError: if `path` exists and `force` is False.

  >>> import jax.numpy as jnp, tempfile, os
  >>> import flax_tangents as ft
  >>> path = os.path.join(tempfile.mkdtemp(), 'vars')
  >>> ft.checkpoint.save(path, {'params': {'w': jnp.ones((2, 3))}})
  >>> ft.checkpoint.restore(path)['params']['w'].shape
  (2, 3)
  """
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(_path(path), tree, force=force)
    checkpointer.wait_until_finished()


def _stored_tree(checkpointer: Any, path: str) -> Any:
  metadata = checkpointer.metadata(path)
  tree = getattr(metadata, "item_metadata", metadata)
  return getattr(tree, "tree", tree)


def restore(path: PathLike, target: Any = None,
            sharding: ShardingArg = None) -> Any:
  """Restores a pytree saved by `save` (or by orbax's standard checkpointer).

  Args:
    path: the checkpoint directory.
    target: optional pytree giving the structure to restore into (e.g. a
      freshly initialized `TrainState`; its arrays may be abstract
      `jax.ShapeDtypeStruct` leaves). Without it, the result is nested dicts and
      lists as orbax stores them.
    sharding: where to put the arrays: a `jax.sharding.Sharding` for every
      array (a `NamedSharding` that cannot split a leaf replicates it over
      its mesh), or a pytree of shardings matching the tree. Default: each
      target leaf's sharding, else the default device. The mesh may differ
      from the one the checkpoint was written from.

  Returns:
    The restored pytree.

  Raises:
    FileNotFoundError: if there is no checkpoint at `path`.

  >>> import jax, jax.numpy as jnp, numpy as np, tempfile, os
  >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  >>> import flax_tangents as ft
  >>> path = os.path.join(tempfile.mkdtemp(), 'state')
  >>> ft.checkpoint.save(path, {'w': jnp.arange(4.), 'step': 3})
  >>> mesh = Mesh(np.array(jax.devices()), ('data',))
  >>> state = ft.checkpoint.restore(path, sharding=NamedSharding(mesh, P()))
  >>> state['w'].sharding.spec, int(state['step'])
  (P(), 3)
  """
  path = _path(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoint at {path!r}.")
  with ocp.StandardCheckpointer() as checkpointer:
    reference = target if target is not None else _stored_tree(checkpointer,
                                                               path)
    return checkpointer.restore(path, _abstract(reference, sharding))


def save_kernel(path: PathLike, kernel: Kernel, *, force: bool = False
                ) -> None:
  """Saves an `ft.Kernel`: its arrays and its static fields.

  Args:
    path: the checkpoint directory to create.
    kernel: the kernel (its arrays may be sharded, e.g. from `ft.batch`).
    force: overwrite an existing checkpoint at `path`.

  Raises:
    TypeError: if `kernel` is not an `ft.Kernel`.

  >>> import jax.numpy as jnp, tempfile, os
  >>> import flax_tangents as ft
  >>> kernel = ft.Kernel.from_inputs(jnp.ones((3, 4)))
  >>> path = os.path.join(tempfile.mkdtemp(), 'kernel')
  >>> ft.checkpoint.save_kernel(path, kernel)
  >>> restored = ft.checkpoint.restore_kernel(path)
  >>> restored.nngp.shape, restored.shape1, restored.x1_is_x2
  ((3, 3), (3, 4), True)
  """
  if not isinstance(kernel, Kernel):
    raise TypeError(f"save_kernel expects an ft.Kernel, got "
                    f"{type(kernel).__name__}; use ft.checkpoint.save for "
                    "other pytrees.")
  fields = {f.name: getattr(kernel, f.name)
            for f in dataclasses.fields(kernel)}
  arrays = {name: fields[name] for name in _ARRAY_FIELDS
            if fields[name] is not None}
  static = {name: (list(value) if isinstance(value, tuple) else value)
            for name, value in fields.items() if name not in _ARRAY_FIELDS}
  static.update(format=_KERNEL_FORMAT, version=_KERNEL_FORMAT_VERSION,
                arrays={name: {"shape": list(a.shape),
                               "dtype": np.dtype(a.dtype).name}
                        for name, a in arrays.items()})
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(_path(path), args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(arrays),
        static=ocp.args.JsonSave(static)), force=force)


def restore_kernel(path: PathLike, sharding: ShardingArg = None) -> Kernel:
  """Restores an `ft.Kernel` saved by `save_kernel`.

  Args:
    path: the checkpoint directory.
    sharding: where to put the arrays, as for `restore` (e.g.
      `NamedSharding(mesh, P('data'))` splits `nngp`, `ntk` and `cov1` by
      rows where the device count divides them). Default: the default
      device.

  Returns:
    The kernel, with the static fields it was saved with.

  Raises:
    FileNotFoundError: if there is no checkpoint at `path`.
    ValueError: if `path` does not hold a kernel.
  """
  path = _path(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoint at {path!r}.")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    static = checkpointer.restore(path, args=ocp.args.Composite(
        static=ocp.args.JsonRestore()))["static"]
    if not isinstance(static, dict) or static.get("format") != _KERNEL_FORMAT:
      raise ValueError(f"{path!r} does not hold a kernel saved by "
                       "ft.checkpoint.save_kernel.")
    stored = {name: jax.ShapeDtypeStruct(tuple(spec["shape"]),
                                         np.dtype(spec["dtype"]))
              for name, spec in static["arrays"].items()}
    arrays = checkpointer.restore(path, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(_abstract(stored, sharding))
    ))["arrays"]
  fields = {name: arrays.get(name) for name in _ARRAY_FIELDS}
  for name in ("shape1", "shape2"):
    fields[name] = tuple(static[name])
  for name in ("x1_is_x2", "is_gaussian", "is_reversed", "is_input",
               "diagonal_batch", "diagonal_spatial", "batch_axis",
               "channel_axis"):
    fields[name] = static[name]
  return Kernel(**fields)
