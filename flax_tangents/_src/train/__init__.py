"""Implementation of `ft.train`; import from `flax_tangents.train`."""
