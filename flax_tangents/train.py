"""Linearized training with optax: a network, its linearization, the NTK.

`fit` trains a Flax network and its linearization around the initial
parameters (`ft.linearize`) side by side, from the same variables, with any
`optax.GradientTransformation`, full batch or minibatches, on the MSE or the
cross-entropy. At chosen steps it records losses, accuracies, outputs and the
function-space distance between the two, and predicts the same quantities at
the matching gradient-flow times `t = step * learning_rate` with `ft.predict`,
from the empirical NTK at initialization and, for models with an exact
infinite-width limit (built from `flax_tangents.nn`, or stock Flax layers that
`ft.kernel_fn` lifts), from the analytic infinite-width NTK. Training state is
checkpointed with orbax; a stopped run resumes where it left off.

>>> import jax, jax.numpy as jnp, optax
>>> import flax.linen as nn
>>> import flax_tangents as ft
>>> model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(1)])
>>> x = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
>>> y = jnp.sin(x[:, :1])
>>> variables = model.init(jax.random.PRNGKey(1), x)
>>> result = ft.train.fit(model.apply, variables, optax.sgd(0.5), x, y,
...                       steps=20, record_steps=10, learning_rate=0.5)
>>> sorted(result.final_gaps())[:2]
['linearized-ntk_analytic/fx_train', 'linearized-ntk_analytic/train_loss']
"""

from flax_tangents._src.train.fit import fit
from flax_tangents._src.train.results import Curves
from flax_tangents._src.train.results import TrainResult
from flax_tangents._src.train.results import accuracy
from flax_tangents._src.train.results import cross_entropy_loss
from flax_tangents._src.train.results import mse_loss

__all__ = (
    "Curves",
    "TrainResult",
    "accuracy",
    "cross_entropy_loss",
    "fit",
    "mse_loss",
)
