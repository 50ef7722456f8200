"""Flax's own example models (`tests/flax_examples/`) as empirical-NTK cases.

`make_case(name, size, dtype)` builds one model with tiny (`size='tiny'`,
for tests) or benchmark (`size='bench'`) dimensions and returns a
`FlaxExample(f, variables, x1, x2, kwargs, trace_axes, per_example)`:
`f(variables, x, **kwargs)` evaluates the model (`x` is a tuple where the
model takes several inputs), `trace_axes` keeps the kernel small where the
outputs are wide, and `per_example` says whether each output example depends
only on its input example, so that `vmap_axes=0` is valid. The VAE and
seq2seq draw random numbers for the whole batch (the reparameterization
noise, the sampled tokens): evaluated one example at a time they draw other
numbers, so `vmap_axes=0` would change what `f` computes.
"""

from typing import Any, NamedTuple
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_examples import imagenet_models
from flax_examples import lm1b_models
from flax_examples import ppo_models
from flax_examples import seq2seq_models
from flax_examples import sst2_models
from flax_examples import vae_models
from flax_examples import wmt_models

__all__ = ["CASES", "FlaxExample", "make_case"]

CASES = ("resnet", "lm1b", "wmt", "sst2", "seq2seq", "vae", "ppo")


class FlaxExample(NamedTuple):
  f: Any
  variables: Any
  x1: Any
  x2: Any
  kwargs: dict
  trace_axes: tuple
  per_example: bool


# name -> size -> dimensions.
_SIZES = {
    "resnet": {"tiny": dict(n=(3, 2), hw=8, filters=2, stages=(1, 1)),
               "bench": dict(n=(8, 8), hw=32, filters=16, stages=(1, 1))},
    "lm1b": {"tiny": dict(n=(3, 2), length=5, emb=4, heads=2, layers=1,
                          mlp=6, vocab=7),
             "bench": dict(n=(8, 8), length=16, emb=64, heads=4, layers=2,
                           mlp=128, vocab=64)},
    "wmt": {"tiny": dict(n=(3, 2), length=4, emb=4, heads=2, layers=1, mlp=6,
                         vocab=7),
            "bench": dict(n=(8, 8), length=16, emb=64, heads=4, layers=2,
                          mlp=128, vocab=64)},
    "sst2": {"tiny": dict(n=(3, 2), length=5, emb=3, hidden=4, vocab=9),
             "bench": dict(n=(8, 8), length=16, emb=32, hidden=32,
                           vocab=256)},
    "seq2seq": {"tiny": dict(n=(3, 2), length=4, hidden=4, vocab=5),
                "bench": dict(n=(8, 8), length=10, hidden=64, vocab=16)},
    "vae": {"tiny": dict(n=(3, 2), latents=2, hidden=5, features=6),
            "bench": dict(n=(8, 8), latents=20, hidden=500, features=784)},
    "ppo": {"tiny": dict(n=(3, 2), hw=8, actions=3),
            "bench": dict(n=(8, 8), hw=84, actions=6)},
}


def _tokens(key, n, length, vocab):
  """Token ids in [1, vocab) with trailing padding (0) on some rows."""
  tokens = jax.random.randint(key, (n, length), 1, vocab)
  lengths = length - jnp.arange(n) % 2
  return jnp.where(jnp.arange(length)[None, :] < lengths[:, None], tokens, 0)


def _transformer_config(module, d, dtype, **extra):
  return module.TransformerConfig(
      vocab_size=d["vocab"], output_vocab_size=d["vocab"], dtype=dtype,
      emb_dim=d["emb"], num_heads=d["heads"], num_layers=d["layers"],
      qkv_dim=d["emb"], mlp_dim=d["mlp"], max_len=2 * d["length"],
      dropout_rate=0.0, attention_dropout_rate=0.0, deterministic=True,
      **extra)


def _build(name, d, dtype, keys):
  """`(model, apply_fn, (x1, x2), kwargs, trace_axes, per_example)`."""
  k1, k2 = keys
  n1, n2 = d["n"]
  if name == "resnet":
    model = imagenet_models.ResNet(
        stage_sizes=list(d["stages"]), block_cls=imagenet_models.ResNetBlock,
        num_classes=3, num_filters=d["filters"], dtype=dtype)
    xs = [jax.random.normal(k, (n, d["hw"], d["hw"], 3), dtype)
          for k, n in ((k1, n1), (k2, n2))]
    return model, model.apply, xs, {"train": False}, (), True
  if name == "lm1b":
    model = lm1b_models.TransformerLM(_transformer_config(lm1b_models, d,
                                                          dtype))
    xs = [_tokens(k, n, d["length"], d["vocab"])
          for k, n in ((k1, n1), (k2, n2))]
    return model, model.apply, xs, {}, (-1,), True
  if name == "wmt":
    # Shared embeddings, also used for the logits: one parameter, two uses.
    model = wmt_models.Transformer(_transformer_config(
        wmt_models, d, dtype, share_embeddings=True,
        logits_via_embedding=True))
    xs = []
    for k, n in ((k1, n1), (k2, n2)):
      ka, kb = jax.random.split(k)
      xs.append((_tokens(ka, n, d["length"], d["vocab"]),
                 _tokens(kb, n, d["length"], d["vocab"])))
    apply = lambda v, x, **kw: model.apply(v, x[0], x[1], **kw)  # noqa: E731
    return model, apply, xs, {}, (-1,), True
  if name == "sst2":
    model = sst2_models.TextClassifier(
        embedding_size=d["emb"], hidden_size=d["hidden"],
        vocab_size=d["vocab"], output_size=2, dropout_rate=0.0,
        word_dropout_rate=0.0)
    xs = []
    for k, n in ((k1, n1), (k2, n2)):
      lengths = d["length"] - jnp.arange(n) % 3
      xs.append((_tokens(k, n, d["length"], d["vocab"]), lengths))
    apply = lambda v, x, **kw: model.apply(v, x[0], x[1], **kw)  # noqa: E731
    return model, apply, xs, {"deterministic": True}, (), True
  if name == "seq2seq":
    model = seq2seq_models.Seq2seq(teacher_force=True,
                                   hidden_size=d["hidden"],
                                   vocab_size=d["vocab"])
    xs = []
    for k, n in ((k1, n1), (k2, n2)):
      ka, kb = jax.random.split(k)
      enc = jax.nn.one_hot(_tokens(ka, n, d["length"], d["vocab"]),
                           d["vocab"], dtype=dtype)
      dec = jax.nn.one_hot(_tokens(kb, n, d["length"], d["vocab"]),
                           d["vocab"], dtype=dtype)
      xs.append((enc, dec))
    apply = lambda v, x, **kw: model.apply(v, x[0], x[1], **kw)  # noqa: E731
    kwargs = {"rngs": {"lstm": jax.random.PRNGKey(3)}}
    return model, apply, xs, kwargs, (-1,), False
  if name == "vae":
    model = vae_models.VAE(latents=d["latents"], hidden=d["hidden"],
                           features=d["features"])
    xs = [jax.random.uniform(k, (n, d["features"]), dtype)
          for k, n in ((k1, n1), (k2, n2))]
    apply = lambda v, x, **kw: model.apply(  # noqa: E731
        v, x, jax.random.PRNGKey(5), **kw)
    return model, apply, xs, {}, (-1,), False
  if name == "ppo":
    model = ppo_models.ActorCritic(num_outputs=d["actions"])
    xs = [255 * jax.random.uniform(k, (n, d["hw"], d["hw"], 4), dtype)
          for k, n in ((k1, n1), (k2, n2))]
    return model, model.apply, xs, {}, (), True
  raise ValueError(f"unknown Flax example {name!r}; choose from {CASES}.")


def _cast(tree, dtype):
  return jax.tree.map(
      lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating)
      else v, tree)


def make_case(name: str, size: str = "tiny",
              dtype=jnp.float64) -> FlaxExample:
  """Builds Flax example `name` (one of `CASES`) at `size`.

  Args:
    name: the example.
    size: `'tiny'` (tests: 3 and 2 examples, a few units) or `'bench'`.
    dtype: floating dtype of parameters, statistics and float inputs
      (float32 for the LSTMs of sst2 and seq2seq, whose carries are float32).

  Returns:
    A `FlaxExample`.
  """
  d = _SIZES[name][size]
  if name in ("sst2", "seq2seq"):
    # Their LSTMs' initial carries are float32 whatever the parameters are.
    dtype = jnp.float32
  key = jax.random.PRNGKey(zlib.crc32(name.encode()))
  k_init, k1, k2 = jax.random.split(key, 3)
  model, apply, (x1, x2), kwargs, trace_axes, per_example = _build(
      name, d, dtype, (k1, k2))
  init_kwargs = {k: v for k, v in kwargs.items() if k != "rngs"}
  rngs = {"params": k_init, **kwargs.get("rngs", {})}

  def init(*args, **kw):
    with jax.numpy_rank_promotion("allow"):
      return model.init(*args, **kw)

  if name in ("wmt", "sst2", "seq2seq"):
    variables = init(rngs, x1[0], x1[1], **init_kwargs)
  elif name == "vae":
    variables = init(rngs, x1, jax.random.PRNGKey(5))
  else:
    variables = init(rngs, x1, **init_kwargs)
  variables = _cast(dict(nn.meta.unbox(variables)), dtype)

  def f(v, x, **kw):
    # Flax's examples rely on NumPy's rank promotion, which the tests turn
    # into an error.
    with jax.numpy_rank_promotion("allow"):
      return apply(v, x, **kw)

  return FlaxExample(f, variables, x1, x2, kwargs, trace_axes, per_example)
