"""Predictions of wide networks: closed forms and ODEs in function space.

Neural Tangents' `predict` module, on current JAX. Given kernels (analytic
from `ft.kernel_fn`, or empirical from `ft.empirical_ntk_fn`), these predict:

- `gradient_descent_mse`: the outputs of one linearized / infinitely wide
  network trained by gradient flow on the MSE, at any (or infinite) time;
- `gradient_descent`: the same for any loss, with optional momentum (ODE);
- `gp_inference`: exact NNGP / NTK / NTKGP Gaussian-process inference;
- `gradient_descent_mse_ensemble`: the mean and covariance of an infinite
  ensemble of infinitely wide networks at any training time;
- `max_learning_rate`: the largest stable learning rate on the MSE.

Time `t` is in steps (`absolute_time = learning_rate * t`) and the MSE is
`||f(x_train) - y_train||^2 / (2 * y_train.size)`, as in Neural Tangents.
Kernels are symmetrized and factorized in float64, also when JAX's x64 mode
is off (then for concrete inputs only; outputs keep the inputs' dtype), as
NumPy does for float32 arrays. A kernel that is not positive semi-definite
raises `NotPSDError`, which names the matrix, its smallest eigenvalue and a
`diag_reg` that fixes it; a float32 kernel whose rounding alone can move the
solution by 10% or more (condition number times float32's epsilon) gives an
`IllConditionedWarning` with the fixes. Negative or non-finite times,
regularizers and learning rates are refused.

>>> import jax.numpy as jnp
>>> import flax_tangents as ft
>>> k = jnp.array([[1., .5], [.5, 1.]])
>>> fx = ft.predict.gradient_descent_mse(k, jnp.ones((2, 1)))(None, 0.)
>>> fx.shape
(2, 1)
"""

from flax_tangents._src.predict.checks import IllConditionedWarning
from flax_tangents._src.predict.conventions import Gaussian
from flax_tangents._src.predict.ensemble import gradient_descent_mse_ensemble
from flax_tangents._src.predict.gradient_descent import PredictFn
from flax_tangents._src.predict.gradient_descent import gradient_descent_mse
from flax_tangents._src.predict.gradient_descent import max_learning_rate
from flax_tangents._src.predict.inference import gp_inference
from flax_tangents._src.predict.krylov import ConvergenceError
from flax_tangents._src.predict.linalg import NotPSDError
from flax_tangents._src.predict.ode import ODEState
from flax_tangents._src.predict.ode import PredictFnODE
from flax_tangents._src.predict.ode import gradient_descent
from flax_tangents._src.predict.solvers import CG
from flax_tangents._src.predict.solvers import DENSE_MAX_N
from flax_tangents._src.predict.solvers import SolveInfo
from flax_tangents._src.scale.tiled_kernel import TiledKernel

__all__ = (
    "CG",
    "ConvergenceError",
    "DENSE_MAX_N",
    "Gaussian",
    "IllConditionedWarning",
    "NotPSDError",
    "ODEState",
    "PredictFn",
    "PredictFnODE",
    "SolveInfo",
    "TiledKernel",
    "gp_inference",
    "gradient_descent",
    "gradient_descent_mse",
    "gradient_descent_mse_ensemble",
    "max_learning_rate",
)
