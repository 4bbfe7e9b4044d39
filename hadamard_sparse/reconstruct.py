"""Reconstruction after the mask: least-squares refit of the kept weights, block-level reconstruction.

Two registered methods (``sparsify(model, s, method=..., calibration=batches)``); like
``"sparsegpt"`` they **edit the kept weights** (the pruned entries of ``original`` keep their dense
values), so keep a ``copy.deepcopy`` of the model if you need the dense one back.

``"wanda_refit"``
    Wanda's masks (``|W_ij| * ||X_j||``), then the kept weights of every output row are refit by
    least squares on the calibration inputs of the dense model, restricted to the row's support:
    with ``H = X^T X + d * diag(X^T X)`` (``d = 0.1``, the dampening of ``"sparsegpt"``) and ``S`` the
    kept columns of row ``w``, ``v_S = H_SS^-1 H_S: w``. This is the exact minimiser of
    ``||X w - X_S v||^2 + d * sum_j H_jj (w_j - v_j)^2`` over ``v`` supported on ``S``: one
    Cholesky solve per row, no sweep. Mask from Wanda, weights optimal for the mask; cost ``R`` Cholesky solves of size ``|S|`` per weight
    (1.5 to 2.5 minutes for all-MiniLM-L6-v2 on one CPU core).

``"sparsegpt_block"``
    For models made of a stack of repeated blocks (the transformer layers of a Hugging Face model,
    found as the longest ``nn.ModuleList`` whose items all hold targeted tensors), blocks are
    processed in order: the block's inputs are captured from the model whose earlier blocks are
    already pruned, the block's tensors are pruned by sequential SparseGPT on those inputs, then
    the kept weights of the block are trained with Adam (``_STEPS`` steps of one calibration batch
    each, learning rate ``_LR``) to minimise ``||block_dense(x_dense) - block_sparse(x_sparse)||^2``,
    the mean squared error between the dense model's block output (recorded in one dense pass
    before anything changes) and the pruned block's output on its pruned-prefix input: the
    block-wise reconstruction of the "free lunch" line of work (EBFT, Guo et al. 2024,
    arXiv 2402.12419; Shin et al. 2024). Only the kept entries of the targeted weights move
    (pruned entries get zero gradients through the mask); biases and norms stay. If the training
    raised the block's calibration error, the block's SparseGPT weights are restored. Targeted
    tensors outside the blocks (a pooler, a head) are pruned by sequential SparseGPT. Cost: one
    dense pass storing every block's output for every calibration batch, one prefix pass per block,
    plus the training: minutes on CPU for a 6-layer MiniLM with ~170 sentences.

Both need calibration with Gram matrices; ``"sparsegpt_block"`` needs the batches themselves
(it runs the blocks), not :class:`~hadamard_sparse.calibration.ActivationStats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import sparsegpt as _sgpt
from ._engine import compute_keep_masks, pre_mask_value
from ._model_io import eval_mode
from .calibration import (
    ActivationStats,
    LayerStats,
    call_batch,
    check_batches,
    check_stats,
    collect,
    stats_for,
    with_progress,
)
from .errors import InvalidArgumentError, InvalidTypeError
from .layers import Target
from .scores import Apply, ScoreContext, get_score

# api registers the methods "wanda_refit" (wanda_score + prune_wanda_refit) and "sparsegpt_block"
# (sparsegpt.obs_saliency + prune_blocks); importing this module registers nothing.
__all__ = [
    "SCOPES",
    "find_blocks",
    "prune_blocks",
    "prune_wanda_refit",
    "reconstruct_block",
    "refit_rows",
    "wanda_keep_masks",
    "wanda_score",
]

SCOPES = ("row", "layer")

_STEPS = 200
_LR = 1e-4
_DAMP = _sgpt.PERCDAMP
_SOLVE_BYTES = 64 * 2**20  # memory bound of one batch of per-row solves


# ----------------------------------------------------------------------------- least-squares refit


def refit_rows(
    w: torch.Tensor, keep: torch.Tensor, h: torch.Tensor, damp: float | None = None
) -> torch.Tensor:
    """Least-squares refit of the kept entries of each row of ``w`` (``R x F``) given ``h = X^T X``.

    Args:
        w: the dense weight, rows = outputs, columns = input features.
        keep: bool ``(R, F)``, ``True`` where kept.
        h: ``(F, F)`` Gram matrix of the calibration inputs.
        damp: ``H + damp * diag(H)`` is used (dead inputs get a unit diagonal). Default: ``_DAMP``.

    Returns:
        ``(R, F)`` in ``w``'s dtype: the refit kept weights, zeros where pruned. Row ``i`` minimises
        ``||X w_i - X v||^2 + damp * sum_j H_jj (w_ij - v_j)^2`` over ``v`` supported on ``keep[i]``.
    """
    damp = _DAMP if damp is None else damp
    hd = h.to(torch.float64).clone()
    diag = torch.diagonal(hd)
    diag[diag == 0] = 1.0
    hd += damp * torch.diag(diag.clone())
    wd = w.to(torch.float64)
    rhs = wd @ hd  # (R, F): row i is (H w_i)^T, H symmetric
    out = torch.zeros_like(wd)
    counts = keep.sum(1)
    for k in counts.unique().tolist():
        if k == 0:
            continue
        rows = (counts == k).nonzero().squeeze(1)
        chunk = max(1, _SOLVE_BYTES // (8 * k * k))
        for c in range(0, rows.numel(), chunk):
            r = rows[c : c + chunk]
            idx = keep[r].nonzero()[:, 1].view(len(r), k)  # kept columns of each row, ascending
            a = hd[idx[:, :, None], idx[:, None, :]]  # (n, k, k)
            b = torch.gather(rhs[r], 1, idx).unsqueeze(-1)
            chol, info = torch.linalg.cholesky_ex(a)
            if bool((info != 0).any()):
                v = torch.linalg.lstsq(a, b).solution
            else:
                v = torch.cholesky_solve(b, chol)
            out[r] = out[r].scatter(1, idx, v.squeeze(-1))
    return out.to(w.dtype)


def _refit_target(t: Target, st: LayerStats, keep: torch.Tensor) -> torch.Tensor:
    """New dense value of ``t``: refit kept entries, pruned entries keep their dense values."""
    assert st.gram is not None
    dense = pre_mask_value(t.module, t.tensor_name)
    kb = st.to_blocks(keep.expand(dense.shape))
    wb = st.to_blocks(dense)
    new = torch.stack([refit_rows(wb[i], kb[i], st.gram[i].to(wb.device)) for i in range(wb.shape[0])])
    new = st.from_blocks(new).to(dense.device, dense.dtype)
    return torch.where(keep, new, dense)


def wanda_keep_masks(
    targets: Sequence[Target],
    sparsities: Sequence[float],
    *,
    scope: str,
    stats: ActivationStats,
    structure: Any,
) -> list[torch.Tensor]:
    """Wanda's keep-masks of ``targets`` (one sparsity, or one per target), the start of ``"wanda_refit"`` and ``"dsnot"``."""
    per = list(sparsities)
    same = all(abs(s - per[0]) < 1e-12 for s in per)
    return compute_keep_masks(
        targets, per[0] if same else per, method="wanda", scope=scope, stats=stats, structure=structure
    )


def prune_wanda_refit(
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
    """The ``"wanda_refit"`` pruner: Wanda masks, then the support-restricted least-squares refit."""
    _sgpt.check_targets(targets, structure, sparsities)
    stats = stats_for(model, targets, calibration, method="wanda_refit", need_gram=True)
    keeps = wanda_keep_masks(targets, sparsities, scope=scope, stats=stats, structure=structure)
    news = [_refit_target(t, stats[t.qualified], k) for t, k in zip(targets, keeps)]  # all before any change
    for t, keep, new in zip(targets, keeps, news):
        apply(t, keep.expand(new.shape), new)


def wanda_score(ctx: ScoreContext) -> torch.Tensor:
    """Mask-only use of ``"wanda_refit"`` (schedules, ``compute_keep_masks``): Wanda's score."""
    return get_score("wanda").fn(ctx)


# ----------------------------------------------------------------------------- block reconstruction


def find_blocks(model: nn.Module, targets: Sequence[Target]) -> list[nn.Module]:
    """The repeated blocks of ``model``: items of its longest ``nn.ModuleList`` (at least 2) that all hold targets.

    Returns ``[]`` when no such list exists (then ``"sparsegpt_block"`` is plain sequential SparseGPT).
    """
    owners = {id(t.module) for t in targets}
    best: list[nn.Module] = []
    for m in model.modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2 or len(m) <= len(best):
            continue
        items = list(m)
        if all(any(id(s) in owners for s in item.modules()) for item in items):
            best = items
    return best


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise InvalidTypeError(
        f"sparsegpt_block: cannot find the output tensor of a block that returned {type(out).__name__}"
    )


class _Stop(Exception):
    """Stops a forward pass whose remaining outputs are not needed."""


def _is_cache(x: Any) -> bool:
    """A key/value cache (Hugging Face ``Cache``): replaying a block must not append to it."""
    return any(c.__name__ == "Cache" for c in type(x).__mro__)


def _detach(x: Any) -> Any:
    """Detached copy of a block's recorded inputs; key/value caches become ``None``."""
    if _is_cache(x):
        return None
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def _run_model(
    model: nn.Module, batches: Sequence[Any], hooks: list[tuple[nn.Module, Any, bool]], first: int = 0
) -> None:
    """One no-grad eval-mode pass over ``batches`` (the first being batch ``first``) with temporary hooks."""
    handles = []
    try:
        for module, fn, pre in hooks:
            if pre:
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn))
        with eval_mode(model), torch.no_grad():
            for index, batch in enumerate(batches):
                try:
                    call_batch(model, batch, first + index, passthrough=(_Stop,))
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()


def _dense_outputs(
    model: nn.Module, blocks: Sequence[nn.Module], batches: Sequence[Any]
) -> list[list[torch.Tensor]]:
    """Every block's output (first tensor, first call) for every batch, from one pass."""
    outs: list[list[torch.Tensor]] = [[] for _ in blocks]
    batch_index = [0]

    def make(i: int) -> Any:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if len(outs[i]) == batch_index[0]:  # first call of this batch
                outs[i].append(_first_tensor(out).detach().clone())

        return hook

    hooks: list[tuple[nn.Module, Any, bool]] = [(b, make(i), False) for i, b in enumerate(blocks)]
    for j, batch in enumerate(batches):
        batch_index[0] = j
        _run_model(model, [batch], hooks, j)
    return outs


def _block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[Any]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) of the first call of ``block`` in every batch, with the model as it is now."""
    got: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kw = _detach(kwargs)
        if "use_cache" in kw:
            kw["use_cache"] = False
        got.append((_detach(args), kw))
        raise _Stop

    _run_model(model, batches, [(block, hook, True)])
    return got


class _Replay(nn.Module):
    """Calls ``block`` on recorded inputs: ``replay(i=j)`` runs the block on batch ``j``'s inputs."""

    def __init__(self, block: nn.Module, inputs: list[tuple[tuple, dict]]) -> None:
        super().__init__()
        self.block = block
        self.inputs = inputs

    def forward(self, i: int) -> torch.Tensor:
        args, kwargs = self.inputs[i]
        return _first_tensor(self.block(*args, **kwargs))


def _block_error(replay: _Replay, targets_out: Sequence[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(F.mse_loss(replay(i), y)) for i, y in enumerate(targets_out)) / len(targets_out)


def _original(t: Target) -> nn.Parameter:
    return t.module.parametrizations[t.tensor_name].original  # type: ignore[index, union-attr, return-value]


def reconstruct_block(
    replay: _Replay,
    targets: Sequence[Target],
    dense_out: Sequence[torch.Tensor],
    *,
    steps: int = _STEPS,
    lr: float = _LR,
    seed: int = 0,
) -> tuple[float, float]:
    """Adam on the kept weights of ``targets`` (masked originals) to match ``dense_out``; returns errors before/after.

    Only the ``original`` tensors of ``targets`` are updated (in place, under ``no_grad`` by the
    optimizer); pruned entries get zero gradients through their masks and stay. Other parameters'
    ``.grad`` are left untouched. If the mean calibration error went up, the weights are restored.
    """
    params = [_original(t) for t in targets]
    before = _block_error(replay, dense_out)
    saved = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    try:
        for p in params:
            p.requires_grad_(True)
        with eval_mode(replay), torch.enable_grad():
            for _ in range(steps):
                i = int(torch.randint(len(dense_out), (1,), generator=g))
                loss = F.mse_loss(replay(i), dense_out[i])
                for p, gr in zip(params, torch.autograd.grad(loss, params)):
                    p.grad = gr
                opt.step()
    finally:
        for p, flag, gr in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = gr
    after = _block_error(replay, dense_out)
    if not after <= before:  # also catches NaN
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        after = before
    return before, after


def _segments(targets: Sequence[Target], blocks: Sequence[nn.Module]) -> list[tuple[int | None, list[int]]]:
    """Consecutive target indices grouped by the block holding them (``None``: outside every block)."""
    where: dict[int, int] = {}
    for bi, b in enumerate(blocks):
        for m in b.modules():
            where[id(m)] = bi
    segs: list[tuple[int | None, list[int]]] = []
    for i, t in enumerate(targets):
        b = where.get(id(t.module))
        if segs and segs[-1][0] == b:
            segs[-1][1].append(i)
        else:
            segs.append((b, [i]))
    return segs


def prune_blocks(
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
    """The ``"sparsegpt_block"`` pruner (see the module doc)."""
    nm_struct = structure
    _sgpt.check_targets(targets, structure, sparsities)
    if isinstance(calibration, ActivationStats):
        raise InvalidArgumentError(
            "method 'sparsegpt_block' needs calibration batches (an iterable of model inputs: it runs "
            "the blocks), got ActivationStats"
        )
    batches = list(check_batches(calibration))
    if not batches:
        raise InvalidArgumentError(
            "method 'sparsegpt_block' needs at least one calibration batch, got an empty iterable"
        )
    probe = collect(model, targets, batches, gram=False, warn=False)
    check_stats(probe, targets, "sparsegpt_block", False)
    blocks = find_blocks(model, targets)
    dense_out = _dense_outputs(model, blocks, batches) if blocks else []
    for b, idx in with_progress(_segments(targets, blocks), progress, "sparsegpt_block"):
        seg = [targets[i] for i in idx]
        sps = [sparsities[i] for i in idx]
        if b is None or len(dense_out[b]) != len(
            batches
        ):  # outside the blocks, or a block not run once per batch
            _sgpt.prune(
                model,
                seg,
                sps,
                scope=scope,
                structure=nm_struct,
                calibration=batches,
                apply=apply,
                progress=False,
            )
            continue
        inputs = _block_inputs(model, blocks[b], batches)
        replay = _Replay(blocks[b], inputs)
        calls = [{"i": i} for i in range(len(inputs))]
        _sgpt.prune(
            replay, seg, sps, scope=scope, structure=nm_struct, calibration=calls, apply=apply, progress=False
        )
        reconstruct_block(replay, seg, dense_out[b], seed=b)
