"""The pruning engine: keep-masks from method, scope and structure, in one place.

:func:`compute_keep_masks` is what :func:`~hadamard_sparse.sparsify` and every
schedule call: it resolves the score method, checks the structure once, builds
one lazy score per target and runs the single scope dispatch (``"global"``,
``"layer"``, ``"row"``) for unstructured and structured masks alike. An
unstructured tensor is treated as a structure whose groups are its elements.

Also here: :func:`mask_of` (a tensor's :class:`HadamardMask`) and
:func:`pre_mask_value` (the value with every mask skipped), shared with
:mod:`sparsegpt` and the schedules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _select
from ._checks import SCOPES, check_int
from .errors import InvalidArgumentError
from .groups import TensorGroups
from .layers import Target, weight_dims
from .parametrizations import HadamardMask
from .scores import ScoreContext, get_score
from .structures import NM, Structure, StructureLike, check_sparsity, check_targets, parse_structure

__all__ = [
    "broadcasts_to",
    "check_floor",
    "check_mask_shapes",
    "check_structure",
    "compute_keep_masks",
    "floor_count",
    "mask_of",
    "pre_mask_value",
]


def mask_of(module: nn.Module, name: str) -> HadamardMask | None:
    """The :class:`HadamardMask` in the parametrization chain of ``module.<name>``, or ``None``."""
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:  # type: ignore[index, union-attr]
        if isinstance(p, HadamardMask):
            return p
    return None


def pre_mask_value(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor's value with every HadamardMask in its chain skipped (the dense value), detached."""
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


def broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target``."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def check_structure(structure: Structure, targets: Sequence[Target], sparsities: Sequence[float]) -> None:
    """Refuse targets that ``structure`` does not fit and sparsities above its maximum."""
    check_targets(structure, targets)
    for s in sparsities:
        check_sparsity(structure, s)


def check_mask_shapes(targets: Sequence[Target], structure: Structure | None, given: object = None) -> None:
    """Refuse targets whose existing mask cannot hold the masks ``structure`` produces (masks keep their shape).

    Args:
        targets: the tensors about to be (re)masked.
        structure: the parsed structure (``None``: unstructured).
        given: the structure as the user passed it, for the message.
    """
    for t in targets:
        m = mask_of(t.module, t.tensor_name)
        if m is None:
            continue
        shape = t.value().shape
        new_shape = (
            shape if structure is None else structure.mask_shape(shape, *weight_dims(t.module, t.tensor_name))
        )
        if not broadcasts_to(new_shape, m.mask.shape):
            raise InvalidArgumentError(
                f"{t.qualified} has a mask of shape {tuple(m.mask.shape)} and structure={given!r} "
                f"needs one of shape {tuple(new_shape)}; masks are updated in place and keep their shape: "
                "remove the parametrizations first"
            )


def _score_thunk(
    t: Target, seed: int, method: str, stats: Mapping[str, Any] | None, value: str, nest: bool
) -> _select.ScoreThunk:
    entry = get_score(method)

    def scores() -> torch.Tensor:
        with torch.no_grad():
            w = pre_mask_value(t.module, t.tensor_name) if value == "dense" else t.value().detach()
            st = None if stats is None else stats.get(t.qualified)
            sc = entry.fn(ScoreContext(t.qualified, t.module, t.tensor_name, w, seed, st))
            current = mask_of(t.module, t.tensor_name) if nest else None
            if current is None:
                return sc
            # Masked entries score -inf: they are pruned first, so new masks nest in the old ones.
            sc = sc if sc.is_floating_point() else sc.float()
            return sc.masked_fill(~current.mask.expand(w.shape), float("-inf"))

    return scores


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
    checked: bool = False,
    min_keep: int = 0,
) -> list[torch.Tensor]:
    """Boolean keep-masks for ``targets``; the shared engine of sparsify and schedules.

    Args:
        targets: the tensors, in order (the order breaks ties).
        sparsity: one fraction, or one per target (only with ``scope="layer"``).
        method: a registered score name.
        scope: ``"global"``, ``"layer"`` or ``"row"`` (per output row; with a structure only ``"N:M"``).
        seed: base seed; each target gets its own seed drawn from it.
        stats: optional per-qualified-name statistics handed to the score function.
        value: score the ``"dense"`` value (masks ignored) or the ``"effective"`` one. With
            ``"effective"`` and no structure, entries already masked score ``-inf``, so the new masks
            are nested in the current ones (masks only grow sparser); with a structure they score as
            zero weights.
        structure: ``None`` or a structure (see :func:`~hadamard_sparse.sparsify`); sparsities then
            count groups.
        checked: the caller already ran :func:`check_structure` on these targets and sparsities.
        min_keep: with ``scope="global"``, the best ``min_keep`` entries (groups, with a structure)
            of every output unit are never pruned, and the exact total is reached by pruning the
            next-lowest entries elsewhere (see :func:`~hadamard_sparse.sparsify`). ``0``: no floor.

    Raises:
        InvalidArgumentError: the floor leaves fewer prunable entries than the sparsity asks for.

    Returns:
        One bool tensor per target, ``True`` where kept: of the target's shape, or with a
        ``structure`` of its compact shape (broadcastable to the target's shape).

    Example::

        >>> targets = resolve_targets(torch.nn.Linear(4, 4))
        >>> compute_keep_masks(targets, 0.5)[0].sum().item()
        8
    """
    st = parse_structure(structure)
    get_score(method)  # refuse unknown methods before anything else
    if scope not in SCOPES:
        raise InvalidArgumentError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    if isinstance(sparsity, (int, float)):
        per = [float(sparsity)] * len(targets)
    else:
        per = [float(x) for x in sparsity]
        if scope == "global":
            raise InvalidArgumentError("per-tensor sparsities need scope='layer'")
    if st is not None and not checked:
        check_structure(st, targets, per)
    if st is not None and scope == "row" and not isinstance(st, NM):
        raise InvalidArgumentError(f"scope='row' with a structure needs an 'N:M' structure, got {st}")
    gen = torch.Generator().manual_seed(seed)
    seeds = [int(torch.randint(0, 2**62, (1,), generator=gen)) for _ in targets]
    nest = value == "effective" and st is None
    thunks = [_score_thunk(t, sd, method, stats, value, nest) for t, sd in zip(targets, seeds)]
    if isinstance(st, TensorGroups):  # groups spanning tensors: one decision per group (no min_keep floor)
        dims = [weight_dims(t.module, t.tensor_name) for t in targets]
        keeps = st.keep_masks(targets, thunks, per, scope, dims)
    else:
        keeps = _dispatch(st, targets, thunks, per, scope, check_int(min_keep, "min_keep", 0))
    return [k.to(t.value().device) for t, k in zip(targets, keeps)]


def _units(st: Structure | None, shape: torch.Size, dims: tuple[int, int]) -> tuple[int, int] | None:
    """``(units, axis)``: how the scores of one tensor split into output units for the global floor.

    Unstructured: the element scores, one unit per index of the output dimension ``axis``.
    Structured: the flat group scores in :meth:`~hadamard_sparse.structures.Structure.n_units`
    equal runs (``axis`` 0). When every unit is a single entry (a ``Linear(1, n)`` weight, blocks
    as wide as the layer), the floor protects the tensor as a whole instead, as it does for rows.
    ``None``: nothing to protect.
    """
    if st is None:
        units, axis = (shape[dims[0]], dims[0]) if len(shape) > dims[0] else (1, 0)
        n = math.prod(shape)
    else:
        u = st.n_units(shape, *dims)
        if u is None:
            return None
        units, axis, n = u, 0, st.n_groups(shape, *dims)
    if units == 0 or n == 0:
        return None
    return (1, 0) if n // units == 1 else (units, axis)


def floor_count(
    st: Structure | None, shapes: Sequence[torch.Size], dims: Sequence[tuple[int, int]], min_keep: int
) -> int:
    """How many entries (groups) the ``min_keep`` floor protects over tensors of ``shapes``."""
    total = 0
    for sh, d in zip(shapes, dims):
        u = _units(st, sh, d)
        n = math.prod(sh) if st is None else st.n_groups(sh, *d)
        if u is not None:
            total += u[0] * min(min_keep, n // u[0])
    return total


def _check_floor(
    st: Structure | None,
    shapes: Sequence[torch.Size],
    dims: Sequence[tuple[int, int]],
    counts: Sequence[int],
    sparsity: float,
    min_keep: int,
    arg: str,
) -> None:
    total = sum(counts)
    wanted = min(total, _select.n_to_prune(sparsity / (1.0 if st is None else st.group_fraction), total))
    protected = floor_count(st, shapes, dims, min_keep)
    if wanted > total - protected:
        what = "weights" if st is None else "groups"
        raise InvalidArgumentError(
            f"{arg}={sparsity:g} with scope='global' prunes "
            f"{wanted:,} of {total:,} {what}, but min_keep={min_keep} keeps the best {min_keep} of every "
            f"output unit ({protected:,} {what}), so at most {total - protected:,} can be pruned; lower the "
            f"{arg}, or pass min_keep=0 to allow emptying whole output units and tensors"
        )


def check_floor(
    targets: Sequence[Target],
    sparsity: float,
    structure: StructureLike = None,
    min_keep: int = 1,
    arg: str = "sparsity",
) -> None:
    """Refuse a global ``sparsity`` that the ``min_keep`` floor cannot reach on ``targets`` (shapes only).

    Args:
        targets: the tensors a global selection would run over.
        sparsity: the fraction of elements (of groups, with a structure) to prune.
        structure: ``None`` or a structure, as for :func:`compute_keep_masks`.
        min_keep: the floor (``0``: nothing to check).
        arg: the argument's name for the message (``"final_sparsity"`` for schedules).
    """
    st = parse_structure(structure)
    min_keep = check_int(min_keep, "min_keep", 0)
    if min_keep == 0 or not targets or isinstance(st, TensorGroups):  # groups spanning tensors: no floor
        return
    shapes = [t.value().shape for t in targets]
    dims = [weight_dims(t.module, t.tensor_name) for t in targets]
    counts = [math.prod(sh) if st is None else st.n_groups(sh, *d) for sh, d in zip(shapes, dims)]
    _check_floor(st, shapes, dims, counts, sparsity, min_keep, arg)


def _protected(
    thunk: Callable[[], torch.Tensor], units: int, axis: int, k: int
) -> Callable[[], torch.Tensor]:
    """``thunk``'s scores with the ``k`` best entries of each unit (not already ``-inf``) set to ``+inf``.

    The protected positions are found once (a ``topk`` per unit) and reused on later calls, since
    the selection calls each thunk two or three times and it returns the same scores every time.
    """
    cache: list[torch.Tensor] = []

    def scores() -> torch.Tensor:
        x = thunk()
        x = x if x.is_floating_point() else x.float()
        moved = x.movedim(axis, 0)
        rows = moved.reshape(units, -1).clone()
        kk = min(k, rows.shape[1])
        if kk == 0:
            return x
        if not cache:
            cache.append(rows.topk(kk, dim=1).indices)
        idx = cache[0]
        vals = rows.gather(1, idx)
        rows.scatter_(1, idx, torch.where(vals > float("-inf"), float("inf"), vals))
        return rows.reshape(moved.shape).movedim(0, axis)

    return scores


def _dispatch(
    st: Structure | None,
    targets: Sequence[Target],
    thunks: Sequence[_select.ScoreThunk],
    per: Sequence[float],
    scope: str,
    min_keep: int = 0,
) -> list[torch.Tensor]:
    """The one scope dispatch: groups are the structure's, or the elements when ``st`` is ``None``."""
    shapes = [t.value().shape for t in targets]
    dims = [weight_dims(t.module, t.tensor_name) for t in targets]
    fraction = 1.0 if st is None else st.group_fraction
    if st is None:
        counts = [math.prod(sh) for sh in shapes]
        group: list[Callable[[], torch.Tensor]] = list(thunks)
    else:
        counts = [st.n_groups(sh, *d) for sh, d in zip(shapes, dims)]
        group = [(lambda th=th, d=d: st.group_scores(th(), *d)) for th, d in zip(thunks, dims)]
    if scope == "global" and min_keep > 0:
        group = _floored(st, group, shapes, dims, counts, per[0], min_keep)

    structured = st is not None
    largest = max((math.prod(sh) for sh in shapes), default=0)

    def n_prune(sp: float, n: int) -> int:
        return min(n, _select.n_to_prune(sp / fraction, n))

    if scope == "row":
        if st is None:  # exactly round(sparsity * row_len) in every output row
            keeps = [_select.row_keep_mask(th(), sp, d[0]) for th, sp, d in zip(thunks, per, dims)]
        else:  # N:M groups are laid out output-first: one row of groups per output
            keeps = [
                _select.row_keep_mask(g().reshape(sh[d[0]], -1), min(1.0, sp / fraction), 0).reshape(-1)
                for g, sp, sh, d in zip(group, per, shapes, dims)
            ]
    elif scope == "global":
        keeps = _select_groups(group, counts, n_prune(per[0], sum(counts)), structured, largest)
    else:
        keeps = [
            _select_groups([g], [c], n_prune(sp, c), structured, largest)[0]
            for g, c, sp in zip(group, counts, per)
        ]
    if st is None:
        return [k.view(sh) for k, sh in zip(keeps, shapes)]
    return [st.expand(k, thunks[i], shapes[i], *dims[i]) for i, k in enumerate(keeps)]


def _floored(
    st: Structure | None,
    group: list[Callable[[], torch.Tensor]],
    shapes: Sequence[torch.Size],
    dims: Sequence[tuple[int, int]],
    counts: Sequence[int],
    sparsity: float,
    min_keep: int,
) -> list[Callable[[], torch.Tensor]]:
    """Group thunks whose protected entries score ``+inf``, after checking the total can still be met."""
    _check_floor(st, shapes, dims, counts, sparsity, min_keep, "sparsity")
    out: list[Callable[[], torch.Tensor]] = []
    for g, sh, d in zip(group, shapes, dims):
        u = _units(st, sh, d)
        if u is None:
            out.append(g)
        else:
            out.append(_protected(g, u[0], u[1], min_keep))
    return out


def _select_groups(
    group: Sequence[Callable[[], torch.Tensor]],
    counts: Sequence[int],
    n_prune: int,
    structured: bool,
    largest: int,
) -> list[torch.Tensor]:
    """Flat keep decisions over the groups of several tensors, exactly ``n_prune`` pruned in all."""
    thunks = list(group)
    if not structured:
        return _select.keep_masks(thunks, n_prune)
    total = sum(counts)
    if n_prune <= 0 or n_prune >= total:
        return [torch.full((c,), n_prune <= 0, dtype=torch.bool) for c in counts]
    if total <= largest:  # group scores fit the memory bound of one tensor: compute them once
        cached = [th() for th in thunks]
        thunks = [lambda c=c: c for c in cached]
    return _select.keep_masks(thunks, n_prune)
