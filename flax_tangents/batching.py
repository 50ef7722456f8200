"""Placeholder: replaced by the kernels-at-scale work (issue 6)."""


def batch(*args, **kwargs):
  raise NotImplementedError("ft.batch is not implemented yet")
