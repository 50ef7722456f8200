"""`BatchedKernelFn`: a kernel function computed tile by tile over a mesh.

One call:

1. splits the call's arguments into inputs (`x1`, `x2`, and 2-tuple keyword
   arguments `(for_x1, for_x2)` whose leading axes are the batch sizes:
   tiled like the inputs), arrays (parameters, keys: copied to every
   device) and everything else (`get`, flags: fixed at compile time);
2. evaluates the wrapped function abstractly on one tile to learn what it
   returns (`OutputTemplate`) and plans the tiles (`TilePlan`);
3. restores finished tiles from `checkpoint_dir`, if given;
4. computes the other tiles in rounds of one tile per device, with a
   `jax.shard_map` program compiled once per tile kind and shape;
5. stitches the tiles (`assemble`) and rebuilds the wrapped function's
   output (arrays, namedtuple or `ft.Kernel`).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Optional, Union

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec
import numpy as np

from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.scale import assemble
from flax_tangents._src.scale import devices
from flax_tangents._src.scale import fingerprint as fingerprint_lib
from flax_tangents._src.scale import progress as progress_lib
from flax_tangents._src.scale import tile_checkpoint
from flax_tangents._src.scale import tile_outputs
from flax_tangents._src.scale.call_arguments import Call
from flax_tangents._src.scale.tile_plan import DIAG
from flax_tangents._src.scale.tile_plan import FULL
from flax_tangents._src.scale.tile_plan import OFFDIAG
from flax_tangents._src.scale.tile_plan import TilePlan
from flax_tangents._src.scale.tile_plan import pad_rows
from flax_tangents._src.scale.tile_plan import tile_rows

__all__ = ["BatchedKernelFn"]


class BatchedKernelFn:
  """See `ft.batch`."""

  def __init__(self, kernel_fn: Callable[..., Any], batch_size: int,
               mesh: Optional[Mesh], store_on_device: bool,
               checkpoint_dir: Optional[str],
               progress: progress_lib.ProgressArg):
    if not callable(kernel_fn):
      raise TypeError(f"ft.batch expects a kernel function, got "
                      f"{type(kernel_fn).__name__}.")
    if (isinstance(batch_size, bool) or not isinstance(batch_size, int)
        or batch_size < 1):
      raise ValueError(f"`batch_size` must be a positive integer, got "
                       f"{batch_size!r}.")
    self.kernel_fn = kernel_fn
    self.batch_size = batch_size
    self.mesh = mesh
    self.store_on_device = store_on_device
    self.checkpoint_dir = checkpoint_dir
    self.progress = progress
    # Shared by every ft.batch of the same kernel function, so that a new
    # wrapper (a rerun notebook cell) neither recompiles nor retraces.
    # Keyed by the user's function (not `ft.batch`'s wrapper of it), so that
    # a new wrapper (a rerun notebook cell) finds the compiled tile programs.
    self._programs, self._templates = _caches_for(
        getattr(kernel_fn, "ft_cache_owner", kernel_fn))
    functools.update_wrapper(self, kernel_fn)

  # ------------------------------------------------------------------ call

  def __call__(self, x1: Any, x2: Any = None, *args: Any, **kwargs: Any):
    if isinstance(x1, Kernel) or isinstance(x2, Kernel):
      raise NotImplementedError(
          "ft.batch tiles kernels of inputs; pass the inputs `x1`, `x2` "
          "rather than a Kernel (apply the batched function to the data and "
          "the whole network instead of composing it with a Kernel).")
    call = Call(x1, x2, args, kwargs)
    mesh = self.mesh if self.mesh is not None else devices.default_mesh()
    b = min(self.batch_size, max(call.n1, call.n2))
    # Traced on every call: a kernel function with state (an NNX model
    # called with `params=None`, a mutated module) may compute something
    # else than at its last call, and neither its cached program nor its
    # checkpoint may then be reused.
    computation = self._computation(call, x1, x2, b)

    template = self._template(call, x1, x2, b, computation)
    mirror = call.symmetric and template.all_transposable
    plan = TilePlan(call.n1, call.n2, b, call.symmetric, mirror)

    padded_inputs = _padded_inputs(call, x1, x2, plan)
    dynamic = devices.put_replicated(call.dynamic, mesh)

    if self.store_on_device:
      assembler = assemble.DeviceAssembler(template, plan, mesh)
    else:
      assembler = assemble.HostAssembler(template, plan)

    checkpoint = self._open_checkpoint(call, x1, x2, plan, template,
                                       computation)
    try:
      done = set()
      if checkpoint is not None:
        done = _restore(checkpoint, plan, template, assembler)
      todo = [tile for tile in plan.tiles if tile.id not in done]
      if checkpoint is not None and todo:
        checkpoint.ensure_writable()
      progress = progress_lib.Progress(len(plan.tiles), len(done),
                                       self.progress,
                                       devices.is_primary_process())
      self._compute(call, template, plan, mesh, todo, assembler, checkpoint,
                    progress, padded_inputs, dynamic, computation)
    except BaseException:
      if checkpoint is not None:
        checkpoint.abandon()
      raise
    if checkpoint is not None:
      checkpoint.close()
    progress.close()
    return template.build(assembler.result(), call.n1, call.n2)

  def _open_checkpoint(self, call: Call, x1: Any, x2: Any, plan: TilePlan,
                       template: tile_outputs.OutputTemplate,
                       computation: str
                       ) -> Optional[tile_checkpoint.TileCheckpoint]:
    """The call's tile checkpoint in `checkpoint_dir`, or None without one."""
    if self.checkpoint_dir is None:
      return None
    return tile_checkpoint.TileCheckpoint(
        self.checkpoint_dir, self._fingerprint(call, x1, x2, plan,
                                               computation),
        {"plan": plan.describe(),
         "leaves": tile_outputs.describe_leaves(template)})

  def _compute(self, call, template, plan, mesh, todo, assembler, checkpoint,
               progress, padded_inputs, dynamic, computation) -> None:
    """Computes the tiles `todo` in rounds of one tile per device."""
    x1_padded, x2_padded, tiled1, tiled2 = padded_inputs
    b = plan.batch_size
    for kind in (DIAG, OFFDIAG, FULL):
      tiles = [tile for tile in todo if tile.kind == kind]
      if not tiles:
        continue
      program = self._program(call, kind, template, mesh, computation)
      for start in range(0, len(tiles), mesh.size):
        chunk = tiles[start:start + mesh.size]
        padding = [chunk[0]] * (mesh.size - len(chunk))
        ids = np.asarray([t.id for t in chunk] + [-1] * len(padding))
        rows = np.asarray([t.i for t in chunk + padding])
        cols = np.asarray([t.j for t in chunk + padding])
        inputs = [tile_rows(x1_padded, rows, b),
                  tile_rows(x2_padded, cols, b),
                  tile_rows(tiled1, rows, b), tile_rows(tiled2, cols, b)]
        leaves = program(*devices.put_sharded(inputs, mesh), dynamic)
        if self.store_on_device:
          if checkpoint is not None:
            checkpoint.save(ids, leaves)  # Written while the next computes.
          assembler.add(ids, jax.block_until_ready(leaves))
        else:
          host = devices.gather_to_host(leaves)
          if checkpoint is not None:
            # Under multi-host every process holds every tile on the host;
            # each writes only its own devices' tiles, from `leaves`.
            checkpoint.save(ids, leaves if devices.multi_process() else host)
          assembler.add(ids, host)
        progress.update(len(chunk))

  # ------------------------------------------------------------ programs

  def _one_tile(self, call: Call, kind: str) -> Callable[..., Any]:
    """The wrapped function on one (unstacked) tile."""
    def one_tile(x1, x2, tiled1, tiled2, dynamic):
      args, kwargs = call.rebuild(dynamic)
      kwargs = dict(kwargs)
      for name in call.tiled:
        kwargs[name] = (tiled1[name], tiled2[name])
      return self.kernel_fn(x1, None if kind == DIAG else x2, *args, **kwargs)
    return one_tile

  def _template(self, call: Call, x1: Any, x2: Any, b: int,
                computation: str) -> tile_outputs.OutputTemplate:
    kind = DIAG if call.symmetric else FULL
    specs = self._tile_specs(call, x1, x2, b)
    key = call.program_key(kind)
    if key is not None:
      # Tracing the wrapped function costs time: reuse the template for
      # calls with the same structure, shapes and static arguments.
      key += (b, jax.tree.structure(specs), tuple(jax.tree.leaves(specs)),
              tuple((np.shape(d), _dtype(d)) for d in call.dynamic),
              computation)
      if key in self._templates:
        return self._templates[key]
    template = self._new_template(call, kind, specs, b)
    if key is not None:
      self._templates[key] = template
    return template

  @staticmethod
  def _tile_specs(call: Call, x1: Any, x2: Any, b: int) -> tuple:
    """Abstract inputs of one tile: `(x1, x2, tiled1, tiled2)`."""
    def tile_spec(x):
      return jax.tree.map(
          lambda leaf: jax.ShapeDtypeStruct((b,) + np.shape(leaf)[1:],
                                            _dtype(leaf)), x)
    return (tile_spec(x1), tile_spec(x1 if x2 is None else x2),
            tile_spec({n: v[0] for n, v in call.tiled.items()}),
            tile_spec({n: v[1] for n, v in call.tiled.items()}))

  def _new_template(self, call: Call, kind: str, specs: tuple,
                    b: int) -> tile_outputs.OutputTemplate:
    one_tile = self._one_tile(call, kind)
    abstract = jax.eval_shape(one_tile, *specs, call.dynamic)
    template = tile_outputs.OutputTemplate(abstract, b, call.get,
                                           self._layout_hint())
    if call.symmetric and not template.all_transposable:
      # An analytic kernel function asked for arrays: its Kernel says how
      # the arrays are laid out.
      hint = self._analytic_layout_hint(call, specs)
      if hint is not None:
        template = tile_outputs.OutputTemplate(abstract, b, call.get, hint)
    return template

  def _layout_hint(self) -> Optional[tile_outputs.LayoutHint]:
    trace_axes = getattr(self.kernel_fn, "trace_axes", None)
    diagonal_axes = getattr(self.kernel_fn, "diagonal_axes", None)
    if trace_axes is None or diagonal_axes is None:
      return None
    return tile_outputs.empirical_layout_hint(tuple(trace_axes),
                                              tuple(diagonal_axes))

  def _analytic_layout_hint(self, call, specs):
    args, kwargs = call.rebuild(call.dynamic)
    if args:
      args = (None,) + tuple(args[1:])
    elif "get" in kwargs:
      kwargs = dict(kwargs, get=None)
    else:
      return None
    try:
      kernel = jax.eval_shape(
          lambda x: self.kernel_fn(x, None, *args, **kwargs), specs[0])
    except Exception:  # pylint: disable=broad-except
      return None  # Not an analytic kernel function: layout stays unknown.
    if not isinstance(kernel, Kernel):
      return None
    layout = tile_outputs._kernel_layout(kernel)  # pylint: disable=protected-access
    return lambda rest: layout

  def _program(self, call: Call, kind: str,
               template: tile_outputs.OutputTemplate, mesh: Mesh,
               computation: str) -> Callable[..., Any]:
    key = call.program_key(kind)
    # `computation` in the key: `jax.jit` would otherwise keep what a
    # stateful kernel function computed when first traced.
    cache_key = None if key is None else key + (
        mesh, template.treedef, tuple(template.leaves), computation)
    if cache_key is not None and cache_key in self._programs:
      return self._programs[cache_key]
    roles = ((tile_outputs.PAIR,) if kind == OFFDIAG else
             (tile_outputs.PAIR, tile_outputs.ROW, tile_outputs.COL))
    one_tile = self._one_tile(call, kind)
    names = {leaf.key: assemble.leaf_name(k)
             for k, leaf in enumerate(template.leaves)}

    def body(x1s, x2s, tiled1s, tiled2s, dynamic):
      first = functools.partial(jax.tree.map, lambda x: x[0])
      output = one_tile(first(x1s), first(x2s), first(tiled1s),
                        first(tiled2s), dynamic)
      flat = template.flatten(output, roles)
      return {names[key]: value[None] for key, value in flat.items()}

    spec = devices.tile_axis_spec(mesh)
    program = jax.jit(jax.shard_map(
        body, mesh=mesh, in_specs=(spec, spec, spec, spec, PartitionSpec()),
        out_specs=spec, check_vma=False))
    if cache_key is not None:
      self._programs[cache_key] = program
    return program

  # ---------------------------------------------------------- fingerprint

  def _computation(self, call: Call, x1: Any, x2: Any, b: int) -> str:
    """Digest of the per-tile program: what the kernel function computes."""
    kind = DIAG if call.symmetric else FULL
    specs = self._tile_specs(call, x1, x2, b)
    abstract_dynamic = [jax.ShapeDtypeStruct(np.shape(d), _dtype(d))
                        for d in call.dynamic]
    return fingerprint_lib.computation_identity(
        self._one_tile(call, kind), *specs, abstract_dynamic)

  def _fingerprint(self, call: Call, x1: Any, x2: Any, plan: TilePlan,
                   computation: str) -> dict[str, str]:
    digest = fingerprint_lib.digest
    return {
        "x1": digest(x1),
        "x2": digest(x2),
        "batch_size": str(self.batch_size),
        "tiling": digest(plan.describe()),
        "get": repr(call.get),
        "kernel_fn (what it computes)": computation,
        "array arguments (parameters)": digest(call.dynamic),
        "other arguments": digest(list(call.static)),
        "tiled arguments": digest(call.tiled),
    }


def _padded_inputs(call: Call, x1: Any, x2: Any, plan: TilePlan) -> tuple:
  """`(x1, x2, tiled1, tiled2)` padded to whole tiles."""
  b = plan.batch_size
  x1_padded = pad_rows(x1, plan.n1_blocks * b)
  x2_padded = x1_padded if call.symmetric else pad_rows(
      x2, plan.n2_blocks * b)
  tiled1 = {n: pad_rows(v[0], plan.n1_blocks * b)
            for n, v in call.tiled.items()}
  tiled2 = {n: pad_rows(v[1], plan.n2_blocks * b)
            for n, v in call.tiled.items()}
  return x1_padded, x2_padded, tiled1, tiled2


def _restore(checkpoint: tile_checkpoint.TileCheckpoint, plan: TilePlan,
             template: tile_outputs.OutputTemplate,
             assembler: Union[assemble.HostAssembler,
                              assemble.DeviceAssembler]) -> set[int]:
  """Adds the checkpoint's finished tiles to `assembler`; returns their ids."""
  done = set()
  expected = {assemble.leaf_name(k): (leaf.shape, np.dtype(leaf.dtype).name)
              for k, leaf in enumerate(template.leaves)}
  for ids, leaves in checkpoint.load(len(plan.tiles), expected):
    if isinstance(assembler, assemble.DeviceAssembler):
      assembler.add_host(ids, leaves)
    else:
      assembler.add(ids, leaves)
    done.update(int(i) for i in ids if i >= 0)
  return done


_MAX_SHARED_CACHES = 16
_SHARED_CACHES: collections.OrderedDict[Any, tuple[dict, dict]] = (
    collections.OrderedDict())


def _caches_for(kernel_fn: Callable[..., Any]) -> tuple[dict, dict]:
  """Compiled programs and output templates of `kernel_fn`'s tiles."""
  try:
    caches = _SHARED_CACHES.pop(kernel_fn, None)
  except TypeError:  # Unhashable: caches of its own.
    return {}, {}
  if caches is None:
    caches = ({}, {})
  _SHARED_CACHES[kernel_fn] = caches  # Most recently used last.
  while len(_SHARED_CACHES) > _MAX_SHARED_CACHES:
    _SHARED_CACHES.popitem(last=False)
  return caches


def _dtype(leaf: Any) -> Any:
  return leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
