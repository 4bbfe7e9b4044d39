"""The verbs: register_mask, sparsify, masks.

``sparsify`` is plan-then-apply (:mod:`hadamard_sparse._plan`); ``remove_parametrizations``
lives in :mod:`hadamard_sparse.bake` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._attach import attach_mask
from ._checks import Selectors, check_finite, check_module
from ._engine import mask_of
from ._model_io import join_name
from ._plan import apply_plan, plan_sparsify
from .bake import remove_parametrizations
from .errors import InvalidArgumentError, InvalidTypeError
from .parametrizations import HadamardMask, check_mask
from .structures import StructureLike

__all__ = ["check_finite", "masks", "register_mask", "remove_parametrizations", "sparsify"]


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
    return attach_mask(module, name, mask)


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

    Every argument is checked, and the targets, per-tensor sparsities and calibration
    statistics resolved, in one pass before the first mask is registered (plan, then apply).
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
    plan = plan_sparsify(
        model,
        sparsity,
        method=method,
        scope=scope,
        include=include,
        exclude=exclude,
        seed=seed,
        structure=structure,
        distribution=distribution,
        calibration=calibration,
        example_inputs=example_inputs,
        min_keep=min_keep,
        allocation=allocation,
    )
    return apply_plan(plan)


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
