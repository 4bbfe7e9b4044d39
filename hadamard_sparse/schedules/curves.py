"""Sparsity curves: pure functions of the step.

:func:`cubic` (Zhu & Gupta) and :func:`linear` map a step to a target sparsity;
:class:`~hadamard_sparse.schedules.GradualPruning` follows one of them.
"""

from __future__ import annotations

__all__ = ["CURVES", "cubic", "linear"]


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
