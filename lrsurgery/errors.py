"""One exception family whose messages are written for users: what is wrong, and how to fix it.

The CLI prints ``str(error)`` without a traceback and exits with ``error.exit_code``.
"""

from __future__ import annotations


class LrsurgeryError(Exception):
    """Base of every error lrsurgery raises on bad input; the message names the thing and the fix."""

    exit_code = 1


class ModelNotFoundError(LrsurgeryError):
    """A model reference could not be resolved offline (or at all)."""


class TargetError(LrsurgeryError):
    """Target patterns matched nothing, or matched modules that cannot be adapted."""


class AdapterFormatError(LrsurgeryError):
    """A file is not a valid lrsurgery adapter (wrong format, unknown version, corrupt, NaN)."""


class BaseMismatchError(LrsurgeryError):
    """An adapter was made for other base weights than the ones it is being applied to."""


class ShapeMismatchError(LrsurgeryError):
    """A tensor does not have the shape the model or the metadata says it must have."""


class OutputExistsError(LrsurgeryError):
    """An output path exists and ``force`` was not given."""


class TrainingError(LrsurgeryError):
    """Training cannot start or continue (bad data, NaN loss, bad configuration)."""
