"""Shared argument checks: sparsities, ints, seeds, method/scope/calibration, selectors, optimizers, finite values.

Every verb and schedule validates its arguments with these helpers before it
touches the model, so a refused call leaves the model exactly as it was and the
same mistake gets the same message everywhere. Each helper returns the checked
(normalised) value and raises :class:`~hadamard_sparse.errors.InvalidTypeError`
(a ``TypeError``) or :class:`~hadamard_sparse.errors.InvalidArgumentError` (a
``ValueError``) naming the argument, the value and what is allowed.

This module sits just above :mod:`errors` and :mod:`scores`; it imports no other
sibling.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import nn

from .errors import InvalidArgumentError, InvalidTypeError
from .scores import ScoreEntry, get_score

__all__ = [
    "DISTRIBUTIONS",
    "NORMS",
    "SCOPES",
    "Selector",
    "Selectors",
    "check_blocksize",
    "check_choice",
    "check_distribution",
    "check_finite",
    "check_fraction",
    "check_int",
    "check_method",
    "check_module",
    "check_norm",
    "check_optimizer",
    "check_positive_int",
    "check_seed",
    "check_selectors",
    "check_sparsity",
]

SCOPES = ("global", "layer", "row")
DISTRIBUTIONS = ("uniform", "er", "erk")
NORMS = ("l1", "l2")

Selector = Union[type, str, Callable[[str, nn.Module], bool]]
Selectors = Union[Selector, Sequence[Selector], None]


def check_fraction(value: object, arg: str = "sparsity", *, high_open: bool = False) -> float:
    """A float in ``[0, 1]`` (``[0, 1)`` with ``high_open``), e.g. a sparsity."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(f"{arg} must be a float in [0, 1], got {value!r}")
    v = float(value)
    if not (0.0 <= v <= 1.0) or math.isnan(v):
        raise InvalidArgumentError(f"{arg} must be a float in [0, 1], got {value!r}")
    if high_open and v >= 1.0:
        raise InvalidArgumentError(f"{arg} must be a float in [0, 1), got {value!r}")
    return v


check_sparsity = check_fraction  # the usual name at call sites that check a sparsity


def check_int(value: object, arg: str, minimum: int) -> int:
    """An int ``>= minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidTypeError(f"{arg} must be an int >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise InvalidArgumentError(f"{arg} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_positive_int(value: object, arg: str) -> int:
    """An int ``>= 1`` (bools refused), with the message "must be a positive int"."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTypeError(f"{arg} must be a positive int, got {value!r}")
    if value < 1:
        raise InvalidArgumentError(f"{arg} must be a positive int, got {value!r}")
    return value


def check_seed(seed: object, arg: str = "seed") -> int:
    """Any Python int (bools refused)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidTypeError(f"{arg} must be an int, got {seed!r}")
    return seed


def check_choice(value: object, arg: str, allowed: Sequence[str]) -> str:
    """One of the strings ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise InvalidArgumentError(f"{arg} must be one of {list(allowed)}, got {value!r}")
    return value


def check_distribution(distribution: object, arg: str = "distribution") -> str:
    """One of :data:`DISTRIBUTIONS` (``"uniform"``, ``"er"``, ``"erk"``)."""
    return check_choice(distribution, arg, DISTRIBUTIONS)


def check_norm(norm: object, arg: str = "norm") -> str:
    """One of :data:`NORMS` (``"l1"``, ``"l2"``)."""
    if norm not in NORMS:
        raise InvalidArgumentError(f"{arg} must be one of {list(NORMS)}, got {norm!r}")
    return norm  # type: ignore[return-value]


def check_module(model: object, arg: str = "model") -> nn.Module:
    """An ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"{arg} must be an nn.Module, got {type(model).__name__}")
    return model


def check_optimizer(
    optimizer: object, arg: str = "optimizer", required: bool = False
) -> torch.optim.Optimizer | None:
    """A ``torch.optim.Optimizer`` (or ``None`` unless ``required``)."""
    if optimizer is None and not required:
        return None
    if not isinstance(optimizer, torch.optim.Optimizer):
        need = "a torch.optim.Optimizer" if required else "a torch.optim.Optimizer or None"
        raise InvalidTypeError(f"{arg} must be {need}, got {optimizer!r}")
    return optimizer


def check_method(
    method: str,
    scope: str | None,
    *,
    calibration: Any = None,
    takes_calibration: bool = True,
) -> tuple[ScoreEntry, str]:
    """The score entry of ``method`` and the resolved ``scope``, after checking they fit together.

    Args:
        method: a registered score name (unknown names raise with the list of known ones).
        scope: ``"global"``, ``"layer"``, ``"row"``, or ``None`` for the method's first scope.
        calibration: the caller's calibration argument (checked only against ``None``).
        takes_calibration: ``False`` for callers without calibration data (schedules): methods
            that need calibration are then refused.

    Returns:
        ``(entry, scope)``.
    """
    entry = get_score(method)
    if scope is None:
        scope = entry.scopes[0]  # "global" for magnitude/random, "row" for wanda/sparsegpt
    if scope not in SCOPES:
        raise InvalidArgumentError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    if scope not in entry.scopes:
        raise InvalidArgumentError(f"method {method!r} supports scope in {list(entry.scopes)}, got {scope!r}")
    if entry.needs_gradients and calibration is None:
        raise InvalidArgumentError(
            f"method {method!r} needs gradients gathered during training, got calibration=None: build "
            "tracker = hs.GradientScores(model) before training (it records every backward pass), train, "
            "then pass calibration=tracker"
        )
    if entry.needs_calibration:
        if not takes_calibration:
            raise InvalidArgumentError(
                f"method {method!r} needs calibration data, which schedules do not take"
            )
        if calibration is None:
            raise InvalidArgumentError(
                f"method {method!r} needs calibration: an iterable of model inputs (tensors, tuples or "
                "dicts of keyword arguments) or hs.calibrate(model, batches) statistics, got None"
            )
    return entry, scope


def check_selectors(selectors: Selectors, arg: str) -> list[Selector]:
    """``include``/``exclude`` as a list: module types, glob patterns or callables ``(name, module) -> bool``."""
    if selectors is None:
        return []
    items: list[Selector]
    if isinstance(selectors, (str, type)) or (callable(selectors) and not isinstance(selectors, Sequence)):
        items = [selectors]  # type: ignore[list-item]
    elif isinstance(selectors, Sequence):
        items = list(selectors)
    else:
        raise InvalidTypeError(
            f"{arg} must be a module type, a glob pattern, a callable (name, module) -> bool "
            f"or a list of those, got {selectors!r}"
        )
    for s in items:
        ok = (isinstance(s, type) and issubclass(s, nn.Module)) or isinstance(s, str) or callable(s)
        if not ok:
            raise InvalidTypeError(
                f"{arg} entries must be nn.Module subclasses, glob patterns (str) or callables "
                f"(name, module) -> bool, got {s!r}"
            )
    return items


def check_blocksize(blocksize: object) -> tuple[int, int]:
    """A block shape: a pair of positive ints."""
    if (
        not isinstance(blocksize, (tuple, list))
        or len(blocksize) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in blocksize)
    ):
        raise InvalidArgumentError(f"blocksize must be a pair of positive ints, got {blocksize!r}")
    return int(blocksize[0]), int(blocksize[1])


def check_finite(value: torch.Tensor, what: str) -> None:
    """Refuse NaN/inf values (a masked NaN stays NaN, and magnitudes of NaN or inf rank arbitrarily)."""
    if value.is_meta:
        return
    bad = value.numel() - int(torch.isfinite(value).sum())
    if bad:
        raise InvalidArgumentError(
            f"{what} has {bad} non-finite value(s) (NaN or inf); they are refused because a masked NaN "
            "is still NaN (NaN * 0) and non-finite scores rank arbitrarily: replace them first, e.g. "
            "with torch.nan_to_num_ under torch.no_grad()"
        )
