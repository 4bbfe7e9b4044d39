"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): prune and reconstruct, layer by layer.

.. warning::
    ``method="sparsegpt"`` is the one method that **edits the weights**: besides
    registering the masks, it rewrites the kept entries of each targeted tensor's
    ``original`` so that the layer's output on the calibration data stays as close
    as possible to the dense one. The pruned entries of ``original`` keep their
    dense values (as with every other method), but the kept ones change, so
    ``sparsify(model, 0.0)`` no longer gives back the pretrained model. Keep a copy
    (``copy.deepcopy``) if you need it.

For one weight, viewed as ``R x F`` (outputs x input features, see
:mod:`hadamard_sparse.calibration`), with ``H = X^T X`` the Gram matrix of its
calibration inputs, the columns are processed left to right in blocks of 128:
at the start of each block the entries with the lowest OBS saliency
``w^2 / [H^-1]_jj^2`` are chosen (exact counts, see below), then each column is
pruned and the error ``(w - q) / [H^-1]_jj`` is spread over the later columns
through the Cholesky factor of ``H^-1`` (the optimal brain surgeon update).

Counts are exact as everywhere in this library: ``scope="row"`` prunes exactly
``round(s * F)`` entries of every row (each block takes its share by cumulative
rounding), ``scope="layer"`` exactly ``round(s * R * F)`` of the tensor. With an
``N:M`` structure (only at sparsity ``N/M``) the ``N`` lowest-saliency entries of
every group of ``M`` are chosen when the sweep reaches the group.

When ``calibration`` is an iterable of batches, layers are processed
sequentially in module order: the Gram matrix of each layer is gathered with
the layers before it already pruned and reconstructed, as in the paper. This
costs one calibration pass per "wave" (consecutive tensors fed the very same
input tensor, such as the q, k and v projections of an attention block, share a
wave), and each pass stops its forward as soon as the wave's inputs are seen. Given :class:`~hadamard_sparse.calibration.ActivationStats`
(``calibrate(..., gram=True)``), all layers use those dense-model statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _select
from ._engine import pre_mask_value
from .calibration import ActivationStats, LayerStats, check_batches, check_stats, collect, with_progress
from .errors import InvalidArgumentError
from .layers import Target, layer_kind, layer_rule, supported_layers
from .parametrizations import HadamardMask
from .scores import Apply, ScoreContext
from .structures import NM

# No public names for users: the method is registered as "sparsegpt" by builtin_methods (register_score with
# obs_saliency as the score and prune as the pruner); importing this module registers nothing.
__all__ = ["PERCDAMP", "SCOPES", "check_targets", "obs_prune", "obs_saliency", "prune"]

SCOPES = ("row", "layer")
_BLOCK = 128
# Dampening of H. The paper adds 0.01 * mean(diag H) * I, tuned for 128 x 2048 calibration tokens
# of LLMs. Here: H + 0.1 * diag(H) (Levenberg-Marquardt style), which is invariant to the scale of each
# input feature and suits a few dozen sentences (a few hundred tokens, fewer than the 1536 inputs of a
# BERT FFN output, so H is rank-deficient). all-MiniLM-L6-v2 at 50%, one-shot: mean cosine 0.876 with
# the paper's 0.01 * mean, 0.908 with 0.1 * mean, 0.908 with 0.1 * diag (top-1 0.93 vs 0.83); on
# synthetic inputs whose feature scales span 100x, 0.1 * mean was worse than Wanda and 0.1 * diag best.
PERCDAMP = 0.1
_DAMP_RELATIVE = True


def _hinv_upper(h: torch.Tensor, percdamp: float = PERCDAMP) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + percdamp * diag(H))^-1`` (``U^T U``), float64, dead inputs made harmless.

    With ``P`` the reversal permutation and ``P H P = L L^T``, ``U = P L^-1 P`` is upper triangular
    with ``U^T U = H^-1``: one Cholesky and one triangular inverse.
    """
    h = h.to(torch.float64).clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    if _DAMP_RELATIVE:  # Levenberg-Marquardt style: H + percdamp * diag(H), invariant to feature scales
        damp_m = torch.diag(diag.clone())
    else:  # the paper's: H + percdamp * mean(diag H) * I
        damp_m = float(diag.mean()) * eye
    flipped = h.flip(0, 1)
    damp_f = damp_m.flip(0, 1)
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(flipped + percdamp * (10**attempt) * damp_f)
        if int(info) == 0:
            inv = torch.linalg.solve_triangular(chol, eye, upper=False)
            return inv.flip(0, 1)
    raise InvalidArgumentError(
        "sparsegpt: the calibration Gram matrix is not positive definite even after damping "
        "(check the calibration inputs for inf/nan)"
    )


def _block_quota(n: int, i1: int, i2: int, f: int) -> int:
    """Share of ``n`` pruned entries of a row (or matrix) falling to columns ``[i1, i2)`` of ``f``."""
    return round(n * i2 / f) - round(n * i1 / f)


def obs_prune(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    *,
    scope: str = "row",
    nm: tuple[int, int] | None = None,
    n_prune: int | None = None,
    blocksize: int = _BLOCK,
    percdamp: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one ``(R, F)`` matrix with Gram matrix ``h`` ``(F, F)``.

    Args:
        w: the dense weight, rows = outputs, columns = input features.
        h: ``sum x x^T`` over calibration inputs.
        sparsity: fraction pruned per row (``"row"``) or of the matrix (``"layer"``).
        scope: ``"row"`` or ``"layer"``.
        nm: ``(n, m)``: prune ``n`` of every ``m`` consecutive columns of each row instead.
        n_prune: for ``"layer"``, the exact count (default ``round(sparsity * R * F)``).
        blocksize: columns per lazy-update block (a multiple of ``m`` is used with ``nm``).
        percdamp: ``H + percdamp * diag(H)`` is inverted (dampening relative to each input
            feature's scale; the paper uses ``0.01 * mean(diag H) * I``). Default: ``0.1``.

    Returns:
        ``(new_w, keep)``: the reconstructed weight (zeros where pruned) and the bool keep-mask.
    """
    r, f = w.shape
    W = w.to(torch.float32).clone()
    U = _hinv_upper(h.to(W.device), PERCDAMP if percdamp is None else percdamp).to(torch.float32)
    keep = torch.ones(r, f, dtype=torch.bool, device=W.device)
    row_n = _select.n_to_prune(sparsity, f)
    total_n = _select.n_to_prune(sparsity, r * f) if n_prune is None else n_prune
    if nm is not None:
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    for i1 in range(0, f, blocksize):
        i2 = min(i1 + blocksize, f)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        err = torch.zeros_like(W1)
        prune1 = torch.zeros(W1.shape, dtype=torch.bool, device=W.device)
        if nm is None:
            sal = W1.square() / d.square()
            if scope == "row":
                k = _block_quota(row_n, i1, i2, f)
                if k:
                    order = _select.order_keys(sal).view(sal.shape).argsort(dim=1, stable=True)[:, :k]
                    prune1.scatter_(1, order, True)
            else:
                k = _block_quota(total_n, i1, i2, f)
                prune1 = ~_select.keep_masks([lambda s=sal: s], k)[0].view(W1.shape)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                sal = W1[:, i : i + nm[1]].square() / d[i : i + nm[1]].square()
                order = sal.argsort(dim=1, stable=True)[:, : nm[0]]
                prune1[:, i : i + nm[1]].scatter_(1, order, True)
            col = W1[:, i]
            q = col.masked_fill(prune1[:, i], 0.0)
            e = (col - q) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            err[:, i] = e
        W[:, i1:i2] = W1
        keep[:, i1:i2] = ~prune1
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return W.to(w.dtype), keep


def _prune_target(
    t: Target, st: LayerStats, sparsity: float, scope: str, nm: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-mask and new dense value (pruned entries keep their old values) of one target."""
    assert st.gram is not None
    dense = pre_mask_value(t.module, t.tensor_name)
    blocks = st.to_blocks(dense)
    b, r, f = blocks.shape
    total = _select.n_to_prune(sparsity, b * r * f)
    new_blocks, keep_blocks = [], []
    for i in range(b):
        share = _block_quota(total, i, i + 1, b)
        nw, kp = obs_prune(blocks[i], st.gram[i], sparsity, scope=scope, nm=nm, n_prune=share)
        new_blocks.append(nw)
        keep_blocks.append(kp)
    new = st.from_blocks(torch.stack(new_blocks)).to(dense.device, dense.dtype)
    keep = st.from_blocks(torch.stack(keep_blocks)).to(dense.device)
    return keep, torch.where(keep, new, dense)


def check_targets(
    targets: Sequence[Target], structure: Any, sparsities: Sequence[float]
) -> tuple[int, int] | None:
    """Refuse what SparseGPT's reconstruction cannot prune, before anything changes.

    Args:
        targets: the targeted tensors.
        structure: the parsed structure: ``None`` or an :class:`~hadamard_sparse.structures.NM`.
        sparsities: one per target; with ``N:M`` each must be ``N/M``.

    Returns:
        ``(n, m)`` for an ``N:M`` structure, else ``None``.

    Raises:
        InvalidArgumentError: listing every target of a layer kind it cannot reconstruct or with
            parametrizations other than a mask, or a structure/sparsity it does not support.
    """
    problems = []
    for t in targets:
        rule = layer_rule(t.module)
        if rule is None or not rule.reconstructable:
            kind = layer_kind(t.module)
            problems.append(
                f"{t.qualified}: layer kind {kind!r} (sparsegpt supports "
                f"{supported_layers(reconstructable=True)})"
            )
        elif parametrize.is_parametrized(t.module, t.tensor_name):
            plist = t.module.parametrizations[t.tensor_name]  # type: ignore[index, union-attr]
            if not plist.is_tensor or not all(isinstance(p, HadamardMask) for p in plist):
                problems.append(f"{t.qualified}: has parametrizations other than a HadamardMask")
    if problems:
        raise InvalidArgumentError(
            f"method 'sparsegpt' cannot prune {len(problems)} tensor(s); exclude them "
            "(exclude=[...]):\n  " + "\n  ".join(problems)
        )
    if structure is None:
        return None
    if not isinstance(structure, NM):
        raise InvalidArgumentError(f"method 'sparsegpt' supports structure None or 'N:M', got {structure!r}")
    full = structure.n / structure.m
    bad = [s for s in sparsities if abs(s - full) > 1e-9]
    if bad:
        raise InvalidArgumentError(
            f"method 'sparsegpt' with structure {structure} needs sparsity {full:g} (N/M), got {bad[0]!r}"
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
    """The ``"sparsegpt"`` pruner: validate, then prune and reconstruct every target (see module doc)."""
    nm = check_targets(targets, structure, sparsities)
    if isinstance(calibration, ActivationStats):
        check_stats(calibration, targets, "sparsegpt", need_gram=True)
        # every layer uses the dense statistics: compute every result first, then apply them all
        results = [
            _prune_target(t, calibration[t.qualified], sp, scope, nm) for t, sp in zip(targets, sparsities)
        ]
        for t, (keep, new) in zip(targets, results):
            apply(t, keep, new)
        return
    batches = list(check_batches(calibration))
    # every target must be observable before anything changes
    probe = collect(model, targets, batches, gram=False, warn=False)
    check_stats(probe, targets, "sparsegpt", False)
    sparsity_of = {t.qualified: sp for t, sp in zip(targets, sparsities)}
    # Each wave's statistics are gathered with the earlier waves already applied (as in the paper),
    # so this path applies as it goes; sparsify undoes every applied wave if a later one raises.
    for wave in with_progress(_waves(targets, probe), progress, "sparsegpt"):
        calls = [probe.calls_per_batch(t.qualified) for t in wave]
        constant = all(len(set(c)) == 1 for c in calls)
        stop = {t.qualified: c[0] for t, c in zip(wave, calls)} if constant else None
        stats = collect(model, wave, batches, gram=True, progress=False, warn=False, stop_after=stop)
        results = [_prune_target(t, stats[t.qualified], sparsity_of[t.qualified], scope, nm) for t in wave]
        for t, (keep, new) in zip(wave, results):
            apply(t, keep, new)


def _waves(targets: Sequence[Target], probe: ActivationStats) -> list[list[Target]]:
    """Consecutive targets fed the very same input tensors (e.g. q, k, v projections) form one wave."""
    waves: list[list[Target]] = []
    for t in targets:
        sig = probe.input_identities(t.qualified)
        if waves and sig and probe.input_identities(waves[-1][-1].qualified) == sig:
            waves[-1].append(t)
        else:
            waves.append([t])
    return waves


def obs_saliency(ctx: ScoreContext) -> torch.Tensor:
    """Mask-only SparseGPT criterion ``w^2 / [H^-1]_jj^2`` (no weight update), e.g. for schedules."""
    st = ctx.stats
    if not isinstance(st, LayerStats) or st.gram is None:
        raise InvalidArgumentError(
            f"method 'sparsegpt' needs calibration statistics with a Gram matrix for {ctx.name}"
        )
    w = st.to_blocks(ctx.weight.to(torch.float64))
    d = torch.stack([torch.diagonal(_hinv_upper(g)) for g in st.gram.to(w.device)])
    sal = w.square() / d[:, None, :].square()
    return st.from_blocks(sal).to(torch.float32)
