"""Exception types raised by hadamard_sparse.

Every error a user can trigger with bad input is a :class:`ValueError` or a
:class:`TypeError` subclass, so ``except ValueError`` / ``except TypeError`` keep
working for callers that do not know this library, and every one of them is a
:class:`HadamardSparseError`, so ``except hs.HadamardSparseError`` catches them all.

- :class:`InvalidArgumentError`: an argument has an allowed type but a refused value.
- :class:`InvalidTypeError`: an argument has a refused type (also a :class:`TypeError`).
- :class:`NoTargetsError`: the model has no tensor the operation can act on.
- :class:`UnsupportedGraphError`: a model's graph cannot be transformed safely.
- :class:`TeacherCacheMissError`: a batch is not in a distiller's strict teacher cache.
- :class:`CalibrationError`: the model's forward raised on a calibration batch (the model's own
  exception is chained as ``__cause__``); raised as :class:`CalibrationTypeError` (also a
  :class:`TypeError`) or :class:`CalibrationRuntimeError` (also a :class:`RuntimeError`) when the
  model raised one of those, so code catching the original category keeps working.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "CalibrationRuntimeError",
    "CalibrationTypeError",
    "HadamardSparseError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "NoTargetsError",
    "TeacherCacheMissError",
    "UnsupportedGraphError",
]


class HadamardSparseError(ValueError):
    """Base class of the errors raised for invalid arguments or models."""


class InvalidArgumentError(HadamardSparseError):
    """Raised when an argument has an allowed type but a value outside what is allowed."""


class InvalidTypeError(HadamardSparseError, TypeError):
    """Raised when an argument has a type that is not allowed (a :class:`TypeError` too)."""


class NoTargetsError(HadamardSparseError):
    """Raised when a model has no tensor that the requested operation can act on."""


class UnsupportedGraphError(HadamardSparseError):
    """Raised when a model's graph cannot be transformed safely (e.g. by ``shrink``)."""


class TeacherCacheMissError(HadamardSparseError):
    """Raised when a :class:`~hadamard_sparse.distill.Distiller` with ``cache="strict"`` meets a batch it has not cached."""


class CalibrationError(InvalidArgumentError):
    """Raised when the model cannot run a calibration batch; the model's exception is the ``__cause__``."""


class CalibrationTypeError(CalibrationError, InvalidTypeError):
    """A :class:`CalibrationError` whose cause is a :class:`TypeError` (it is a ``TypeError`` too)."""


class CalibrationRuntimeError(CalibrationError, RuntimeError):
    """A :class:`CalibrationError` whose cause is a :class:`RuntimeError` (it is a ``RuntimeError`` too)."""
