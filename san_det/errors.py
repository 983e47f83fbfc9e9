"""The one exception type that command-line tools report as a single line, without a traceback.

It lives at the bottom of the package (no imports) so that every layer can raise it.
"""

__all__ = ["UserInputError"]


class UserInputError(ValueError):
    """Bad input from the user (config, paths, datasets): the message says what and where."""
