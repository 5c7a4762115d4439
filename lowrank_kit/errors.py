"""User-facing errors.

Every error a user can trigger with bad input derives from :class:`LowRankError`. Its message is one
line: what is wrong, what was received, and what to do or the valid choices. The CLI prints that line
and exits non-zero without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class LowRankError(Exception):
    """Base class of every error caused by user input or environment, reported in one line."""


class RegistryError(LowRankError):
    """A plugin registered something invalid (duplicate name, wrong kind)."""


class UnknownNameError(LowRankError, KeyError):
    """A name (method, quantizer, model, scheme, ...) that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RecipeError(LowRankError):
    """A recipe or a CLI flag that builds one is invalid."""


class ModelLoadError(LowRankError):
    """A model could not be found, loaded or recognised."""


class CalibrationError(LowRankError):
    """Calibration data is missing, empty or unusable."""


class CheckpointError(LowRankError):
    """A compressed checkpoint is missing, corrupt or from an unsupported format version."""


def unknown_name(kind: str, name: str, available: Iterable[str]) -> UnknownNameError:
    """The one error style for an unknown registry name."""
    choices = ", ".join(sorted(available)) or "(none registered)"
    return UnknownNameError(f"unknown {kind} {name!r}; available: {choices}")
