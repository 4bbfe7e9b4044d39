"""``recover``: prune a pretrained model to a high sparsity and distill it back towards its dense self.

The recipe (oBERT, Kurtic et al. 2022; movement pruning + distillation, Sanh et al. 2020; SquareHead,
Kurtic et al. 2023), written down as data in :class:`~.loop.Plan`:

1. a frozen dense copy of the model becomes the teacher;
2. one-shot pruning with a calibrated method (``"sparsegpt"`` by default) on the first
   training batches, to ``initial_sparsity`` (``min(0.7, sparsity)``);
3. a cubic ramp (:class:`~hadamard_sparse.schedules.GradualPruning`, global scope) from there to
   ``sparsity`` over the first three quarters of the run, ``pruning_steps`` cuts;
4. at every step, distillation (output + SquareHead features of the transformer blocks), AdamW,
   and a learning rate that restarts at each pruning step
   (:class:`~hadamard_sparse.schedules.RestartingLR`);
5. heads (pooler, classifier, LM head) stay dense, as do embeddings and LayerNorm (not targeted);
6. a report of quality against the teacher on held-out data.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._checks import Selectors, check_fraction, check_int, check_method, check_seed, check_selectors
from ..api import sparsify
from ..distill import Distiller
from ..errors import InvalidArgumentError, InvalidTypeError
from ..gradient_scores import GradientScores
from ..layers import resolve_targets
from ..reconstruct import find_blocks
from ..report import sparsity_report
from ..schedules import GradualPruning, RestartingLR, recovery_steps
from ..schedules.base import check_schedule_method
from ..scores import get_score
from ..structures import check_sparsity, parse_structure
from .data import Batches, is_sentence_transformer, tokenizer_of
from .distill import make_distiller
from .loop import Plan, Run, check_config, load_checkpoint, measure_step, plan_steps, restore, train
from .quality import Quality, compare, embeddings

__all__ = ["HEAD_PATTERNS", "RecoveryReport", "recover"]

#: Targeted tensors whose qualified names match one of these stay dense unless ``dense_heads=False``.
HEAD_PATTERNS = ("*pooler*", "*classifier*", "cls.*", "*.cls.*", "*lm_head*", "*qa_outputs*", "score.*")


@dataclass
class RecoveryReport:
    """What a :func:`recover` run did and how close the result stays to the dense teacher.

    Attributes:
        model: the recovered model (the one passed in, changed in place).
        sparsity: the fraction of zeros over the pruned tensors.
        target: the requested sparsity.
        steps: training steps done (in all, resumed runs included).
        planned_steps: the steps the plan had.
        minutes: wall-clock minutes of this call.
        stopped_early: the ``max_minutes`` budget ended the run before its plan's last step.
        cut_to_target: the ramp had not reached the target when training ended (budget), so the
            masks were cut to the target at once at the end.
        shortened: the plan was shortened to fit ``max_minutes`` (from the measured step time).
        seconds: wall-clock seconds of each phase (setup, one_shot, train, final_cut_and_eval).
        one_shot: quality right after the one-shot pruning (``None`` without ``eval_data`` or on resume).
        quality: quality at the end (``None`` without ``eval_data``).
        losses: the training loss of every step.
        plan: the run's :class:`~hadamard_sparse.recover.loop.Plan`.
    """

    model: nn.Module
    sparsity: float
    target: float
    steps: int
    planned_steps: int
    minutes: float
    stopped_early: bool
    one_shot: Quality | None
    quality: Quality | None
    plan: Plan
    losses: list[float] = field(default_factory=list, repr=False)
    shortened: bool = False
    cut_to_target: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"sparsity {self.sparsity:.4f} (target {self.target:g}), {self.steps}/{self.planned_steps} steps "
            f"in {self.minutes:.1f} min"
            + (" (plan shortened to fit max_minutes)" if self.shortened else "")
            + (" (stopped by max_minutes)" if self.stopped_early else "")
            + (" (ramp unfinished: masks cut to the target at the end)" if self.cut_to_target else ""),
            "seconds: " + ", ".join(f"{k} {v:g}" for k, v in self.seconds.items()),
        ]
        if self.one_shot is not None:
            lines.append(f"one-shot vs dense:  {self.one_shot}")
        if self.quality is not None:
            lines.append(f"recovered vs dense: {self.quality}")
        return "\n".join(lines)


def _float(value: object, arg: str, low: float, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= low
    ):
        raise InvalidArgumentError(f"{arg} must be a number > {low:g}, got {value!r}")
    return float(value)


def _heads(model: nn.Module, include: Selectors) -> list[str]:
    names = [t.qualified for t in resolve_targets(model, include, None, warn_tied=False)]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in HEAD_PATTERNS)]


def _feature_modules(model: nn.Module, include: Selectors, exclude: Selectors) -> list[str]:
    blocks = {id(b) for b in find_blocks(model, resolve_targets(model, include, exclude, warn_tied=False))}
    return [name for name, m in model.named_modules() if id(m) in blocks]


def recover(
    model: nn.Module,
    data: object,
    sparsity: float | None = None,
    *,
    tokenizer: Any = None,
    eval_data: object = None,
    method: str = "sparsegpt",
    ramp_method: str = "magnitude",
    initial_sparsity: float | None = None,
    structure: str | None = None,
    scope: str = "global",
    include: Selectors = None,
    exclude: Selectors = None,
    dense_heads: bool = True,
    steps: int | None = None,
    max_minutes: float | None = None,
    pruning_steps: int = 10,
    batch_size: int = 32,
    max_length: int = 128,
    group_by_length: bool = True,
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    restarts: bool = True,
    features: bool = True,
    temperature: float = 2.0,
    dropout: bool = False,
    calibration_batches: int = 4,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    seed: int = 0,
    progress: bool | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> RecoveryReport:
    r"""Prune ``model`` to ``sparsity`` and recover its quality by distilling from its dense self.

    Every argument is checked, the data read and the targets resolved before the model changes.
    The model is changed in place (masks registered as with :func:`~hadamard_sparse.sparsify`)
    and returned in the report.

    Args:
        model: a pretrained model (a Hugging Face model, a ``SentenceTransformer``, any
            ``nn.Module``): the student; a frozen dense copy becomes the teacher.
        data: training data: an iterable of texts (with ``tokenizer=``, or a SentenceTransformer's
            own) or of model inputs (a ``DataLoader``; dicts of keyword arguments, tuples, tensors).
        sparsity: the final sparsity, in ``(0, 1)``. Default: ``0.9``, or the structure's with an
            N:M ``structure``.
        tokenizer: a Hugging Face tokenizer for text data.
        eval_data: held-out data (same kinds as ``data``; never the training texts) on which the
            report compares student and teacher. ``None``: no quality report.
        method: the one-shot method (a registered score; calibrated on the first
            ``calibration_batches`` training batches when it needs calibration). Default:
            ``"sparsegpt"`` (``"sparsegpt_block"`` starts closer, 0.85 vs 0.79 cosine on
            all-MiniLM-L6-v2 at 70%, but its block reconstruction, 200 Adam steps per block, is what the
            distillation does anyway, at about 15 times the one-shot's time: 11 min vs 40 s there).
        ramp_method: the score of the gradual ramp: a calibration-free registered score, or
            ``"movement"`` / ``"obs"``, which read the gradients of the run (an
            :class:`~hadamard_sparse.GradientScores` is built and checkpointed; ``"obs"`` keeps 16
            gradients per tensor, blocks of 50). Default: ``"magnitude"``.
        initial_sparsity: the one-shot sparsity. Default: ``min(0.7, sparsity)``.
        structure: a structure for the one-shot masks (``"2:4"``): the masks then stay fixed and
            the run only distils.
        scope: the scope of the ramp: ``"global"`` (one threshold over all pruned tensors) or ``"layer"``.
        include: prune only these tensors (selectors of :func:`~hadamard_sparse.sparsify`).
        exclude: leave these tensors dense, besides the heads.
        dense_heads: leave the tensors matching :data:`HEAD_PATTERNS` (pooler, classifier, LM head)
            dense. Default: ``True``.
        steps: training steps. Default: :func:`~hadamard_sparse.schedules.recovery_steps` of the sparsity.
        max_minutes: wall-clock budget of this call: the step time is measured before training
            and the run shortened to fit; if steps get slower, the run stops at the budget (a
            checkpoint is written when ``checkpoint_dir`` is set) and the report says so.
        pruning_steps: cuts of the ramp. Default: ``10``.
        batch_size: texts per batch (text data). Default: ``32``.
        max_length: tokens per text (text data). Default: ``128``.
        group_by_length: batch training texts of similar token counts together, as the Hugging
            Face ``Trainer``'s ``group_by_length`` does (:class:`~.data.Batches`): less padding, so
            faster steps; every text is still seen once per epoch. Default: ``True``.
        lr: the peak learning rate of AdamW. Default: ``3e-4`` (lower it if the loss climbs between
            pruning steps). On all-MiniLM-L6-v2 with ``initial_sparsity=sparsity`` (no ramp), ``3e-3``
            recovered the most in 100 and 550 steps (``docs/recovery.md``, "Measured").
        weight_decay: AdamW's weight decay. Default: ``0.0``.
        restarts: restart the learning rate at every pruning step (``False``: one linear decay). Default: ``True``.
        features: add SquareHead feature distillation on the repeated blocks. Default: ``True``.
        temperature: softening of logits for models with logits. Default: ``2.0``.
        dropout: train the student with dropout (``False``: in eval mode). Default: ``False``.
        calibration_batches: training batches calibrating the one-shot method. Default: ``4``.
        checkpoint_dir: where to checkpoint (``recover_state.pt``); ``None``: no checkpoints.
        checkpoint_every: steps between checkpoints. Default: ``100``.
        resume: continue the run checkpointed in ``checkpoint_dir`` (pass the same dense model and
            arguments); the result equals the uninterrupted run's.
        seed: seeds data order, dropout and random scores. Default: ``0``.
        progress: a tqdm bar (``None``: when tqdm is installed and stderr is a terminal).
        callback: called as ``callback(step, info)`` after each step (``info``: loss parts,
            sparsity, learning rate).

    Returns:
        A :class:`RecoveryReport` (``report.model`` is ``model``).

    Example::

        >>> report = hs.recover(model, texts, 0.9, tokenizer=tok, eval_data=held_out, max_minutes=30)
        >>> print(report)
    """
    t_start = time.perf_counter()
    # ---------------------------------------------------------------- checks, nothing changes here
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    parsed = parse_structure(structure)
    if sparsity is None:
        sparsity = parsed.max_sparsity if parsed is not None and parsed.max_sparsity < 1.0 else 0.9
    target = check_fraction(sparsity, "sparsity")
    if not 0.0 < target < 1.0:
        raise InvalidArgumentError(f"sparsity must be a float in (0, 1), got {sparsity!r}")
    if parsed is not None:
        check_sparsity(parsed, target)
    initial = (
        min(0.7, target) if initial_sparsity is None else check_fraction(initial_sparsity, "initial_sparsity")
    )
    if initial > target or parsed is not None:
        initial = target
    needs_grads = get_score(ramp_method).needs_gradients
    check_schedule_method(ramp_method, scope, calibration=True if needs_grads else None)
    steps_n = recovery_steps(target) if steps is None else check_int(steps, "steps", 1)
    budget = _float(max_minutes, "max_minutes", 0.0, allow_none=True)
    n_cuts = check_int(pruning_steps, "pruning_steps", 1)
    b_size = check_int(batch_size, "batch_size", 1)
    m_len = check_int(max_length, "max_length", 1)
    peak = _float(lr, "lr", 0.0)
    wd = check_fraction(weight_decay, "weight_decay")
    temp = _float(temperature, "temperature", 0.0)
    n_calib = check_int(calibration_batches, "calibration_batches", 1)
    ckpt_every = check_int(checkpoint_every, "checkpoint_every", 1)
    check_seed(seed)
    for name, flag in (
        ("dense_heads", dense_heads),
        ("restarts", restarts),
        ("features", features),
        ("dropout", dropout),
        ("group_by_length", group_by_length),
        ("resume", resume),
    ):
        if not isinstance(flag, bool):
            raise InvalidTypeError(f"{name} must be a bool, got {flag!r}")
    if resume and checkpoint_dir is None:
        raise InvalidArgumentError("resume=True needs checkpoint_dir (where the run checkpointed)")
    if callback is not None and not callable(callback):
        raise InvalidTypeError(f"callback must be callable (step, info) -> None, got {callback!r}")
    tok = tokenizer_of(model, tokenizer)
    wrap = is_sentence_transformer(model)
    batches = Batches(
        data,
        "data",
        tokenizer=tok,
        batch_size=b_size,
        max_length=m_len,
        wrap=wrap,
        group_by_length=group_by_length,
    )
    eval_batches = (
        None
        if eval_data is None
        else Batches(
            eval_data, "eval_data", tokenizer=tok, batch_size=b_size, max_length=m_len, wrap=wrap
        ).in_order()
    )
    user_exclude = check_selectors(exclude, "exclude")
    heads = _heads(model, include) if dense_heads else []
    excl = [
        *user_exclude,
        *(h for h in heads if not any(fnmatch.fnmatchcase(h, s) for s in user_exclude if isinstance(s, str))),
    ]
    targets = resolve_targets(model, include, excl or None, warn_tied=False)  # raises on unmatched selectors
    if not targets:
        raise InvalidArgumentError(
            f"recover: no tensor of {type(model).__name__} is left to prune; check include/exclude"
        )
    calibration = batches.in_order(n_calib)
    entry, _ = check_method(method, None, calibration=calibration)
    state = load_checkpoint(checkpoint_dir) if resume else None  # type: ignore[arg-type]
    config = {
        "sparsity": target, "initial": initial, "method": method, "ramp_method": ramp_method,
        "structure": structure, "scope": scope, "targets": [t.qualified for t in targets],
        "lr": peak, "weight_decay": wd, "restarts": restarts, "features": features,
        "temperature": temp, "dropout": dropout, "seed": seed, "batch_size": b_size, "max_length": m_len,
        "group_by_length": group_by_length,
    }  # fmt: skip
    if state is not None:
        check_config(state, config)

    # ---------------------------------------------------------------- teacher, one-shot
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    deadline = None if budget is None else t_start + 60.0 * budget
    one_shot_quality = None
    t_emb = None if eval_batches is None else embeddings(teacher, eval_batches)
    timings = {"setup": time.perf_counter() - t_start}
    t0 = time.perf_counter()
    if state is None:
        with torch.no_grad():
            sparsify(
                model, initial, method=method, structure=structure, include=include, exclude=excl or None,
                calibration=calibration if entry.needs_calibration else None, seed=seed,
            )  # fmt: skip
        if t_emb is not None:
            one_shot_quality = compare(t_emb, embeddings(model, eval_batches))  # type: ignore[arg-type]
    else:
        sparsify(model, 0.0, include=include, exclude=excl or None)  # full-shape masks to load into

    timings["one_shot"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    shortened = False
    # ---------------------------------------------------------------- the run
    model.train(dropout)
    features_of = _feature_modules(model, include, excl or None) if features else []
    distill = make_distiller(
        model, teacher, batches.at(0, seed), features=features_of, temperature=temp,
        feature_weight=1.0 if features else 0.0,
    )  # fmt: skip
    tracker = None
    if needs_grads:  # movement / oBERT scores: gradients recorded during training
        names = config["targets"]
        tracker = GradientScores(model, num_grads=16 if ramp_method == "obs" else 0, include=names)
    try:
        plan = Plan(**state["plan"]) if state is not None else plan_steps(target, initial, steps_n, n_cuts)
        run = _build(
            tracker, model, distill, batches, plan, peak, wd, restarts, ramp_method, scope, seed, config
        )
        if state is None and deadline is not None:
            per_step = measure_step(run)
            if tracker is not None:
                tracker.reset()  # the measured passes are not training
            reserve = 0.0 if eval_batches is None else 0.5 * per_step * len(eval_batches)
            fit = int((deadline - time.perf_counter() - reserve) / per_step)
            if fit < plan.steps:
                shortened = True
                plan = plan_steps(target, initial, max(fit, 0), n_cuts)
                run = _build(
                    tracker,
                    model,
                    distill,
                    batches,
                    plan,
                    peak,
                    wd,
                    restarts,
                    ramp_method,
                    scope,
                    seed,
                    config,
                )
        start = 0
        if state is not None:
            start = restore(run, state)
        else:
            torch.manual_seed(seed)
        done, stopped = train(
            run, start, deadline=deadline, checkpoint_dir=checkpoint_dir, checkpoint_every=ckpt_every,
            progress=progress, callback=callback,
        )  # fmt: skip
    finally:
        distill.remove()
        if tracker is not None:
            tracker.remove()
    timings["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cut = False
    if run.schedule is not None and run.schedule.sparsity < target:  # budget ran out mid-ramp
        GradualPruning(model, target, initial_sparsity=target, start_step=0, end_step=0, method=ramp_method,
                       scope=scope, seed=seed)  # fmt: skip
        cut = True
    elif run.schedule is None and initial < target:  # no time for a ramp: cut to the target at once
        GradualPruning(model, target, initial_sparsity=target, start_step=0, end_step=0, method=ramp_method,
                       scope=scope, seed=seed)  # fmt: skip
        cut = True
    model.eval()
    quality = None if t_emb is None else compare(t_emb, embeddings(model, eval_batches))  # type: ignore[arg-type]
    rep = sparsity_report(model)
    names = set(config["targets"])
    zeros = sum(t.zeros for t in rep.tensors if t.name in names)
    numel = sum(t.numel for t in rep.tensors if t.name in names)
    timings["final_cut_and_eval"] = time.perf_counter() - t0
    return RecoveryReport(
        model=model, sparsity=zeros / max(numel, 1), target=target, steps=done, planned_steps=plan.steps,
        minutes=(time.perf_counter() - t_start) / 60.0, stopped_early=stopped, one_shot=one_shot_quality,
        quality=quality, plan=plan, losses=list(run.losses), shortened=shortened, cut_to_target=cut,
        seconds={k: round(v, 1) for k, v in timings.items()},
    )  # fmt: skip


def _build(
    tracker: GradientScores | None,
    model: nn.Module,
    distill: Distiller,
    batches: Batches,
    plan: Plan,
    peak: float,
    wd: float,
    restarts: bool,
    ramp_method: str,
    scope: str,
    seed: int,
    config: dict[str, Any],
) -> Run:
    """Optimizer, learning-rate scheduler and pruning schedule for ``plan``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=peak, weight_decay=wd)
    schedule = None
    if plan.ramps:
        schedule = GradualPruning(
            model, plan.target, initial_sparsity=plan.initial, start_step=plan.start, end_step=plan.end,
            every=plan.every, method=ramp_method, scope=scope, seed=seed, calibration=tracker,
        )  # fmt: skip
    cuts = [] if schedule is None or not restarts else list(range(plan.start, plan.end + 1, plan.every))
    lr_sched = RestartingLR(optimizer, cuts, total_steps=max(plan.steps, 1))
    return Run(model, distill, batches, optimizer, lr_sched, schedule, plan, seed, config, [], tracker)
