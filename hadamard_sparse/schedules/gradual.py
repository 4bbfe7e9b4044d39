"""Gradual magnitude pruning along a sparsity curve (Zhu & Gupta 2017)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from .._checks import check_fraction, check_int
from ..errors import InvalidArgumentError
from ..gradient_scores import GradientScores, check_gradients
from ..layers import Selectors
from ..scores import get_score
from ..structures import check_sparsity, parse_structure
from . import sharded
from .base import Schedule, check_schedule_method, is_distributed
from .curves import CURVES

__all__ = ["GradualPruning"]


class GradualPruning(Schedule):
    r"""Gradual magnitude pruning along a sparsity curve (Zhu & Gupta 2017, arXiv 1710.01878).

    At the update steps ``start_step, start_step + every, ...`` and ``end_step``, the masks are
    pruned to ``curve(step)`` with exact element counts (``round(s * N)`` zeros over all masked
    tensors with ``scope="global"``, ``round(s * n)`` per tensor with ``scope="layer"``). Masks only
    grow sparser: entries already masked are pruned first and never come back, so the scores are
    those of the *effective* weights. ``original`` is not zeroed at pruned positions.

    Steps count optimizer steps: ``step()`` after the ``t``-th ``optimizer.step()`` moves to step
    ``t``. Step 0 (construction) is an update step when ``start_step == 0``.

    Args:
        model: a model with masks (``hs.sparsify(model, 0.0)`` registers all-ones masks); may be
            wrapped in DDP or ``torch.compile`` (the masks of the inner model are driven) or sharded
            with FSDP2's ``fully_shard`` (unstructured only; see docs/schedules.md).
        final_sparsity: sparsity reached at ``end_step``, in ``[0, 1]``. Default: ``0.9``.
        initial_sparsity: sparsity at ``start_step``, in ``[0, final_sparsity]``. Default: ``0.0``.
        start_step: first update step (``>= 0``). Default: ``0``.
        end_step: last update step (``>= start_step``). Default: ``1000``.
        every: steps between updates (``>= 1``). Default: ``100``.
        curve: ``"cubic"``, ``"linear"`` or a callable ``progress -> sparsity`` with ``progress`` in
            ``[0, 1]``. Default: ``"cubic"``.
        method: a registered score (``"magnitude"``, ``"random"``, ...). Default: ``"magnitude"``.
        scope: ``"global"`` (one threshold over all masked tensors) or ``"layer"``. Default: ``"global"``.
        structure: passed to the pruning engine for structured sparsity (``None``: unstructured).
        seed: seeds the schedule's own generator (used by random scores). Default: ``0``.
        min_keep: with ``scope="global"``, the best ``min_keep`` weights (groups, with a structure)
            of every output unit are never pruned, as in :func:`~hadamard_sparse.sparsify`; a
            ``final_sparsity`` the floor cannot reach is refused here. ``0``: no floor. Default: ``1``.
        calibration: for the methods that read gradients recorded during training (``"movement"``,
            ``"obs"``): the :class:`~hadamard_sparse.GradientScores` built on the model before training.
            After every pruning step it drops its kept gradients (and its movement, if built with
            ``movement="since_prune"``); with ``"obs"`` each step also applies the OBS update to the
            kept weights. ``None`` for every other method. Under DDP the movement is averaged over
            the ranks before each pruning step (:meth:`~hadamard_sparse.GradientScores.synchronize`);
            under FSDP2 build the tracker after ``fully_shard`` (``"movement"`` only).
        include: only the masked tensors matching one of these selectors are driven (module types,
            glob patterns on qualified names, callables ``(name, module) -> bool``, as in
            :func:`~hadamard_sparse.sparsify`); the others keep their masks. ``None``: all.
        exclude: masked tensors matching one of these selectors are left as they are. An
            ``include``/``exclude`` entry that matches no masked tensor raises before any change.

    Example::

        >>> model = hs.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), 0.0)
        >>> sched = GradualPruning(model, 0.5, start_step=0, end_step=4, every=2)
        >>> for _ in range(4):
        ...     sched.step()
        >>> sched.sparsity
        0.5
    """

    _who = "GradualPruning"

    def __init__(
        self,
        model: nn.Module,
        final_sparsity: float = 0.9,
        *,
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        end_step: int = 1000,
        every: int = 100,
        curve: str | Callable[[float], float] = "cubic",
        method: str = "magnitude",
        scope: str = "global",
        structure: Any = None,
        seed: int = 0,
        min_keep: int = 1,
        calibration: GradientScores | None = None,
        include: Selectors = None,
        exclude: Selectors = None,
    ) -> None:
        final = check_fraction(final_sparsity, "final_sparsity")
        initial = check_fraction(initial_sparsity, "initial_sparsity")
        if final < initial:
            raise InvalidArgumentError(
                f"final_sparsity must be >= initial_sparsity (masks only grow sparser), "
                f"got final_sparsity={final_sparsity!r} < initial_sparsity={initial_sparsity!r}"
            )
        start = check_int(start_step, "start_step", 0)
        end = check_int(end_step, "end_step", 0)
        if end < start:
            raise InvalidArgumentError(
                f"end_step must be >= start_step, got end_step={end_step!r} < start_step={start_step!r}"
            )
        self.every = check_int(every, "every", 1)
        if not (callable(curve) or (isinstance(curve, str) and curve in CURVES)):
            raise InvalidArgumentError(
                f"curve must be one of {list(CURVES)} or a callable progress -> sparsity, got {curve!r}"
            )
        check_schedule_method(method, scope, calibration)
        parsed = parse_structure(structure)
        if parsed is not None:
            check_sparsity(parsed, final, "final_sparsity")
        super().__init__(model, seed, include, exclude)
        plan = self._plan_nested(final, method=method, scope=scope, structure=parsed, min_keep=min_keep)
        self.min_keep = plan.min_keep
        self.calibration = self._check_gradients(method, calibration, parsed)
        self._plan = dataclasses.replace(plan, calibration=self.calibration, stats=self.calibration)
        self.final_sparsity = final
        self.initial_sparsity = initial
        self.start_step = start
        self.end_step = end
        self.curve = curve
        self.method = method
        self.scope = scope
        self.structure = structure
        if self._is_update(0):
            self._update(0)

    def _check_gradients(self, method: str, calibration: Any, parsed: Any) -> GradientScores | None:
        """The GradientScores of a method that reads recorded gradients (checked), else ``None``."""
        if not get_score(method).needs_gradients:
            if calibration is not None:
                raise InvalidArgumentError(
                    "calibration is for the methods that read recorded gradients ('movement', 'obs'), "
                    f"got method={method!r} with calibration={type(calibration).__name__}"
                )
            return None
        if method == "obs" and sharded.mesh_of(self._masked, self._who) is not None:
            raise InvalidArgumentError(
                "method 'obs' does not support FSDP2-sharded weights: its block Fisher and OBS update need "
                "whole rows of gradients, which no rank holds; use method='movement' there"
            )
        if method == "obs" and is_distributed():
            raise InvalidArgumentError(
                "method 'obs' updates the kept weights from each rank's own gradients, which would make "
                "the replicas differ under torch.distributed; use method='movement' there"
            )
        return check_gradients(calibration, self._masked, method, need_data=False, structure=parsed)

    def _curve_value(self, step: int) -> float:
        if isinstance(self.curve, str):
            return CURVES[self.curve](
                step,
                initial=self.initial_sparsity,
                final=self.final_sparsity,
                start=self.start_step,
                end=self.end_step,
            )
        if step >= self.end_step:
            progress = 1.0
        elif step <= self.start_step:
            progress = 0.0
        else:
            progress = (step - self.start_step) / (self.end_step - self.start_step)
        value = self.curve(progress)  # type: ignore[operator]
        try:
            return check_fraction(value, "curve(progress)")
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (progress={progress})") from None

    def _is_update(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.every == 0 or step == self.end_step

    def target_at(self, step: int) -> float:
        """The target sparsity the masks follow after ``step`` (the curve at the last update step)."""
        if step < self.start_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return self._curve_value(self.end_step)
        last = self.start_step + (step - self.start_step) // self.every * self.every
        return self._curve_value(last)

    @property
    def sparsity(self) -> float:
        return self.target_at(self.last_step)

    def _on_step(self, step: int) -> None:
        if self._is_update(step):
            self._update(step)

    def _update(self, step: int) -> None:
        target = self._curve_value(step)
        self._prune_nested(target, self._plan)
        self._record(step, target)

    def _config(self) -> dict[str, Any]:
        return {
            "final_sparsity": self.final_sparsity,
            "initial_sparsity": self.initial_sparsity,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "every": self.every,
            "curve": self.curve if isinstance(self.curve, str) else "callable",
            "method": self.method,
            "scope": self.scope,
            "min_keep": self.min_keep,
        }
