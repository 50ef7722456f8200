"""Implementation of `ft.predict`; import from `flax_tangents.predict`."""
