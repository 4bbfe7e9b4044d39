"""Layer-wise sparsity allocation for ``sparsify(..., allocation=...)``: ``"uniform"`` or ``"owl"``.

``"owl"`` (outlier-weighed layerwise sparsity, Yin et al. 2024, arXiv 2310.05175): layers holding
more outliers are pruned less. A "layer" is one of the model's repeated blocks (see
:func:`~hadamard_sparse.reconstruct.find_blocks`; a targeted tensor outside every block is a layer
of its own). Its outlier ratio ``D`` is the fraction of its Wanda scores ``|W_ij| * ||X_j||`` above
``M`` times their mean over the layer (``M = 5``). The ratios are mapped linearly onto densities
spanning ``2 * lambda`` (``lambda = 0.08``), the most outliers getting the highest density, and
shifted so that the parameter-weighted mean sparsity is the requested one (then clipped to
``[0, 1]``).

Measured on all-MiniLM-L6-v2 (SparseGPT, 32 calibration sentences) OWL *lowers* quality (mean
cosine 0.909 -> 0.872 at 50%, 0.723 -> 0.680 at 70%): its last block has the fewest outliers, so it
is pruned most, and it matters most to the embedding. It is kept as an option for LLMs, where the
paper measured large gains (LLaMA-7B at 70%: Wanda 85.8 -> 24.6 perplexity).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._engine import pre_mask_value
from .calibration import ActivationStats
from .errors import InvalidArgumentError
from .layers import Target
from .reconstruct import find_blocks

__all__ = ["ALLOCATIONS", "check_allocation", "layer_groups", "owl_sparsities"]

ALLOCATIONS = ("uniform", "owl")
_LAMBDA = 0.08
_M = 5.0


def check_allocation(allocation: object) -> str:
    """The allocation name, or an :class:`InvalidArgumentError` naming the allowed ones."""
    if not isinstance(allocation, str) or allocation not in ALLOCATIONS:
        raise InvalidArgumentError(f"allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    return allocation


def layer_groups(model: nn.Module, targets: Sequence[Target]) -> list[int]:
    """The layer index of each target: its block's, or a new one per target outside every block."""
    where: dict[int, int] = {}
    for bi, block in enumerate(find_blocks(model, targets)):
        for m in block.modules():
            where[id(m)] = bi
    nxt = len(set(where.values()))
    out = []
    for t in targets:
        if id(t.module) in where:
            out.append(where[id(t.module)])
        else:
            out.append(nxt)
            nxt += 1
    return out


def owl_sparsities(
    model: nn.Module,
    targets: Sequence[Target],
    sparsity: float,
    stats: ActivationStats,
    *,
    lam: float = _LAMBDA,
    m: float = _M,
) -> list[float]:
    """Per-target sparsities from OWL (see the module doc); their parameter-weighted mean is ``sparsity``.

    Args:
        model: the model (its blocks define the layers).
        targets: the targeted tensors, each covered by ``stats``.
        sparsity: the overall sparsity.
        stats: calibration statistics of the dense model (``calibrate(model, batches)``).
        lam: half the spread of the layer densities.
        m: outlier threshold, in multiples of the layer's mean Wanda score.

    Returns:
        One sparsity per target (targets of one layer share it).

    Example::

        >>> stats = calibrate(model, batches)
        >>> owl_sparsities(model, resolve_targets(model), 0.5, stats)
    """
    groups = layer_groups(model, targets)
    n_groups = max(groups) + 1
    scores: list[list[torch.Tensor]] = [[] for _ in range(n_groups)]
    sizes = torch.zeros(n_groups, dtype=torch.float64)
    for t, g in zip(targets, groups):
        w = pre_mask_value(t.module, t.tensor_name)
        norms = stats[t.qualified].norms_like_weight().to(w.device, torch.float32)
        scores[g].append((w.abs().to(torch.float32) * norms).reshape(-1))
        sizes[g] += w.numel()
    ratio = torch.zeros(n_groups, dtype=torch.float64)
    for g, parts in enumerate(scores):
        s = torch.cat(parts)
        ratio[g] = float((s > m * s.mean()).sum()) / s.numel()
    spread = ratio.max() - ratio.min()
    dens = (ratio - ratio.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(ratio)
    dens = dens - (dens * sizes).sum() / sizes.sum() + (1.0 - sparsity)
    per_group = (1.0 - dens).clamp(0.0, 1.0)
    return [float(per_group[g]) for g in groups]
