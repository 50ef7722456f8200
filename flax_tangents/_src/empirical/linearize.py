"""Placeholder: replaced by the empirical-kernel work (issue 3)."""


def linearize(*args, **kwargs):
  raise NotImplementedError("linearize is not implemented yet")


taylor_expand = linearize
