"""Placeholder: replaced by the kernels-at-scale work (issue 6)."""


def monte_carlo_kernel_fn(*args, **kwargs):
  raise NotImplementedError("monte_carlo_kernel_fn is not implemented yet")
