"""Stock `nn.MultiHeadDotProductAttention`: refused, with the reason.

Flax's attention scales logits by `1 / sqrt(head_dim)`. As the head
dimension grows with a fixed number of heads, the logits `q . k / sqrt(d)`
converge to Gaussian random variables rather than to constants, so the
output is a softmax-weighted mixture with random weights: not a Gaussian
process, and without a closed-form kernel (Hron et al., 2020, "Infinite
attention"). A Gaussian limit exists with `1 / d` scaling, or with
infinitely many heads, which is what `ftn.GlobalSelfAttention` implements.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from flax_tangents._src.analytic.errors import KernelRuleError
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.lifting import paths
from flax_tangents._src.analytic.registry import register_kernel_rule

__all__: list[str] = []


def _stock_attention_rule(module: nn.MultiHeadDotProductAttention,
                          *args: Any, **kwargs: Any) -> Kernel:
  del args, kwargs
  path = paths.path_string(module)
  raise KernelRuleError(
      f"stock nn.{type(module).__name__} (module '{path}', num_heads="
      f"{module.num_heads}) has no infinite-width kernel: with Flax's "
      "1/sqrt(head_dim) logit scaling and a fixed number of heads, the "
      "attention logits stay random in the limit (Gaussian, not constant), "
      "so the output is not a Gaussian process (Hron et al. 2020, "
      "'Infinite attention'). Use `ftn.GlobalSelfAttention`, whose limit "
      "uses 1/head_dim scaling (linear_scaling=True) or infinitely many "
      "heads, as Neural Tangents does.")


register_kernel_rule(nn.MultiHeadDotProductAttention, _stock_attention_rule)
