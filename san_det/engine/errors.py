"""Re-export of :class:`san_det.errors.UserInputError` (its home below every other layer)."""

from ..errors import UserInputError

__all__ = ["UserInputError"]
