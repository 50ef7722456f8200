"""Every elementwise nonlinearity, checked the same way (rows of
`activation_cases.CASES`).

1. Monte Carlo: finite networks from `model.init` converge to
   `ft.kernel_fn`'s NNGP and NTK;
2. float32 inputs give float32 kernels that agree with float64;
3. the errors for non-Gaussian inputs and invalid arguments.
Integrals of the finite activation are in `test_activations_quadrature.py`,
closed forms in `test_activations_closed_form.py`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from activation_cases import CASES
from activation_cases import Case
from activation_cases import MC_READOUT
from activation_cases import mc_inputs
from activation_cases import mc_network
from testing import DtypeCase
from testing import LayerRuleTest
from testing import RaisesCase
from testing import assert_mc_close

# --- 1. Monte Carlo convergence of finite networks -------------------------

MC_NETWORKS = 32
MC_STANDARD_ERRORS = 6.0


@functools.lru_cache(maxsize=None)
def _mc_parameters(with_bias: bool):
  """Parameters of `MC_NETWORKS` networks, drawn by `model.init`.

  Activations have no parameters, so every case's network has the same
  parameter tree: it is drawn once (one compilation) and shared.
  """
  template = mc_network(Case("template", ftn.Relu(),
                             unit_variance=not with_bias))
  keys = jax.random.split(jax.random.key(1), MC_NETWORKS)
  init = lambda k: template.init(k, mc_inputs())["params"]
  return jax.jit(jax.vmap(init))(keys)


def _sample_kernels(network: nn.Module, params, x):
  """Per-network NNGP of the activation layer and NTK of the network."""

  def one_network(p):
    # The activation layer's own channels: `(1/width) sum_i a_i(x) a_i(x')`
    # is unbiased for its NNGP, as the pre-activations are exactly Gaussian.
    _, state = network.apply({"params": p}, x, capture_intermediates=True)
    features = state["intermediates"]["layers_1"]["__call__"][0]
    nngp = features @ features.T / features.shape[-1]
    # Empirical NTK: Jacobian contraction, traced over the two outputs.
    jacobian = jax.jacobian(lambda q: network.apply({"params": q}, x))(p)
    ntk = sum(
        jnp.einsum("ajp,bjp->ab", j.reshape(j.shape[:2] + (-1,)),
                   j.reshape(j.shape[:2] + (-1,)))
        for j in jax.tree.leaves(jacobian)) / 2
    return nngp, ntk

  return jax.jit(jax.vmap(one_network))(params)


def _assert_mc_close(samples, expected, max_relative_se):
  """`assert_mc_close` within `MC_STANDARD_ERRORS` standard errors.

  With one hidden layer both estimates are unbiased at any width (the
  pre-activations are exactly Gaussian given the input, and the readout
  weights are independent of them), so only sampling error remains. Its
  standard error is measured from the 32 networks, each averaging 1024
  channels (so per-network estimates are close to Gaussian); 6 standard
  errors bound a Student-t(31) deviation with probability ~1e-6 per entry,
  so the ~1000 entries checked here fail by chance with probability ~1e-3
  (and the seeds are fixed). A vacuity guard requires the standard error to
  be under `max_relative_se` of the kernel's scale.
  """
  assert_mc_close(samples, expected, n_se=MC_STANDARD_ERRORS, rel_floor=1e-10,
                  atol=1e-12, max_relative_se=max_relative_se)


@pytest.mark.parametrize("case", [c for c in CASES if c.reference],
                         ids=[c.name for c in CASES if c.reference])
def test_monte_carlo_converges_to_kernel(case):
  network = mc_network(case)
  x = mc_inputs()
  params = _mc_parameters(not case.unit_variance)
  assert (jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(network.init, jax.random.key(0), x)["params"]))
  nngp_samples, ntk_samples = _sample_kernels(network, params, x)
  nngp, ntk = ft.kernel_fn(network)(x, None, ("nngp", "ntk"))
  # The readout maps the activation layer's NNGP k to W^2 k + b^2.
  hidden_nngp = (nngp - MC_READOUT["b_std"]**2) / MC_READOUT["W_std"]**2
  _assert_mc_close(nngp_samples, hidden_nngp, case.mc_max_relative_se)
  _assert_mc_close(ntk_samples, ntk, case.mc_max_relative_se)


# --- 2. float32 and float64 ------------------------------------------------


def _dtype_case(case: Case) -> DtypeCase:
  # Eager: cheaper than compiling twice. The network's parameters are
  # float64 (param_dtype), so only the kernel's dtype follows the inputs.
  x2 = mc_inputs()[::-1] * 0.9 if not case.unit_variance else None
  return DtypeCase(case.name, mc_network(case), mc_inputs(), x2,
                   rtol32=2e-4, atol32=1e-5, jit=False, finite=False)


# --- 3. Errors ---------------------------------------------------------------


def _non_gaussian_cases(name, layer):
  """`layer` after a nonlinearity, and on raw inputs, is refused."""
  after_nonlinearity = nn.Sequential([ftn.Dense(4), ftn.Relu(), layer])
  return [RaisesCase(f"{name}_after_nonlinearity",
                     lambda: ft.kernel_fn(after_nonlinearity)(mc_inputs()),
                     "not Gaussian"),
          RaisesCase(f"{name}_on_raw_inputs",
                     lambda: ft.kernel_fn(layer)(mc_inputs()), "raw inputs")]


RAISES = [
    *_non_gaussian_cases("gelu", ftn.Gelu()),
    *_non_gaussian_cases("sin", ftn.Sin()),
    *_non_gaussian_cases("monomial", ftn.Monomial(2)),
    *_non_gaussian_cases("numerical", ftn.ElementwiseNumerical(jnp.tanh, 5)),
    RaisesCase("monomial_negative_degree", lambda: ftn.Monomial(degree=-1),
               "must be a"),
    RaisesCase("rectified_fractional_degree",
               lambda: ftn.RectifiedMonomial(degree=1.5), "must be a"),
    RaisesCase("hermite_negative_degree", lambda: ftn.Hermite(degree=-2),
               "must be a"),
    RaisesCase("numerical_zero_nodes",
               lambda: ftn.ElementwiseNumerical(jnp.tanh, deg=0), "must be a"),
]


class TestActivations(LayerRuleTest):
  dtype_cases = [_dtype_case(c) for c in CASES]
  raises_cases = RAISES
