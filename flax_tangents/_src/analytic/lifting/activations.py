"""The kernel of an elementwise function of one Gaussian pre-activation.

An expression (see `expressions`) is first matched against the closed forms
the library already has, through its normal form:

- polynomials (`Polynomial`), `a min(x, 0) + b max(x, 0)` (ReLU, leaky ReLU,
  `abs`: `ABRelu`), `max(x, 0)**k` (`RectifiedMonomial`), `a erf(b x) + c`
  (`Erf`), `a x (1 + erf(b x))` (the exact GELU, scaled), `a sin(b x + c)`
  and cosines (`Sin`), `a exp(b x)` (`Exp`), `a exp(b x**2)` (`Gaussian`),
  `a sign(x)` (`Sign`).

Any other function that is analytic on the whole line (`tanh`, `sigmoid`,
`silu`, `softplus`, the tanh approximation of GELU, compositions of these)
gets its kernel by Gauss-Hermite quadrature on `QUADRATURE_DEGREE` nodes per
dimension. Where a closed form is close to it (`tanh(c x)` and the logistic
sigmoid: a fitted mixture of erfs; `x (1 + tanh(c x + ...))`, i.e. the tanh
GELU and SiLU: the GELU), the quadrature only corrects that closed form (a
control variate), which makes it far more accurate.

Stated accuracy (relative, measured against adaptive quadrature for
`tanh`, `sigmoid`, `silu`, `softplus` and the tanh GELU): below 1e-8 for
pre-activation variances up to 1, below ~2e-6 for the NNGP and ~1e-4 for the
NTK factor `E[phi' phi']` at variances 3 to 30. At run time (also under
`jit`) the rule is compared with a coarser one; a `LiftedQuadratureWarning`
reports an estimated error above `QUADRATURE_TOLERANCE`.

Functions with kinks or poles that match no closed form are refused:
quadrature converges too slowly on them to give a number worth publishing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional
import warnings

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import gaussian_integrals as gi
from flax_tangents._src.analytic import gaussian_integrals_exp as gi_exp
from flax_tangents._src.analytic import gaussian_integrals_poly as gi_poly
from flax_tangents._src.analytic.lifting import expressions as ex
from flax_tangents._src.analytic.lifting import normal_form as nf
from flax_tangents._src.analytic.lifting import quadrature

__all__ = ["Activation", "QUADRATURE_DEGREE", "recognize"]

GaussianExpectation = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# Nodes per dimension of the quadrature for functions without a closed form,
# and of the coarser rule whose difference estimates its error.
QUADRATURE_DEGREE = 64
_COARSE_DEGREE = 48
# Estimated relative errors above this are reported (`LiftedQuadratureWarning`).
QUADRATURE_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class Activation:
  """A recognized nonlinearity.

  Attributes:
    name: what it was recognized as, e.g. `'ABRelu(a=0.01, b=1.0)'`.
    nngp_fn: `E[phi(u) phi(v)]` of `(cov12, var1, var2)`.
    d_nngp_fn: `E[phi'(u) phi'(v)]`.
    exact: whether both are closed forms (otherwise quadrature).
  """
  name: str
  nngp_fn: GaussianExpectation
  d_nngp_fn: GaussianExpectation
  exact: bool = True


def _scaled(fns: tuple[GaussianExpectation, GaussianExpectation],
            scale: float) -> tuple[GaussianExpectation, GaussianExpectation]:
  nngp_fn, d_nngp_fn = fns
  return (lambda c, v1, v2: scale**2 * nngp_fn(c, v1, v2),
          lambda c, v1, v2: scale**2 * d_nngp_fn(c, v1, v2))


def _shifted(nngp_fn: GaussianExpectation, shift: float,
             mean_per_std: float) -> GaussianExpectation:
  """`E[(phi(u) + s)(phi(v) + s)]` given `E[phi(u) phi(v)]`, for `phi` with
  `E[phi(u)] = mean_per_std * sqrt(var(u))` (positively homogeneous)."""

  def fn(c, v1, v2):
    means = mean_per_std * (jnp.sqrt(v1) + jnp.sqrt(v2))
    return nngp_fn(c, v1, v2) + shift * means + shift**2

  return fn


def _gelu_fns(amplitude: float, k: float):
  """`amplitude * gelu(k x)`: the exact GELU kernel at scaled variances."""
  s = k * k
  return (lambda c, v1, v2: amplitude**2 * gi.gelu_nngp(s * c, s * v1, s * v2),
          lambda c, v1, v2: amplitude**2 * s * gi.gelu_d_nngp(
              s * c, s * v1, s * v2))


def _single_term(key: tuple[Any, ...], scale: float
                 ) -> Optional[Activation]:
  """The closed form of `scale * term`, for a one-term form, or `None`."""
  kind = key[0]
  if kind == "relu":
    fns = _scaled((functools.partial(gi_poly.rectified_monomial_nngp,
                                     degree=key[1]),
                   functools.partial(gi_poly.rectified_monomial_d_nngp,
                                     degree=key[1])), scale)
    return Activation(f"{scale} * RectifiedMonomial(degree={key[1]})",
                      *fns)
  if kind == "sin":
    params = dict(a=scale, b=key[1], c=key[2])
    return Activation(f"Sin({params})",
                      functools.partial(gi_exp.sin_nngp, **params),
                      functools.partial(gi_exp.sin_d_nngp, **params))
  if kind == "exp":
    params = dict(a=scale, b=key[1])
    return Activation(f"Exp({params})",
                      functools.partial(gi_exp.exp_nngp, **params),
                      functools.partial(gi_exp.exp_d_nngp, **params))
  if kind == "gauss":
    params = dict(a=scale, b=key[1])
    return Activation(f"Gaussian({params})",
                      functools.partial(gi_exp.gaussian_nngp, **params),
                      functools.partial(gi_exp.gaussian_d_nngp, **params))
  if kind == "sign":
    return Activation(f"{scale} * Sign()",
                      *_scaled((gi.sign_nngp, gi.sign_d_nngp), scale))
  return None


def _closed_form(form: nf.Form) -> Optional[Activation]:
  keys = set(form)
  kinds = {k[0] for k in keys}
  coef = lambda key: form.get(key, 0.0)
  if kinds <= {"1", "x"}:
    poly = nf.polynomial_of(form)
    assert poly is not None, form
    fns = (functools.partial(gi_poly.polynomial_nngp, coef=poly),
           functools.partial(gi_poly.polynomial_d_nngp, coef=poly))
    return Activation(f"Polynomial(coef={poly})", *fns)
  if keys <= {("x", 1), ("relu", 1), ("1",)}:
    a = coef(("x", 1))
    b = a + coef(("relu", 1))
    shift = coef(("1",))
    nngp_fn = functools.partial(gi.abrelu_nngp, a=a, b=b)
    if shift:
      nngp_fn = _shifted(nngp_fn, shift, (b - a) / math.sqrt(2 * math.pi))
    return Activation(f"ABRelu(a={a}, b={b}) + {shift}", nngp_fn,
                      functools.partial(gi.abrelu_d_nngp, a=a, b=b))
  if len(keys) == 1:
    (key,), (scale,) = keys, form.values()
    single = _single_term(key, scale)
    if single is not None:
      return single
  erf_keys = [k for k in keys if k[0] == "erf"]
  if len(erf_keys) == 1 and keys <= {erf_keys[0], ("1",)}:
    params = dict(a=coef(erf_keys[0]), b=erf_keys[0][1], c=coef(("1",)))
    return Activation(f"Erf({params})",
                      functools.partial(gi.erf_nngp, **params),
                      functools.partial(gi.erf_d_nngp, **params))
  x_erf = [k for k in keys if k[0] == "x_erf"]
  if (len(x_erf) == 1 and keys == {("x", 1), x_erf[0]} and
      coef(("x", 1)) == coef(x_erf[0])):
    # a x (1 + erf(b x)) = 2 a x Phi(k x) = (2 a / k) gelu(k x), k = sqrt2 b.
    k = math.sqrt(2) * x_erf[0][1]
    amplitude = 2 * coef(("x", 1)) / k
    return Activation(f"{amplitude} * Gelu()(({k}) * x)",
                      *_gelu_fns(amplitude, k))
  return None


# tanh(x) ~ sum_k A_k erf(B_k x), fitted once (max error 1.1e-5, weights
# summing to 1 so that the tails agree): a control variate for tanh.
_TANH_ERF_WEIGHTS = (0.36983906931117727, 0.10975667490332627,
                     0.059878171682986876, 0.4605260841025095)
_TANH_ERF_SLOPES = (0.6696701070083833, 1.4412193293674531,
                    0.45322863120796697, 0.98400556069585)


def _erf_mixture(a: float, slope: float, shift: float):
  """`a sum_k A_k erf(B_k slope x) + shift`, close to `a tanh(slope x) +
  shift`, and its kernels: the erf kernel at rescaled covariances gives
  every cross term `E[erf(b_j u) erf(b_k v)]`."""
  slopes = [b * slope for b in _TANH_ERF_SLOPES]
  pairs = [(a * a * wj * wk, bj, bk)
           for wj, bj in zip(_TANH_ERF_WEIGHTS, slopes)
           for wk, bk in zip(_TANH_ERF_WEIGHTS, slopes)]

  def phi(x):
    return a * sum(w * jax.scipy.special.erf(b * x)
                   for w, b in zip(_TANH_ERF_WEIGHTS, slopes)) + shift

  def nngp_fn(c, v1, v2):
    return sum(w * gi.erf_nngp(bj * bk * c, bj * bj * v1, bk * bk * v2,
                               a=1.0, b=1.0, c=0.0)
               for w, bj, bk in pairs) + shift**2

  def d_nngp_fn(c, v1, v2):
    return sum(w * bj * bk * gi.erf_d_nngp(
        bj * bk * c, bj * bj * v1, bk * bk * v2, a=1.0, b=1.0, c=0.0)
               for w, bj, bk in pairs)

  return phi, nngp_fn, d_nngp_fn


def _reference(form: nf.Form):
  """A closed form close to a smooth function, for a control variate.

  Returns `(phi, nngp_fn, d_nngp_fn)` or `None`. `a tanh(c x) + d` (and the
  logistic sigmoid, `(1 + tanh(x / 2)) / 2`) gets a fitted mixture of erfs;
  `tanh` of a polynomial gets the erf with the same slope at 0; and
  `a x (1 + tanh(c x + ...))` (the tanh GELU, SiLU) gets the GELU.
  """
  keys = set(form)
  tanh = [k for k in keys if k[0] == "tanh"]
  if len(tanh) == 1 and keys <= {tanh[0], ("1",)} and tanh[0][1] > 0:
    a, d = form[tanh[0]], form.get(("1",), 0.0)
    if len(tanh[0]) == 2:
      return _erf_mixture(a, tanh[0][1], d)
    b = math.sqrt(math.pi) / 2 * tanh[0][1]
    params = dict(a=a, b=b, c=d)
    return (lambda x: a * jax.scipy.special.erf(b * x) + d,
            functools.partial(gi.erf_nngp, **params),
            functools.partial(gi.erf_d_nngp, **params))
  x_tanh = [k for k in keys if k[0] == "x_tanh"]
  if (len(x_tanh) == 1 and keys == {("x", 1), x_tanh[0]} and
      form[("x", 1)] == form[x_tanh[0]] and x_tanh[0][1] > 0):
    k = math.sqrt(math.pi / 2) * x_tanh[0][1]
    amplitude = 2 * form[("x", 1)] / k
    return ((lambda x: amplitude * jax.nn.gelu(k * x, approximate=False)),
            *_gelu_fns(amplitude, k))
  return None


def _warn_if_inaccurate(name: str, estimate: jax.Array) -> None:
  """Warns (at run time, also under `jit`) when quadrature is inaccurate."""

  def warn(value):
    if float(value) > QUADRATURE_TOLERANCE:
      warnings.warn(
          f"The Gauss-Hermite quadrature of the lifted nonlinearity "
          f"{name} has an estimated relative error of {float(value):.1e} "
          f"(above {QUADRATURE_TOLERANCE:g}), typically because its "
          "pre-activations have a large variance. Replace the function by "
          "`ftn.ElementwiseNumerical(fn, deg)` with a larger `deg` (or a "
          "closed-form layer) for a more accurate kernel.",
          LiftedQuadratureWarning, stacklevel=2)

  jax.debug.callback(warn, estimate)


class LiftedQuadratureWarning(UserWarning):
  """A lifted nonlinearity's kernel is less accurate than stated."""


def _with_error_estimate(name: str, fn: Callable[[int], GaussianExpectation]
                         ) -> GaussianExpectation:
  """`fn(deg)` at `QUADRATURE_DEGREE`, compared with a coarser rule."""

  def expectation(cov12, var1, var2):
    fine = fn(QUADRATURE_DEGREE)(cov12, var1, var2)
    coarse = fn(_COARSE_DEGREE)(cov12, var1, var2)
    scale = jnp.maximum(jnp.max(jnp.abs(fine)), jnp.finfo(fine.dtype).tiny)
    _warn_if_inaccurate(name, jnp.max(jnp.abs(fine - coarse)) / scale)
    return fine

  return expectation


def _numerical(expr: ex.Expr, form: Optional[nf.Form],
               description: str) -> Activation:
  phi = functools.partial(ex.evaluate, expr)
  d_phi = jnp.vectorize(jax.grad(lambda x: ex.evaluate(expr, x)))
  reference = None if form is None else _reference(form)
  name = f"{description} (quadrature)"

  if reference is None:
    def plain(f):
      return lambda deg: functools.partial(quadrature.expectation, f, f,
                                           deg=deg)
    return Activation(name, _with_error_estimate(name, plain(phi)),
                      _with_error_estimate(name, plain(d_phi)), exact=False)
  r, r_nngp, r_d_nngp = reference
  d_r = jnp.vectorize(jax.grad(r))

  def corrected(f, g, closed):
    # E[f f] = closed E[g g] + quadrature of (E[f f] - E[g g]): the two
    # quadratures share nodes, so most of their error cancels.
    return lambda deg: lambda c, v1, v2: closed(c, v1, v2) + (
        quadrature.difference(f, g, c, v1, v2, deg))

  return Activation(
      name, _with_error_estimate(name, corrected(phi, r, r_nngp)),
      _with_error_estimate(name, corrected(d_phi, d_r, r_d_nngp)),
      exact=False)


def recognize(expr: ex.Expr, description: str = "phi"
              ) -> Optional[Activation]:
  """The kernel functions of `phi(x) = expr`, or `None` if it has none here.

  Args:
    expr: the function.
    description: what the user wrote (`'tanh'`), for messages.

  Returns:
    An `Activation` (closed form, or quadrature for smooth functions), or
    `None` for functions with kinks or poles that match no closed form.
  """
  form = nf.normal_form(expr)
  if form is not None:
    found = _closed_form(form)
    if found is not None:
      return found
  if ex.is_smooth(expr):
    return _numerical(expr, form, description)
  return None
