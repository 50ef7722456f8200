"""Mixtures: activations whose channels are Gaussian per part, not alike.

After `Flatten` of activations with spatial axes, a unit of the output is a
(location, channel) pair: each unit is Gaussian (if the input was), but
locations have different variances. After `FanInConcat` along channels,
units of different branches have different kernels. A nonlinearity applied
to such units acts on each part with that part's kernel; applying it to the
channel-averaged kernel (what an affine layer needs) is wrong.

So `Flatten` and channel concatenation return a kernel whose fields are the
channel average (exact for the next affine layer, which sums over all
units) and which keeps its parts: the kernel before flattening, or the
branch kernels. Operations that act on every unit alike
(`mixture_units.map_units`:
nonlinearities, scalar arithmetic, batch slicing) apply to each part and
re-average, exactly; any other rule sees only the average and drops the
parts (`Kernel.replace` does not copy them), and the result is marked
non-Gaussian, so a later nonlinearity refuses it instead of guessing.

This is what `is_gaussian=True` means throughout: the channels are i.i.d.
centred Gaussian with the kernel's covariances. The audit of every rule:

- sets it True: affine layers (`affine_kernel`: Dense, Conv, ConvLocal,
  ConvTranspose, stock nn.Dense/nn.Conv) and attention (its output
  projection is a fresh affine layer), whatever their input;
- keeps it: layers that map every channel by the same linear map over
  locations or rescale it deterministically (pooling, global pooling,
  `Index`, `ImageResize`, `Aggregate`, `Identity`, `ftn.LayerNorm`,
  scalar `Kernel * c`), and `FanInSum` of Gaussian, uncorrelated branches;
- sets it False: nonlinearities, dropout, `FanInProd`, a constant shift
  `Kernel + c`, stock `nn.LayerNorm` with a scale, raw inputs, and
  `Flatten`/channel `FanInConcat` (mixtures, whose parts keep theirs).
"""

from __future__ import annotations

from typing import Optional

from flax_tangents._src.analytic.kernel import Kernel

__all__ = ["CONCAT", "FLATTEN", "identically_distributed",
           "is_centred_mixture", "is_mixed", "mark_mixed", "parts_of",
           "with_parts"]

FLATTEN = "flatten"
CONCAT = "concat"


def parts_of(kernel: Kernel) -> Optional[tuple[Kernel, ...]]:
  """The parts of a mixture, or `None` for identically distributed units."""
  return kernel._parts  # pylint: disable=protected-access


def is_mixed(kernel: Kernel) -> bool:
  """Whether channels may differ in distribution (a mixture, kept or not)."""
  return kernel._parts is not None or kernel._mixed  # pylint: disable=protected-access


def is_centred_mixture(kernel: Kernel) -> bool:
  """Whether `kernel` is a mixture of centred Gaussian parts."""
  parts = parts_of(kernel)
  return parts is not None and all(
      p.is_gaussian or is_centred_mixture(p) for p in parts)


def identically_distributed(kernel: Kernel) -> bool:
  """Whether all channels share the kernel's distribution.

  False for raw inputs (deterministic channel values) and for mixtures.
  """
  return not kernel.is_input and not is_mixed(kernel)


def mark_mixed(kernel: Kernel) -> Kernel:
  """`kernel`, marked as having channels of different distributions."""
  object.__setattr__(kernel, "_mixed", True)
  return kernel


def with_parts(average: Kernel, parts: tuple[Kernel, ...],
               assembly: str) -> Kernel:
  """`average` (the channel-averaged kernel) remembering its `parts`."""
  out = average.replace(is_gaussian=False)
  object.__setattr__(out, "_parts", tuple(parts))
  object.__setattr__(out, "_assembly", assembly)
  return out
