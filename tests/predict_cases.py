"""Shared pieces of the `ft.predict` tests: a closeness check, closed-form
kernels of a small ReLU network, and the MSE and cross-entropy losses."""

import collections

import jax
import jax.numpy as jnp
import numpy as np

NngpNtk = collections.namedtuple("NngpNtk", "nngp ntk")


def assert_close(actual, expected, rtol=1e-6):
  """Relative agreement, with an absolute floor scaled to the array."""
  expected = np.asarray(expected)
  atol = rtol * max(float(np.max(np.abs(expected))), 1e-300)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol,
                             atol=atol)


def relu_network_kernel_fn(x1, x2=None, get=None):
  """Closed-form kernels of Dense(64, 1.4, 0.1) - Relu - Dense(3, 1.1, 0.05).

  NTK parameterization. With q = W1^2 x.x' / d + b1^2 the first layer's
  covariance (its NTK equals it: the inputs carry no NTK), the ReLU gives the
  arc-cosine kernel of degree 1 and its derivative's degree-0 kernel,
    E[relu relu'] = sqrt(q11 q22) (sin t + (pi - t) cos t) / (2 pi),
    E[step step'] = (pi - t) / (2 pi),   with cos t = q12 / sqrt(q11 q22),
  and the readout layer gives nngp = W2^2 E[relu relu'] + b2^2 and
  ntk = W2^2 (E[relu relu'] + q12 E[step step']) + b2^2.
  """
  same = x2 is None
  x2 = x1 if same else x2

  def first_layer(a, b):
    return 1.4**2 * jnp.sum(a * b, axis=-1) / a.shape[-1] + 0.1**2

  q12 = first_layer(x1[:, None, :], x2[None, :, :])
  q11, q22 = first_layer(x1, x1), first_layer(x2, x2)
  norm = jnp.sqrt(q11[:, None] * q22[None, :])
  cos = jnp.clip(q12 / norm, -1., 1.)
  angle = jnp.arccos(cos)
  if same:  # exactly zero on the diagonal, where rounding would leave ~1e-8
    angle = angle * (1 - jnp.eye(angle.shape[0], dtype=angle.dtype))
  relu_cov = norm * (jnp.sin(angle) + (jnp.pi - angle) * cos) / (2 * jnp.pi)
  step_cov = (jnp.pi - angle) / (2 * jnp.pi)
  kernels = {"nngp": 1.1**2 * relu_cov + 0.05**2,
             "ntk": 1.1**2 * (relu_cov + q12 * step_cov) + 0.05**2}
  if isinstance(get, str):
    return kernels[get]
  get = ("nngp", "ntk") if get is None else tuple(get)
  return collections.namedtuple("Kernels", get)(*(kernels[g] for g in get))


def cross_entropy(fx, y):
  """Mean over examples of the softmax cross-entropy over the output axis."""
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(fx) * y, axis=-1))


def mse(fx, y):
  """Half the mean squared error, NT's loss for `gradient_descent_mse`."""
  return 0.5 * jnp.mean((fx - y)**2)
