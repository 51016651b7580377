"""Error types with messages meant for people.

Every error moerge raises on bad input is a :class:`MoergeError`. Its message
says what was expected, what was found, where (file, tensor, recipe line) and,
when there is one, what to do. The CLI prints the message alone (no traceback
unless ``--debug``) and exits with :attr:`MoergeError.exit_code`.
"""

from __future__ import annotations

from collections.abc import Iterable


class MoergeError(Exception):
    """Base class for every user-facing moerge error."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class RecipeError(MoergeError):
    """The recipe is malformed: unknown key, wrong type, missing value."""


class CheckpointError(MoergeError):
    """A checkpoint cannot be found, read or trusted (corrupt header, pickle without opt-in)."""


class PlanError(MoergeError):
    """The inputs cannot be merged as asked: missing tensor, shape mismatch, bad parameter."""


class NonFiniteError(MoergeError):
    """An input tensor holds NaN or Inf."""


class OutputError(MoergeError):
    """The output cannot be written: exists without --force, disk full, permissions."""


class StepError(MoergeError):
    """A step an experiment runs in its own process (a merge, statistics, a router) failed; its log is named."""


class UnknownMethodError(RecipeError):
    """No merge method is registered under the requested name."""


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """Return the candidate closest to ``word`` by edit distance, if it is close enough."""
    import difflib

    matches = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Format a ``did you mean`` suffix (empty when nothing is close)."""
    best = closest(word, candidates)
    return f" (did you mean {best!r}?)" if best else ""
