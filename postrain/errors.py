"""User-facing errors.

Anything a user can cause by a bad recipe, a bad override, bad data or a bad path raises a subclass of
:class:`PostrainError`. The CLI prints its message (no traceback) and exits non-zero; everything else is a bug
and keeps its traceback.
"""


class PostrainError(Exception):
    """An error in the user's input, with a message that says what is wrong and where."""


class RecipeError(PostrainError):
    """A recipe (file or override) is malformed, has an unknown key, or a value of the wrong type."""


class DataError(PostrainError):
    """A dataset cannot be loaded or lacks a column the job needs."""


class RunDirError(PostrainError):
    """The run directory exists and would be overwritten."""
