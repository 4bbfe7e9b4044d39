"""``shrink``: physically remove pruned channels, and the per-layer-type rebuild rules it uses.

The channel analysis lives in ``export/graph.py`` (traversal) and ``export/rules.py``
(one rule per op). Here each rebuildable layer type has one entry in
``REBUILD_RULES``, filled with :func:`rebuild_rule`: given the layer, its
:class:`~hadamard_sparse.export.graph.LayerPlan` and which channel ids are removed,
it returns a shallow copy of the layer holding the kept slices.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..api import remove_parametrizations
from ..errors import InvalidTypeError, UnsupportedGraphError
from . import (
    rules,  # noqa: F401  (registers the op rules)
    rules_aten,  # noqa: F401  (registers the ATen op rules)
)
from .attention import disable_fused_paths
from .graph import ChannelFlow, FixedSize, LayerPlan, as_inputs, capture
from .heads import prune_zero_heads, set_submodule
from .rules import CONV_DIMS

__all__ = ["REBUILD_RULES", "rebuild", "rebuild_rule", "shrink"]

Removed = Callable[[torch.Tensor], torch.Tensor]
#: ``rule(new, old, plan, removed)`` slices the tensors of ``new`` (a shallow copy of ``old``).
RebuildRule = Callable[[nn.Module, nn.Module, LayerPlan, Removed], None]
#: One rebuild rule per layer type, looked up along the MRO.
REBUILD_RULES: dict[type, RebuildRule] = {}


def rebuild_rule(*types: type) -> Callable[[RebuildRule], RebuildRule]:
    """Register how :func:`shrink` rebuilds layers of ``types``."""

    def decorator(fn: RebuildRule) -> RebuildRule:
        for t in types:
            REBUILD_RULES[t] = fn
        return fn

    return decorator


def _param_like(src: torch.Tensor | None, value: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(value.detach().clone().contiguous())
    if src is not None:
        p.requires_grad_(src.requires_grad)
    return p


def rebuild(mod: nn.Module, plan: LayerPlan, removed: Removed) -> nn.Module:
    """A shallow copy of ``mod`` (same class, hooks and attributes) holding the kept slices."""
    rule = next((REBUILD_RULES[t] for t in type(mod).__mro__ if t in REBUILD_RULES), None)
    if rule is None:  # pragma: no cover - the op rules only plan layers that have a rebuild rule
        raise TypeError(f"shrink has no rebuild rule for {type(mod).__name__}")
    new = copy.copy(mod)
    new._parameters = dict(mod._parameters)  # type: ignore[assignment]
    new._buffers = dict(mod._buffers)  # type: ignore[assignment]
    new._modules = dict(mod._modules)  # type: ignore[assignment]
    with torch.no_grad():
        rule(new, mod, plan, removed)
    return new


def _keep(plan: LayerPlan, removed: Removed) -> torch.Tensor:
    assert plan.out_ids is not None
    return (~removed(plan.out_ids)).nonzero().squeeze(1)


@rebuild_rule(nn.Linear, *CONV_DIMS)
def _rebuild_linear_or_conv(new: nn.Module, mod: nn.Module, plan: LayerPlan, removed: Removed) -> None:
    if plan.kind == "depthwise":
        keep = _keep(plan, removed).to(mod.weight.device)
        new.weight = _param_like(mod.weight, mod.weight.detach().index_select(0, keep))
        if mod.bias is not None:
            new.bias = _param_like(mod.bias, mod.bias.detach().index_select(0, keep))
        new.out_channels = new.in_channels = new.groups = len(keep)
        return
    w = mod.weight.detach()
    keep_rows = (
        ~removed(plan.out_ids) if plan.out_ids is not None else torch.ones(w.shape[0], dtype=torch.bool)
    )
    keep_cols = torch.ones(w.shape[1], dtype=torch.bool)
    delta = torch.zeros(w.shape[0], dtype=torch.float64)
    groups = getattr(mod, "groups", 1)
    for ids, const, _ in plan.in_cols:
        gone = removed(ids)
        if groups > 1:  # coupled across the groups: the same columns go in each
            gone_g = gone.view(groups, -1)
            if not bool((gone_g == gone_g[0]).all()):  # the channel rules couple them; never expected
                raise UnsupportedGraphError(
                    f"shrink: the input channels removed from a grouped {type(mod).__name__}({mod.in_channels}, "
                    f"{mod.out_channels}, groups={groups}) differ between its groups; a grouped conv needs "
                    "the same channels removed in every group"
                )
            keep_cols &= ~gone_g[0]
            fold = gone_g & (const.view(groups, -1) != 0)  # (groups, in per group)
            if fold.any():  # row o reads the constants of its own group
                wsum = w.reshape(w.shape[0], w.shape[1], -1).sum(-1).to(torch.float64).cpu()
                group_of_row = torch.arange(w.shape[0]) // (w.shape[0] // groups)
                cg = torch.where(fold, const.view(groups, -1), 0.0)[group_of_row]
                delta += (wsum * cg).sum(1)
            continue
        keep_cols &= ~gone
        fold = gone & (const != 0)
        if fold.any():
            wf = w[:, fold].to(torch.float64).cpu()
            cf = const[fold]
            if plan.kind == "linear":
                delta += wf @ cf
            else:
                delta += (wf.reshape(wf.shape[0], wf.shape[1], -1).sum(-1)) @ cf
    rows = keep_rows.nonzero().squeeze(1).to(w.device)
    cols = keep_cols.nonzero().squeeze(1).to(w.device)
    new.weight = _param_like(mod.weight, w.index_select(0, rows).index_select(1, cols))
    if mod.bias is not None:
        b = (mod.bias.detach().to(torch.float64) + delta.to(mod.bias.device)).to(mod.bias.dtype)
        new.bias = _param_like(mod.bias, b.index_select(0, rows))
    if plan.kind == "linear":
        new.out_features, new.in_features = len(rows), len(cols)
    else:
        new.out_channels, new.in_channels = len(rows), len(cols) * groups


@rebuild_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _rebuild_batchnorm(new: nn.Module, mod: nn.Module, plan: LayerPlan, removed: Removed) -> None:
    keep = _keep(plan, removed)
    for pname in ("weight", "bias"):
        if mod._parameters.get(pname) is not None:
            t = mod._parameters[pname]
            new._parameters[pname] = _param_like(t, t.detach().index_select(0, keep.to(t.device)))
    for bname in ("running_mean", "running_var"):
        if mod._buffers.get(bname) is not None:
            t = mod._buffers[bname]
            new._buffers[bname] = t.index_select(0, keep.to(t.device)).clone()
    new.num_features = len(keep)


def _run(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors ``model`` returns on the inputs (eval mode, no gradients), flattened."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        for m, mode in modes:
            m.train(mode)
    leaves: list[torch.Tensor] = []

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            leaves.append(x)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif hasattr(x, "to_tuple"):  # transformers ModelOutput
            visit(x.to_tuple())

    visit(out)
    return leaves


def _same(ref: list[torch.Tensor], got: list[torch.Tensor]) -> str | None:
    """Why ``got`` differs from ``ref`` (``None`` when every tensor matches up to float rounding)."""
    if len(ref) != len(got):
        return f"it returns {len(got)} tensors instead of {len(ref)}"
    for i, (r, g) in enumerate(zip(ref, got)):
        if r.shape != g.shape:
            return f"output {i} has shape {tuple(g.shape)} instead of {tuple(r.shape)}"
        if r.is_floating_point():
            scale = float(r.abs().max()) if r.numel() else 0.0
            if not torch.allclose(g, r, rtol=1e-4, atol=1e-5 * max(1.0, scale), equal_nan=True):
                err = float((g - r).abs().max())
                return f"output {i} differs by up to {err:.3g}"
        elif not torch.equal(r, g):
            return f"output {i} differs"
    return None


def _plan(
    work: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[dict[str, LayerPlan], Removed, list[str]]:
    """Capture ``work`` and find the removable channels; returns the plans of the layers to rebuild."""
    cap = capture(work, args, kwargs)
    analysis = ChannelFlow(cap.gm, cap.frozen, root=None if cap.mode == "fx" else cap.root, params=cap.params)
    analysis.run()
    # Never empty a layer: keep one channel of a producer that would lose all of them.
    for name in analysis.producer_order:
        ids = analysis.plans[name].out_ids
        assert ids is not None
        if len(ids) and bool(analysis.removed(ids).all()):
            analysis.blocked.add(int(ids[0]))
    roots = {analysis.find(b) for b in analysis.blocked}

    def removed(ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([analysis.find(i) not in roots for i in ids.tolist()], dtype=torch.bool)

    todo = {}
    for name, plan in analysis.plans.items():
        gone = bool(plan.out_ids is not None and removed(plan.out_ids).any())
        gone = gone or any(bool(removed(ids).any()) for ids, _, _ in plan.in_cols)
        if gone:
            todo[name] = plan
    return todo, removed, analysis.fixed


def shrink(model: nn.Module, example_inputs: torch.Tensor | Sequence[Any] | dict[str, Any]) -> nn.Module:
    r"""Physically remove pruned channels, neurons and attention heads, and the inputs that read them, in place.

    The model is captured by *running* it once on ``example_inputs`` (eval mode, no
    gradients) with ``torch.export.export(strict=False)``, so Python branches such as
    ``if embed:`` take the path the inputs take and ``F.pad``, permutes, reshapes, splits
    and views are seen as the ATen ops they run; ``torch.fx.symbolic_trace`` is the
    fallback when export fails. A channel is *pruned* when its producer's weights for it
    are all zero (an all-zero row of a Linear, an all-zero filter of a Conv): it then
    carries a constant (its bias, or zero), which is followed through elementwise
    activations, dropout, BatchNorm (running statistics), pooling, ``pad`` (constant only if
    padded with the same value), ``add``/``sub``/``mul``/``div``, ``cat``/``split``/``chunk``,
    ``permute``/``transpose`` and reshapes/flattens that keep each channel whole (e.g.
    ``x.permute(0, 2, 1, 3).reshape(B, -1)`` into a Linear). A channel is removed (from
    its producers, from BatchNorm and depthwise convolutions in between, and from the
    inputs of its consumers) only when every layer that reads it either sees zero, or sees
    a constant that folds exactly into its bias. Channels added together (residual
    connections) form one group, removed only if every branch allows it. A grouped
    convolution ties channel ``j`` of each of its groups (inputs and outputs), so the same
    number goes from every group and it is rebuilt with the same ``groups``. Channels reaching
    the model's outputs, LayerNorm/GroupNorm over the channel dimension, a shared module or a
    module whose tensors the forward reads directly are kept.

    Attention heads (BERT, ViT, Llama, GPT-2, T5, Whisper, wav2vec2 blocks; see ``export/heads.py``) whose value
    rows are all zero are removed with their query/key rows and the output projection's
    columns (grouped-query attention: a key/value head goes with all its query heads), and
    the block's ``num_heads``-like attributes are updated. An ``nn.MultiheadAttention`` with such
    heads becomes a :class:`~hadamard_sparse.export.attention.ProjectedMultiheadAttention` (same
    forward, explicit ``q_proj``/``k_proj``/``v_proj``/``out_proj``) holding the other heads; one
    it cannot reproduce (``add_bias_kv``, ``add_zero_attn``) is kept whole with a warning.

    The work is done on a baked deep copy; the copy's output is checked against the masked
    model's (up to float rounding) before the changed layers are swapped into ``model``, so
    a refused call leaves ``model`` unchanged. Parametrizations of this library are then
    baked into ``model`` (:func:`remove_parametrizations`); ``copy.deepcopy`` it beforehand
    to keep the masked one. Changed layers are shallow copies of the same class with the
    kept slices (``isinstance``, hooks and extra attributes hold) and updated
    ``in_features``/``out_features``/``in_channels``/``out_channels``/``num_features``/
    ``groups``. An optimizer built before must be rebuilt.

    Args:
        model: the model, masked (parametrized) or baked.
        example_inputs: a tensor, a tuple of the model's positional inputs or a dict of its
            keyword inputs; the forward runs on them (shapes, and the branch to follow).

    Returns:
        ``model``, baked and shrunk in place.

    Raises:
        UnsupportedGraphError: the model cannot be captured, an operation it does not model
            (a view splitting pruned channels, an unknown function, ...) reads pruned channels, naming the layer and the operation; or the
            shrunk copy computes something else (e.g. a reshape to a hard-coded width). The
            model is unchanged.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> hs.register_mask(model[0], "weight", torch.arange(16).unsqueeze(1) < 4)  # keep 4 neurons
        >>> shrink(model, torch.randn(1, 8))[0].out_features
        4
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    args, kwargs = as_inputs(example_inputs)
    work = remove_parametrizations(copy.deepcopy(model))
    try:
        ref = _run(work, args, kwargs)
    except Exception as exc:
        raise UnsupportedGraphError(
            f"shrink could not run {type(model).__name__} on example_inputs: {type(exc).__name__}: {exc}"
        ) from exc
    changed = prune_zero_heads(work)
    disable_fused_paths(work)
    todo, removed, fixed = _plan(work, args, kwargs)
    for name, plan in todo.items():
        set_submodule(work, name, rebuild(work.get_submodule(name), plan, removed))
    changed += list(todo)
    updates: list[tuple[str, str, int]] = []
    if changed:
        why = _check(work, ref, args, kwargs)
        if why is not None and fixed:  # a reshape to a width stored in an attribute: update it, check again
            updates = _width_attributes(work, fixed, removed)
            for mod_name, attr, value in updates:
                setattr(work.get_submodule(mod_name), attr, value)
            why = _check(work, ref, args, kwargs) if updates else why
        if why is not None:
            hint = ("; " + "; ".join(f.where for f in fixed)) if fixed else ""
            raise UnsupportedGraphError(
                f"shrink refused {type(model).__name__}: the shrunk copy does not compute what the masked "
                f"model computes ({why}){hint}. Compute sizes from the layers (e.g. "
                "self.classifier.in_features) or use -1 in reshapes"
            )
    remove_parametrizations(model)
    done: list[str] = []
    for name in sorted(set(changed), key=lambda n: n.count(".")):
        if any(name == d or name.startswith(d + ".") for d in done):
            continue
        set_submodule(model, name, work.get_submodule(name))
        done.append(name)
    for mod_name, attr, value in updates:
        setattr(model.get_submodule(mod_name), attr, value)
    disable_fused_paths(model)
    return model


def _check(
    work: nn.Module, ref: list[torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str | None:
    try:
        return _same(ref, _run(work, args, kwargs))
    except Exception as exc:
        return f"it raises {type(exc).__name__}: {exc}"


def _width_attributes(
    work: nn.Module, fixed: list[FixedSize], removed: Removed
) -> list[tuple[str, str, int]]:
    """``(module, attribute, new value)`` for int attributes of the module running a fixed-size reshape.

    torchcrepe reshapes with ``reshape(-1, self.in_features)``: the attribute equal to the constant,
    on the module whose forward runs the reshape, is set to the dimension's new size. Only kept when
    the shrunk copy then reproduces the masked outputs.
    """
    out = []
    for f in fixed:
        mod = work.get_submodule(f.module)
        new = int((~removed(f.ids)).sum())
        for attr, value in vars(mod).items():
            if type(value) is int and value == f.value and not attr.startswith("_"):
                out.append((f.module, attr, new))
    return out
