"""STRUCTURED_DERIVATIVES: a jaxpr interpreter for fast empirical NTKs.

Novak, Sohl-Dickstein, Schoenholz, "Fast Finite Width Neural Tangent
Kernel" (ICML 2022), on public JAX APIs (`jax.make_jaxpr`, `jax.extend`).

Modules, one concept each:
  ir: the flat, inlined program a jaxpr becomes.
  structure: labels and factors describing a Jacobian's structure.
  rules_*: structure rules per primitive family; rules: the registry.
  planner: which chain of rules each parameter follows, where it stops.
  contraction: one parameter's NTK term as an einsum.
  interpreter: `ntk`, the entry point.
"""

from flax_tangents._src.empirical.structured.interpreter import ntk

__all__ = ["ntk"]
