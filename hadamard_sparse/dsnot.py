"""DSnoT, Dynamic Sparse No Training (Zhang et al., ICLR 2024): training-free prune-and-grow of a mask.

Starting from Wanda's mask, every output row ``i`` of a weight viewed as ``R x F`` (see
:mod:`hadamard_sparse.calibration`) swaps, one pair per cycle, a pruned weight back in and a kept
weight out, to shrink the *expected* reconstruction error of the row estimated from the mean
``mu_j`` and variance ``var_j`` of each input feature over the calibration rows::

    e_i = E[y_i(dense) - y_i(sparse)] = sum_{j pruned} W_ij * mu_j

- growing: among the row's pruned weights, the one with the largest ``sign(e_i) * W_ij mu_j / var_j``
  (it cancels most of the error, with the least variance);
- pruning: among the row's kept weights whose ``W_ij mu_j`` has the opposite sign of ``e_i``, the one
  with the lowest Wanda score ``|W_ij| ||X_j||``; with ``N:M``, the kept weight of the grown weight's
  group with the lowest Wanda score (so the group keeps exactly ``N`` zeros);
- stopping (per row): the paper's rule, ``|e_i| <= update_threshold`` or a swap that would flip the
  sign of ``e_i``; here also a swap that would not shrink ``|e_i|`` or a row out of candidates;
  at most ``max_cycles`` swaps (50, as in the paper). The threshold defaults to ``0.0``, not the
  paper's absolute ``0.1`` (see ``UPDATE_THRESHOLD``); both are module constants.

Every row keeps its number of zeros (and every ``N:M`` group its ``N``), and ``|e_i|`` never grows.
Candidate lists are fixed at the start (a grown weight is never pruned again, a newly pruned one never
regrown), as in the reference implementation; all rows of a tensor run together (vectorised). The
mask is all that changes: the weights are untouched, so ``sparsify(model, 0.0)`` undoes it.
:mod:`~hadamard_sparse.builtin_methods` registers it as ``"dsnot"`` (Wanda's score for mask-only uses, :func:`prune` as the pruner).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._engine import pre_mask_value
from .calibration import LayerStats, stats_for
from .errors import InvalidArgumentError
from .layers import Target
from .reconstruct import wanda_keep_masks
from .scores import Apply
from .structures import NM

__all__ = ["MAX_CYCLES", "SCOPES", "UPDATE_THRESHOLD", "dsnot_rows", "expected_error", "prune"]

SCOPES = ("row", "layer")
MAX_CYCLES = 50  # the paper's (its code: --max_cycle_time 50)
# The paper's code stops a row at |e_i| <= 0.1, an absolute value tuned for LLaMA's activations. On
# all-MiniLM-L6-v2 |e_i| is about 0.03 after Wanda, so 0.1 stops almost every row before its first swap
# (mean cosine at 50%: 0.8843, Wanda 0.8840); 0.01 gives 0.8976 and 0.0 gives 0.8970 (2:4: 0.7781 and
# 0.7783; 70%: 0.7140 and 0.7144). 0.0 is scale-free: a row then stops on the sign rule, when out of
# candidates, or after MAX_CYCLES swaps.
UPDATE_THRESHOLD = 0.0
_VAR_POWER = 1.0  # --pow_of_var_regrowing 1


def expected_error(w: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``(R,)`` expected output error of each row, ``sum_{j pruned} W_ij mu_j`` (float64)."""
    return (w.to(torch.float64) * mean.to(torch.float64) * ~keep).sum(1)


def _first(order: torch.Tensor, valid: torch.Tensor, ptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column at position ``ptr`` of each row's ``order`` and whether it is a valid candidate."""
    p = ptr.clamp(max=order.shape[1] - 1)[:, None]
    col = order.gather(1, p).squeeze(1)
    ok = (ptr < order.shape[1]) & valid.gather(1, col[:, None]).squeeze(1)
    return col, ok


def dsnot_rows(
    w: torch.Tensor,
    keep: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    sq_norm: torch.Tensor,
    *,
    nm: tuple[int, int] | None = None,
    max_cycles: int = MAX_CYCLES,
    update_threshold: float = UPDATE_THRESHOLD,
) -> torch.Tensor:
    """DSnoT on one ``(R, F)`` matrix: the new keep-mask (same count per row, and per ``N:M`` group).

    Args:
        w: the dense weight, rows = outputs, columns = input features.
        keep: bool ``(R, F)`` starting mask (``True`` where kept), e.g. Wanda's.
        mean: ``(F,)`` mean of each input feature over the calibration rows.
        var: ``(F,)`` variance of each input feature.
        sq_norm: ``(F,)`` ``||X_j||^2`` (for the Wanda score of the pruning criterion).
        nm: ``(N, M)``: swaps stay inside groups of ``M`` consecutive columns.
        max_cycles: most swaps per row.
        update_threshold: a row stops once ``|e_i|`` is at most this.

    Returns:
        The new bool keep-mask ``(R, F)``.

    Example::

        >>> st = hs.calibrate(model, batches)["0.weight"]  # a Linear's statistics
        >>> mean, var = (t[0] for t in st.input_moments())
        >>> start = row_keep_mask(w.abs() * st.sq_sum[0].sqrt().float(), 0.5)  # Wanda's mask
        >>> keep = dsnot_rows(w, start, mean, var, st.sq_sum[0])
        >>> torch.equal(keep.sum(1), start.sum(1))
        True
    """
    wd = w.to(torch.float64)
    metric = wd * mean.to(torch.float64)  # W_ij mu_j: what pruning j adds to e_i
    wanda = wd.abs() * sq_norm.to(torch.float64).sqrt()
    keep = keep.clone()
    r = keep.shape[0]
    e = expected_error(wd, keep, mean)
    sign0 = torch.sign(e)
    rows = torch.arange(r, device=keep.device)
    pruned0, kept0 = ~keep, keep.clone()
    # growing lists: pruned weights by metric / var, descending (for e > 0) and ascending (e < 0)
    grow_key = metric / var.to(torch.float64).clamp_min(1e-12).pow(_VAR_POWER)
    grow_hi = grow_key.masked_fill(~pruned0, float("-inf")).argsort(dim=1, descending=True, stable=True)
    grow_lo = grow_key.masked_fill(~pruned0, float("inf")).argsort(dim=1, stable=True)
    # pruning lists (unstructured): kept weights of each sign by Wanda score, ascending
    prune_neg = wanda.masked_fill(~(kept0 & (metric < 0)), float("inf")).argsort(dim=1, stable=True)
    prune_pos = wanda.masked_fill(~(kept0 & (metric > 0)), float("inf")).argsort(dim=1, stable=True)
    ptr = torch.zeros(r, dtype=torch.long, device=keep.device)
    active = e.abs() > update_threshold
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        pos = e > 0
        g_hi, ok_hi = _first(grow_hi, pruned0, ptr)
        g_lo, ok_lo = _first(grow_lo, pruned0, ptr)
        g, ok_g = torch.where(pos, g_hi, g_lo), torch.where(pos, ok_hi, ok_lo)
        if nm is None:
            p_neg, ok_neg = _first(prune_neg, kept0 & (metric < 0), ptr)
            p_pos, ok_pos = _first(prune_pos, kept0 & (metric > 0), ptr)
            p, ok_p = torch.where(pos, p_neg, p_pos), torch.where(pos, ok_neg, ok_pos)
        else:  # the kept weight of g's group with the lowest Wanda score (initially kept ones only)
            m = nm[1]
            cols = (g - g % m)[:, None] + torch.arange(m, device=keep.device)[None, :]
            cand = (keep & kept0).gather(1, cols)
            best = wanda.gather(1, cols).masked_fill(~cand, float("inf")).argmin(1)
            p, ok_p = cols.gather(1, best[:, None]).squeeze(1), cand.any(1)
        after = e + metric[rows, p] - metric[rows, g]
        ok = active & ok_g & ok_p & (torch.sign(after) == sign0) & (after.abs() < e.abs())
        keep[rows[ok], g[ok]] = True
        keep[rows[ok], p[ok]] = False
        e = torch.where(ok, after, e)
        active = ok & (e.abs() > update_threshold)
        ptr += 1
    return keep


def _dsnot_target(t: Target, st: LayerStats, keep: torch.Tensor, nm: tuple[int, int] | None) -> torch.Tensor:
    dense = pre_mask_value(t.module, t.tensor_name)
    wb = st.to_blocks(dense.detach())
    kb = st.to_blocks(keep.expand(dense.shape))
    mean, var = st.input_moments()
    out = [
        dsnot_rows(
            wb[i],
            kb[i],
            mean[i].to(wb.device),
            var[i].to(wb.device),
            st.sq_sum[i].to(wb.device),
            nm=nm,
            max_cycles=MAX_CYCLES,  # read at call time, so they can be changed on the module
            update_threshold=UPDATE_THRESHOLD,
        )
        for i in range(wb.shape[0])
    ]
    return st.from_blocks(torch.stack(out)).to(dense.device)


def _check(structure: Any, sparsities: Sequence[float]) -> tuple[int, int] | None:
    if structure is None:
        return None
    if not isinstance(structure, NM):
        raise InvalidArgumentError(
            f"method 'dsnot' supports structure None or 'N:M', got structure={structure}"
        )
    full = structure.n / structure.m
    bad = [s for s in sparsities if abs(s - full) > 1e-9]
    if bad:
        raise InvalidArgumentError(
            f"method 'dsnot' with structure {structure} needs sparsity {full:g} (N/M), got {bad[0]!r}"
        )
    return structure.n, structure.m


def prune(
    model: nn.Module,
    targets: Sequence[Target],
    sparsities: Sequence[float],
    *,
    scope: str,
    structure: Any,
    calibration: Any,
    apply: Apply,
    progress: bool | None = None,
) -> None:
    """The ``"dsnot"`` pruner: Wanda masks, then DSnoT's swaps per row; every mask computed before any is set."""
    nm = _check(structure, sparsities)
    stats = stats_for(model, targets, calibration, method="dsnot", need_gram=False)
    for t in targets:
        stats[t.qualified].input_moments()  # refuse statistics without sums before anything changes
    keeps = wanda_keep_masks(targets, sparsities, scope=scope, stats=stats, structure=structure)
    news = [_dsnot_target(t, stats[t.qualified], k, nm) for t, k in zip(targets, keeps)]
    for t, keep in zip(targets, news):
        apply(t, keep, pre_mask_value(t.module, t.tensor_name).detach())
