"""Linen layers that carry infinite-width kernel rules.

Each layer is an ordinary `flax.linen.Module` (its `init`/`apply` are the
finite network) and `ft.kernel_fn` uses its rule for the infinite-width limit.
Importing this package also registers rules for stock `flax.linen` modules.
"""

from flax_tangents._src.analytic.enums import AggregateImplementation
from flax_tangents._src.analytic.enums import AttentionMechanism
from flax_tangents._src.analytic.enums import Padding
from flax_tangents._src.analytic.enums import PositionalEmbedding
from flax_tangents.nn import stock as _stock  # noqa: F401 (registers rules)
from flax_tangents.nn.activations import Erf
from flax_tangents.nn.activations import Exp
from flax_tangents.nn.activations import ExpNormalized
from flax_tangents.nn.activations import Gaussian
from flax_tangents.nn.activations import Gelu
from flax_tangents.nn.activations import Sigmoid_like
from flax_tangents.nn.activations import Sign
from flax_tangents.nn.activations_trig import Cos
from flax_tangents.nn.activations_trig import Gabor
from flax_tangents.nn.activations_trig import Rbf
from flax_tangents.nn.activations_trig import Sin
from flax_tangents.nn.attention import GlobalSelfAttention
from flax_tangents.nn.combinators import FanInConcat
from flax_tangents.nn.combinators import FanInProd
from flax_tangents.nn.combinators import FanInSum
from flax_tangents.nn.conv import Conv
from flax_tangents.nn.conv import ConvLocal
from flax_tangents.nn.conv import ConvTranspose
from flax_tangents.nn.dot_general import DotGeneral
from flax_tangents.nn.dropout import Dropout
from flax_tangents.nn.elementwise import Elementwise
from flax_tangents.nn.elementwise import ElementwiseBase
from flax_tangents.nn.graph import Aggregate
from flax_tangents.nn.linear import Dense
from flax_tangents.nn.normalization import LayerNorm
from flax_tangents.nn.numerical import ElementwiseNumerical
from flax_tangents.nn.polynomial import Hermite
from flax_tangents.nn.polynomial import Monomial
from flax_tangents.nn.polynomial import Polynomial
from flax_tangents.nn.polynomial import RectifiedMonomial
from flax_tangents.nn.pooling import AvgPool
from flax_tangents.nn.pooling import GlobalAvgPool
from flax_tangents.nn.pooling import GlobalSumPool
from flax_tangents.nn.pooling import SumPool
from flax_tangents.nn.relu import ABRelu
from flax_tangents.nn.relu import Abs
from flax_tangents.nn.relu import LeakyRelu
from flax_tangents.nn.relu import Relu
from flax_tangents.nn.resize import ImageResize
from flax_tangents.nn.resize import Index
from flax_tangents.nn.resize import Slice
from flax_tangents.nn.shape import Flatten
from flax_tangents.nn.shape import Identity

__all__ = (
    "ABRelu",
    "Abs",
    "Aggregate",
    "AggregateImplementation",
    "AttentionMechanism",
    "AvgPool",
    "Conv",
    "ConvLocal",
    "ConvTranspose",
    "Cos",
    "Dense",
    "DotGeneral",
    "Dropout",
    "Elementwise",
    "ElementwiseBase",
    "ElementwiseNumerical",
    "Erf",
    "Exp",
    "ExpNormalized",
    "FanInConcat",
    "FanInProd",
    "FanInSum",
    "Flatten",
    "Gabor",
    "Gaussian",
    "Gelu",
    "GlobalAvgPool",
    "GlobalSelfAttention",
    "GlobalSumPool",
    "Hermite",
    "Identity",
    "ImageResize",
    "Index",
    "LayerNorm",
    "LeakyRelu",
    "Monomial",
    "Padding",
    "Polynomial",
    "PositionalEmbedding",
    "Rbf",
    "RectifiedMonomial",
    "Relu",
    "Sigmoid_like",
    "Sign",
    "Sin",
    "Slice",
    "SumPool",
)
