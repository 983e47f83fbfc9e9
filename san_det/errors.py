"""The exception types that command-line tools report as a single line, without a traceback.

They live at the bottom of the package (no imports) so that every layer can raise them.
"""

__all__ = ["CheckpointError", "CorruptImageError", "DatasetError", "UserInputError"]


class UserInputError(ValueError):
    """Bad input from the user (config, paths, datasets): the message says what and where."""


class DatasetError(UserInputError):
    """A dataset on disk is missing, empty, inconsistent or unreadable; the message names the path."""


class CorruptImageError(DatasetError):
    """An image file cannot be read (missing, truncated, not an image); the message names it."""


class CheckpointError(UserInputError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into: the one error of
    checkpoint loading (docs/CHECKPOINTS.md); the message names the file or the first key."""
