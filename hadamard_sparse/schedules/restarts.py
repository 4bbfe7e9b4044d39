"""Learning rates that restart at every pruning step (oBERT's cyclic-linear schedule).

Kurtic et al. 2022 (oBERT, arXiv 2203.07259) decay the learning rate linearly from its peak to
about 0 between two pruning steps and jump back to the peak at each: the weights that survive a
pruning step get a fresh, large learning rate to recover, and a small one before the next cut.
:func:`restart_factor` is that curve (a pure function of the step); :class:`RestartingLR` applies
it to any ``torch.optim`` optimizer as a :class:`torch.optim.lr_scheduler.LRScheduler`.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from .._checks import check_fraction, check_int
from ..errors import InvalidArgumentError, InvalidTypeError
from .gradual import GradualPruning

__all__ = ["RestartingLR", "restart_factor", "update_steps"]


def restart_factor(step: int, *, restarts: Sequence[int], total_steps: int, floor: float = 0.0) -> float:
    r"""The learning-rate factor at ``step``: 1 at each restart, linear down to ``floor`` before the next.

    The cycle boundaries are ``0``, the ``restarts`` and ``total_steps``. Within a cycle
    :math:`[b_i, b_{i+1})`, the factor is :math:`1 - (1 - f)\,(t - b_i) / (b_{i+1} - b_i)`; from
    ``total_steps`` on it stays at ``floor``.

    Args:
        step: the step ``t`` (the number of optimizer steps taken).
        restarts: the steps where the factor jumps back to 1 (pruning steps; ``0`` and steps at or
            past ``total_steps`` add nothing).
        total_steps: the end of the last cycle.
        floor: the factor reached at the end of each cycle, in ``[0, 1]``. Default: ``0.0``.

    Returns:
        The factor in ``[floor, 1]``.

    Example::

        >>> restart_factor(5, restarts=[10], total_steps=20)
        0.5
        >>> restart_factor(10, restarts=[10], total_steps=20)
        1.0
    """
    bounds = sorted({0, total_steps, *(r for r in restarts if 0 < r < total_steps)})
    if step >= total_steps:
        return float(floor)
    i = bisect.bisect_right(bounds, step) - 1
    lo, hi = bounds[i], bounds[i + 1]
    return float(1.0 - (1.0 - floor) * (step - lo) / (hi - lo))


def update_steps(schedule: GradualPruning) -> list[int]:
    """The steps at which ``schedule`` prunes: ``start_step, start_step + every, ...`` and ``end_step``.

    Example::

        >>> model = hs.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), 0.0)
        >>> update_steps(GradualPruning(model, 0.5, start_step=0, end_step=5, every=2))
        [0, 2, 4, 5]
    """
    steps = list(range(schedule.start_step, schedule.end_step + 1, schedule.every))
    if steps[-1] != schedule.end_step:
        steps.append(schedule.end_step)
    return steps


class RestartingLR(torch.optim.lr_scheduler.LRScheduler):
    r"""Cyclic-linear learning rate restarting at every pruning step (oBERT).

    The learning rate of every parameter group is ``base_lr * restart_factor(t)`` after ``t``
    calls of :meth:`step` (see :func:`restart_factor`): it decays linearly from ``base_lr`` to
    ``floor * base_lr`` between two pruning steps, jumps back at each, and decays once more from the
    last pruning step to ``total_steps``. It is a pure function of the step, so ``state_dict()``
    (which holds the step) restores it exactly.

    Call ``scheduler.step()`` right after ``optimizer.step()``, next to ``schedule.step()``: a
    :class:`GradualPruning` that prunes at step ``s`` (after ``s`` optimizer steps) is followed
    by an optimizer step at the full learning rate.

    Args:
        optimizer: any ``torch.optim`` optimizer.
        restarts: the pruning steps, or a :class:`GradualPruning` whose update steps are taken.
        total_steps: the number of training steps (end of the last cycle). With a schedule it
            defaults to ``end_step + every`` (one more pruning interval of fine-tuning after the
            last cut); with a list of steps it is required.
        floor: the factor reached at the end of each cycle, in ``[0, 1]``. Default: ``0.0``.
        last_epoch: as in :class:`torch.optim.lr_scheduler.LRScheduler`. Default: ``-1``.

    Example::

        >>> model = hs.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), 0.0)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> lr = RestartingLR(opt, [2], total_steps=4)
        >>> for _ in range(2):
        ...     opt.step(); lr.step()
        >>> lr.get_last_lr()
        [0.1]
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        restarts: Sequence[int] | GradualPruning,
        *,
        total_steps: int | None = None,
        floor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidTypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(restarts, GradualPruning):
            steps = update_steps(restarts)
            if total_steps is None:
                total_steps = restarts.end_step + restarts.every
        elif isinstance(restarts, Sequence) and not isinstance(restarts, str):
            steps = [check_int(r, "restarts[i]", 0) for r in restarts]
            if total_steps is None:
                raise InvalidArgumentError(
                    "total_steps is required when restarts is a list of steps (it ends the last cycle)"
                )
        else:
            raise InvalidTypeError(
                f"restarts must be a list of pruning steps or a GradualPruning, got {type(restarts).__name__}"
            )
        self.total_steps = check_int(total_steps, "total_steps", 1)
        self.floor = check_fraction(floor, "floor")
        self.restarts = sorted(set(steps))
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The factor applied to the base learning rates at ``step``."""
        return restart_factor(step, restarts=self.restarts, total_steps=self.total_steps, floor=self.floor)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        f = self.factor(max(self.last_epoch, 0))
        return [base * f for base in self.base_lrs]
