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
from . import rules  # noqa: F401  (registers the op rules)
from .graph import ChannelFlow, LayerPlan, as_inputs, frozen_modules, trace
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
    for ids, const, _ in plan.in_cols:
        gone = removed(ids)
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
        new.out_channels, new.in_channels = len(rows), len(cols)


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


def shrink(model: nn.Module, example_inputs: torch.Tensor | Sequence[Any]) -> nn.Module:
    r"""Physically remove pruned output channels/neurons and the inputs that read them, in place.

    The model is traced with :func:`torch.fx.symbolic_trace` and run once on
    ``example_inputs`` (in eval mode, without gradients) to know every tensor's
    shape. A channel is *pruned* when its producer's weights for it are all zero
    (an all-zero row of a Linear, an all-zero filter of a Conv): it then carries a
    constant (its bias, or zero), which is followed through elementwise
    activations, dropout, BatchNorm (running statistics), pooling, ``add``/``sub``/
    ``mul``/``div``, ``cat`` along channels, ``flatten`` and ``mean`` over other
    dimensions. A channel is removed (from its producers, from BatchNorm and
    depthwise convolutions in between, and from the inputs of its consumers) only
    when every layer that reads it either sees zero, or sees a constant that can be
    folded exactly into its bias: a Linear with a bias, or a Conv with a bias and no
    zero padding. Channels added together (residual connections) form one group,
    removed only if every branch allows it. Channels reaching the model's outputs,
    LayerNorm/GroupNorm over the channel dimension, a shared module or a module
    whose tensors the forward reads directly are kept. The result equals the
    masked model's output in eval mode up to float rounding.

    Parametrizations of this library are baked first (:func:`remove_parametrizations`);
    ``copy.deepcopy`` the model beforehand to keep the masked one. Changed layers
    are replaced by shallow copies of the same class with the kept slices (so
    ``isinstance``, hooks and extra attributes hold); their ``in_features``/
    ``out_features``/``in_channels``/``out_channels``/``num_features``/``groups`` are
    updated. An optimizer built before must be rebuilt.

    Args:
        model: the model, masked (parametrized) or baked. It must be traceable by ``torch.fx``.
        example_inputs: a tensor, or a tuple of the model's positional inputs, used only for
            shapes (e.g. to map each channel to its ``H*W`` inputs after ``flatten``).

    Returns:
        ``model``, baked and shrunk in place.

    Raises:
        UnsupportedGraphError: the model cannot be traced, or an operation it does not model
            (a reshape other than ``x.view(batch, -1)``, a grouped non-depthwise conv, an
            unknown module or function, ...) reads pruned channels. The model is unchanged.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> hs.register_mask(model[0], "weight", torch.arange(16).unsqueeze(1) < 4)  # keep 4 neurons
        >>> shrink(model, torch.randn(1, 8))[0].out_features
        4
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = as_inputs(example_inputs)
    gm = trace(model, inputs)
    analysis = ChannelFlow(gm, frozen_modules(model, gm))
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
    remove_parametrizations(model)
    new_modules = {name: rebuild(model.get_submodule(name), plan, removed) for name, plan in todo.items()}
    for name, new in new_modules.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model
