"""Lifting unmodified Flax models to kernel rules.

- `initializers`: exact variances of stock Flax / JAX initializers;
- `transforms`: Flax lifted transforms (`nn.scan`, `nn.vmap`, `nn.remat`...);
- `tracing`: a module's `__call__` as a jaxpr, submodule calls kept opaque;
- `expressions`, `activations`: elementwise subgraphs and the nonlinearities
  they are recognized as;
- `provenance`: which values are independent (sums and products of branches);
- `interpreter`, `program`, `values`: the jaxpr evaluated on kernels, with
  `elementwise_rules`, `shape_rules`, `spatial_ops` and `scan_rule` for its
  primitives;
- `dispatch`, `errors`, `paths`: entry point, refusals with source lines.
"""
