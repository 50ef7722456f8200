"""The registry of structure rules, by primitive name."""

from flax_tangents._src.empirical.structured import rules_elementwise
from flax_tangents._src.empirical.structured import rules_indexing
from flax_tangents._src.empirical.structured import rules_linear
from flax_tangents._src.empirical.structured import rules_shape
from flax_tangents._src.empirical.structured import structure

__all__ = ["RULES"]

RULES: dict[str, structure.Rule] = {
    **rules_elementwise.RULES,
    **rules_shape.RULES,
    **rules_linear.RULES,
    **rules_indexing.RULES,
}
