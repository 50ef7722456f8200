"""The `Kernel`: covariances of a layer's outputs at infinite width.

`ft.Kernel` is defined here. The methods that are kernel rules in their own
right (`slice`, `mask`, `dot_general`, `k[idx]`, `k * c`, `k1 + k2`, ...)
need the rule math of `masking`, `combinators`, `resize` and others, which
all take `Kernel`s; so that those modules can import this one and not the
reverse, the math is handed to the class
(`flax_tangents/_src/analytic/kernel_operations.py`):
`flax_tangents/_src/analytic/kernel_methods.py` installs it when it is
imported (`flax_tangents` imports it, so a `Kernel` always has it).
`Kernel.from_inputs` needs no rule math: its covariances are computed by
`flax_tangents/_src/analytic/kernel_inputs.py`, below this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import kernel_inputs
from flax_tangents._src.analytic import kernel_tree
from flax_tangents._src.analytic.errors import PlainFunctionError
from flax_tangents._src.analytic.kernel_operations import (
  installed as _operations,
)

__all__ = ["Kernel"]

_ARRAY_ATTRIBUTES = frozenset({
    "shape", "ndim", "dtype", "size", "T", "reshape", "astype", "mean", "sum",
    "squeeze", "at"})


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

  Methods give the kernel of transformed activations, with Neural Tangents'
  meaning: `k.slice(s1, s2)`, `k[idx]` (indexing, batch slices apply to both
  batches), `k * c` / `k / c` (covariances times `c**2`), `-k`, `k + c`
  (a constant shift: adds `c**2`, for centred activations only), `k1 + k2` /
  `k1 - k2` (`FanInSum` of independent branches), `k1 * k2` (`FanInProd`).

  Attributes:
    nngp: covariance between the outputs on the first and second batches.
    ntk: neural tangent kernel, same shape as `nngp`; `None` when not computed.
    cov1: covariance of the outputs on the first batch.
    cov2: covariance on the second batch; `None` when `x1_is_x2`.
    x1_is_x2: whether the two batches are the same inputs (a Python bool;
      may be a traced boolean array, as in NT, when set under `jit`).
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

  # Per-part kernels when channels are not identically distributed (after
  # `Flatten` or a channel concatenation); see `_src/analytic/mixtures.py`.
  # Not dataclass fields: `replace` drops them, so only rules that know
  # mixtures keep them.
  _parts = None
  _assembly: ClassVar[Optional[str]] = None
  # Whether channels may differ in distribution (a mixture whose parts a
  # rule dropped): kept by `replace` until a rule makes the kernel Gaussian.
  _mixed = False
  # The affine layers whose Gaussian fields the activations depend on
  # (`_src/analytic/lineage.py`); copied by `replace`, `None` if unknown.
  _sources = None

  def __post_init__(self):
    x1_is_x2 = self.x1_is_x2
    if not isinstance(x1_is_x2, bool):
      try:  # A concrete array (e.g. from NT code) becomes a Python bool.
        object.__setattr__(self, "x1_is_x2", bool(x1_is_x2))
      except (jax.errors.ConcretizationTypeError, TypeError):
        pass  # Traced: stays an array leaf, as in NT.

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
    kernel = cls(**kernel_inputs.input_fields(
        x1, x2, diagonal_batch=diagonal_batch,
        diagonal_spatial=diagonal_spatial, compute_ntk=compute_ntk))
    object.__setattr__(kernel, "_sources", frozenset())  # Fixed: no randomness.
    return kernel

  # ------------------------------------------------------------ conveniences

  def replace(self, **changes: Any) -> "Kernel":
    """A copy with the given fields changed (as `dataclasses.replace`).

    The copy describes activations whose channels are identically
    distributed: per-part kernels of a mixture are not carried over.
    """
    new = dataclasses.replace(self, **changes)
    if ((self._mixed or self._parts is not None) and
        changes.get("is_gaussian") is not True):
      object.__setattr__(new, "_mixed", True)
    if self._sources is not None:
      object.__setattr__(new, "_sources", self._sources)
    return new

  def asdict(self) -> dict[str, Any]:
    """The fields as a dictionary (shallow)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def astuple(self) -> tuple[Any, ...]:
    """The fields as a tuple, in declaration order (shallow)."""
    return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

  def slice(self, n1_slice: slice, n2_slice: slice) -> "Kernel":
    """The kernel of the inputs `x1[n1_slice]` and `x2[n2_slice]`.

    Args:
      n1_slice: a `slice` of the first batch.
      n2_slice: a `slice` of the second batch (of `x1` when `x1_is_x2`).

    Returns:
      The sliced kernel; `x1_is_x2` stays true only for equal slices.

    >>> import jax.numpy as jnp
    >>> import flax_tangents as ft
    >>> k = ft.Kernel.from_inputs(jnp.ones((4, 3)))
    >>> k.slice(slice(0, 2), slice(1, 4)).nngp.shape
    (2, 3)
    """
    return _operations().slice_batches(self, n1_slice, n2_slice)

  @property
  def spatial_ndim(self) -> int:
    """Number of spatial dimensions of the activations."""
    return len(self.shape1) - 2

  def transpose(self, axes: Optional[Sequence[int]] = None) -> "Kernel":
    """Permutes the spatial dimensions of all covariances.

    Args:
      axes: a permutation of `range(spatial_ndim)`; `None` reverses them.
        Batch axes stay leading; channels are not stored in a `Kernel`.

    Returns:
      The kernel of the activations with spatial axes permuted.
    """
    return _operations().transpose(self, axes)

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
    as_mask = lambda m: None if m is None else jnp.asarray(m, bool)
    return _operations().mask(self, as_mask(mask1), as_mask(mask2))

  def reverse(self) -> "Kernel":
    """Reverses the order of spatial axes in all covariances."""
    return self.transpose(None).replace(is_reversed=not self.is_reversed)

  def dot_general(self, other1: Optional[jax.typing.ArrayLike],
                  other2: Optional[jax.typing.ArrayLike], is_lhs: bool,
                  dimension_numbers: Any) -> "Kernel":
    """Covariances after `lax.dot_general` with fixed arrays (NT's method).

    Describes `y = lax.dot_general(other, x, dimension_numbers)` when
    `is_lhs` (the fixed array is the left operand), else
    `lax.dot_general(x, other, dimension_numbers)`, where `x` are the
    activations `(N, *spatial, C)`. `other1` acts on the first batch and
    `other2` on the second. Any spatial axes and the batch axis may be
    contracted or be dot batch dimensions; the channel axis may not (it is
    the infinite one). `y`'s axes are ordered as this library keeps all
    activations: batch first, then the other axes in `lax.dot_general`'s
    order, channels last (as `ftn.DotGeneral` does in the finite network).
    Contracting the batch axis leaves a unit batch axis, the kernel of the
    single combination `sum_n other[n] x[n]`.

    Contracting spatial axes needs full spatial covariances
    (`diagonal_spatial=False`), contracting the batch axis full batch
    covariances (`diagonal_batch=False`); dot batch dimensions and free
    axes of `other` work with diagonal layouts too.

    Args:
      other1: the fixed operand for the first batch; `None` uses `other2`.
      other2: the fixed operand for the second batch; `None` uses `other1`.
      is_lhs: whether the fixed operand is the left one of `dot_general`.
      dimension_numbers: `((lhs_contracting, rhs_contracting), (lhs_batch,
        rhs_batch))` as for `jax.lax.dot_general`.

    Returns:
      The kernel of `y`.

    Padding masks (`mask1`, `mask2`) follow NT's rule: an output entry is
    padding iff no real input entry reaches it with a non-zero weight.

    Raises:
      ValueError: if the channel axis is contracted or batched, sizes do not
        match, or the kernel's layout lacks the covariances needed.

    >>> import numpy as np
    >>> import flax_tangents as ft
    >>> x = np.random.RandomState(0).randn(2, 5, 3)   # (N, length, C)
    >>> pool = np.ones((5, 1)) / 5                    # mean over length
    >>> k = ft.Kernel.from_inputs(x).dot_general(pool, None, False,
    ...                                          (((1,), (0,)), ((), ())))
    >>> k.nngp.shape, k.shape1
    ((2, 2, 1, 1), (2, 1, 3))
    """
    if other1 is None and other2 is None:
      return self
    other1 = jnp.asarray(other2 if other1 is None else other1)
    other2 = jnp.asarray(other1 if other2 is None else other2)
    return _operations().dot_general(self, other1, other2, is_lhs,
                                     dimension_numbers)

  # ---------------------------------------------------------- composition

  def __getitem__(self, idx: Any) -> "Kernel":
    """The kernel of the activations indexed as `x[idx]` (NT's semantics).

    `idx` is a basic index (ints, slices, `...`) over the activation axes
    `(N, *spatial, C)`. The channel axis must stay `:`; the batch axis may
    be sliced (both batches alike) but not indexed by an int; an int on a
    spatial axis removes it.

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import flax_tangents as ft
    >>> k = ft.Kernel.from_inputs(jnp.ones((4, 5, 6, 3)))
    >>> k[np.s_[:2, 1, 2:4]].nngp.shape
    (2, 2, 2, 2)
    """
    return _operations().getitem(self, idx)

  # Arithmetic with NT's meaning: the kernel of `y = f(x)` from that of `x`.
  def __mul__(self, other: Any) -> "Kernel":
    """`x * c` scales every covariance by `c**2`; `x1 * x2` is FanInProd."""
    return _operations().multiply(self, other)

  __rmul__ = __mul__

  def __truediv__(self, other: Any) -> "Kernel":
    """`x / c` scales every covariance by `1 / c**2`."""
    return _operations().divide(self, other)

  def __neg__(self) -> "Kernel":
    """`-x` has the same second moments as `x`."""
    return self

  def __pos__(self) -> "Kernel":
    return self

  def __add__(self, other: Any) -> "Kernel":
    """`x1 + x2` is FanInSum; `x + c` shifts by a constant (adds `c**2`)."""
    return _operations().add(self, other)

  __radd__ = __add__

  def __sub__(self, other: Any) -> "Kernel":
    """`x1 - x2` has the kernel of `x1 + x2` (independent, centred `x2`)."""
    return _operations().add(self, other)

  __rsub__ = __sub__

  def __jax_array__(self):
    raise PlainFunctionError(
        "A flax_tangents Kernel was passed to a plain JAX function, which has "
        "no infinite-width rule. Use a module from `flax_tangents.nn` (for "
        "example `ftn.Relu()` instead of `nn.relu`), or give your module a "
        "rule with `ft.register_kernel_rule`. (A constant factor given as a "
        "JAX array goes on the right: `kernel * c`.)")

  __array__ = __jax_array__
  # NumPy scalars defer to the Kernel's own operators (`np.float32(2) * k`).
  __array_ufunc__ = None

  def __getattr__(self, name: str) -> Any:
    # Only reached for attributes a Kernel lacks: say why for array ones.
    if name in _ARRAY_ATTRIBUTES:
      raise AttributeError(
          f"A Kernel has no `{name}`: it is not an array but the covariances "
          "of one (its activations' shape is `shape1`/`shape2`). A module "
          "that uses `x.{name}` needs a kernel rule "
          "(`ft.register_kernel_rule`) or layers from `flax_tangents.nn`.")
    raise AttributeError(
        f"'{type(self).__name__}' object has no attribute '{name}'")

  def __matmul__(self, other: Any):
    raise TypeError(
        "`@` on a Kernel has no infinite-width meaning: a product with a "
        "fixed matrix over the channel axis changes the width. Use "
        "`ftn.Dense` for a random linear layer, or `Kernel.dot_general` "
        "to contract spatial axes with a fixed array.")

  __rmatmul__ = __matmul__


kernel_tree.register(Kernel)
