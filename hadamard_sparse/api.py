"""The verbs: register_mask, sparsify, masks, remove_parametrizations."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _select
from ._targets import Selectors, Target, check_not_wrapped, resolve_targets, weight_dims
from .checkpoint import drop_load_hook, ensure_load_hook
from .errors import NoTargetsError
from .parametrizations import HadamardMask, _check_mask, _SparseParametrization
from .scores import ScoreContext, get_score
from .sparsegpt import stats_for
from .structures import (
    NM,
    StructureLike,
    check_sparsity,
    check_targets,
    parse_structure,
    structured_keep_masks,
)

__all__ = ["masks", "register_mask", "remove_parametrizations", "sparsify"]

_SCOPES = ("global", "layer", "row")


def _check_sparsity(sparsity: object, arg: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{arg} must be a float in [0, 1], got {sparsity!r}")
    s = float(sparsity)
    if not (0.0 <= s <= 1.0) or math.isnan(s):
        raise ValueError(f"{arg} must be a float in [0, 1], got {sparsity!r}")
    return s


def _mask_of(module: nn.Module, name: str) -> HadamardMask | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:  # type: ignore[index, union-attr]
        if isinstance(p, HadamardMask):
            return p
    return None


def _pre_mask_value(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor's value with every HadamardMask in its chain skipped (the dense value)."""
    with torch.no_grad():
        if not parametrize.is_parametrized(module, name):
            return getattr(module, name).detach()
        plist = module.parametrizations[name]  # type: ignore[index, union-attr]
        if plist.is_tensor:
            x = plist.original
            chain = list(plist)
        else:
            originals = [getattr(plist, f"original{i}") for i in range(plist.ntensors)]
            x = plist[0](*originals)
            chain = list(plist)[1:]
        for p in chain:
            if not isinstance(p, HadamardMask):
                x = p(x)
        return x.detach()


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


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

    Example::

        >>> lin = torch.nn.Linear(4, 3)
        >>> m = register_mask(lin, "weight", lin.weight.abs() > 0.1)
        >>> torch.equal(lin.weight, lin.parametrizations.weight.original * m.mask)
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str) or not hasattr(module, name):
        raise ValueError(f"name must name a tensor of {type(module).__name__}, got {name!r}")
    current = getattr(module, name)
    if not isinstance(current, torch.Tensor):
        raise ValueError(f"module.{name} must be a tensor, got {type(current).__name__}")
    if mask is None:
        mask = torch.ones(current.shape, dtype=torch.bool, device=current.device)
    _check_mask(mask, current.shape, "mask")
    existing = _mask_of(module, name)
    if existing is not None:
        with torch.no_grad():
            if _broadcasts_to(mask.shape, existing.mask.shape):
                existing.mask.copy_(mask)  # a compact (structured) mask may fill a larger buffer
            else:
                raise ValueError(
                    f"mask has shape {tuple(mask.shape)} but {name} already has a mask of shape "
                    f"{tuple(existing.mask.shape)}; masks are updated in place and keep their shape"
                )
        return existing
    pm = HadamardMask(mask.to(current.device))
    parametrize.register_parametrization(module, name, pm)
    ensure_load_hook(module)
    return pm


def _apply_pruned(t: Target, keep: torch.Tensor, dense: torch.Tensor) -> None:
    """Register ``keep`` on ``t`` and write ``dense`` into its original (for weight-editing pruners)."""
    register_mask(t.module, t.tensor_name, keep)
    with torch.no_grad():
        t.module.parametrizations[t.tensor_name].original.copy_(dense)  # type: ignore[index, union-attr]


def _targets_or_raise(model: nn.Module, include: Selectors, exclude: Selectors, verb: str) -> list[Target]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_not_wrapped(model)
    targets = resolve_targets(model, include, exclude)
    if not targets:
        raise NoTargetsError(
            f"{verb}: model {type(model).__name__} has no tensor to act on (targets are the weights of "
            "Linear, ConvNd, ConvTransposeNd, RNN/LSTM/GRU, MultiheadAttention and HF Conv1D; "
            "Embedding only when include lists its type); check include/exclude"
        )
    return targets


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

    Args:
        model: any ``nn.Module``; not wrapped in DDP/FSDP yet.
        sparsity: fraction of targeted weights (of groups, with a ``structure``) set to zero, in
            ``[0, 1]`` (at most ``N/M`` for ``"N:M"``). Default ``None``: ``0.7``, or ``N/M`` for
            an ``"N:M"`` structure.
        method: a registered score (``"magnitude"``, ``"random"``, ``"wanda"``, ``"sparsegpt"``, ...).
            Default: ``"magnitude"``. ``"sparsegpt"`` also rewrites the kept weights (see
            ``docs/pretrained.md``); every other method only sets masks.
        scope: ``"global"`` (one threshold over all targets), ``"layer"`` (each tensor on its own) or
            ``"row"`` (exactly ``round(sparsity * row_len)`` in every output row). Default ``None``: the
            method's first scope (``"global"`` for magnitude/random, ``"row"`` for wanda/sparsegpt,
            which refuse ``"global"``).
        include: module types, glob patterns on qualified names, or a callable
            ``(module_name, module) -> bool``; only matching tensors are targeted.
            ``nn.Embedding``/``nn.EmbeddingBag`` are targeted only when listed here by type.
        exclude: same kinds of selectors; matching tensors are skipped.
        seed: seed for methods that draw random numbers (``"random"``).
        structure: ``None`` (unstructured), ``"row"``/``"out_channel"``, ``"column"``/``"in_channel"``,
            an ``"N:M"`` string such as ``"2:4"``, or a :class:`~hadamard_sparse.structures.Structure`
            (``Channels(axis, norm=...)``, ``NM(n, m)``, ``Block(rows, cols, norm=...)``).
        distribution: ``None``, or ``"uniform"``/``"er"``/``"erk"``: per-tensor sparsities from
            :func:`~hadamard_sparse.densities.layer_densities` (their total is ``sparsity``), each tensor
            pruned on its own (``scope`` is then ``"layer"``). Unstructured only.
        calibration: for data-aware methods (``"wanda"``, ``"sparsegpt"``): an iterable of model
            inputs (tensors, tuples of positional arguments, dicts of keyword arguments) or the
            :class:`~hadamard_sparse.calibration.ActivationStats` of :func:`calibrate`. Ignored by
            other methods.

    Returns:
        ``model``, with masks registered or updated.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> sparsify(model, sparsity=0.75)
        Sequential(...)
        >>> sparsity_report(model).sparsity
        0.75
    """
    st = parse_structure(structure)
    if sparsity is None:
        s = 0.7 if st is None else st.default_sparsity
    else:
        s = _check_sparsity(sparsity)
    entry = get_score(method)
    if scope is None:
        scope = entry.scopes[0]  # "global" for magnitude/random, "row" for wanda/sparsegpt
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {list(_SCOPES)}, got {scope!r}")
    if scope not in entry.scopes:
        raise ValueError(f"method {method!r} supports scope in {list(entry.scopes)}, got {scope!r}")
    if entry.needs_calibration and calibration is None:
        raise ValueError(
            f"method {method!r} needs calibration: an iterable of model inputs (tensors, tuples or dicts "
            "of keyword arguments) or hs.calibrate(model, batches) statistics, got None"
        )
    if st is not None and scope == "row" and not isinstance(st, NM):
        raise ValueError(
            f"scope='row' with a structure needs an 'N:M' structure, got structure={structure!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    targets = _targets_or_raise(model, include, exclude, "sparsify")
    if st is not None:
        check_targets(st, targets)
        check_sparsity(st, s)
    for t in targets:
        m = _mask_of(t.module, t.tensor_name)
        if m is None:
            continue
        shape = t.value().shape
        new_shape = shape if st is None else st.mask_shape(shape, *weight_dims(t.module, t.tensor_name))
        if not _broadcasts_to(new_shape, m.mask.shape):
            raise ValueError(
                f"{t.qualified} has a mask of shape {tuple(m.mask.shape)} and structure={structure!r} "
                f"needs one of shape {tuple(new_shape)}; masks are updated in place and keep their shape: "
                "remove the parametrizations first"
            )
    per: float | list[float] = s
    if distribution is not None:
        from .densities import _check_distribution, _densities

        dist = _check_distribution(distribution)
        if st is not None:
            raise ValueError(
                f"distribution={distribution!r} needs structure=None, got structure={structure!r}"
            )
        if "layer" not in entry.scopes:
            raise ValueError(f"distribution needs a method supporting scope='layer', got method={method!r}")
        dens = _densities({t.qualified: tuple(t.value().shape) for t in targets}, s, dist)
        per, scope = [1.0 - dens[t.qualified] for t in targets], "layer"
    if entry.pruner is not None:  # e.g. sparsegpt: also rewrites the kept weights
        per_list = [per] * len(targets) if isinstance(per, float) else per
        entry.pruner(
            model, targets, per_list, scope=scope, structure=st, calibration=calibration, apply=_apply_pruned
        )
        return model
    stats = None
    if entry.needs_calibration:
        stats = stats_for(model, targets, calibration, method=method, need_gram=entry.needs_gram)
    keeps = compute_keep_masks(targets, per, method=method, scope=scope, seed=seed, structure=st, stats=stats)
    for t, keep in zip(targets, keeps):
        register_mask(t.module, t.tensor_name, keep)
    return model


def compute_keep_masks(
    targets: Sequence[Target],
    sparsity: float | Sequence[float],
    *,
    method: str = "magnitude",
    scope: str = "global",
    seed: int = 0,
    stats: Mapping[str, Any] | None = None,
    value: str = "dense",
    structure: StructureLike = None,
) -> list[torch.Tensor]:
    """Boolean keep-masks for ``targets``; the shared engine of sparsify and schedules.

    Args:
        targets: the tensors, in order (the order breaks ties).
        sparsity: one fraction, or one per target (only with ``scope="layer"``).
        method: a registered score name.
        scope: ``"global"``, ``"layer"`` or ``"row"`` (per output row, unstructured only).
        seed: base seed; each target gets its own seed drawn from it.
        stats: optional per-qualified-name statistics handed to the score function.
        value: score the ``"dense"`` value (masks ignored) or the ``"effective"`` one. With
            ``"effective"`` and no structure, entries already masked score ``-inf``, so the new masks
            are nested in the current ones (masks only grow sparser); with a structure they score as
            zero weights.
        structure: ``None`` or a structure (see :func:`sparsify`); sparsities then count groups.

    Returns:
        One bool tensor per target, ``True`` where kept: of the target's shape, or with a
        ``structure`` of its compact shape (broadcastable to the target's shape).
    """
    st = parse_structure(structure)
    entry = get_score(method)
    gen = torch.Generator().manual_seed(seed)
    seeds = [int(torch.randint(0, 2**62, (1,), generator=gen)) for _ in targets]

    def thunk(t: Target, sd: int) -> _select.ScoreThunk:
        def scores() -> torch.Tensor:
            with torch.no_grad():
                w = _pre_mask_value(t.module, t.tensor_name) if value == "dense" else t.value().detach()
                ctx = ScoreContext(
                    t.qualified,
                    t.module,
                    t.tensor_name,
                    w,
                    sd,
                    None if stats is None else stats.get(t.qualified),
                )
                sc = entry.fn(ctx)
                current = _mask_of(t.module, t.tensor_name) if value == "effective" and st is None else None
                if current is None:
                    return sc
                # Masked entries score -inf: they are pruned first, so new masks nest in the old ones.
                sc = sc if sc.is_floating_point() else sc.float()
                return sc.masked_fill(~current.mask.expand(w.shape), float("-inf"))

        return scores

    thunks = [thunk(t, sd) for t, sd in zip(targets, seeds)]
    if isinstance(sparsity, (int, float)):
        per = [float(sparsity)] * len(targets)
    else:
        per = [float(x) for x in sparsity]
        if scope == "global":
            raise ValueError("per-tensor sparsities need scope='layer'")
    if st is not None:
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {list(_SCOPES)} with a structure, got {scope!r}")
        keeps = structured_keep_masks(st, targets, thunks, per, scope)
        return [k.to(t.value().device) for t, k in zip(targets, keeps)]
    if scope == "row":  # exactly round(sparsity * row_len) in every output row
        return [
            _select.row_keep_mask(th(), sp, weight_dims(t.module, t.tensor_name)[0]).to(t.value().device)
            for t, th, sp in zip(targets, thunks, per)
        ]
    if scope == "global":
        total = sum(t.value().numel() for t in targets)
        flat = _select.keep_masks(thunks, _select.n_to_prune(per[0], total))
    else:
        flat = [
            _select.keep_masks([th], _select.n_to_prune(sp, t.value().numel()))[0]
            for t, th, sp in zip(targets, thunks, per)
        ]
    out = []
    for t, keep in zip(targets, flat):
        w = t.value()
        out.append(keep.view(w.shape).to(w.device))
    return out


def _iter_masks(model: nn.Module) -> Iterator[tuple[str, HadamardMask]]:
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tname in module.parametrizations:  # type: ignore[union-attr]
            m = _mask_of(module, tname)
            if m is not None:
                yield (f"{mod_name}.{tname}" if mod_name else tname), m


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


def _fresh_class(module: nn.Module) -> None:
    """Give ``module`` its own copy of parametrize's injected class.

    ``copy.deepcopy`` shares the injected class between a model and its copy,
    and ``parametrize.remove_parametrizations`` deletes the property from that
    class, which would break the other copy.
    """
    cls = module.__class__
    ns = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, ns)


def remove_parametrizations(model: nn.Module, threshold: float = 0.0) -> nn.Module:
    r"""Bake: replace every parametrization of this library by its current value, in place.

    Each parametrized tensor whose chain holds one of our parametrizations
    becomes a plain Parameter again (the same Parameter object when the chain
    has a single original), holding exactly the effective sparse weight.
    Modules get their original classes back, so ``pickle``, ``torch.save``,
    ``torch.jit.script`` and ``torch.export`` work. Baking a ``copy.deepcopy``
    leaves the source model untouched. Parametrizations of other libraries on
    other tensors are left alone.

    Args:
        model: the parametrized model.
        threshold: after baking, entries with ``|w| <= threshold`` become exactly 0.
            Default ``0.0`` leaves values untouched.

    Returns:
        ``model``, baked.

    Example::

        >>> baked = remove_parametrizations(sparsify(model, 0.9))
        >>> type(baked[0]) is torch.nn.Linear
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or threshold < 0:
        raise ValueError(f"threshold must be a real number >= 0, got {threshold!r}")
    work: list[tuple[nn.Module, str]] = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for tname, plist in module.parametrizations.items():  # type: ignore[union-attr]
            if any(isinstance(p, _SparseParametrization) for p in plist):
                work.append((module, tname))
    done: set[int] = set()
    for module, tname in work:
        if id(module) not in done:
            _fresh_class(module)
            done.add(id(module))
        parametrize.remove_parametrizations(module, tname, leave_parametrized=True)
        if threshold > 0:
            with torch.no_grad():
                t = getattr(module, tname)
                t.masked_fill_(t.abs() <= threshold, 0.0)
        drop_load_hook(module)
    return model
