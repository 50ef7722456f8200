"""What lifting refuses: each message names the module, the operation and
the line of the user's code (marked `# refused: <case>` below)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents._src.analytic.lifting.errors import LiftingError

RS = np.random.RandomState(0)
X1, X2 = RS.randn(3, 4), RS.randn(2, 4)
IMG1, IMG2 = RS.randn(2, 4, 4, 3), RS.randn(3, 4, 4, 3)

with open(__file__) as _source:
  _LINES = {m.group(1): i + 1 for i, line in enumerate(_source)
            for m in [re.search(r"# refused: (\w+)", line)] if m}


class Refused(nn.Module):
  case: str

  @nn.compact
  def __call__(self, x):
    case = self.case
    if case == "relu_of_inputs":
      return nn.Dense(2)(nn.relu(x))  # refused: relu_of_inputs
    h = nn.Dense(6)(x)
    if case == "tanh_of_layer_norm":
      return jnp.tanh(nn.LayerNorm()(h))  # refused: tanh_of_layer_norm
    if case == "elu":
      return nn.Dense(2)(nn.elu(h))  # refused: elu
    if case == "correlated_sum":
      return nn.relu(h) + jnp.tanh(nn.Dense(6)(x))  # refused: correlated_sum
    if case == "correlated_product":
      return h * nn.relu(nn.Dense(6)(h))  # refused: correlated_product
    if case == "channel_mean":
      return h.mean(axis=-1, keepdims=True)  # refused: channel_mean
    if case == "batch_mean":
      return h - h.mean(axis=0, keepdims=True)  # refused: batch_mean
    if case == "python_if":
      if h.sum() > 0:  # refused: python_if
        return h
      return -h
    if case == "fixed_matrix":
      return h @ jnp.ones((6, 2))  # refused: fixed_matrix
    if case == "own_parameter":
      w = self.param("w", nn.initializers.normal(), (6, 2))
      return h @ w  # refused: own_parameter
    if case == "varying_shift":
      return h + jnp.arange(6.0)[None]  # refused: varying_shift
    if case == "softmax":
      return nn.softmax(h)  # refused: softmax
    if case == "shared_weights":
      dense = nn.Dense(6)
      return dense(nn.relu(dense(h)))  # refused: shared_weights
    if case == "channel_split":
      return h.reshape((h.shape[0], 2, 3))  # refused: channel_split
    if case == "while_loop":
      return jax.lax.while_loop(lambda a: a.sum() < 9, lambda a: 2 * a, h)  # refused: while_loop
    if case == "fori_loop":
      return jax.lax.fori_loop(0, 3, lambda i, a: 2 * a, h)  # refused: fori_loop
    if case == "nn_cond":
      return nn.cond(True, lambda m, a: a, lambda m, a: -a, self, h)  # refused: nn_cond
    raise ValueError(case)


class RefusedImages(nn.Module):
  case: str

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(4, (2, 2))(x)
    if self.case == "max_pool":
      return nn.max_pool(h, (2, 2))  # refused: max_pool
    if self.case == "global_max":
      return jnp.max(h, axis=(1, 2))  # refused: global_max
    if self.case == "relu6":
      return nn.relu6(h)  # refused: relu6
    if self.case == "per_channel_scale":
      return h * jnp.arange(1.0, 5.0)[None, None, None]  # refused: per_channel_scale
    if self.case == "batch_norm_train":
      return nn.BatchNorm(use_running_average=False)(h)  # refused: batch_norm_train
    if self.case == "attention":
      tokens = h.reshape((h.shape[0], -1, 4))
      return nn.MultiHeadDotProductAttention(num_heads=2)(tokens)  # refused: attention
    if self.case == "vmap":
      dense = nn.vmap(nn.Dense, in_axes=1, out_axes=1,
                      variable_axes={"params": 0}, split_rngs={"params": True})
      return dense(3)(h)  # refused: vmap
    raise ValueError(self.case)


CASES = {
    "relu_of_inputs": (Refused, "relu", "raw inputs"),
    "tanh_of_layer_norm": (Refused, "tanh", "not Gaussian"),
    "elu": (Refused, "elu", "kinks"),
    "correlated_sum": (Refused, "add", "correlated"),
    "correlated_product": (Refused, "mul", "dependent"),
    "channel_mean": (Refused, "reduce_sum", "channel axis"),
    "batch_mean": (Refused, "reduce_sum", "batch axis"),
    "python_if": (Refused, "Python control flow", "value of a network"),
    "fixed_matrix": (Refused, "dot_general", "fixed"),
    "own_parameter": (Refused, "dot_general", r"self\.param"),
    "varying_shift": (Refused, "add", "varies over locations|differs between "
                      "channels"),
    "softmax": (Refused, "reduce_max", "maximum"),
    "shared_weights": (Refused, "Dense call", "weight tying"),
    "channel_split": (Refused, "reshape", "channel axis"),
    "max_pool": (RefusedImages, "reduce_window_max", "max pooling"),
    "global_max": (RefusedImages, "reduce_max", "maximum"),
    "relu6": (RefusedImages, "relu6", "kinks"),
    "per_channel_scale": (RefusedImages, "mul", "differs between channels"),
    "while_loop": (Refused, "while", "control flow"),
    "fori_loop": (Refused, "scan", "loops over network values"),
    "nn_cond": (Refused, "cond", "control flow"),
}

# Refusals by the rule of a stock module (or a lifted transform) that a
# lifted module calls: the module's own error, with the calling line added.
STOCK_CASES = {
    "batch_norm_train": (NotImplementedError,
                         r"nn.BatchNorm \(module 'BatchNorm_0'\) in training "
                         r"mode.*mixes the examples"),
    "attention": (ft.KernelRuleError,
                  r"nn.MultiHeadDotProductAttention \(module "
                  r"'MultiHeadDotProductAttention_0'.*logits stay random"),
    "vmap": (ft.KernelRuleError, r"nn.vmap\(Dense\) \(module 'VmapDense_0'\) "
             r"has no infinite-width kernel rule"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refusal_names_module_primitive_and_line(case):
  module_type, primitive, reason = CASES[case]
  x1, x2 = (X1, X2) if module_type is Refused else (IMG1, IMG2)
  with pytest.raises(LiftingError) as info:
    ft.kernel_fn(module_type(case))(x1, x2, ("nngp", "ntk"))
  error = info.value
  message = str(error)
  assert f"test_lifting_refusals.py:{_LINES[case]}" in message, message
  assert f"of type test_lifting_refusals.{module_type.__name__}" in message
  assert primitive in error.primitive, (error.primitive, message)
  assert re.search(reason, message), message


@pytest.mark.parametrize("case", sorted(STOCK_CASES))
def test_stock_module_refusal_names_the_calling_line(case):
  error_type, reason = STOCK_CASES[case]
  with pytest.raises(error_type) as info:
    ft.kernel_fn(RefusedImages(case))(IMG1, IMG2, ("nngp", "ntk"))
  message = str(info.value)
  assert re.search(reason, message), message
  assert re.search(rf"called at \S*test_lifting_refusals.py:{_LINES[case]}\b",
                   message), message
  # Added once, at the innermost lifted call.
  assert message.count("called at") == 1, message


def test_stock_refusal_in_a_nested_module_names_the_innermost_line():
  class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
      return RefusedImages("batch_norm_train", name="block")(x)

  with pytest.raises(NotImplementedError) as info:
    ft.kernel_fn(Outer())(IMG1, IMG2)
  message = str(info.value)
  assert f"test_lifting_refusals.py:{_LINES['batch_norm_train']}" in message
  assert message.count("called at") == 1, message


def test_refusal_inside_a_nested_module_names_its_path():
  class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Refused("elu", name="block")(nn.Dense(4)(x))

  with pytest.raises(LiftingError) as info:
    ft.kernel_fn(Outer())(X1, X2)
  assert "module 'block' of type test_lifting_refusals.Refused" in str(
      info.value)
  assert f"test_lifting_refusals.py:{_LINES['elu']}" in str(info.value)


def test_refusals_under_jit():
  fn = jax.jit(ft.kernel_fn(Refused("elu")), static_argnames="get")
  with pytest.raises(LiftingError, match="kinks"):
    fn(X1, X2, get="nngp")
