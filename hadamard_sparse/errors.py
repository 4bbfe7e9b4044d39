"""Exception types raised by hadamard_sparse.

Every error a user can trigger with bad input is a :class:`ValueError` or a
:class:`TypeError` subclass, so ``except ValueError`` keeps working for callers
that do not know this library.
"""

from __future__ import annotations

__all__ = ["HadamardSparseError", "NoTargetsError", "UnsupportedGraphError"]


class HadamardSparseError(ValueError):
    """Base class of the errors raised for invalid arguments or models."""


class NoTargetsError(HadamardSparseError):
    """Raised when a model has no tensor that the requested operation can act on."""


class UnsupportedGraphError(HadamardSparseError):
    """Raised when a model's graph cannot be transformed safely (e.g. by ``shrink``)."""
