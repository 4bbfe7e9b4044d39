"""Sparsity curves: pure functions of the step.

:func:`cubic` (Zhu & Gupta) and :func:`linear` map a step to a target sparsity;
:class:`~hadamard_sparse.schedules.GradualPruning` follows one of them. :func:`recovery_steps` is
the default training length a recovery run gives a target sparsity.
"""

from __future__ import annotations

import math

from .._checks import check_fraction, check_int

__all__ = ["CURVES", "cubic", "linear", "recovery_steps"]


def cubic(step: int, *, initial: float, final: float, start: int, end: int) -> float:
    r"""Zhu & Gupta's cubic sparsity curve (arXiv 1710.01878).

    :math:`s_t = s_f + (s_i - s_f)\,(1 - (t - t_0) / (t_1 - t_0))^3` for :math:`t_0 \le t \le t_1`,
    ``initial`` before ``start`` and ``final`` after ``end``.

    Args:
        step: the step ``t``.
        initial: sparsity at ``start``.
        final: sparsity at ``end``.
        start: first step of the ramp.
        end: last step of the ramp (``end == start`` jumps to ``final`` at ``start``).

    Returns:
        The target sparsity at ``step``.

    Example::

        >>> cubic(50, initial=0.0, final=0.8, start=0, end=100)
        0.7
    """
    if step < start:
        return float(initial)
    if step >= end:
        return float(final)
    progress = (step - start) / (end - start)
    return float(final + (initial - final) * (1.0 - progress) ** 3)


def linear(step: int, *, initial: float, final: float, start: int, end: int) -> float:
    """Linear sparsity ramp from ``initial`` at ``start`` to ``final`` at ``end``.

    Args:
        step: the step ``t``.
        initial: sparsity at ``start``.
        final: sparsity at ``end``.
        start: first step of the ramp.
        end: last step of the ramp.

    Returns:
        The target sparsity at ``step``.

    Example::

        >>> linear(25, initial=0.0, final=0.8, start=0, end=100)
        0.2
    """
    if step < start:
        return float(initial)
    if step >= end:
        return float(final)
    progress = (step - start) / (end - start)
    return float(initial + (final - initial) * progress)


#: The curves :class:`~hadamard_sparse.schedules.GradualPruning` accepts by name.
CURVES = {"cubic": cubic, "linear": linear}


def recovery_steps(sparsity: float, *, steps_per_halving: int = 300, minimum: int = 100) -> int:
    r"""The default number of training steps to recover a model pruned to ``sparsity``.

    The length grows with the number of times the kept weights are halved,
    :math:`\log_2(1 / (1 - s))`: 1 at 50%, 2.3 at 80%, 3.3 at 90%, 4.3 at 95%. Each halving
    removes a comparable share of what the network still holds, and gradual-pruning recipes
    (Zhu & Gupta 2017; oBERT, Kurtic et al. 2022) spend their budget roughly evenly per such
    step, so training grows with it rather than with the sparsity itself (which would give 90%
    barely more than 80%) or with :math:`1 / (1 - s)` (which gives 95% twice 90%).

    Args:
        sparsity: the target sparsity, in ``[0, 1)``.
        steps_per_halving: training steps per halving of the kept weights. Default: ``300``
            (batches of 32 sentences: about 1,000 steps at 90%).
        minimum: the fewest steps returned. Default: ``100``.

    Returns:
        ``max(minimum, ceil(steps_per_halving * log2(1 / (1 - sparsity))))``.

    Example::

        >>> recovery_steps(0.9)
        997
        >>> recovery_steps(0.5)
        300
    """
    s = check_fraction(sparsity, "sparsity", high_open=True)
    per = check_int(steps_per_halving, "steps_per_halving", 1)
    low = check_int(minimum, "minimum", 1)
    return max(low, math.ceil(per * math.log2(1.0 / (1.0 - s)) - 1e-9))
