"""A zoo of small, real Flax models for empirical-kernel tests.

Shared by the tests of every empirical NTK implementation. Each case is
built by `make_case(name, dtype)` and unpacks as
`f, variables, x1, x2, kwargs = make_case(name)`, where `f(variables, x,
**kwargs)` is the model's `apply` (or, for NNX, a pure function made with
`nnx.split`/`nnx.merge`). Shapes are tiny so that full Jacobians are cheap.

Module constants describe the cases:
  CASES: every case name.
  VMAP_SAFE: cases whose outputs for one example depend only on that example
    (batch axis 0 in and out), so `vmap_axes=0` is valid. BatchNorm in
    training mode and dropout (one mask drawn for the whole batch) are not.
"""

from typing import Any, NamedTuple
import zlib

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["CASES", "VMAP_SAFE", "ZooCase", "make_case"]


class ZooCase(NamedTuple):
  f: Any
  variables: Any
  x1: Any
  x2: Any
  kwargs: dict


class MLP(nn.Module):
  """Dense layers with a different activation after each."""

  @nn.compact
  def __call__(self, x):
    for width, act in ((5, nn.relu), (4, jnp.tanh), (4, nn.gelu),
                       (3, nn.sigmoid)):
      x = act(nn.Dense(width)(x))
    return nn.Dense(2)(x)


class CNN(nn.Module):
  """Conv + BatchNorm + ReLU, twice; keeps spatial outputs (N, 3, 3, 2)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(3, (3, 3), padding="VALID")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    x = nn.Conv(2, (1, 1))(x)
    return x


class ResNet(nn.Module):
  """A stem conv, one residual block with LayerNorm, pooling and a head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), padding="SAME")(x)
    y = nn.Conv(3, (3, 3), padding="SAME")(nn.relu(x))
    y = nn.Conv(3, (3, 3), padding="SAME")(nn.relu(y))
    x = nn.LayerNorm()(x + y)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(2)(x)


class Transformer(nn.Module):
  """Embedding, one self-attention block and a per-token head: (N, L, 3)."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(num_embeddings=7, features=4)(tokens)
    y = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(x)
    x = nn.LayerNorm()(x + y)
    return nn.Dense(3)(nn.gelu(x))


class DropoutNet(nn.Module):
  """Dropout driven by `rngs={'dropout': key}` between two Dense layers."""

  @nn.compact
  def __call__(self, x, deterministic: bool = False):
    x = nn.relu(nn.Dense(6)(x))
    x = nn.Dropout(rate=0.5)(x, deterministic=deterministic)
    return nn.Dense(2)(x)


class NnxMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(4, 5, rngs=rngs)
    self.out = nnx.Linear(5, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.tanh(self.hidden(x)))


CASES = ("mlp", "cnn_batchnorm", "cnn_batchnorm_train", "resnet",
         "transformer", "dropout", "nnx")
VMAP_SAFE = ("mlp", "cnn_batchnorm", "resnet", "transformer", "nnx")


def _cast(tree, dtype):
  """Casts floating leaves to `dtype`; integers and keys stay as they are."""

  def cast(leaf):
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      return jnp.asarray(leaf, dtype)
    return leaf

  return jax.tree.map(cast, tree)


def _perturb_batch_stats(variables, key):
  """Non-trivial running statistics, so that held-fixed state matters."""
  stats = variables["batch_stats"]
  k1, k2 = jax.random.split(key)
  stats = jax.tree.map(lambda s: s, stats)
  bn = stats["BatchNorm_0"]
  bn = {"mean": 0.3 * jax.random.normal(k1, bn["mean"].shape),
        "var": 0.5 + jax.random.uniform(k2, bn["var"].shape)}
  return {**variables, "batch_stats": {**stats, "BatchNorm_0": bn}}


def make_case(name: str, dtype=jnp.float64) -> ZooCase:
  """Builds zoo case `name` with floating inputs and variables in `dtype`.

  Args:
    name: one of `CASES`.
    dtype: floating dtype of parameters, statistics and inputs.

  Returns:
    `ZooCase(f, variables, x1, x2, kwargs)`: `x1` has 3 examples, `x2` has 2,
    and `f(variables, x, **kwargs)` evaluates the model.
  """
  key_init, key_x1, key_x2, key_extra = jax.random.split(
      jax.random.PRNGKey(zlib.crc32(name.encode())), 4)
  kwargs = {}
  if name == "mlp":
    model = MLP()
    x1 = jax.random.normal(key_x1, (3, 4))
    x2 = jax.random.normal(key_x2, (2, 4))
  elif name in ("cnn_batchnorm", "cnn_batchnorm_train"):
    model = CNN()
    x1 = jax.random.normal(key_x1, (3, 5, 5, 2))
    x2 = jax.random.normal(key_x2, (2, 5, 5, 2))
    if name == "cnn_batchnorm_train":
      # Batch statistics of the batch itself; Flax returns (out, state).
      kwargs = {"train": True, "mutable": ["batch_stats"]}
    else:
      kwargs = {"train": False}
  elif name == "resnet":
    model = ResNet()
    x1 = jax.random.normal(key_x1, (3, 4, 4, 2))
    x2 = jax.random.normal(key_x2, (2, 4, 4, 2))
  elif name == "transformer":
    model = Transformer()
    x1 = jax.random.randint(key_x1, (3, 4), 0, 7)
    x2 = jax.random.randint(key_x2, (2, 4), 0, 7)
  elif name == "dropout":
    model = DropoutNet()
    x1 = jax.random.normal(key_x1, (3, 4))
    x2 = jax.random.normal(key_x2, (2, 4))
    kwargs = {"rngs": {"dropout": jax.random.PRNGKey(7)}}
  elif name == "nnx":
    module = NnxMLP(nnx.Rngs(0))
    # The two-line NNX recipe: split once, merge inside a pure function.
    graphdef, params = nnx.split(module)
    f = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
    x1 = jax.random.normal(key_x1, (3, 4))
    x2 = jax.random.normal(key_x2, (2, 4))
    return ZooCase(f, _cast(params, dtype), _cast(x1, dtype),
                   _cast(x2, dtype), kwargs)
  else:
    raise ValueError(f"unknown zoo case {name!r}; choose from {CASES}.")

  init_kwargs = {k: v for k, v in kwargs.items() if k not in ("mutable",
                                                              "rngs")}
  variables = model.init({"params": key_init, "dropout": key_init}, x1,
                         **init_kwargs)
  variables = jax.tree.map(lambda v: v, dict(variables))
  if "batch_stats" in variables:
    variables = _perturb_batch_stats(variables, key_extra)
  return ZooCase(model.apply, _cast(variables, dtype), _cast(x1, dtype),
                 _cast(x2, dtype), kwargs)
