"""The base class of errors a user can act on.

A :class:`UserError` is raised for bad input the user controls: a config
value, a missing or damaged data set, a damaged or mismatched checkpoint, an
unusable model file. Its message is complete (what is wrong, where, and what
to do), so the command-line tools print it as one paragraph without a
traceback (:mod:`bvit_jax.cli`). Every other exception is a bug or an
environment problem and keeps its traceback.

Subclasses also derive from the built-in type that fits (``ValueError``,
``RuntimeError``, ``FileNotFoundError``), so existing ``except`` clauses
keep working.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "MissingExtraError"]


class UserError(Exception):
    """An error whose message tells the user what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message says which field and how to fix it."""


class MissingExtraError(UserError, ImportError):
    """A job needs an optional dependency group (a ``pyproject.toml`` extra) that is not installed."""

    def __init__(self, job: str, extra: str, error: ImportError):
        super().__init__(
            f"{job} needs the '{extra}' extra, which is not installed ({error}): "
            f"pip install 'bvit_jax[{extra}]' (or, in a checkout, bash scripts/setup.sh {extra})"
        )
