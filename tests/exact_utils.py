"""Old name of `testing.exact_ntk` (kept for the test files that still
import it)."""

from testing import exact_ntk

__all__ = ["exact_ntk"]
