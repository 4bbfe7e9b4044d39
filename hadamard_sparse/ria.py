"""RIA, Relative Importance and Activations (Zhang et al., ICLR 2024, "Plug-and-Play"), and its N:M permutation.

For a weight viewed as ``R x F`` (outputs x input features, see :mod:`hadamard_sparse.calibration`)
with calibration input norms ``||X_j||_2``::

    RIA_ij = (|W_ij| / sum_k |W_ik|  +  |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** a,   a = 0.5

the relative importance of the weight within its output row and within its input column, scaled by
the activation. builtin_methods registers it as ``"ria"`` (mask only, scopes ``"row"`` then ``"layer"``, needs
calibration); importing this module registers nothing.

N:M and the channel permutation. The paper permutes the input channels so that large scores are
spread over the ``M``-groups before choosing ``N`` of each group (:func:`channel_permutation`,
:func:`permuted_nm_keep`). A mask chosen in permuted order and mapped back to the original columns is
exact for the masked model (``w * mask`` is elementwise), but its groups are no longer ``M``
*consecutive* columns: it is not a valid 2:4 mask for sparse kernels or for
``structure="2:4"`` (whose contract, and :func:`~hadamard_sparse.to_sparse`, need consecutive groups).
Using the permutation for real means reordering this layer's input columns *and* the rows of
whatever produces them, which for the residual-stream inputs of a transformer (q/k/v, FFN up) means
every layer writing to the stream. So ``sparsify(method="ria", structure="2:4")`` keeps a true N:M
mask in the original order (RIA's score, no permutation); the permutation is offered as functions
for users who can reorder a producer/consumer pair themselves (e.g. an FFN's up rows and down
columns), and ``benchmarks/pretrained_minilm.py`` measures what it would add as a mask-only upper bound.
"""

from __future__ import annotations

import torch

from .calibration import LayerStats
from .errors import InvalidArgumentError
from .scores import ScoreContext

__all__ = ["SCOPES", "channel_permutation", "permuted_nm_keep", "ria_blocks", "ria_score"]

SCOPES = ("row", "layer")
ALPHA = 0.5  # the paper's exponent of the activation norm


def ria_blocks(w: torch.Tensor, norms: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """RIA scores of ``B`` blocks ``w`` ``(B, R, F)`` with input norms ``norms`` ``(B, F)``, float32.

    A row or column of zeros scores 0 (its sum is clamped away from 0).
    """
    a = w.abs().to(torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    rel = a / a.sum(2, keepdim=True).clamp_min(tiny) + a / a.sum(1, keepdim=True).clamp_min(tiny)
    return (rel * norms.to(torch.float64)[:, None, :].pow(alpha)).to(torch.float32)


def ria_score(ctx: ScoreContext) -> torch.Tensor:
    """The ``"ria"`` score of one tensor, in the weight's shape (see the module docstring)."""
    st = ctx.stats
    if not isinstance(st, LayerStats):
        raise InvalidArgumentError(f"method 'ria' needs calibration statistics for {ctx.name}, got {st!r}")
    blocks = st.to_blocks(ctx.weight.to(torch.float32))
    return st.from_blocks(ria_blocks(blocks, st.input_norms().to(blocks.device)))


def channel_permutation(scores: torch.Tensor, m: int) -> torch.Tensor:
    """RIA's channel allocation: a column permutation that spreads important columns over ``M``-groups.

    Columns are sorted by their total score (over rows) and dealt to the ``F / M`` groups in snake
    order (group 0, 1, ..., K-1, then K-1, ..., 0, ...), so every group gets one column of each
    importance band: the paper's balanced "channel allocation" heuristic (its optional linear-sum
    assignment refinement is not done).

    Args:
        scores: ``(R, F)`` scores, ``F`` divisible by ``m``.
        m: the group size ``M``.

    Returns:
        ``perm`` ``(F,)`` long: group ``g`` is the columns ``perm[g * m : (g + 1) * m]``.

    Example::

        >>> scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
        >>> channel_permutation(scores, 4)  # one column of each band of 2 per group: sums 18 and 18
        tensor([7, 4, 3, 0, 6, 5, 2, 1])
    """
    _check_scores_m(scores, m)
    f = scores.shape[1]
    k = f // m
    order = scores.to(torch.float64).sum(0).argsort(descending=True, stable=True)
    band = torch.arange(f) // k  # the band (0 = most important) of the i-th column in `order`
    pos = torch.arange(f) % k
    group = torch.where(band % 2 == 0, pos, k - 1 - pos)
    slot = group * m + band  # position in the permuted order
    perm = torch.empty(f, dtype=torch.long)
    perm[slot] = order.cpu()
    return perm.to(scores.device)


def _check_scores_m(scores: torch.Tensor, m: int) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise InvalidArgumentError(f"scores must be a 2-D (R, F) tensor, got {got}")
    f = scores.shape[1]
    if isinstance(m, bool) or not isinstance(m, int) or m < 1 or f % m:
        raise InvalidArgumentError(
            f"m must be a positive int dividing the number of columns {f}, got m={m!r}"
        )


def permuted_nm_keep(scores: torch.Tensor, n: int, m: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask ``(R, F)`` pruning the ``n`` lowest scores of every group of ``m`` columns of ``perm``.

    The mask is in the *original* column order; each row has exactly ``n`` zeros in every permuted
    group (consecutive groups only when ``perm`` is the identity).

    Args:
        scores: ``(R, F)`` scores, ``F`` divisible by ``m``.
        n: how many of each group to prune, ``0 <= n <= m``.
        m: the group size ``M``.
        perm: ``(F,)`` a permutation of the columns (default: :func:`channel_permutation`).

    Returns:
        The bool keep-mask ``(R, F)``.

    Example::

        >>> scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
        >>> permuted_nm_keep(scores, 2, 4)  # groups {7, 4, 3, 0} and {6, 5, 2, 1}: keeps 7, 4 and 6, 5
        tensor([[False, False, False, False,  True,  True,  True,  True]])
    """
    _check_scores_m(scores, m)
    r, f = scores.shape
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= m:
        raise InvalidArgumentError(f"n must be an int in [0, m={m}], got n={n!r}")
    if perm is None:
        perm = channel_permutation(scores, m)
    elif (
        not isinstance(perm, torch.Tensor)
        or perm.dim() != 1
        or not torch.equal(perm.detach().cpu().sort().values, torch.arange(f))
    ):
        got = tuple(perm.shape) if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise InvalidArgumentError(
            f"perm must be a permutation of the {f} columns (a 1-D long tensor), got {got}"
        )
    ps = scores[:, perm].reshape(r, f // m, m)
    low = ps.argsort(dim=2, stable=True)[:, :, :n]
    keep_p = torch.ones_like(ps, dtype=torch.bool).scatter_(2, low, False).reshape(r, f)
    keep = torch.empty_like(keep_p)
    keep[:, perm] = keep_p
    return keep
