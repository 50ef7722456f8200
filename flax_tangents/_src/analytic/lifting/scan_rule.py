"""The kernel rule of a Flax `nn.scan` met in a lifted module's program.

In the traced program, `nn.scan(Block, length=L)(...)(h, None)` is one
`scan` equation whose body calls the step module (an opaque module call,
recorded with the `nn.scan` that runs it). The network values among the
scan's carry are the step's kernel-valued arguments; the rest of the carry
is Flax's own bookkeeping. With independent parameters per step (checked),
the kernel is the step's kernel applied `L` times (`transforms.repeat`).
"""

from __future__ import annotations

from typing import Optional

import jax

from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.lifting import paths
from flax_tangents._src.analytic.lifting import program as program_lib
from flax_tangents._src.analytic.lifting import provenance as prov
from flax_tangents._src.analytic.lifting import tracing
from flax_tangents._src.analytic.lifting import transforms
from flax_tangents._src.analytic.lifting.interpreter import Interpreter
from flax_tangents._src.analytic.lifting.interpreter import register
from flax_tangents._src.analytic.lifting.program import Equation
from flax_tangents._src.analytic.lifting.values import Const
from flax_tangents._src.analytic.lifting.values import Elem
from flax_tangents._src.analytic.lifting.values import Net
from flax_tangents._src.analytic.lifting.values import Value

__all__: list[str] = []

_LOOP = ("it loops over network values (`jax.lax.scan`, `fori_loop`) inside "
         "the module's code; write the loop body as a module and use "
         "`nn.scan` with independent parameters per step")


def _kernels_in(tree):
  return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(
      x, Kernel)) if isinstance(x, Kernel)]


@register("scan")
def scan(interp: Interpreter, eqn: Equation,
         values: list[Value]) -> list[Value]:
  params = eqn.params
  n_consts, n_carry = params["num_consts"], params["num_carry"]
  body = program_lib.from_closed_jaxpr(params["jaxpr"])
  records = [interp.trace.calls[e.params["index"]] for e in body.equations
             if e.primitive is tracing.MODULE_CALL]
  if len(records) != 1 or records[0].transform is None:
    raise interp.refuse(eqn, _LOOP)
  record = records[0]
  transform = record.transform
  carry = values[n_consts:n_consts + n_carry]
  others = values[:n_consts] + values[n_consts + n_carry:]
  if any(isinstance(v, (Net, Elem)) for v in others):
    raise interp.refuse(
        eqn, f"{transforms.describe(transform)} scans over network values "
        "(`xs`); only its carry may depend on the network's input")
  dependent = [i for i, v in enumerate(carry) if isinstance(v, (Net, Elem))]
  if len(dependent) != sum(x is None for x in record.in_leaves):
    raise interp.refuse(
        eqn, f"{transforms.describe(transform)} passes arrays other than "
        "its carry to the step (`xs`); only `(carry, None)` steps are "
        "supported")
  module_path = tuple(str(p) for p in transform.module.path)
  transforms.check_scan_parameters(
      transform, module_path in interp.trace.param_paths)
  nets = [interp.net(carry[i], eqn) for i in dependent]
  inner = transforms.inner_module(transform)
  step_provenance: list[Optional[prov.Provenance]] = []

  def step(kernels):
    it = iter(kernels)
    leaves = [next(it) if x is None else x for x in record.in_leaves]
    args, kwargs = jax.tree.unflatten(record.in_tree, leaves)
    with paths.prefix(paths.full_path(transform.module)):
      new_carry, ys = inner.apply({}, *args, method=record.method, **kwargs)
    if _kernels_in(ys):
      raise interp.refuse(
          eqn, f"the step of {transforms.describe(transform)} returns "
          "network values as outputs (`ys`); only the carry may be one")
    out = _kernels_in(new_carry)
    step_provenance[:] = [prov.lookup(k) for k in out]
    return out

  final = transforms.repeat(step, [n.kernel for n in nets], params["length"])
  outputs: list[Value] = [Const(None, from_params=True) for _ in eqn.outputs]
  inputs = [n.provenance for n in nets]
  for position, kernel, found in zip(dependent, final, step_provenance):
    outputs[position] = Net(kernel, found if found is not None else (
        prov.opaque(inputs, paths.path_string(transform.module))))
  return outputs
