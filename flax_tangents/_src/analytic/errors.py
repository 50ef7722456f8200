"""Errors raised while computing analytic kernels."""

__all__ = ["KernelRuleError", "PlainFunctionError"]


class KernelRuleError(TypeError):
  """A module or function met by a `Kernel` has no infinite-width rule.

  The message names the module path, its type, and how to fix it: use the
  matching layer from `flax_tangents.nn`, or register a rule with
  `ft.register_kernel_rule` / `@ft.kernel_rule`.
  """


class PlainFunctionError(KernelRuleError):
  """A `Kernel` reached a plain JAX function (e.g. `nn.relu`).

  Raised by `Kernel.__jax_array__`; `ft.kernel_fn` re-raises it as a
  `KernelRuleError` naming the module that made the call.
  """
