"""Exact selection of the lowest scores, over one tensor or many, with bounded memory.

The global threshold over many tensors is found without concatenating them:
scores are mapped to order-preserving int32 keys and a radix select (four
passes of 8 bits, each a ``bincount`` per tensor) finds the exact key of the
k-th smallest score. Only one tensor's scores live at a time, so the extra
memory is a few times the largest tensor, not the size of the model.

Ties are broken deterministically: among equal scores, the tensor listed
first, then the lower flat index, is pruned first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__: list[str] = []  # private module

ScoreThunk = Callable[[], torch.Tensor]


def n_to_prune(sparsity: float, numel: int) -> int:
    """The exact count rule: ``round(sparsity * numel)``."""
    return int(round(sparsity * numel))


def _keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys whose signed order equals the float order of ``scores`` (flattened)."""
    # "+ 0.0" maps -0.0 to +0.0 so that equal scores get equal keys.
    bits = (scores.detach().reshape(-1).to(torch.float32) + 0.0).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _kth_key(thunks: Sequence[ScoreThunk], k: int) -> tuple[int, int]:
    """Key of the k-th smallest score (1-based) and how many entries equal to it are within the k.

    Returns:
        ``(key, take)``: all entries with key < ``key`` are among the k smallest, and so are the
        first ``take`` entries equal to ``key`` in (tensor, flat index) order.
    """
    remaining = k
    prefix = 0
    for shift in (24, 16, 8, 0):
        counts = torch.zeros(256, dtype=torch.int64)
        for thunk in thunks:
            keys = _keys(thunk())
            if shift != 24:
                keys = keys[(keys >> (shift + 8)) == prefix]
            if shift == 24:
                digits = (keys >> 24) + 128
            else:
                digits = (keys >> shift) & 0xFF
            counts += torch.bincount(digits.long(), minlength=256).cpu()
        cum = counts.cumsum(0)
        digit = int(torch.searchsorted(cum, torch.tensor(remaining)))
        below = int(cum[digit - 1]) if digit > 0 else 0
        remaining -= below
        prefix = (digit - 128) if shift == 24 else (prefix << 8) | digit
    return prefix, remaining


def keep_masks(thunks: Sequence[ScoreThunk], n_prune: int) -> list[torch.Tensor]:
    """Boolean keep-masks (flattened) pruning exactly the ``n_prune`` lowest scores over all thunks.

    Args:
        thunks: callables returning each tensor's scores; each may be called several times and
            must return the same values every time.
        n_prune: how many entries to prune in total, in ``[0, total]``.

    Returns:
        One flat bool tensor per thunk, ``True`` where the entry is kept.
    """
    if n_prune <= 0:
        return [torch.ones(t().numel(), dtype=torch.bool) for t in thunks]
    key, take = _kth_key(thunks, n_prune)
    out: list[torch.Tensor] = []
    for thunk in thunks:
        keys = _keys(thunk())
        keep = keys > key
        if take > 0:
            eq = (keys == key).nonzero().flatten()
            n = min(take, eq.numel())
            keep[eq[n:]] = True
            take -= n
        else:
            keep |= keys == key
        out.append(keep)
    return out


def layer_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of ``scores``' shape pruning exactly ``round(sparsity * numel)`` lowest entries."""
    flat = keep_masks([lambda: scores], n_to_prune(sparsity, scores.numel()))[0]
    return flat.view(scores.shape).to(scores.device)
