"""Schedules on models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

``fully_shard`` turns every Parameter into a ``DTensor`` sharded on dim 0 (each rank holds a
block of rows) and all-gathers a layer's weights for its forward. It leaves buffers alone, so
the masks stay **replicated**: every rank holds the whole bool mask, and the forward multiplies
the all-gathered weight by it, as without sharding. Cost: one byte per masked weight on every
rank, next to FSDP's ``(4 + 4 + 8) / world_size`` bytes of fp32 weight, gradient and Adam state.

What runs outside the forward (a schedule's update) must not mix the plain mask with the sharded
weight. Here every rank works on its own shard only:

- :func:`value` computes a masked tensor's value as a ``DTensor`` (the mask enters as a
  ``Replicate`` DTensor, which DTensor slices locally: no communication);
- each rank scores only the block it owns (:func:`hadamard_sparse._dtensor.local_part`; a tensor
  that is not sharded is owned by rank 0 alone, so nothing is counted twice);
- :func:`keep_masks` is the exact radix select of :mod:`hadamard_sparse._select` with its two
  histograms all-reduced over the ranks, and ties at the threshold given out in (tensor, rank,
  flat index) order, which for ``Shard(0)`` is the one-process order: the global threshold of a
  schedule is found from histograms, never by gathering weights;
- :func:`assemble` turns each rank's new block of mask rows back into the replicated mask (one
  all-reduce of a ``uint8`` mask per tensor).

Only 1-D device meshes (plain FSDP2, not HSDP) and unstructured masks are supported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from .. import _select
from .._dtensor import Slices, as_dtensor, is_dtensor, local_part, replicated
from .._engine import check_floor
from ..errors import InvalidArgumentError
from ..layers import weight_dims
from ..parametrizations import HadamardMask
from ..scores import ScoreContext, get_score

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class MaskedTensor(Protocol):
    """What these helpers read of a :class:`~hadamard_sparse.schedules.base.MaskedTensor`."""

    qualified: str
    module: nn.Module
    tensor_name: str

    @property
    def mask(self) -> torch.Tensor: ...

    @property
    def plist(self) -> parametrize.ParametrizationList: ...

    @property
    def shape(self) -> torch.Size: ...


__all__ = ["assemble", "check_no_structure", "keep_masks", "mesh_of", "prune_nested", "top_k", "value"]


def _originals(m: MaskedTensor) -> list[torch.Tensor]:
    plist = m.plist
    if plist.is_tensor:
        return [plist.original]
    return [getattr(plist, f"original{i}") for i in range(plist.ntensors)]


def mesh_of(masked: Sequence[MaskedTensor], who: str) -> DeviceMesh | None:
    """The device mesh the masked tensors are sharded over, or ``None`` when none is a DTensor.

    Raises:
        InvalidArgumentError: the tensors live on several meshes, or on a mesh that is not 1-D.
    """
    meshes = []
    for m in masked:
        for t in _originals(m):
            if is_dtensor(t) and all(t.device_mesh != x for x in meshes):  # fully_shard makes equal meshes
                meshes.append(t.device_mesh)
    if not meshes:
        return None
    if len(meshes) > 1 or meshes[0].ndim != 1:
        raise InvalidArgumentError(
            f"{who}: the masked tensors are sharded over {len(meshes)} device mesh(es) of "
            f"{[x.ndim for x in meshes]} dimension(s); schedules support one 1-D mesh (fully_shard "
            "with the default mesh, not HSDP)"
        )
    return meshes[0]


def check_no_structure(masked: Sequence[MaskedTensor], structure: object, who: str) -> None:
    """Refuse a ``structure`` when the masked tensors are sharded (structured selection is not distributed)."""
    if structure is not None and mesh_of(masked, who) is not None:
        raise InvalidArgumentError(
            f"{who}: structure={structure!r} is not supported on weights sharded with fully_shard; "
            "prune with a structure before sharding, or use unstructured masks"
        )


def value(m: MaskedTensor, mesh: DeviceMesh, *, dense: bool = False) -> torch.Tensor:
    """The tensor's value as a DTensor (``dense``: every HadamardMask in its chain skipped), detached."""
    with torch.no_grad():
        plist = m.plist
        originals = [as_dtensor(t.detach(), mesh) for t in _originals(m)]
        if plist.is_tensor:
            x, chain = originals[0], list(plist)
        else:
            x, chain = plist[0](*originals), list(plist)[1:]
        for p in chain:
            if isinstance(p, HadamardMask):
                if not dense:
                    x = x * replicated(p.mask.to(x.dtype), x)
            else:
                x = p(x)
        return x.detach()


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup) -> None:
    dist.all_reduce(t, group=group)


def keep_masks(
    thunks: Sequence[Callable[[], torch.Tensor]], n_prune: int, group: dist.ProcessGroup
) -> list[torch.Tensor]:
    """Flat keep-masks of each rank's blocks, pruning exactly ``n_prune`` lowest scores over all ranks.

    The radix select of :func:`hadamard_sparse._select.keep_masks` with its two 65536-bin histograms
    all-reduced, so every rank finds the same k-th key; entries equal to it are pruned first in the
    earlier tensor, then the lower rank, then the lower local flat index (for ``Shard(0)`` blocks the
    one-process order). Every rank must call this with thunks for the same tensors in the same order;
    a thunk may be called several times and must not communicate after its first call.

    Args:
        thunks: callables returning this rank's block of each tensor's scores.
        n_prune: how many entries to prune over all ranks and tensors.
        group: the process group of the ranks that share the tensors.

    Returns:
        One flat bool tensor per thunk (of its local block), ``True`` where kept.
    """
    if n_prune <= 0:
        return [torch.ones(t().numel(), dtype=torch.bool, device=t().device) for t in thunks]
    # Collectives run on the scores' device (CUDA tensors for NCCL, CPU ones for gloo).
    device = thunks[0]().device if thunks else torch.device("cpu")
    counts = torch.zeros(65536, dtype=torch.int64, device=device)
    for thunk in thunks:  # pass 1: histogram of the high 16 bits (signed, shifted to [0, 65536))
        counts += torch.bincount((_select.order_keys(thunk()) >> 16) + 32768, minlength=65536)
    _all_reduce(counts, group)
    cum = counts.cumsum(0).cpu()
    high = int(torch.searchsorted(cum, torch.tensor(n_prune)))
    remaining = n_prune - (int(cum[high - 1]) if high > 0 else 0)
    high -= 32768
    counts = torch.zeros(65536, dtype=torch.int64, device=device)
    for thunk in thunks:  # pass 2: histogram of the low 16 bits inside the bucket of the k-th key
        keys = _select.order_keys(thunk())
        ck = keys[(keys >> 16) == high]
        counts += torch.bincount(ck & 0xFFFF, minlength=65536)
    _all_reduce(counts, group)
    cum = counts.cumsum(0).cpu()
    low = int(torch.searchsorted(cum, torch.tensor(remaining)))
    take = remaining - (int(cum[low - 1]) if low > 0 else 0)
    key = (high << 16) | low
    # Entries equal to the k-th key: `take` of them are pruned, in (tensor, rank, index) order.
    n_eq = torch.stack([(_select.order_keys(th()) == key).sum() for th in thunks]).to(torch.int64)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    gathered = [torch.empty_like(n_eq) for _ in range(world)]
    dist.all_gather(gathered, n_eq, group=group)
    n_eq = n_eq.cpu()
    gathered = [g.cpu() for g in gathered]
    out = []
    for i, thunk in enumerate(thunks):
        before = sum(int(g[i]) for g in gathered[:rank])
        mine = max(0, min(int(n_eq[i]), take - before))
        take = max(0, take - sum(int(g[i]) for g in gathered))
        keys = _select.order_keys(thunk())
        keep = keys > key
        eq = (keys == key).nonzero().flatten()
        keep[eq[mine:]] = True
        out.append(keep)
    return out


def top_k(scores: torch.Tensor, k: int, numel: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Bool mask (of the local block ``scores``) of the ``k`` largest scores of a tensor of ``numel`` entries over all ranks."""
    return keep_masks([lambda: scores], numel - k, group)[0].view(scores.shape)


def assemble(local: torch.Tensor, sl: Slices, shape: torch.Size, group: dist.ProcessGroup) -> torch.Tensor:
    """The full bool mask from every rank's block ``local`` at ``sl`` (blocks are disjoint): one all-reduce."""
    buf = torch.zeros(shape, dtype=torch.uint8, device=local.device)
    buf[sl] = local.to(torch.uint8)
    _all_reduce(buf, group)
    return buf.bool()


def _protect(
    sc: torch.Tensor, sl: Slices, shape: torch.Size, out_dim: int, min_keep: int, group: dist.ProcessGroup
) -> torch.Tensor:
    """This rank's block ``sc`` of a tensor's scores with the best ``min_keep`` entries of every output unit,
    over all ranks, set to ``+inf`` (entries at ``-inf``, already pruned, stay).

    The global floor of :func:`hadamard_sparse._engine.compute_keep_masks` for unstructured scores: a
    unit is an index of ``out_dim`` (the whole tensor when units are single entries). A unit may span
    ranks (``Conv1D`` weights are ``(in, out)``, sharded on ``in``): each rank proposes its ``k`` best
    entries per unit and one ``all_gather`` of ``(value, global index)`` pairs picks the best ``k``.
    """
    n = math.prod(shape)
    units, axis = (shape[out_dim], out_dim) if len(shape) > out_dim else (1, 0)
    if units == 0 or n == 0:
        return sc
    if n // units == 1:
        units, axis = 1, 0
    k = min(min_keep, n // units)
    sc = sc if sc.is_floating_point() else sc.float()
    order = [axis, *(d for d in range(len(shape)) if d != axis)] if units > 1 else list(range(len(shape)))
    moved = sc.permute(order) if units > 1 else sc
    rows = moved.reshape(moved.shape[0] if units > 1 else 1, -1)
    first = sl[axis].start if units > 1 else 0  # the first unit this rank holds
    vals = torch.full((units, k), float("-inf"), device=sc.device)
    where = torch.full((units, k), -1, dtype=torch.int64, device=sc.device)
    lk = min(k, rows.shape[1])
    if lk > 0 and rows.shape[0] > 0:
        v, col = rows.topk(lk, dim=1)
        flat = col + torch.arange(rows.shape[0], device=sc.device)[:, None] * rows.shape[1]
        coords = torch.unravel_index(flat, tuple(moved.shape))
        strides = torch.empty(shape, device="meta").stride()
        gidx = sum((c + sl[d].start) * strides[d] for c, d in zip(coords, order))
        vals[first : first + rows.shape[0], :lk] = v
        where[first : first + rows.shape[0], :lk] = gidx
    world = dist.get_world_size(group)
    all_vals, all_where = (
        [torch.empty_like(vals) for _ in range(world)],
        [torch.empty_like(where) for _ in range(world)],
    )
    dist.all_gather(all_vals, vals, group=group)
    dist.all_gather(all_where, where, group=group)
    best_v, pick = torch.cat(all_vals, 1).topk(k, dim=1)
    best = torch.cat(all_where, 1).gather(1, pick).masked_fill(best_v == float("-inf"), -1)
    if lk == 0 or rows.shape[0] == 0:
        return sc
    mine = best[first : first + rows.shape[0]]  # the protected global indices of this rank's units
    chosen = (gidx[:, :, None] == mine[:, None, :]).any(-1)
    rows = rows.clone()
    rows.scatter_(1, col, torch.where(chosen, float("inf"), rows.gather(1, col)))
    out = rows.reshape(moved.shape)
    return out.permute(torch.argsort(torch.tensor(order)).tolist()) if units > 1 else out


def _score_thunk(
    m: MaskedTensor,
    method: str,
    seed: int,
    dense: bool,
    nest: bool,
    mesh: DeviceMesh,
    where: list[Slices],
    min_keep: int = 0,
    stats: object = None,
) -> Callable[[], torch.Tensor]:
    """This rank's block of the tensor's scores, computed once (score functions may communicate).

    The block's index is appended to ``where`` at the first call. ``min_keep > 0``: the global floor
    (:func:`_protect`). ``stats``: handed to the score (``ScoreContext.stats``).
    """
    entry = get_score(method)
    cache: list[torch.Tensor] = []

    def scores() -> torch.Tensor:
        if cache:
            return cache[0]
        with torch.no_grad():
            w = value(m, mesh, dense=dense)
            _, sl = local_part(w)
            sc = entry.fn(ScoreContext(m.qualified, m.module, m.tensor_name, w, seed, stats))
            if is_dtensor(sc):
                if sc.placements != w.placements:  # type: ignore[attr-defined]
                    sc = sc.redistribute(w.device_mesh, w.placements)  # type: ignore[attr-defined]
                sc = local_part(sc)[0]
            else:  # a plain tensor of the full shape, the same on every rank (e.g. seeded random scores)
                sc = sc[sl]
            if nest:
                sc = sc if sc.is_floating_point() else sc.float()
                sc = sc.masked_fill(~m.mask.expand(w.shape)[sl], float("-inf"))
            if min_keep > 0:
                out_dim = weight_dims(m.module, m.tensor_name)[0]
                sc = _protect(sc, sl, w.shape, out_dim, min_keep, mesh.get_group())
        cache.append(sc)
        where.append(sl)
        return sc

    return scores


def prune_nested(
    masked: Sequence[MaskedTensor],
    sparsity: float,
    *,
    method: str,
    scope: str,
    seed: int,
    mesh: DeviceMesh,
    min_keep: int = 0,
    stats: Mapping[str, object] | None = None,
) -> list[torch.Tensor]:
    """The new replicated masks: the current ones pruned to ``sparsity``, nested (effective-value scores).

    The sharded counterpart of ``compute_keep_masks(..., value="effective", min_keep=...)`` for
    unstructured masks, with the same per-tensor seeds, count rule, floor and tie order.
    ``stats``: per-qualified-name statistics for the scores (an ``hs.GradientScores`` for ``"movement"``).
    """
    group = mesh.get_group()
    gen = torch.Generator().manual_seed(seed)
    seeds = [int(torch.randint(0, 2**62, (1,), generator=gen)) for _ in masked]
    where: list[list[Slices]] = [[] for _ in masked]
    floor = min_keep if scope == "global" else 0
    if floor > 0:
        check_floor(masked, sparsity, None, floor)  # type: ignore[arg-type]
    thunks = [
        _score_thunk(
            m, method, sd, False, True, mesh, w, floor, None if stats is None else stats.get(m.qualified)
        )
        for m, sd, w in zip(masked, seeds, where)
    ]
    counts = [math.prod(m.shape) for m in masked]
    if scope == "global":
        keeps = keep_masks(thunks, _select.n_to_prune(sparsity, sum(counts)), group)
    else:
        keeps = [
            keep_masks([th], min(c, _select.n_to_prune(sparsity, c)), group)[0]
            for th, c in zip(thunks, counts)
        ]
    out = []
    for m, keep, (sl,) in zip(masked, keeps, where):
        local_mask = m.mask[sl]
        out.append(assemble(local_mask & keep.view(local_mask.shape), sl, m.mask.shape, group))
    return out
