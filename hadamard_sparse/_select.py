"""Exact selection of the lowest scores, over one tensor or many, with bounded memory.

The global threshold over many tensors is found without concatenating them:
scores are mapped to order-preserving int32 keys and a radix select (two
passes of 16 bits, each a ``bincount`` per tensor) finds the exact key of the
k-th smallest score; the second pass also builds the masks. Only one tensor's scores live at a time, so the extra
memory is a few times the largest tensor, not the size of the model.

Ties are broken deterministically: among equal scores, the tensor listed
first, then the lower flat index, is pruned first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = ["ScoreThunk", "keep_masks", "layer_keep_mask", "n_to_prune", "order_keys", "row_keep_mask"]

ScoreThunk = Callable[[], torch.Tensor]


def n_to_prune(sparsity: float, numel: int) -> int:
    """The exact count rule: ``round(sparsity * numel)``."""
    return int(round(sparsity * numel))


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys whose signed order equals the float order of ``scores`` (flattened)."""
    s = scores.detach().reshape(-1)
    if s.dtype != torch.float32:
        s = s.to(torch.float32)
    # "+ 0.0" maps -0.0 to +0.0 so that equal scores get equal keys (and gives a fresh tensor).
    bits = (s + 0.0).view(torch.int32)
    if bits.numel() and int(bits.min()) < 0:  # negative floats: reverse their order, below the others
        flip = bits >> 31  # -1 for negative floats, 0 otherwise
        flip &= 0x7FFFFFFF
        bits ^= flip
    return bits


def _high_hist(keys: torch.Tensor) -> torch.Tensor:
    """65536-bin histogram of the high 16 bits (signed, shifted to [0, 65536)); consumes ``keys``."""
    keys >>= 16
    keys += 32768
    return torch.bincount(keys, minlength=65536).cpu()


# Scores are keyed and counted in chunks of this many entries, so the temporaries (keys, shifted keys,
# comparisons, bincount's int64 copy) take a few times 2**19 entries, not a few times the largest tensor.
_CHUNK = 1 << 19


def _chunk_keys(thunk: ScoreThunk) -> tuple[int, torch.device, Iterator[tuple[int, torch.Tensor]]]:
    """The number of scores, their device and an iterator of ``(offset, keys of the next chunk)``.

    Only the iterator holds the scores, so they are freed as soon as it is exhausted (a loop
    variable holding a view of them would keep them alive while the next tensor is scored).
    """
    scores = thunk().detach().reshape(-1)
    n, device = scores.numel(), scores.device

    def chunks(scores: torch.Tensor = scores) -> Iterator[tuple[int, torch.Tensor]]:
        for off in range(0, n, _CHUNK):
            yield off, order_keys(scores[off : off + _CHUNK])

    del scores
    return n, device, chunks()


def _bucket(thunks: Sequence[ScoreThunk], k: int) -> tuple[int, int, int]:
    """Radix pass 1: the high 16 bits of the k-th smallest key, its rank within that bucket, and the
    largest tensor's size."""
    counts = torch.zeros(65536, dtype=torch.int64)
    largest = 0
    for thunk in thunks:
        n, _, chunks = _chunk_keys(thunk)
        largest = max(largest, n)
        for _, keys in chunks:
            counts += _high_hist(keys)
    cum = counts.cumsum(0)
    high = int(torch.searchsorted(cum, torch.tensor(k)))
    return high - 32768, k - (int(cum[high - 1]) if high > 0 else 0), largest


def _in_bucket(keys: torch.Tensor, high: int) -> torch.Tensor:
    """Indices (into ``keys``) of the keys whose high 16 bits are ``high``."""
    hi = keys >> 16
    return (hi == high).nonzero().flatten()


def keep_masks(thunks: Sequence[ScoreThunk], n_prune: int) -> list[torch.Tensor]:
    """Boolean keep-masks (flattened) pruning exactly the ``n_prune`` lowest scores over all thunks.

    Two radix passes of 16 bits over int32 keys (a 65536-bin ``bincount`` per chunk of
    ``2**19`` entries, one tensor at a time). The second pass also builds each mask for every
    entry outside the bucket that holds the k-th key and keeps the few entries inside it (their
    indices and keys); once the exact key is known they are fixed up, so each thunk runs twice.
    The kept entries are capped at an eighth of the largest tensor, over all thunks; a tensor
    whose entries do not fit (e.g. many equal scores) is scored a third time instead. Peak memory
    beyond the masks: one tensor's scores, the kept bucket entries and chunk-sized temporaries.

    Args:
        thunks: callables returning each tensor's scores; each may be called several times and
            must return the same values every time.
        n_prune: how many entries to prune in total, in ``[0, total]``.

    Returns:
        One flat bool tensor per thunk, ``True`` where the entry is kept. Ties: among equal
        scores, the earlier tensor, then the lower flat index, is pruned first.
    """
    if n_prune <= 0:
        return [torch.ones(t().numel(), dtype=torch.bool) for t in thunks]
    high, remaining, largest = _bucket(thunks, n_prune)
    lo_key = high << 16  # the bucket holds keys lo_key .. lo_key + 0xFFFF
    counts = torch.zeros(65536, dtype=torch.int64)
    out: list[torch.Tensor] = []
    cands: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    budget = largest // 8  # bucket entries that may be kept, over all tensors
    for thunk in thunks:
        n, device, chunks = _chunk_keys(thunk)
        keep = torch.empty(n, dtype=torch.bool, device=device)
        idxs: list[torch.Tensor] = []
        cks: list[torch.Tensor] = []
        n_cand, collect = 0, True
        for off, keys in chunks:
            torch.gt(keys, lo_key | 0xFFFF, out=keep[off : off + keys.numel()])
            idx = _in_bucket(keys, high)
            ck = keys[idx]
            counts += torch.bincount(ck & 0xFFFF, minlength=65536).cpu()
            n_cand += idx.numel()
            collect = collect and n_cand <= budget
            if collect:
                idxs.append(idx + off)
                cks.append(ck)
        if collect and idxs:
            cands.append((torch.cat(idxs), torch.cat(cks)))
            budget -= n_cand
        else:
            cands.append(None)  # over budget: scored again below
        out.append(keep)
    cum = counts.cumsum(0)
    low = int(torch.searchsorted(cum, torch.tensor(remaining)))
    take = remaining - (int(cum[low - 1]) if low > 0 else 0)
    key = lo_key | low

    def fix(keep: torch.Tensor, idx: torch.Tensor, ck: torch.Tensor) -> None:
        # Within the bucket: keep keys above the k-th; of those equal to it, prune the first `take`.
        nonlocal take
        kept = ck > key
        eq = (ck == key).nonzero().flatten()
        n = min(take, eq.numel())
        kept[eq[n:]] = True
        take -= n
        keep[idx] = kept

    for i, (keep, cand) in enumerate(zip(out, cands)):
        if cand is not None:
            fix(keep, *cand)
            continue
        _, _, chunks = _chunk_keys(thunks[i])  # scored again, fixed chunk by chunk (flat order kept)
        for off, keys in chunks:
            idx = _in_bucket(keys, high)
            fix(keep, idx + off, keys[idx])
    return out


def layer_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of ``scores``' shape pruning exactly ``round(sparsity * numel)`` lowest entries."""
    flat = keep_masks([lambda: scores], n_to_prune(sparsity, scores.numel()))[0]
    return flat.view(scores.shape).to(scores.device)


def row_keep_mask(scores: torch.Tensor, sparsity: float, out_dim: int = 0) -> torch.Tensor:
    """Keep-mask pruning exactly ``round(sparsity * row_len)`` lowest scores in every output row.

    A row is everything indexed by one position of ``out_dim`` (``scores.movedim(out_dim, 0)[i]``).
    Ties: the lower flat index within the row is pruned first.
    """
    rows = scores.movedim(out_dim, 0)
    moved_shape = rows.shape
    r = rows.reshape(moved_shape[0], -1)
    k = n_to_prune(sparsity, r.shape[1])
    keep = torch.ones(r.shape, dtype=torch.bool, device=scores.device)
    if k > 0 and r.numel() > 0:
        order = order_keys(r).view(r.shape).argsort(dim=1, stable=True)[:, :k]
        keep.scatter_(1, order, False)
    return keep.reshape(moved_shape).movedim(0, out_dim)
