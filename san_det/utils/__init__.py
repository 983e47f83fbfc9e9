"""Helpers below every other layer of san_det (they import only the standard library)."""
