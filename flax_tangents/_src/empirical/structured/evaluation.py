"""Evaluating a flat program (`ir`), perturbed and instrumented.

`evaluate` runs a `FlatProgram` equation by equation with additive
perturbations of chosen variables (the structured NTK differentiates with
respect to them); `evaluate_with_taps` also perturbs variables inside `scan`
bodies and reads values out of them at every iteration (factors of
structured Jacobians computed in a loop). Addresses of body variables are
`(equation index, address)` (`address_aval`).
"""

from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax

from flax_tangents._src.empirical.structured.ir import Atom
from flax_tangents._src.empirical.structured.ir import Equation
from flax_tangents._src.empirical.structured.ir import FlatProgram
from flax_tangents._src.empirical.structured.ir import Literal

__all__ = ["address_aval", "evaluate", "evaluate_with_taps", "read_atom"]


def evaluate(program: FlatProgram, args: Sequence[Any],
             perturbations: dict[Any, Any],
             overrides: Optional[dict[str, Callable[..., Any]]] = None
             ) -> dict[int, Any]:
  """Evaluates `program`, adding `perturbations[v]` to variable `v`.

  Args:
    program: the flat program.
    args: values of `program.inputs`.
    perturbations: additive perturbations by variable id; the structured
      NTK differentiates with respect to them to get `d outputs / d v`.
    overrides: by primitive name, `fn(equation, *operands)` computing the
      (single) output of that primitive another way.

  Returns:
    The value of every variable, by id (perturbed values where perturbed).
  """
  return evaluate_with_taps(program, args, perturbations, {}, overrides)[0]


def address_aval(program: FlatProgram, address: Any
                 ) -> tuple[tuple[int, ...], Any]:
  """Shape and dtype of the variable at `address`, stacked over loops.

  An address is a variable id, or `(equation index, address)` for a
  variable of the body of that `scan`, whose values over the iterations
  are stacked along a leading axis.
  """
  if isinstance(address, int):
    return program.shapes[address], program.dtypes[address]
  index, inner = address
  shape, dtype = address_aval(program.body(index), inner)
  return (program.equations[index].params["length"],) + shape, dtype


def evaluate_with_taps(program: FlatProgram, args: Sequence[Any],
                       perturbations: dict[Any, Any],
                       taps: dict[tuple[int, ...], list[Callable[..., Any]]],
                       overrides: Optional[dict[str, Callable[..., Any]]] = None
                       ) -> tuple[dict[int, Any], dict[tuple[int, ...],
                                                      list[Any]]]:
  """`evaluate`, with perturbations and read-outs inside `scan` bodies.

  Args:
    program: the flat program.
    args: values of `program.inputs`.
    perturbations: additive perturbations by address (see `address_aval`);
      one inside a loop body is stacked over its iterations.
    taps: by loop path (the `scan` equation indices, outermost first),
      functions of a reader of that body's variables, evaluated at every
      iteration (factors of structured Jacobians computed in a body).
    overrides: as for `evaluate` (outside loop bodies).

  Returns:
    `(env, tapped)`: the value of every variable of `program`, by id, and
    for each path of `taps` the list of its functions' values, stacked over
    the iterations (outer loops first).
  """
  local = {a: d for a, d in perturbations.items() if isinstance(a, int)}
  nested_perturbations: dict[int, dict[Any, Any]] = {}
  for address, delta in perturbations.items():
    if not isinstance(address, int):
      nested_perturbations.setdefault(address[0], {})[address[1]] = delta
  nested_taps: dict[int, dict[tuple[int, ...], list[Any]]] = {}
  for path, fns in taps.items():
    nested_taps.setdefault(path[0], {})[path[1:]] = fns

  env: dict[int, Any] = dict(program.consts)
  for var_id, value in zip(program.inputs, args):
    env[var_id] = value
  for var_id, delta in local.items():
    if var_id in env:
      env[var_id] = env[var_id] + delta

  def read(atom: Atom) -> Any:
    return atom.value if isinstance(atom, Literal) else env[atom]

  tapped: dict[tuple[int, ...], list[Any]] = {}
  for index, eqn in enumerate(program.equations):
    inputs = list(map(read, eqn.inputs))
    if index in nested_perturbations or index in nested_taps:
      outs, inner = _instrumented_scan(
          program.body(index), eqn, inputs,
          nested_perturbations.get(index, {}), nested_taps.get(index, {}))
      tapped.update({(index,) + path: values
                     for path, values in inner.items()})
    elif overrides and eqn.name in overrides:
      outs = (overrides[eqn.name](eqn, *inputs),)
    else:
      bind_params = eqn.primitive.get_bind_params(eqn.params)
      outs = eqn.primitive.bind(*inputs, **bind_params)
      if not eqn.primitive.multiple_results:
        outs = (outs,)
    for var_id, value in zip(eqn.outputs, outs):
      if var_id in local:
        value = value + local[var_id]
      env[var_id] = value
  return env, tapped


def _instrumented_scan(body: FlatProgram, eqn: Equation, inputs: list[Any],
                       perturbations: dict[Any, Any],
                       taps: dict[tuple[int, ...], list[Any]]):
  """A `scan` re-run with `lax.scan` over its flat body, instrumented."""
  p = eqn.params
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts = inputs[:n_consts]
  init = inputs[n_consts:n_consts + n_carry]
  xs = inputs[n_consts + n_carry:]
  addresses = list(perturbations)
  deltas = [perturbations[a] for a in addresses]
  own = taps.get((), [])
  deeper = {path: fns for path, fns in taps.items() if path}

  def step(carry, sliced):
    x_t, deltas_t = sliced
    env, inner = evaluate_with_taps(body, consts + list(carry) + list(x_t),
                                    dict(zip(addresses, deltas_t)), deeper)
    outs = [read_atom(env, a) for a in body.outputs]
    values = [fn(lambda atom: read_atom(env, atom)) for fn in own]
    return outs[:n_carry], (outs[n_carry:], values, inner)

  carry, (ys, values, inner) = jax.lax.scan(
      step, init, (xs, deltas), length=p["length"], reverse=p["reverse"],
      unroll=p["unroll"])
  tapped = {path: vals for path, vals in inner.items()}
  if own:
    tapped[()] = values
  return list(carry) + list(ys), tapped


def read_atom(env: dict[int, Any], atom: Atom) -> Any:
  """The value of `atom` in an environment returned by `evaluate`."""
  return atom.value if isinstance(atom, Literal) else env[atom]
