"""Plans, for each parameter, where its structured Jacobian chains stop.

Starting from a parameter, the planner follows the consumers of the current
value through primitives with structure rules, composing their structures
(threading labels), for as long as the value does not yet depend on the
inputs. The first primitive that mixes in the inputs (`x @ w`, a lookup by
token ids, a bias added to activations) ends the chain: its output is the
*stop variable*, where the interpreter measures `d f / d stop`.

* A value with several consumers (a parameter used twice, as a shared
  embedding is for the lookup and for the logits) forks into one chain per
  consumer: `d f / d w` is the sum over the chains, so the NTK term is the
  sum over pairs of chains.
* A parameter that enters a `scan` as a constant (the weights of an LSTM
  cell) is followed into the scan's body. Its chain stops inside the body,
  once per iteration: the stop variable and the factors computed in the body
  are stacked over iterations, along a *loop label* that belongs to each
  input (not to the parameter), so the chain is that of a layer applied at
  every step.

Stopping early is always correct, only slower: a chain stops before a
primitive without a rule or one that sees the parameter twice; a fork
whose every branch cannot take its first step stops at the forking value.
With no rule at all, the stop variable is the parameter itself and the term
is a plain Jacobian contraction. Each chain records why it stopped
(`Chain.reason`), which `explain` reports.
"""

import dataclasses
import math
from typing import Any, Callable, Optional, Union

import jax.numpy as jnp

from flax_tangents._src.empirical.structured import ir
from flax_tangents._src.empirical.structured import structure
from flax_tangents._src.empirical.structured.rules import RULES

__all__ = ["Chain", "LeafPlan", "dependents", "plan_program", "root_plan"]

Address = Union[int, tuple]


@dataclasses.dataclass(frozen=True)
class Chain:
  """One path from a parameter to a stop variable.

  Attributes:
    stop_var: address of the stop variable: a variable id of the program, or
      `(equation index, address)` inside the body of that `scan` (stacked
      over its iterations).
    stop_labels: labels of the (stacked) stop variable's axes: loop labels
      first, then the axes of the variable itself.
    factors: the factors of `d stop / d parameter`.
    dropped: labels summed out along the chain.
    reason: None when the chain reached the inputs (fully structured),
      otherwise why it stopped where it did.
  """
  stop_var: Address
  stop_labels: tuple[int, ...]
  factors: tuple[structure.Factor, ...]
  dropped: tuple[int, ...]
  reason: Optional[str] = None

  def signature(self) -> tuple:
    factors = tuple((type(f).__name__, f.labels, getattr(f, "target", None),
                     f.scope) for f in self.factors)
    depth = 0
    address = self.stop_var
    while not isinstance(address, int):
      depth, address = depth + 1, address[1]
    return (self.stop_labels, factors, self.dropped, depth)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one parameter leaf's NTK term is computed.

  Attributes:
    root_labels: labels of the parameter's coordinates (shared by both
      inputs of the NTK); all other labels are per input.
    chains: the paths from the parameter to its stop variables.
    sizes: size of every label.
  """
  root_labels: tuple[int, ...]
  chains: tuple[Chain, ...]
  sizes: dict[int, int]

  def signature(self) -> tuple:
    """What must agree between the `x1` and `x2` plans to pair them."""
    return (self.root_labels, tuple(c.signature() for c in self.chains),
            tuple(self.sizes[l] for l in self.root_labels))

  @property
  def structured(self) -> bool:
    return all(c.reason is None for c in self.chains)


def root_plan(program: ir.FlatProgram, leaf_var: int,
              reason: str = "unstructured") -> LeafPlan:
  """The unstructured plan: `d f / d parameter`, a Jacobian contraction."""
  labels = structure.LabelAllocator()
  root = labels.new_for(program.shapes[leaf_var])
  return LeafPlan(root, (Chain(leaf_var, root, (), (), reason),),
                  labels.sizes)


def dependents(program: ir.FlatProgram, sources: set[int]) -> set[int]:
  """Variables computed from any of `sources`."""
  reached = set(sources)
  for eqn in program.equations:
    if any(not isinstance(a, ir.Literal) and a in reached
           for a in eqn.inputs):
      reached.update(eqn.outputs)
  return reached


def _is_scaled_permutation(labels: tuple[int, ...], root: tuple[int, ...],
                           factors, dropped) -> bool:
  return (not dropped and sorted(labels) == sorted(root) and
          len(set(labels)) == len(labels) and
          all(isinstance(f, structure.DenseFactor) and not f.labels
              for f in factors))


def _where(eqn: ir.Equation) -> str:
  from jax.extend import source_info_util  # pylint: disable=g-import-not-at-top
  if eqn.source_info is None:
    return ""
  try:
    return " at " + source_info_util.summarize(eqn.source_info)
  except Exception:  # pylint: disable=broad-except
    return ""


class _Scope:
  """A program the planner walks: the top level, or a loop body."""

  def __init__(self, program: ir.FlatProgram, data_sources: set[int],
               prefix: tuple[int, ...] = (), loop_labels: tuple[int, ...] = ()):
    self.program, self.prefix, self.loop_labels = program, prefix, loop_labels
    self.data_vars = dependents(program, data_sources)
    self.consumers = program.consumers()
    self.output_vars = {a for a in program.outputs
                        if not isinstance(a, ir.Literal)}
    self._depends: dict[int, set[int]] = {}

  def address(self, var: int) -> Address:
    address: Address = var
    for index in reversed(self.prefix):
      address = (index, address)
    return address

  def depends_on(self, origin: int) -> set[int]:
    if origin not in self._depends:
      self._depends[origin] = dependents(self.program, {origin})
    return self._depends[origin]


@dataclasses.dataclass
class _Walk:
  """The state of one chain while it is followed."""
  scope: _Scope
  origin: int  # The variable of `scope` the parameter entered as.
  current: int
  labels: tuple[int, ...]
  factors: tuple[structure.Factor, ...]
  dropped: tuple[int, ...]
  mixed: int = -1  # Number of factors when the inputs were mixed in.


# Past the inputs, a chain goes on only through these cheap structures (a
# convolution's input Jacobian or a lookup's one-hot would be dense per
# example), at most this many more factors, and without forking.
_NOT_PAST_INPUTS = frozenset({"conv_general_dilated", "gather",
                              "dynamic_slice", "scan"})
_MAX_FACTORS_PAST_INPUTS = 8


def _without_reads(compute: Callable[[Any], Any]) -> Callable[[Any], Any]:
  """`compute` given a reader that refuses every read (static factors)."""

  def refuse(*args, **kwargs):
    raise AssertionError("a static IndexFactor read a forward value; only "
                         "factors whose indices depend on shapes alone may "
                         "be marked static")

  return lambda read: compute(refuse)


class _Planner:
  """Plans one parameter leaf."""

  def __init__(self, shape: tuple[int, ...]):
    self.labels = structure.LabelAllocator()
    self.root = self.labels.new_for(shape)
    self.forked = False

  def stop(self, walk: _Walk, reason: Optional[str]) -> list[Chain]:
    return [Chain(walk.scope.address(walk.current),
                  walk.scope.loop_labels + tuple(walk.labels), walk.factors,
                  walk.dropped, reason)]

  def follow(self, walk: _Walk) -> list[Chain]:
    """The chains from `walk.current` on (one per path to a stop).

    Up to the first primitive that mixes in the inputs, the chain follows
    every use of the value. From there on it may go on towards the outputs
    through cheap structures (elementwise maps, sums, products with other
    values): `d f / d y` is then measured further down, where the value is
    smallest (at an output, not at all). The cut is placed at the smallest
    value met.
    """
    scope = walk.scope
    cuts: list[_Walk] = []
    while True:
      if walk.mixed < 0 and walk.current in scope.data_vars:
        walk = dataclasses.replace(walk, mixed=len(walk.factors))
      if walk.mixed >= 0:
        cuts.append(walk)
      if walk.current in scope.output_vars:
        return self.cut(cuts) if cuts else self.stop(walk, None)
      uses = scope.consumers.get(walk.current, [])
      if not uses:
        return []  # An unused value contributes nothing.
      if walk.mixed >= 0:
        if (len(uses) > 1 or len(walk.factors) - walk.mixed >=
            _MAX_FACTORS_PAST_INPUTS or scope.program.equations[
                uses[0][0]].name in _NOT_PAST_INPUTS):
          return self.cut(cuts)
        step = self.step(walk, uses[0])
        if not isinstance(step, _Walk):
          return self.cut(cuts)
        walk = step
        continue
      if len(uses) > 1:
        return self.fork(walk, uses)
      step = self.step(walk, uses[0])
      if isinstance(step, str):
        return self.stop(walk, step)
      if isinstance(step, list):  # Entered a loop body.
        return step
      walk = step

  def cut(self, cuts: list[_Walk]) -> list[Chain]:
    """Stops at the smallest of the values met past the inputs."""
    def size(walk):
      return math.prod(walk.scope.program.shapes[walk.current])
    best = min(range(len(cuts)), key=lambda i: (size(cuts[i]), -i))
    return self.stop(cuts[best], None)

  def fork(self, walk: _Walk, uses) -> list[Chain]:
    self.forked = True
    chains = []
    for use in uses:
      step = self.step(walk, use)
      if isinstance(step, str):
        eqn = walk.scope.program.equations[use[0]]
        return self.stop(walk, f"its value has {len(uses)} uses and one, "
                         f"`{eqn.name}`, has no structure: {step}")
      chains += step if isinstance(step, list) else self.follow(step)
    return chains

  def step(self, walk: _Walk, use) -> Union[_Walk, list[Chain], str]:
    """Applies the rule of one consumer: a new walk, chains, or a reason."""
    scope = walk.scope
    eqn_index, position = use
    eqn = scope.program.equations[eqn_index]
    if eqn.name == "scan" and position < eqn.params["num_consts"]:
      return self.enter_scan(walk, eqn_index, position)
    rule = RULES.get(eqn.name)
    if rule is None:
      return f"no structure rule for `{eqn.name}`{_where(eqn)}"
    if len(eqn.outputs) != 1:
      return f"`{eqn.name}` has several outputs{_where(eqn)}"
    # Another operand may depend on the parameter only through the inputs:
    # then it does so through the stop variable of another chain (every
    # path from the parameter to a value that depends on the inputs passes
    # one), whose perturbation accounts for it.
    depends = scope.depends_on(walk.origin)
    others = [a for k, a in enumerate(eqn.inputs) if k != position]
    if any(not isinstance(a, ir.Literal) and a in depends and
           a not in scope.data_vars for a in others):
      return f"`{eqn.name}` sees the parameter twice{_where(eqn)}"
    out_var = eqn.outputs[0]
    if not jnp.issubdtype(scope.program.dtypes[out_var], jnp.inexact):
      return f"`{eqn.name}` has a non-float output{_where(eqn)}"
    result = rule(structure.RuleContext(eqn, position, walk.labels,
                                        scope.program, self.labels))
    if result is None:
      return f"the rule for `{eqn.name}` does not apply{_where(eqn)}"
    if result.restart:
      if self.forked or scope.prefix or not _is_scaled_permutation(
          walk.labels, self.root, walk.factors, walk.dropped):
        return f"`{eqn.name}` re-arranges a structured value{_where(eqn)}"
      self.root = result.out_labels
    factors = tuple(self.in_scope(f, scope) for f in result.factors)
    return _Walk(scope, walk.origin, out_var, tuple(result.out_labels),
                 walk.factors + factors, walk.dropped + tuple(result.dropped),
                 walk.mixed)

  @staticmethod
  def in_scope(factor: structure.Factor, scope: _Scope) -> structure.Factor:
    """A factor computed in a loop body is stacked over its iterations.

    A static index factor is the same in every iteration: stacking it would
    only multiply the Gram of a pair of them by the squared loop length.
    """
    if not scope.prefix:
      return factor
    if getattr(factor, "static", False):
      # Computed outside the loop: a read there would see no iteration's
      # values, so a factor wrongly marked static must fail, not misread.
      return dataclasses.replace(factor,
                                 compute=_without_reads(factor.compute))
    return dataclasses.replace(factor,
                               labels=scope.loop_labels + factor.labels,
                               scope=scope.prefix)

  def enter_scan(self, walk: _Walk, eqn_index: int, position: int
                 ) -> Union[list[Chain], str]:
    scope = walk.scope
    eqn = scope.program.equations[eqn_index]
    body = scope.program.body(eqn_index)
    n_consts = eqn.params["num_consts"]
    # Data in the body: the carries, the scanned-over values, and constants
    # that are data outside.
    sources = {v for k, v in enumerate(body.inputs)
               if k >= n_consts or (not isinstance(eqn.inputs[k], ir.Literal)
                                    and eqn.inputs[k] in scope.data_vars)}
    loop = self.labels.new(eqn.params["length"])
    inner = _Scope(body, sources, scope.prefix + (eqn_index,),
                   scope.loop_labels + (loop,))
    origin = body.inputs[position]
    forked = self.forked
    chains = self.follow(_Walk(inner, origin, origin, walk.labels,
                               walk.factors, walk.dropped))
    if any(c.stop_var == inner.address(origin) for c in chains):
      self.forked = forked
      reason = next(c.reason for c in chains
                    if c.stop_var == inner.address(origin))
      return f"in the body of `scan`{_where(eqn)}, {reason}"
    return chains


def plan_leaf(program: ir.FlatProgram, leaf_var: int,
              data_vars: set[int]) -> Optional[LeafPlan]:
  """Plans one parameter leaf; None if it is unused or not a float."""
  consumers = program.consumers()
  output_vars = {a for a in program.outputs if not isinstance(a, ir.Literal)}
  if not consumers.get(leaf_var) and leaf_var not in output_vars:
    return None
  if not jnp.issubdtype(program.dtypes[leaf_var], jnp.inexact):
    return None
  planner = _Planner(program.shapes[leaf_var])
  scope = _Scope(program, set())
  scope.data_vars = data_vars
  chains = planner.follow(_Walk(scope, leaf_var, leaf_var, planner.root, (),
                                ()))
  if not chains:
    return None
  return LeafPlan(tuple(planner.root), tuple(chains), planner.labels.sizes)


def plan_program(program: ir.FlatProgram, n_params: int
                 ) -> list[Optional[LeafPlan]]:
  """Plans every parameter leaf of `program`.

  Args:
    program: a flat program whose first `n_params` inputs are the parameter
      leaves and whose other inputs are data (inputs, keyword arguments).
    n_params: number of parameter leaves.

  Returns:
    One plan per parameter leaf, None for unused or non-float leaves.
  """
  param_vars = program.inputs[:n_params]
  data_vars = dependents(program, set(program.inputs[n_params:]))
  return [plan_leaf(program, v, data_vars) for v in param_vars]
