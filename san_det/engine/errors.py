"""The one exception type that command-line tools report as a single line, without a traceback."""

__all__ = ["UserInputError"]


class UserInputError(ValueError):
    """Bad input from the user (config, paths, datasets): the message says what and where."""
