"""The `Kernel`: covariances of a layer's outputs in the infinite-width limit."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

__all__ = ["Kernel"]

_ARRAY_FIELDS = ("nngp", "ntk", "cov1", "cov2", "mask1", "mask2")
_STATIC_FIELDS = (
    "x1_is_x2",
    "is_gaussian",
    "is_reversed",
    "is_input",
    "diagonal_batch",
    "diagonal_spatial",
    "shape1",
    "shape2",
    "batch_axis",
    "channel_axis",
)


@dataclasses.dataclass(frozen=True)
class Kernel:
  """NNGP and NTK of a layer's outputs, with the bookkeeping to propagate them.

  The fields follow Neural Tangents' `Kernel`. Array fields (`nngp`, `ntk`,
  `cov1`, `cov2`, `mask1`, `mask2`) are pytree leaves; the others are static
  auxiliary data, so a `Kernel` passes through `jit`, `vmap`, sharding and
  orbax.

  Layout of the covariance arrays, for inputs of shape `(N, *spatial, C)`:

  - `nngp`, `ntk`: `(N1, N2, S1, S1', S2, S2', ...)` with full spatial
    covariances, `(N1, N2, S1, S2, ...)` when `diagonal_spatial`.
  - `cov1`: `(N1, [N1,] spatial...)`: the leading batch axis is doubled unless
    `diagonal_batch`. `cov2` likewise, or `None` when `x1_is_x2`.

  Attributes:
    nngp: covariance between the outputs on the first and second batches.
    ntk: neural tangent kernel, same shape as `nngp`; `None` when not computed.
    cov1: covariance of the outputs on the first batch.
    cov2: covariance on the second batch; `None` when `x1_is_x2`.
    x1_is_x2: whether the two batches are the same inputs.
    is_gaussian: whether the outputs are Gaussian given the inputs (true after
      an affine layer, false after a nonlinearity).
    is_reversed: whether spatial axes are stored in reversed order (always
      `False` here; kept for compatibility with Neural Tangents).
    is_input: whether this is the kernel of the raw inputs.
    diagonal_batch: whether `cov1`/`cov2` keep only the batch diagonal.
    diagonal_spatial: whether covariances keep only spatial diagonals.
    shape1: shape of the (finite) activations on the first batch.
    shape2: shape of the activations on the second batch.
    batch_axis: batch axis of the activations (0).
    channel_axis: channel axis of the activations (-1), taken to infinity.
    mask1: optional boolean mask of padding in the first batch, `(N1,
      *spatial, C or 1)` (`True` at padding; see `mask` and `ft.kernel_fn`'s
      `mask_constant`).
    mask2: the same for the second batch (`None` when `x1_is_x2`).

  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> k = ft.Kernel.from_inputs(jnp.ones((3, 4)), jnp.ones((2, 4)))
  >>> k.nngp.shape, k.cov1.shape, k.cov2.shape
  ((3, 2), (3,), (2,))
  """

  nngp: Optional[jax.Array]
  ntk: Optional[jax.Array]
  cov1: Optional[jax.Array]
  cov2: Optional[jax.Array]
  x1_is_x2: bool
  is_gaussian: bool
  is_reversed: bool
  is_input: bool
  diagonal_batch: bool
  diagonal_spatial: bool
  shape1: tuple[int, ...]
  shape2: tuple[int, ...]
  batch_axis: int = 0
  channel_axis: int = -1
  mask1: Optional[jax.Array] = None
  mask2: Optional[jax.Array] = None

  # ---------------------------------------------------------------- creation

  @classmethod
  def from_inputs(
      cls,
      x1: jax.typing.ArrayLike,
      x2: Optional[jax.typing.ArrayLike] = None,
      *,
      diagonal_batch: bool = True,
      diagonal_spatial: bool = False,
      compute_ntk: bool = True,
  ) -> "Kernel":
    """The kernel of raw inputs: second moments averaged over channels.

    Args:
      x1: inputs of shape `(N1, *spatial, C)`.
      x2: inputs of shape `(N2, *spatial, C)`, or `None` for `x2 = x1`.
      diagonal_batch: keep only the batch diagonal of `cov1`/`cov2`.
      diagonal_spatial: keep only spatial diagonals.
      compute_ntk: whether to carry an NTK (zero for raw inputs).

    Returns:
      A `Kernel` with `is_input=True` and `is_gaussian=False`.

    Raises:
      ValueError: if `x1` and `x2` differ in anything but the batch size, or
        are not at least 2-D.
    """
    from flax_tangents._src.analytic import covariance  # avoid import cycle

    return covariance.inputs_to_kernel(
        x1, x2, diagonal_batch=diagonal_batch,
        diagonal_spatial=diagonal_spatial, compute_ntk=compute_ntk)

  # ------------------------------------------------------------ conveniences

  def replace(self, **changes: Any) -> "Kernel":
    """A copy with the given fields changed (as `dataclasses.replace`)."""
    return dataclasses.replace(self, **changes)

  def asdict(self) -> dict[str, Any]:
    """The fields as a dictionary (shallow)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @property
  def spatial_ndim(self) -> int:
    """Number of spatial dimensions of the activations."""
    return len(self.shape1) - 2

  def _map_covariances(self, fn) -> "Kernel":
    """Applies `fn(array, n_batch_axes)` to every covariance array."""
    return self.replace(
        nngp=None if self.nngp is None else fn(self.nngp, 2),
        ntk=None if self.ntk is None else fn(self.ntk, 2),
        cov1=None if self.cov1 is None else fn(
            self.cov1, 1 if self.diagonal_batch else 2),
        cov2=None if self.cov2 is None else fn(
            self.cov2, 1 if self.diagonal_batch else 2),
    )

  def transpose(self, axes: Optional[Sequence[int]] = None) -> "Kernel":
    """Permutes the spatial dimensions of all covariances.

    Args:
      axes: a permutation of `range(spatial_ndim)`; `None` reverses them.
        Batch axes stay leading; channels are not stored in a `Kernel`.

    Returns:
      The kernel of the activations with spatial axes permuted.
    """
    n = self.spatial_ndim
    axes = tuple(range(n))[::-1] if axes is None else tuple(
        a % n for a in axes)
    if sorted(axes) != list(range(n)):
      raise ValueError(f"`axes`={axes} is not a permutation of {n} spatial "
                       "axes.")

    def permute(x, n_batch):
      if self.diagonal_spatial:
        perm = list(range(n_batch)) + [n_batch + a for a in axes]
      else:
        perm = list(range(n_batch))
        for a in axes:
          perm += [n_batch + 2 * a, n_batch + 2 * a + 1]
      return jnp.transpose(x, perm)

    def permute_shape(shape):
      return (shape[0],) + tuple(shape[1 + a] for a in axes) + (shape[-1],)

    def permute_mask(mask):
      if mask is None:
        return None
      return jnp.transpose(mask, (0,) + tuple(1 + a for a in axes) +
                           (mask.ndim - 1,))

    return self._map_covariances(permute).replace(
        shape1=permute_shape(self.shape1), shape2=permute_shape(self.shape2),
        mask1=permute_mask(self.mask1), mask2=permute_mask(self.mask2))

  def mask(self, mask1: Optional[jax.typing.ArrayLike],
           mask2: Optional[jax.typing.ArrayLike]) -> "Kernel":
    """Zeroes the covariances of masked (padding) locations.

    As Neural Tangents' `Kernel.mask`: every covariance entry that involves
    a masked location of either batch becomes zero, and the masks are stored
    in `mask1`/`mask2`, so that later layers skip those locations (global
    average pooling, attention, layer norm) and propagate them.

    Args:
      mask1: boolean `(N1, *spatial, 1)`, `True` at padding; `None` masks
        nothing.
      mask2: the same for the second batch; ignored when `x1_is_x2`.

    Returns:
      The masked kernel.

    Raises:
      NotImplementedError: for masks that differ between channels (last
        axis longer than 1), which a kernel cannot represent.

    >>> import jax.numpy as jnp
    >>> import flax_tangents as ft
    >>> k = ft.Kernel.from_inputs(jnp.ones((2, 3, 4)))    # 2 inputs, 3 tokens
    >>> mask = jnp.array([[False, False, True], [False, True, True]])[..., None]
    >>> k.mask(mask, None).cov1[1]                       # 2nd input: 1 token
    Array([[1., 0., 0.],
           [0., 0., 0.],
           [0., 0., 0.]], dtype=float...)
    """
    from flax_tangents._src.analytic import masking  # avoid import cycle

    as_mask = lambda m: None if m is None else jnp.asarray(m, bool)
    return masking.mask_kernel(self, as_mask(mask1), as_mask(mask2))

  def reverse(self) -> "Kernel":
    """Reverses the order of spatial axes in all covariances."""
    return self.transpose(None).replace(is_reversed=not self.is_reversed)

  def dot_general(self, other1: Optional[jax.typing.ArrayLike],
                  other2: Optional[jax.typing.ArrayLike], is_lhs: bool,
                  dimension_numbers: Any) -> "Kernel":
    """Covariances after contracting spatial axes with fixed arrays.

    Describes `y = lax.dot_general(x, other, dimension_numbers)` (or with the
    operands swapped when `is_lhs=False`) where only spatial axes of the
    activations `x` are contracted, its batch and channel axes stay free, and
    `y`'s axes are then ordered batch, remaining spatial axes of `x`, free
    axes of `other`, channels (the layout every `Kernel` uses). `other1` acts
    on the first batch and `other2` on the second. Full spatial covariances
    are needed.

    Args:
      other1: the fixed operand for the first batch; `None` uses `other2`.
      other2: the fixed operand for the second batch; `None` uses `other1`.
      is_lhs: whether the activations are the left operand of `dot_general`.
      dimension_numbers: `((lhs_contracting, rhs_contracting), (lhs_batch,
        rhs_batch))` as for `jax.lax.dot_general`; batch dimensions must be
        empty.

    Returns:
      The kernel of `y`.

    Raises:
      ValueError: if a batch or channel axis is contracted, batch dimensions
        are given, or the kernel keeps only spatial diagonals.

    >>> import numpy as np
    >>> import flax_tangents as ft
    >>> x = np.random.RandomState(0).randn(2, 5, 3)   # (N, length, C)
    >>> pool = np.ones((5, 1)) / 5                    # mean over length
    >>> k = ft.Kernel.from_inputs(x).dot_general(pool, None, True,
    ...                                          (((1,), (0,)), ((), ())))
    >>> k.nngp.shape, k.shape1
    ((2, 2, 1, 1), (2, 1, 3))
    """
    if other1 is None and other2 is None:
      return self
    other1 = jnp.asarray(other2 if other1 is None else other1)
    other2 = jnp.asarray(other1 if other2 is None else other2)
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
    if tuple(lhs_b) or tuple(rhs_b):
      raise ValueError("Kernel.dot_general supports no batch dimensions.")
    x_c, o_c = (lhs_c, rhs_c) if is_lhs else (rhs_c, lhs_c)
    n_x = len(self.shape1)
    x_c = [a % n_x for a in x_c]
    o_c = [a % other1.ndim for a in o_c]
    if any(a in (0, n_x - 1) for a in x_c):
      raise ValueError(
          "Kernel.dot_general may contract only spatial axes; the batch axis "
          "(0) and the channel axis (-1) must stay free.")
    if self.diagonal_spatial:
      raise ValueError("Kernel.dot_general needs full spatial covariances "
                       "(`diagonal_spatial=False`).")
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    left = {a: next(letters) for a in range(1, n_x - 1)}
    right = {a: next(letters) for a in range(1, n_x - 1)}
    o_free = [a for a in range(other1.ndim) if a not in o_c]
    o_left = {a: next(letters) for a in o_free}
    o_right = {a: next(letters) for a in o_free}
    for xa, oa in zip(x_c, o_c):
      o_left[oa], o_right[oa] = left[xa], right[xa]
    x_free = [a for a in range(1, n_x - 1) if a not in x_c]
    out_spatial = "".join(left[a] + right[a] for a in x_free)
    out_spatial += "".join(o_left[a] + o_right[a] for a in o_free)
    spec1 = "".join(o_left[a] for a in range(other1.ndim))
    spec2 = "".join(o_right[a] for a in range(other1.ndim))
    cov_in = "".join(left[a] + right[a] for a in range(1, n_x - 1))

    def contract(cov, n_batch, left_operand, right_operand):
      if cov is None:
        return None
      batch = "XY"[:n_batch]
      return jnp.einsum(f"{spec1},{batch}{cov_in},{spec2}->{batch}"
                        f"{out_spatial}", left_operand, cov, right_operand,
                        precision=jax.lax.Precision.HIGHEST)

    def new_shape(shape):
      return ((shape[0],) + tuple(shape[a] for a in x_free) +
              tuple(other1.shape[a] for a in o_free) + (shape[-1],))

    n_cov_batch = 1 if self.diagonal_batch else 2
    return self.replace(
        nngp=contract(self.nngp, 2, other1, other2),
        ntk=contract(self.ntk, 2, other1, other2),
        cov1=contract(self.cov1, n_cov_batch, other1, other1),
        cov2=contract(self.cov2, n_cov_batch, other2, other2),
        shape1=new_shape(self.shape1), shape2=new_shape(self.shape2))

  # ---------------------------------------------------------- composition

  def __add__(self, other: Any) -> "Kernel":
    # `a + b` on two kernels is the kernel of the sum of independent branches.
    if isinstance(other, Kernel):
      from flax_tangents._src.analytic import combinators
      return combinators.fan_in_sum([self, other])
    return NotImplemented

  def __radd__(self, other: Any) -> "Kernel":
    if isinstance(other, (int, float)) and other == 0:
      return self  # lets `sum(kernels)` work.
    return NotImplemented

  def __jax_array__(self):
    from flax_tangents._src.analytic.errors import PlainFunctionError
    raise PlainFunctionError(
        "A flax_tangents Kernel was passed to a plain JAX function, which has "
        "no infinite-width rule. Use a module from `flax_tangents.nn` (for "
        "example `ftn.Relu()` instead of `nn.relu`), or give your module a "
        "rule with `ft.register_kernel_rule`.")

  __array__ = __jax_array__

  def __mul__(self, other: Any):
    raise TypeError(
        "Multiplying a Kernel has no infinite-width rule; use "
        "`ftn.FanInProd()` for products of branches.")

  __rmul__ = __sub__ = __rsub__ = __truediv__ = __matmul__ = __mul__


jax.tree_util.register_dataclass(
    Kernel, data_fields=list(_ARRAY_FIELDS),
    meta_fields=list(_STATIC_FIELDS))
