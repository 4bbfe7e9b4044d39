"""The verbs: register_mask, sparsify, masks, remove_parametrizations."""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import dsnot, gradient_scores, reconstruct, ria, sparsegpt
from ._checks import (
    Selectors,
    check_distribution,
    check_int,
    check_method,
    check_module,
    check_seed,
    check_sparsity,
)
from ._engine import (
    broadcasts_to,
    check_mask_shapes,
    check_structure,
    compute_keep_masks,
    mask_of,
    pre_mask_value,
)
from ._model_io import join_name
from .allocation import check_allocation, owl_sparsities
from .calibration import stats_for
from .checkpoint import bake, drop_load_hook, ensure_load_hook
from .densities import densities_for_shapes
from .errors import InvalidArgumentError, InvalidTypeError, NoTargetsError
from .gradient_scores import check_gradients
from .groups import TensorGroups
from .layers import Target, check_not_wrapped, resolve_targets
from .parametrizations import HadamardMask, check_mask
from .scores import register_score
from .structures import MODEL_STRUCTURES, NM, StructureLike, parse_structure

__all__ = ["check_finite", "masks", "register_mask", "remove_parametrizations", "sparsify"]

# Built-in methods that live in their own module are registered here, explicitly (importing them
# registers nothing). "sparsegpt": the mask-only OBS saliency as its score, and a pruner that also
# rewrites the kept weights.
register_score(
    "sparsegpt", needs_calibration=True, scopes=sparsegpt.SCOPES, needs_gram=True, pruner=sparsegpt.prune
)(sparsegpt.obs_saliency)
# "wanda_refit": Wanda's masks, then a support-restricted least-squares refit of the kept weights;
# "sparsegpt_block": sequential SparseGPT block by block, then Adam block reconstruction (reconstruct.py).
register_score(
    "wanda_refit",
    needs_calibration=True,
    scopes=reconstruct.SCOPES,
    needs_gram=True,
    pruner=reconstruct.prune_wanda_refit,
)(reconstruct.wanda_score)
register_score(
    "sparsegpt_block",
    needs_calibration=True,
    scopes=reconstruct.SCOPES,
    needs_gram=True,
    pruner=reconstruct.prune_blocks,
)(sparsegpt.obs_saliency)
# "ria": relative importance x activations, mask only (ria.py); "dsnot": Wanda's masks, then DSnoT's
# training-free prune-and-grow swaps per row (dsnot.py), mask only too; its score is Wanda's.
register_score("ria", needs_calibration=True, scopes=ria.SCOPES)(ria.ria_score)
register_score("dsnot", needs_calibration=True, scopes=dsnot.SCOPES, pruner=dsnot.prune)(
    reconstruct.wanda_score
)
# From the gradients an hs.GradientScores recorded: "movement" (mask only), "obs" (oBERT; its pruner updates weights).
register_score("movement", scopes=gradient_scores.MOVEMENT_SCOPES, needs_gradients=True)(
    gradient_scores.movement_score
)
register_score("obs", scopes=gradient_scores.SCOPES, needs_gradients=True, pruner=gradient_scores.obs_prune)(
    gradient_scores.obs_score
)


def register_mask(module: nn.Module, name: str = "weight", mask: torch.Tensor | None = None) -> HadamardMask:
    r"""Parametrize ``module.<name>`` as ``w * mask`` and return the :class:`HadamardMask`.

    The original Parameter object is kept (an optimizer created earlier keeps
    training it). If the tensor already has a mask, that mask is updated in
    place instead of stacking a second one.

    Args:
        module: the module owning the tensor.
        name: the tensor's attribute name. Default: ``"weight"``.
        mask: a ``torch.bool`` tensor of the tensor's shape or broadcastable to it,
            ``True`` where kept. ``None``: all ones. An existing mask is updated in place, so
            ``mask`` must then broadcast to that mask's shape.

    Returns:
        The (new or existing) :class:`HadamardMask`.

    Raises:
        InvalidArgumentError: ``module.<name>`` is a buffer or a plain attribute (not a Parameter),
            holds NaN/inf values, or ``mask`` does not fit it.
        InvalidTypeError: the tensor is not floating point, or ``mask`` is not a bool tensor.

    A tensor on the meta device can be masked (big models are built on meta, then loaded).

    Example::

        >>> lin = torch.nn.Linear(4, 3)
        >>> m = register_mask(lin, "weight", lin.weight.abs() > 0.1)
        >>> torch.equal(lin.weight, lin.parametrizations.weight.original * m.mask)
        True
    """
    check_module(module, "module")
    if not isinstance(name, str) or not hasattr(module, name):
        raise InvalidArgumentError(f"name must name a tensor of {type(module).__name__}, got {name!r}")
    current = getattr(module, name)
    if not isinstance(current, torch.Tensor):
        raise InvalidArgumentError(f"module.{name} must be a tensor, got {type(current).__name__}")
    if not parametrize.is_parametrized(module, name) and name not in module._parameters:
        what = "a buffer" if name in module._buffers else "a plain tensor attribute"
        raise InvalidArgumentError(
            f"module.{name} of {type(module).__name__} is {what}, not a Parameter; masks go on Parameters "
            "(a masked buffer such as BatchNorm's running_mean would silently stop being updated)"
        )
    if not current.is_floating_point():
        raise InvalidTypeError(
            f"module.{name} has dtype {current.dtype}; masks go on floating-point tensors (float32, "
            "float16, bfloat16, float64)"
        )
    if mask is None:
        mask = torch.ones(current.shape, dtype=torch.bool, device=current.device)
    check_mask(mask, current.shape, "mask")
    check_finite(current, f"module.{name}")
    return _attach_mask(module, name, mask)


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


def _attach_mask(module: nn.Module, name: str, mask: torch.Tensor) -> HadamardMask:
    """:func:`register_mask` after its checks (the mask has been checked against the tensor)."""
    existing = mask_of(module, name)
    if existing is not None:
        with torch.no_grad():
            if broadcasts_to(mask.shape, existing.mask.shape):
                existing.mask.copy_(mask)  # a compact (structured) mask may fill a larger buffer
            else:
                raise InvalidArgumentError(
                    f"mask has shape {tuple(mask.shape)} but {name} already has a mask of shape "
                    f"{tuple(existing.mask.shape)}; masks are updated in place and keep their shape"
                )
        return existing
    pm = HadamardMask(mask.to(getattr(module, name).device))
    parametrize.register_parametrization(module, name, pm)
    ensure_load_hook(module)
    return pm


def apply_pruned(t: Target, keep: torch.Tensor, dense: torch.Tensor) -> None:
    """Register ``keep`` on ``t`` and write ``dense`` into its original (for weight-editing pruners)."""
    _attach_mask(t.module, t.tensor_name, keep)
    with torch.no_grad():
        t.module.parametrizations[t.tensor_name].original.copy_(dense)  # type: ignore[index, union-attr]


class _Undo:
    """What ``apply_pruned`` changed on one tensor, to put it back if a pruner raises later."""

    def __init__(self, t: Target) -> None:
        self.t = t
        m = mask_of(t.module, t.tensor_name)
        self.added = m is None
        self.was_parametrized = parametrize.is_parametrized(t.module, t.tensor_name)
        self.order = list(t.module._parameters)
        self.mask = None if m is None else m.mask.clone()
        with torch.no_grad():
            if self.was_parametrized:
                self.original = t.module.parametrizations[t.tensor_name].original.detach().clone()  # type: ignore[index, union-attr]
            else:
                self.original = getattr(t.module, t.tensor_name).detach().clone()

    def restore(self) -> None:
        module, name = self.t.module, self.t.tensor_name
        with torch.no_grad():
            if self.added and not self.was_parametrized:
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                drop_load_hook(module)
                params = dict(module._parameters)  # put the Parameter back at its place (state_dict order)
                module._parameters.clear()
                module._parameters.update({k: params[k] for k in self.order if k in params})
                module._parameters.update(params)
                getattr(module, name).copy_(self.original)
                return
            plist = module.parametrizations[name]  # type: ignore[index, union-attr]
            if self.added:  # the chain had other parametrizations: drop only the mask appended to it
                del plist[-1]
            plist.original.copy_(self.original)
            m = mask_of(module, name)
            if m is not None and self.mask is not None:
                m.mask.copy_(self.mask)


def _run_pruner(
    pruner: Any, model: nn.Module, targets: list[Target], sparsities: list[float], **kw: Any
) -> None:
    """Run a weight-editing pruner; if it raises, undo every tensor it already applied, then re-raise."""
    journal: list[_Undo] = []

    def apply(t: Target, keep: torch.Tensor, dense: torch.Tensor) -> None:
        journal.append(_Undo(t))
        apply_pruned(t, keep, dense)

    try:
        pruner(model, targets, sparsities, apply=apply, **kw)
    except BaseException:
        for undo in reversed(journal):
            undo.restore()
        raise


def targets_or_raise(model: nn.Module, include: Selectors, exclude: Selectors, verb: str) -> list[Target]:
    """The targeted tensors of ``model`` (checked to be a plain module), or :class:`NoTargetsError`."""
    check_module(model)
    check_not_wrapped(model)
    targets = resolve_targets(model, include, exclude)
    if not targets:
        raise NoTargetsError(
            f"{verb}: model {type(model).__name__} has no tensor to act on (targets are the weights of "
            "Linear, ConvNd, ConvTransposeNd, RNN/LSTM/GRU, MultiheadAttention and HF Conv1D; "
            "Embedding only when include lists its type); check include/exclude"
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


def sparsify(
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
) -> nn.Module:
    r"""Mask the targeted weights of ``model`` in place so that exactly ``sparsity`` of them are zero.

    Every targeted weight becomes ``w * mask`` through a :class:`HadamardMask`
    parametrization. Scores are computed on the dense values (the original
    weights, ignoring any current mask), so calling ``sparsify`` again
    recomputes the existing masks in place from all weights: it never stacks a
    second parametrization, and ``sparsify(model, 0.0)`` undoes the pruning.

    Exact counts: with ``scope="layer"`` a tensor of ``n`` elements gets exactly
    ``round(sparsity * n)`` zeros; with ``scope="global"`` exactly
    ``round(sparsity * N)`` over all ``N`` targeted elements. Ties are broken
    deterministically (earlier tensor, then lower flat index, is pruned first).

    With a ``structure``, whole groups are pruned and the counts are per group:
    exactly ``round(sparsity * G)`` of the ``G`` rows, columns or blocks of each
    tensor (``scope="layer"``) or of all targeted tensors (``scope="global"``,
    groups compared by their size-normalised norms). ``"N:M"`` zeroes exactly N
    of every M consecutive weights along the input dimension; its sparsity is
    ``N/M`` (a smaller one N:M-prunes only a fraction of the groups). Compact
    masks are stored broadcastable (e.g. ``(out, 1)`` for rows). See
    :mod:`hadamard_sparse.structures` and ``docs/structured.md``.

    Safe global selection: with ``scope="global"`` the best ``min_keep`` weights
    (default 1) of every output unit — a neuron's row, a conv filter, a gate row,
    indexed by the output dimension of the layer registry — are never pruned, so
    no tensor and no output unit is silently emptied (one global threshold would
    otherwise remove whole layers whose weights are small, such as an output
    head). The exact total still holds: the entries protected this way are made
    up for by pruning the next-lowest entries elsewhere. With a structure the floor
    counts groups: at least ``min_keep`` rows/columns of every tensor, blocks of
    every block row (N:M never empties a unit). A sparsity the floor cannot reach
    is refused; ``min_keep=0`` turns the floor off. ``scope="layer"`` and
    ``"row"`` apply exactly the per-tensor or per-row counts asked for.

    Refused before anything changes: NaN/inf weights (named), weights on the
    meta device when values are needed (``sparsity > 0`` or a data-aware method;
    ``sparsify(model, 0.0)`` registers all-ones masks on a meta model), and
    ``include``/``exclude`` entries that match no targetable tensor.

    Undoing: ``sparsify(model, 0.0)`` restores the dense model only as long as
    nothing wrote to the dense values at pruned positions. Training does: the
    masked positions get zero gradient, but an optimizer with momentum keeps moving
    them with its stale velocity, and AdamW's decoupled weight decay shrinks them
    every step; they stay invisible while masked, but re-enabling them later brings
    back changed values, not the pretrained ones. Keep a copy of the state_dict
    before fine-tuning if you may want to undo.

    Args:
        model: any ``nn.Module``; not wrapped in DDP/FSDP yet.
        sparsity: fraction of targeted weights (of groups, with a ``structure``) set to zero, in
            ``[0, 1]`` (at most ``N/M`` for ``"N:M"``). Default ``None``: ``0.7``, or ``N/M`` for
            an ``"N:M"`` structure.
        method: a registered score (``"magnitude"``, ``"random"``, ``"wanda"``, ``"ria"``, ``"dsnot"``,
            ``"sparsegpt"``, ...).
            Default: ``"magnitude"``. ``"sparsegpt"`` also rewrites the kept weights (see
            ``docs/pretrained.md``); every other method only sets masks.
        scope: ``"global"`` (one threshold over all targets), ``"layer"`` (each tensor on its own) or
            ``"row"`` (exactly ``round(sparsity * row_len)`` in every output row). Default ``None``: the
            method's first scope (``"global"`` for magnitude/random, ``"row"`` for wanda/sparsegpt,
            which refuse ``"global"``).
        include: module types, glob patterns on qualified names, or a callable
            ``(module_name, module) -> bool``; only matching tensors are targeted.
            ``nn.Embedding``/``nn.EmbeddingBag`` are targeted only when listed here by type.
        exclude: same kinds of selectors; matching tensors are skipped. With a group structure
            (``"channel_group"``, ``"neuron"``, ``"head"``), ``include`` selects groups by their producing
            layer and ``exclude`` drops every group with a member in a matching layer.
        seed: seed for methods that draw random numbers (``"random"``).
        structure: ``None`` (unstructured), ``"row"``/``"out_channel"``, ``"column"``/``"in_channel"``,
            an ``"N:M"`` string such as ``"2:4"``, or a :class:`~hadamard_sparse.structures.Structure`
            (``Channels(axis, norm=...)``, ``NM(n, m)``, ``Block(rows, cols, norm=...)``). Groups that
            span tensors, built from the model: ``"channel_group"`` (a channel with its bias,
            BatchNorm entries and consumer inputs; needs ``example_inputs``), ``"neuron"`` (the same
            for Linear layers: FFN neurons), ``"head"`` (attention heads), or the objects
            :class:`~hadamard_sparse.export.groups.ChannelGroups` / ``Heads``; ``sparsity`` is then
            the fraction of groups.
        distribution: ``None``, or ``"uniform"``/``"er"``/``"erk"``: per-tensor sparsities from
            :func:`~hadamard_sparse.densities.layer_densities` (their total is ``sparsity``), each tensor
            pruned on its own (``scope`` is then ``"layer"``). Unstructured only.
        calibration: for data-aware methods (``"wanda"``, ``"sparsegpt"``): an iterable of model
            inputs (tensors, tuples of positional arguments, dicts of keyword arguments) or the
            :class:`~hadamard_sparse.calibration.ActivationStats` of :func:`calibrate`. Ignored by
            other methods (unless ``allocation="owl"``).
        example_inputs: inputs the model runs on to discover the groups of ``structure="channel_group"``
            (every channel with its bias, the BatchNorm entries after it and the inputs of its
            consumers), ``"neuron"`` (the same, Linear layers only: FFN neurons) and ``"head"``
            (attention heads; inputs unused). See ``docs/structured.md``.
        min_keep: with ``scope="global"``, how many of the best weights (groups, with a structure)
            of every output unit are always kept. Default: ``1``. ``0``: none, whole units and
            tensors may be pruned. Not applied to groups that span tensors (``"channel_group"``,
            ``"neuron"``, ``"head"``).
        allocation: ``"uniform"`` (default: every tensor gets ``sparsity``) or ``"owl"``: per-layer
            sparsities from each layer's share of outlier Wanda scores (Yin et al. 2024; see
            :mod:`hadamard_sparse.allocation`), their parameter-weighted mean being ``sparsity``. Needs
            ``calibration`` (any method), unstructured masks, no ``distribution`` and scope ``"row"`` or
            ``"layer"``.

    Raises:
        InvalidArgumentError: a bad argument, a sparsity the ``min_keep`` floor cannot reach,
            non-finite weights, meta-device weights when values are needed, or an
            ``include``/``exclude`` entry that matches nothing (the model is left unchanged).

    Returns:
        ``model``, with masks registered or updated.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> sparsify(model, sparsity=0.75)
        Sequential(...)
        >>> sparsity_report(model).sparsity
        0.75
    """
    if isinstance(structure, str) and structure in MODEL_STRUCTURES:
        check_module(model)
        if example_inputs is None and structure != "head":
            raise InvalidArgumentError(
                f"structure={structure!r} needs example_inputs (a tensor, tuple or dict of model inputs), got None"
            )
        structure = MODEL_STRUCTURES[structure](model, example_inputs)
    st = parse_structure(structure)
    scope_given = scope is not None
    s = (0.7 if st is None else st.default_sparsity) if sparsity is None else check_sparsity(sparsity)
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
    check_seed(seed)
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
        problems = []
        if calibration is None:
            problems.append("calibration (an iterable of model inputs or hs.calibrate statistics), got None")
        if st is not None:
            problems.append(f"structure=None, got structure={structure!r}")
        if dist is not None:
            problems.append(f"distribution=None, got distribution={distribution!r}")
        if scope == "global":
            problems.append("scope 'row' or 'layer', got scope='global'")
        if problems:
            raise InvalidArgumentError("allocation='owl' needs " + "; ".join(problems))
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
    if entry.pruner is not None:  # e.g. sparsegpt: also rewrites the kept weights
        per_list = [per] * len(targets) if isinstance(per, float) else per
        kw: dict[str, Any] = (
            {"min_keep": min_keep if scope == "global" else 0} if entry.needs_gradients else {}
        )
        _run_pruner(
            entry.pruner, model, targets, per_list, scope=scope, structure=st, calibration=calibration, **kw
        )
        return model
    stats = calibration if entry.needs_gradients else None  # a GradientScores maps names to gradient states
    if entry.needs_calibration:
        stats = stats_for(model, targets, calibration, method=method, need_gram=entry.needs_gram)
    keeps: list[torch.Tensor | None] = compute_keep_masks(  # type: ignore[assignment]
        targets,
        per,
        method=method,
        scope=scope,
        seed=seed,
        structure=st,
        stats=stats,
        checked=True,
        min_keep=min_keep,
    )
    for i, t in enumerate(targets):
        keep, keeps[i] = keeps[i], None  # drop each flat mask once its buffer holds it (peak memory)
        assert keep is not None
        _attach_mask(t.module, t.tensor_name, keep)
        del keep
    return model


def _iter_masks(model: nn.Module) -> Iterator[tuple[str, HadamardMask]]:
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tname in module.parametrizations:  # type: ignore[union-attr]
            m = mask_of(module, tname)
            if m is not None:
                yield join_name(mod_name, tname), m


def _masked_shape(module: nn.Module, name: str) -> torch.Size:
    """Shape of the tensor ``module.<name>`` (without computing it when the chain has one original)."""
    plist: parametrize.ParametrizationList = module.parametrizations[name]  # type: ignore[index, union-attr, assignment]
    if plist.is_tensor:
        return plist.original.shape
    with torch.no_grad():
        return getattr(module, name).shape


def masks(model: nn.Module, *, compact: bool = False) -> dict[str, torch.Tensor]:
    r"""The boolean masks of ``model``, by qualified tensor name, describing the effective pattern.

    A full-shape mask is returned as the live buffer itself: update it in place
    (``mask.copy_(new)`` under ``torch.no_grad()``) and the model follows. A
    compact structured mask (e.g. ``(out, 1)`` for rows) is returned as a
    read-only ``expand`` view of its buffer to the weight's shape (no copy; it
    follows later updates); pass ``compact=True`` to get the buffers themselves.

    Args:
        model: a model with masks registered by :func:`sparsify` or :func:`register_mask`.
        compact: return every live buffer as stored (possibly broadcastable) instead.

    Returns:
        ``{"encoder.0.weight": mask, ...}`` in module order.

    Example::

        >>> m = masks(sparsify(model, 0.5))
        >>> sorted(m)
        ['0.weight', '2.weight']
    """
    out: dict[str, torch.Tensor] = {}
    for name, pm in _iter_masks(model):
        mod_name, _, tname = name.rpartition(".")
        shape = pm.mask.shape if compact else _masked_shape(model.get_submodule(mod_name), tname)
        out[name] = pm.mask if pm.mask.shape == shape else pm.mask.expand(shape)
    return out


def remove_parametrizations(model: nn.Module, threshold: float = 0.0) -> nn.Module:
    r"""Bake: replace every parametrization of this library by its current value, in place.

    Each parametrized tensor whose chain holds one of our parametrizations
    becomes a plain Parameter again (the same Parameter object when the chain
    has a single original), holding exactly the effective sparse weight.
    Modules get their original classes back, so ``pickle``, ``torch.save``,
    ``torch.jit.script`` and ``torch.export`` work. Baking a ``copy.deepcopy``
    leaves the source model untouched.

    Parametrizations of other libraries stay in place with the same outputs:
    on other tensors they are not touched; in the same chain as ours (a mask
    stacked on ``weight_norm``, as in wav2vec2's positional convolution) the
    value after our last parametrization is assigned through their
    ``right_inverse`` (their originals become new Parameters), and the ones
    after ours keep it as their input. A chain whose foreign parametrizations
    cannot represent that value (``orthogonal`` or ``spectral_norm`` before a
    mask, ``weight_norm`` with an entirely pruned slice) is refused before
    anything changes.

    Args:
        model: the parametrized model.
        threshold: after baking, entries with ``|w| <= threshold`` become exactly 0 (a real number
            ``>= 0``, not NaN). Default ``0.0`` leaves values untouched.

    Returns:
        ``model``, baked.

    Raises:
        HadamardSparseError: listing the chains that cannot be baked with their foreign
            parametrizations kept; the model is then unchanged.

    Example::

        >>> baked = remove_parametrizations(sparsify(model, 0.9))
        >>> type(baked[0]) is torch.nn.Linear
        True
    """
    check_module(model)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 0:
        raise InvalidArgumentError(f"threshold must be a real number >= 0, got {threshold!r}")
    return bake(model, float(threshold))
