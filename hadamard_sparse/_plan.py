"""``sparsify`` as plan-then-apply: :func:`plan_sparsify` checks and resolves, :func:`apply_plan` prunes.

:func:`plan_sparsify` is the one validating pass. It resolves every argument of
:func:`~hadamard_sparse.sparsify` (the structure, built from the model for
``"channel_group"``/``"neuron"``/``"head"``; the method and its scope; the targets
after ``include``/``exclude``; the per-tensor sparsities of a ``distribution`` or of
``allocation="owl"``; the calibration statistics the scores read) and runs every check
(values, structure fit, mask shapes, the ``min_keep`` floor, recorded gradients) into a
frozen :class:`SparsifyPlan`. It registers nothing, writes nothing, and leaves every
module's flags as they were, so a refused call leaves the model exactly as it was.

:func:`apply_plan` then does the work: the keep-masks from the pruning engine, attached
to the targets, or the method's weight-editing pruner run under an undo journal (the
pruner's own checks on its inputs stay in the pruner; if it raises, every tensor it
already changed is put back).

Example::

    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> plan = plan_sparsify(model, 0.75, scope="layer")
    >>> [t.qualified for t in plan.targets], plan.scope
    (['0.weight', '2.weight'], 'layer')
    >>> apply_plan(plan) is model
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._attach import attach_mask, run_pruner
from ._checks import (
    Selectors,
    check_distribution,
    check_finite,
    check_int,
    check_method,
    check_module,
    check_seed,
    check_sparsity,
)
from ._engine import check_floor, check_mask_shapes, check_structure, compute_keep_masks, pre_mask_value
from .allocation import check_allocation, owl_sparsities
from .calibration import stats_for
from .densities import densities_for_shapes
from .errors import InvalidArgumentError, NoTargetsError
from .gradient_scores import check_gradients
from .groups import TensorGroups
from .layers import Target, check_not_wrapped, resolve_targets, targeted_layers
from .scores import ScoreEntry
from .structures import MODEL_STRUCTURES, NM, Structure, StructureLike, parse_structure

__all__ = ["SparsifyPlan", "apply_plan", "keep_masks", "plan_sparsify", "targets_or_raise"]


@dataclass(frozen=True, eq=False)
class SparsifyPlan:
    """Everything :func:`apply_plan` needs, resolved and checked by :func:`plan_sparsify`.

    Attributes:
        model: the model to prune.
        targets: the tensors to mask, in module order (the order breaks ties).
        sparsity: one fraction for every target, or one per target (from ``distribution`` or
            ``allocation="owl"``).
        method: the registered method's name.
        entry: its score entry (score function, scopes, pruner, what it needs).
        scope: the resolved scope (``"layer"`` when a distribution set per-tensor sparsities).
        structure: the parsed structure (groups spanning tensors already restricted by
            ``include``/``exclude``), or ``None`` for unstructured masks.
        seed: the seed of random scores.
        min_keep: the checked ``min_keep`` floor.
        calibration: the calibration argument as given (read by pruners and gradient methods).
        stats: the statistics the scores read (activation statistics, or the ``GradientScores``),
            already gathered; ``None`` when the method reads none or is a pruner.
    """

    model: nn.Module
    targets: tuple[Target, ...]
    sparsity: float | tuple[float, ...]
    method: str
    entry: ScoreEntry
    scope: str
    structure: Structure | None
    seed: int
    min_keep: int
    calibration: Any
    stats: Mapping[str, Any] | None

    def sparsities(self) -> list[float]:
        """One sparsity per target."""
        if isinstance(self.sparsity, float):
            return [self.sparsity] * len(self.targets)
        return list(self.sparsity)

    def __repr__(self) -> str:
        sp = self.sparsity if isinstance(self.sparsity, float) else f"<{len(self.sparsity)} per-tensor>"
        return (
            f"SparsifyPlan(model={type(self.model).__name__}, targets={len(self.targets)}, sparsity={sp}, "
            f"method={self.method!r}, scope={self.scope!r}, structure={self.structure}, seed={self.seed}, "
            f"min_keep={self.min_keep})"
        )


def targets_or_raise(model: nn.Module, include: Selectors, exclude: Selectors, verb: str) -> list[Target]:
    """The targeted tensors of ``model`` (checked to be a plain module), or :class:`NoTargetsError`."""
    check_module(model)
    check_not_wrapped(model)
    targets = resolve_targets(model, include, exclude)
    if not targets:
        raise NoTargetsError(
            f"{verb}: model {type(model).__name__} has no tensor to act on (targets are "
            f"{targeted_layers()}); check include/exclude"
        )
    return targets


def _check_values(targets: list[Target], needs_values: bool) -> None:
    """Refuse meta-device weights when values are needed, and non-finite weights (by name)."""
    for t in targets:
        w = pre_mask_value(t.module, t.tensor_name)
        if w.is_meta and needs_values:
            raise InvalidArgumentError(
                f"{t.qualified} is on the meta device: it has no values to score; load the weights first "
                "(model.to_empty(device=...) then load_state_dict), or register all-ones masks now with "
                "sparsify(model, 0.0) and prune once the weights are loaded"
            )
        check_finite(w, t.qualified)


def _row_scope_message(method: str, scopes: tuple[str, ...], given: bool, structure: object) -> str:
    """Why ``scope="row"`` refuses a structure other than N:M, and what to pass instead."""
    if method == "sparsegpt":  # its pruner reconstructs N:M or unstructured masks only
        return (
            f"method 'sparsegpt' supports structure None or 'N:M', got structure={structure!r}; for rows, "
            "columns or blocks use method='wanda' with scope='layer', or method='magnitude'"
        )
    instead = [s for s in scopes if s != "row"]
    fix = f"pass scope={instead[0]!r} for rows, columns or blocks" if instead else "use an 'N:M' structure"
    if given:
        return f"scope='row' with a structure needs an 'N:M' structure, got structure={structure!r}; {fix}"
    return (
        f"method {method!r} prunes with scope='row' (per output row) by default, which takes only 'N:M' "
        f"structures, got structure={structure!r}; {fix}"
    )


def _model_structure(model: nn.Module, structure: str, example_inputs: Any) -> Structure:
    """The groups of a structure built from the model (``"channel_group"``, ``"neuron"``, ``"head"``)."""
    check_module(model)
    if example_inputs is None and structure != "head":
        raise InvalidArgumentError(
            f"structure={structure!r} needs example_inputs (a tensor, tuple or dict of model inputs), got None"
        )
    return MODEL_STRUCTURES[structure](model, example_inputs)


def _check_owl(
    calibration: Any, st: Structure | None, distribution: Any, structure: object, scope: str
) -> None:
    """Refuse what ``allocation="owl"`` cannot combine with, all problems in one message."""
    problems = []
    if calibration is None:
        problems.append("calibration (an iterable of model inputs or hs.calibrate statistics), got None")
    if st is not None:
        problems.append(f"structure=None, got structure={structure!r}")
    if distribution is not None:
        problems.append(f"distribution=None, got distribution={distribution!r}")
    if scope == "global":
        problems.append("scope 'row' or 'layer', got scope='global'")
    if problems:
        raise InvalidArgumentError("allocation='owl' needs " + "; ".join(problems))


def plan_sparsify(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    method: str = "magnitude",
    scope: str | None = None,
    include: Selectors = None,
    exclude: Selectors = None,
    seed: int = 0,
    structure: StructureLike = None,
    distribution: str | None = None,
    calibration: Any = None,
    example_inputs: Any = None,
    min_keep: int = 1,
    allocation: str = "uniform",
) -> SparsifyPlan:
    r"""Check and resolve every argument of :func:`~hadamard_sparse.sparsify` without changing ``model``.

    The arguments are those of :func:`~hadamard_sparse.sparsify`, with the same defaults and
    meanings. Calibration data is run through the model here (for data-aware scores and
    ``allocation="owl"``): the forward passes change no parameter, buffer, mask or flag.

    Args:
        model: any ``nn.Module``; not wrapped in DDP/FSDP yet.
        sparsity: the fraction to prune (default: ``0.7``, or ``N/M`` for an ``"N:M"`` structure).
        method: a registered score name.
        scope: ``"global"``, ``"layer"``, ``"row"`` or ``None`` (the method's first scope).
        include: selectors of the tensors (groups) to target.
        exclude: selectors of the tensors (groups) to skip.
        seed: seed for random scores.
        structure: ``None``, a structure name or object, or a structure built from the model.
        distribution: ``None``, ``"uniform"``, ``"er"`` or ``"erk"``.
        calibration: model inputs, ``hs.calibrate`` statistics, or an ``hs.GradientScores``.
        example_inputs: inputs that discover the groups of ``"channel_group"`` / ``"neuron"``.
        min_keep: the floor of a global selection.
        allocation: ``"uniform"`` or ``"owl"``.

    Returns:
        The checked :class:`SparsifyPlan`.

    Raises:
        InvalidArgumentError: a bad argument or a combination that cannot be applied (see
            :func:`~hadamard_sparse.sparsify`); InvalidTypeError: an argument of the wrong type;
            NoTargetsError: nothing to prune. The model is unchanged in every case.

    Example::

        >>> plan = plan_sparsify(torch.nn.Linear(8, 4), 0.5)
        >>> plan.sparsities(), plan.method, plan.scope
        ([0.5], 'magnitude', 'global')
    """
    if isinstance(structure, str) and structure in MODEL_STRUCTURES:
        structure = _model_structure(model, structure, example_inputs)
    st = parse_structure(structure)
    scope_given = scope is not None
    s = float(0.7 if st is None else st.default_sparsity) if sparsity is None else check_sparsity(sparsity)
    entry, scope = check_method(method, scope, calibration=calibration)
    groups = st if isinstance(st, TensorGroups) else None
    if groups is not None and (entry.pruner is not None or distribution is not None):
        raise InvalidArgumentError(
            f"structure={groups} takes a mask-only method and no distribution, got "
            f"method={method!r}, distribution={distribution!r}"
        )
    if groups is not None:  # include/exclude select groups: by producing layer / by any member
        groups = groups.restricted(model, include, exclude)
        st = groups
        if groups.n == 0:
            raise NoTargetsError(
                f"sparsify: structure {structure} has no group left after include={include!r}, exclude={exclude!r}"
            )
    if st is not None and scope == "row" and not isinstance(st, NM):
        raise InvalidArgumentError(_row_scope_message(method, entry.scopes, scope_given, structure))
    seed = check_seed(seed)
    min_keep = check_int(min_keep, "min_keep", 0)
    dist = None if distribution is None else check_distribution(distribution)
    if dist is not None and st is not None:
        raise InvalidArgumentError(
            f"distribution={distribution!r} needs structure=None, got structure={structure!r}"
        )
    if dist is not None and "layer" not in entry.scopes:
        raise InvalidArgumentError(
            f"distribution needs a method supporting scope='layer', got method={method!r}"
        )
    owl = check_allocation(allocation) == "owl"
    if owl:
        _check_owl(calibration, st, distribution, structure, scope)
    targets = (
        groups.targets(model) if groups is not None else targets_or_raise(model, include, exclude, "sparsify")
    )
    _check_values(targets, needs_values=s > 0 or owl or entry.needs_calibration or entry.pruner is not None)
    per: float | list[float] = s
    if owl:
        owl_stats = stats_for(model, targets, calibration, method="allocation='owl'", need_gram=False)
        per = owl_sparsities(model, targets, s, owl_stats)
    if dist is not None:
        dens = densities_for_shapes({t.qualified: tuple(t.value().shape) for t in targets}, s, dist)
        per, scope = [1.0 - dens[t.qualified] for t in targets], "layer"
    if st is not None:
        check_structure(st, targets, [per] if isinstance(per, float) else per)
    check_mask_shapes(targets, st, structure)
    if entry.needs_gradients:  # "movement", "obs": the GradientScores must hold gradients of every target
        check_gradients(calibration, targets, method, need_data=True, structure=st)
    if scope == "global" and isinstance(per, float):  # the engine would refuse it; refuse it before any work
        check_floor(targets, per, st, min_keep)
    stats: Mapping[str, Any] | None = None
    if entry.pruner is None:
        stats = (
            calibration if entry.needs_gradients else None
        )  # a GradientScores maps names to gradient states
        if entry.needs_calibration:
            stats = stats_for(model, targets, calibration, method=method, need_gram=entry.needs_gram)
    return SparsifyPlan(
        model=model,
        targets=tuple(targets),
        sparsity=per if isinstance(per, float) else tuple(per),
        method=method,
        entry=entry,
        scope=scope,
        structure=st,
        seed=seed,
        min_keep=min_keep,
        calibration=calibration,
        stats=stats,
    )


def keep_masks(plan: SparsifyPlan, *, value: str = "dense", checked: bool = True) -> list[torch.Tensor]:
    """The pruning engine's keep-masks for ``plan`` (what :func:`apply_plan` and the schedules attach or write).

    Args:
        plan: the plan (its targets, sparsity, method, scope, structure, seed, floor and statistics).
        value: score the ``"dense"`` values (sparsify) or the ``"effective"`` ones (schedules: masks
            stay nested).
        checked: the structure's fit and maximum sparsity were checked for ``plan.sparsity``;
            ``False`` checks them again (a schedule's curve may go past the sparsity it was planned for).

    Returns:
        One bool tensor per target, ``True`` where kept (compact with a structure).

    Example::

        >>> plan = plan_sparsify(torch.nn.Linear(8, 4), 0.5)
        >>> int(keep_masks(plan)[0].sum())
        16
    """
    return compute_keep_masks(
        list(plan.targets),
        plan.sparsity if isinstance(plan.sparsity, float) else list(plan.sparsity),
        method=plan.method,
        scope=plan.scope,
        seed=plan.seed,
        structure=plan.structure,
        stats=plan.stats,
        value=value,
        checked=checked,
        min_keep=plan.min_keep,
    )


def apply_plan(plan: SparsifyPlan) -> nn.Module:
    """Prune as ``plan`` says: attach the engine's keep-masks, or run the method's pruner.

    Args:
        plan: a plan from :func:`plan_sparsify`, applied to the model it was made for (right
            after it was made: the plan holds what was checked then).

    Returns:
        ``plan.model``, with masks registered or updated.

    Example::

        >>> model = torch.nn.Linear(8, 4)
        >>> apply_plan(plan_sparsify(model, 0.5)) is model
        True
    """
    targets = list(plan.targets)
    if plan.entry.pruner is not None:  # e.g. sparsegpt: also rewrites the kept weights
        kw: dict[str, Any] = (
            {"min_keep": plan.min_keep if plan.scope == "global" else 0} if plan.entry.needs_gradients else {}
        )
        run_pruner(
            plan.entry.pruner,
            plan.model,
            targets,
            plan.sparsities(),
            scope=plan.scope,
            structure=plan.structure,
            calibration=plan.calibration,
            **kw,
        )
        return plan.model
    keeps: list[torch.Tensor | None] = keep_masks(plan)  # type: ignore[assignment]
    for i, t in enumerate(targets):
        keep, keeps[i] = keeps[i], None  # drop each flat mask once its buffer holds it (peak memory)
        assert keep is not None
        attach_mask(t.module, t.tensor_name, keep)
        del keep
    return plan.model
