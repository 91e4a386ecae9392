"""Exceptions the library raises; the CLI turns them into one red line and an exit code.

Exit codes (RELIABILITY.md): 2 for bad input or usage, 1 for runtime failures.
"""
from __future__ import annotations


class CnnxferError(Exception):
    """Base class: a failure the user can act on, with a one-line message."""

    exit_code = 1


class UsageError(CnnxferError):
    """A bad option or combination of options."""

    exit_code = 2


class DataError(CnnxferError):
    """The input data cannot be used (no images, no classes, bad manifest...)."""

    exit_code = 2


class WeightsError(CnnxferError):
    """Weights cannot be found, loaded safely, or do not fit the model."""

    exit_code = 2


class ModelError(CnnxferError):
    """Unknown architecture or a custom model factory that cannot be used."""

    exit_code = 2


class DeviceError(CnnxferError):
    """The requested device is not available on this machine."""

    exit_code = 2


class OutputExistsError(CnnxferError):
    """The output exists and neither --overwrite nor --resume was given."""

    exit_code = 2


class TrainingError(CnnxferError):
    """A run failed while training (non-finite loss, out of memory...)."""

    exit_code = 1


class StrictModeError(CnnxferError):
    """--strict was given and some files were skipped."""

    exit_code = 1
