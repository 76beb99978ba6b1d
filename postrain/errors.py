"""User-facing errors.

Anything a user can cause by a bad recipe, a bad override, bad data or a bad path raises a subclass of
:class:`PostrainError`. The CLI prints its message (no traceback) and exits non-zero; everything else is a bug
and keeps its traceback.
"""

import difflib


class PostrainError(Exception):
    """An error in the user's input, with a message that says what is wrong and where."""


class RecipeError(PostrainError):
    """A recipe (file or override) is malformed, has an unknown key, or a value of the wrong type."""


class DataError(PostrainError):
    """A dataset cannot be loaded or lacks a column the job needs."""


class RunDirError(PostrainError):
    """The run directory exists and would be overwritten."""


class LaunchError(PostrainError):
    """A worker of a launch failed: the message is the first failing rank's, the exit code that worker's."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def did_you_mean(word: object, choices, n: int = 3) -> str:
    """"did you mean 'a' or 'b'?" for the choices closest to a misspelt `word` (case-insensitive), or "".

    The one spelling-hint helper: every error about an unknown key, name or parameter uses it."""

    by_lower = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=n, cutoff=0.6)
    return f"did you mean {' or '.join(repr(by_lower[c]) for c in close)}?" if close else ""


def origin_of(origins: dict[str, str], path: str) -> str:
    """Which layer set `path` ("recipes/x.yaml", "command line", ...): the most specific recorded origin for this
    key or one of its parents (`a.b[2].c` -> `a.b[2]` -> `a.b` -> `a`). Here, below every layer that names a key
    in an error (the recipe loader records the origins; registries and sections below it quote them)."""
    key = path
    while key:
        if key in origins:
            return origins[key]
        key = key[:key.rindex("[")] if key.endswith("]") else key.rpartition(".")[0]
    return "built-in defaults"


class OutputDirError(PostrainError):
    """The run's output directory cannot be made or written: a file in its place or above it, a read-only
    filesystem, no permission."""

