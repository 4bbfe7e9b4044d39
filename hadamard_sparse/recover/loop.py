"""The training loop of a recovery run: distillation steps, pruning steps, checkpoints, budget, progress.

:class:`Plan` is the run written down (steps, ramp, sparsities); it travels in every checkpoint, so a
resumed run follows the plan of the interrupted one. :func:`train` runs steps ``start .. plan.steps``;
a checkpoint (model with masks, optimizer, learning-rate scheduler, pruning schedule, step, torch's
random state, losses) is written atomically every ``checkpoint_every`` steps and at the end, and the
batch of a step is a pure function of the seed and the step (:class:`~.data.Batches`), so a resumed
run is bitwise the uninterrupted one.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distill import Distiller
from ..errors import InvalidArgumentError
from ..gradient_scores import GradientScores
from ..schedules import GradualPruning, RestartingLR
from .data import Batches

__all__ = [
    "CHECKPOINT_FILE",
    "Plan",
    "Run",
    "check_config",
    "load_checkpoint",
    "measure_step",
    "plan_steps",
    "restore",
    "train",
]

#: The file a recovery run checkpoints to, inside ``checkpoint_dir``.
CHECKPOINT_FILE = "recover_state.pt"
_VERSION = 1


@dataclass(frozen=True)
class Plan:
    """A recovery run's schedule.

    Attributes:
        target: the final sparsity.
        initial: the sparsity of the one-shot initialisation.
        steps: training steps in all.
        every: steps between pruning steps of the ramp (0: no ramp).
        start: the first pruning step of the ramp.
        end: the last pruning step of the ramp.
    """

    target: float
    initial: float
    steps: int
    every: int
    start: int
    end: int

    @property
    def ramps(self) -> bool:
        return self.every > 0


def plan_steps(
    target: float, initial: float, steps: int, pruning_steps: int, ramp_fraction: float = 0.75
) -> Plan:
    """Spread ``pruning_steps`` pruning steps evenly over the first ``ramp_fraction`` of ``steps``.

    The ramp prunes at ``every, 2 every, ..., n every`` (``every = floor(ramp_fraction * steps / n)``,
    ``n`` reduced when the run is too short for one step between cuts), so the weights recover for one
    interval at the initial sparsity and for the last quarter of the run at the target.
    """
    if target <= initial + 1e-12 or steps < 2:
        return Plan(target, min(initial, target), steps, 0, 0, 0)
    n = max(1, min(pruning_steps, int(ramp_fraction * steps) - 1))
    every = max(1, int(ramp_fraction * steps) // (n + 1))
    return Plan(target, initial, steps, every, every, every * n)


def _progress(total: int, initial: int, enabled: bool | None) -> Any:
    if enabled is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    if enabled is None and not sys.stderr.isatty():
        return None
    return tqdm(total=total, initial=initial, desc="recover", unit="step", dynamic_ncols=True)


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the state a recovery run wrote to ``checkpoint_dir``."""
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise InvalidArgumentError(
            f"resume=True but {str(path)!r} does not exist; run once without resume to start, "
            "with the same checkpoint_dir"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("version") != _VERSION:
        raise InvalidArgumentError(f"{str(path)!r} is not a recovery checkpoint of this version")
    return state


@dataclass
class Run:
    """What :func:`train` drives, built by the recipe."""

    student: nn.Module
    distill: Distiller
    batches: Batches
    optimizer: torch.optim.Optimizer
    lr: RestartingLR
    schedule: GradualPruning | None
    plan: Plan
    seed: int
    config: dict[str, Any]
    losses: list[float]
    tracker: GradientScores | None = None


def _state(run: Run, step: int) -> dict[str, Any]:
    return {
        "version": _VERSION,
        "config": run.config,
        "plan": asdict(run.plan),
        "step": step,
        "model": run.student.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "lr": run.lr.state_dict(),
        "schedule": None if run.schedule is None else run.schedule.state_dict(),
        "tracker": None if run.tracker is None else run.tracker.state_dict(),
        "rng": torch.get_rng_state(),
        "losses": list(run.losses),
    }


def check_config(state: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse a checkpoint written by a run with other arguments."""
    saved = state.get("config", {})
    diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in config.items() if saved.get(k) != v]
    if diff:
        raise InvalidArgumentError(
            "resume: the checkpoint was written by a run with other arguments (" + "; ".join(diff) + ")"
        )


def restore(run: Run, state: dict[str, Any]) -> int:
    """Load a checkpoint's state into ``run`` (built from the same config); returns its step."""
    check_config(state, run.config)
    run.student.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr.load_state_dict(state["lr"])
    if run.schedule is not None:
        run.schedule.load_state_dict(state["schedule"])
    if run.tracker is not None:
        run.tracker.load_state_dict(state["tracker"])
    torch.set_rng_state(state["rng"])
    run.losses[:] = [float(x) for x in state["losses"]]
    return int(state["step"])


def measure_step(run: Run, repeats: int = 2) -> float:
    """Seconds per training step, from forward + backward passes that change nothing.

    The passes run on batches of about the mean size (:meth:`~.data.Batches.typical_steps`); the
    first one warms up and is not counted. The gradients are dropped and torch's random state is
    put back, so the run that follows is the one it would have been without the measurement.
    """
    rng = torch.get_rng_state()
    times = []
    steps = run.batches.typical_steps(run.seed, repeats + 1)  # fewer when an epoch has fewer batches
    try:
        for i in (steps[j % len(steps)] for j in range(repeats + 1)):
            t0 = time.perf_counter()
            run.distill(run.batches.at(i, run.seed)).backward()
            times.append(time.perf_counter() - t0)
    finally:
        run.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
    # + the optimizer step, the pruning steps and a margin (all-MiniLM-L6-v2 at 90%, 2 threads: measured
    # 0.611 s, trained at 0.618 s per step). Slower steps stop the run at the deadline; a ramp ends at
    # 3/4 of the plan, so it still completes unless steps are a third slower than measured
    return 1.1 * sum(times[1:]) / repeats


def train(
    run: Run,
    start: int,
    *,
    deadline: float | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
    progress: bool | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    max_grad_norm: float = 1.0,
) -> tuple[int, bool]:
    """Run steps ``start .. run.plan.steps``; returns ``(last step, stopped by the deadline)``."""
    bar = _progress(run.plan.steps, start, progress)
    path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_FILE
    params = [p for p in run.student.parameters() if p.requires_grad]
    step, stopped = start, False
    try:
        while step < run.plan.steps:
            if deadline is not None and time.perf_counter() > deadline:
                stopped = True
                break
            loss = run.distill(run.batches.at(step, run.seed))
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            run.optimizer.step()
            run.lr.step()
            if run.schedule is not None:
                run.schedule.step()
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise InvalidArgumentError(
                    f"recover: the loss became {value} at step {step}; lower lr (and check the data)"
                )
            run.losses.append(value)
            info = dict(run.distill.last)
            info["sparsity"] = run.schedule.sparsity if run.schedule is not None else run.plan.target
            info["lr"] = run.optimizer.param_groups[0]["lr"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(sparsity=f"{info['sparsity']:.3f}", loss=f"{value:.4f}", refresh=False)
            if path is not None and (step % checkpoint_every == 0 or step == run.plan.steps):
                _save(path, _state(run, step))
            if callback is not None:
                callback(step, info)
    finally:
        if bar is not None:
            bar.close()
    if stopped and path is not None:
        _save(path, _state(run, step))
    return step, stopped
