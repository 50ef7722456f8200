"""Placeholder: replaced by the empirical-kernel work (issue 3)."""


def _todo(*args, **kwargs):
  raise NotImplementedError("empirical kernels are not implemented yet")


empirical_ntk_fn = empirical_nngp_fn = empirical_kernel_fn = _todo
empirical_ntk_vp_fn = _todo
