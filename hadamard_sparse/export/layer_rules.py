"""One export rule per layer type: channel flow, rebuild, group membership and sparse conversion.

The export side knows four things about a layer type, and each :class:`ExportRule` owns all four:

* :meth:`ExportRule.flow`: what the layer does to the channels of its input
  (:class:`~hadamard_sparse.export.graph.ChannelFlow`; ``shrink`` and ``ChannelGroups``);
* :meth:`ExportRule.rebuild`: how ``shrink`` slices a shallow copy of it down to the kept channels;
* :meth:`ExportRule.members`: which of its tensors' rows and columns belong to a channel group
  (``ChannelGroups``);
* :meth:`ExportRule.sparse`: how ``to_sparse`` runs it with a sparse weight (a :class:`SparseSpec`).

A rule declares what it supports by overriding those methods (:meth:`ExportRule.capabilities`); a
type is looked up along its class's MRO (subclasses inherit their base's rule), and a rule whose
class is only known by name (Hugging Face's ``Conv1D``, never imported here) is registered with a
``match`` predicate instead. The ATen ops that run a layer (``aten.linear`` for ``nn.Linear``) are
listed on the rule (:attr:`ExportRule.aten`), so ``rules_aten.py`` finds the layer behind an op from
here. The "supported" lists in error messages are generated from the registry
(:func:`supported`). The registry itself (:class:`ExportRule`, :func:`register_layer_rule`,
:func:`rule_of`) is ``export/layer_registry.py``, re-exported here; this module holds the
built-in rules (Linear, Conv1d/2d/3d, BatchNorm1d/2d/3d; Hugging Face ``Conv1D`` in
``rules_hf.py``).

Adding a layer type is one rule object in one place, e.g. a layer that computes
``F.linear(x, self.weight, self.bias)``::

    @register_layer_rule(MyLinear)
    class _MyLinearRule(LinearRule):        # flow, rebuild and members of nn.Linear
        label = "MyLinear"

        def sparse(self, mod: nn.Module) -> SparseSpec | None:
            return SparseSpec("MyLinear", lambda m: (m.weight.detach(), m.bias))

``shrink``, ``ChannelGroups`` and ``to_sparse`` then pick it up (``tests/test_export.py`` does
exactly this with a toy layer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ..errors import UnsupportedGraphError
from ..groups import Member
from .graph import ChannelFlow, ChannelInfo, LayerPlan
from .layer_registry import (  # re-exported: a rule module needs only this one
    CAPABILITIES,
    ExportRule,
    GroupIds,
    RebuildFn,
    Removed,
    SparseSpec,
    layer_types,
    rebuild,
    rebuild_rule,
    register_layer_rule,
    registered_rules,
    rule_of,
    rules_by_type,
    supported,
)
from .sparse_conv import CONV_LAYOUTS, CONV_MAX_DENSITY, SparseConv, conv_weight_bias

__all__ = [
    "CAPABILITIES",
    "CONV_DIMS",
    "BatchNormRule",
    "ConvRule",
    "ExportRule",
    "GroupIds",
    "LinearRule",
    "RebuildFn",
    "Removed",
    "SparseSpec",
    "as_tuple",
    "batchnorm_flow",
    "conv_dims",
    "conv_flow",
    "layer_types",
    "linear_flow",
    "no_padding",
    "rebuild",
    "rebuild_rule",
    "register_layer_rule",
    "registered_rules",
    "rule_of",
    "rules_by_type",
    "supported",
]

#: Spatial dimensions of the convolution types shrink rebuilds.
CONV_DIMS: dict[type, int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


# --------------------------------------------------------------------------------------------
# helpers shared by the rules
# --------------------------------------------------------------------------------------------


def as_tuple(x: Any) -> tuple[Any, ...]:
    """``x`` as a tuple (a single value becomes a 1-tuple)."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def conv_dims(conv: nn.Module) -> int:
    """The number of spatial dimensions of a Conv1d/2d/3d."""
    return next(k for t, k in CONV_DIMS.items() if isinstance(conv, t))


def no_padding(conv: nn.Module) -> bool:
    """Whether ``conv`` pads nothing (then a constant input channel folds exactly into its bias)."""
    p = conv.padding
    if isinstance(p, str):
        return p == "valid" or all(k == 1 for k in as_tuple(conv.kernel_size))
    return all(v == 0 for v in as_tuple(p))


def _param_like(src: torch.Tensor | None, value: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(value.detach().clone().contiguous())
    if src is not None:
        p.requires_grad_(src.requires_grad)
    return p


def _keep(plan: LayerPlan, removed: Removed) -> torch.Tensor:
    assert plan.out_ids is not None
    return (~removed(plan.out_ids)).nonzero().squeeze(1)


def _with_bias(mod: nn.Module, rows: torch.Tensor | None, out: dict[str, Member]) -> dict[str, Member]:
    if getattr(mod, "bias", None) is not None:
        out["bias"] = Member(rows, None, False)
    return out


def _consume(
    flow: ChannelFlow, name: str, mod: nn.Module, info: ChannelInfo | None, width: int, foldable: bool
) -> None:
    """Record a weight-reading consumer: drop zero inputs, fold constant ones into the bias."""
    if info is None or len(info.ids) != width:
        flow.block(info)
        return
    has_bias = getattr(mod, "bias", None) is not None
    droppable = ~info.var & ((info.const == 0) | bool(has_bias and foldable))
    flow.blocked.update(info.ids[~droppable].tolist())
    flow.plans[name].in_cols.append((info.ids, info.const, droppable))


def _couple(flow: ChannelFlow, ids: torch.Tensor, groups: int) -> None:
    """Tie channel ``j`` of each of ``groups`` equal consecutive groups of ``ids`` together."""
    per = ids.view(groups, -1)
    flow.union(per[:-1].reshape(-1), per[1:].reshape(-1))


def _linear_or_conv(
    flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module, kind: str, src: Any = None
) -> None:
    src = node.args[0] if src is None else src
    info = flow.tensor_info(src)
    in_shape, out_shape = flow.shape(src), flow.shape(node)
    if in_shape is None or out_shape is None:
        flow.unknown(node, "its shapes are unknown")
        return
    if kind == "linear":
        cdim_in, cdim_out, width = len(in_shape) - 1, len(out_shape) - 1, mod.in_features
        foldable = True
    else:
        k = conv_dims(mod)
        cdim_in, cdim_out, width = len(in_shape) - k - 1, len(out_shape) - k - 1, mod.in_channels
        foldable = mod.padding_mode != "zeros" or no_padding(mod)
    if info is not None and info.cdim != cdim_in:
        flow.unknown(node, "the pruned dimension is not its input-channel dimension")
        return
    plan = flow.plans.setdefault(name, LayerPlan(kind))
    _consume(flow, name, mod, info, width, foldable)
    weight = mod.weight.detach()
    ids = flow.fresh(weight.shape[0])
    groups = getattr(mod, "groups", 1)
    if groups > 1:  # grouped conv: channel j of every group goes together, so the groups stay equal
        _couple(flow, ids, groups)
        if info is not None and len(info.ids) == width:
            _couple(flow, info.ids, groups)
    zero_rows = weight.reshape(weight.shape[0], -1).eq(0).all(dim=1)
    bias = (
        mod.bias.detach().to(torch.float64)
        if mod.bias is not None
        else torch.zeros(weight.shape[0], dtype=torch.float64)
    )
    if flow.discover:  # every row a candidate, its bias masked with it
        zero_rows, bias = torch.ones_like(zero_rows), torch.zeros_like(bias)
    plan.out_ids = ids
    flow.producer_order.append(name)
    flow.info[node] = ChannelInfo(cdim_out, ids, torch.where(zero_rows, bias.cpu(), 0.0), ~zero_rows.cpu())


def _rebuild_linear_or_conv(new: nn.Module, mod: nn.Module, plan: LayerPlan, removed: Removed) -> None:
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


# --------------------------------------------------------------------------------------------
# the built-in rules
# --------------------------------------------------------------------------------------------


def _linear_weight_bias(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    assert isinstance(mod, nn.Linear)
    if type(mod).forward is not nn.Linear.forward:
        return f"{type(mod).__name__} overrides nn.Linear.forward"
    return mod.weight.detach(), mod.bias


@register_layer_rule(nn.Linear)
class LinearRule(ExportRule):
    """``nn.Linear``: a weight ``(out, in)`` read along the input's last dimension."""

    label = "Linear"
    aten = ("linear",)
    produces = True

    def flow(self, flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module, src: Any = None) -> None:
        _linear_or_conv(flow, node, name, mod, "linear", src)

    def rebuild(self, new: nn.Module, mod: nn.Module, plan: LayerPlan, removed: Removed) -> None:
        _rebuild_linear_or_conv(new, mod, plan, removed)

    def members(
        self, mod: nn.Module, plan: LayerPlan, rows: torch.Tensor | None, cols: GroupIds
    ) -> dict[str, Member]:
        col_ids = None
        for ids, _, droppable in plan.in_cols:
            col_ids = cols(ids, droppable)
        return _with_bias(mod, rows, {"weight": Member(rows, col_ids, True)})

    def sparse(self, mod: nn.Module) -> SparseSpec | None:
        if not isinstance(mod, nn.Linear):
            return None
        return SparseSpec("Linear" if type(mod) is nn.Linear else type(mod).__name__, _linear_weight_bias)


def _depthwise(flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module) -> None:
    src = node.args[0]
    info = flow.tensor_info(src)
    k = conv_dims(mod)
    in_shape = flow.shape(src)
    if info is None or in_shape is None:
        flow.info[node] = None
        return
    if info.cdim != len(in_shape) - k - 1 or mod.out_channels != len(info.ids):
        flow.unknown(node, "the pruned dimension is not its channel dimension")
        return
    w = mod.weight.detach().to(torch.float64).cpu().reshape(mod.out_channels, -1)
    b = (
        mod.bias.detach().to(torch.float64).cpu()
        if mod.bias is not None
        else torch.zeros(mod.out_channels, dtype=torch.float64)
    )
    foldable = mod.padding_mode != "zeros" or no_padding(mod)
    zero = ~info.var & (info.const == 0)
    const_ok = ~info.var & (zero | foldable)
    const = torch.where(const_ok, info.const * w.sum(dim=1) + b, 0.0)
    if flow.discover:  # weight and bias of the channel masked with it
        const, const_ok = torch.zeros_like(const), ~info.var
    flow.plans[name] = LayerPlan("depthwise", out_ids=info.ids)
    flow.info[node] = ChannelInfo(info.cdim, info.ids, const, ~const_ok)


@register_layer_rule(*CONV_DIMS)
class ConvRule(ExportRule):
    """``nn.Conv1d/2d/3d``: grouped and depthwise too; ``to_sparse`` runs Conv1d/Conv2d (``groups=1``) as ``SparseConv``."""

    label = "Conv1d/2d/3d (grouped and depthwise too)"
    aten = ("conv1d", "conv2d", "conv3d", "convolution")
    produces = True

    def flow(self, flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module, src: Any = None) -> None:
        if mod.groups == mod.in_channels == mod.out_channels > 1:
            _depthwise(flow, node, name, mod)
        else:  # groups == 1, or grouped: channels coupled across the groups
            _linear_or_conv(flow, node, name, mod, "conv", src)

    def rebuild(self, new: nn.Module, mod: nn.Module, plan: LayerPlan, removed: Removed) -> None:
        if plan.kind == "depthwise":
            keep = _keep(plan, removed).to(mod.weight.device)
            new.weight = _param_like(mod.weight, mod.weight.detach().index_select(0, keep))
            if mod.bias is not None:
                new.bias = _param_like(mod.bias, mod.bias.detach().index_select(0, keep))
            new.out_channels = new.in_channels = new.groups = len(keep)
            return
        _rebuild_linear_or_conv(new, mod, plan, removed)

    def members(
        self, mod: nn.Module, plan: LayerPlan, rows: torch.Tensor | None, cols: GroupIds
    ) -> dict[str, Member]:
        if plan.kind == "depthwise":
            return _with_bias(mod, rows, {"weight": Member(rows, None, True)})
        col_ids = None
        per = mod.in_channels // mod.groups
        for ids, _, droppable in plan.in_cols:  # grouped conv: column j reads channel j of each group
            col_ids = cols(ids[:per], droppable[:per])
        return _with_bias(mod, rows, {"weight": Member(rows, col_ids, True)})

    def sparse(self, mod: nn.Module) -> SparseSpec | None:
        if not isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            return None
        return SparseSpec(
            type(mod).__name__, conv_weight_bias, False, SparseConv, CONV_LAYOUTS, CONV_MAX_DENSITY
        )


@register_layer_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(ExportRule):
    """``nn.BatchNorm1d/2d/3d``: maps channel constants through its running statistics."""

    label = "BatchNorm"
    aten = ("batch_norm",)

    def flow(self, flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module, src: Any = None) -> None:
        src = node.args[0] if src is None else src
        info = flow.tensor_info(src)
        if info is None:
            flow.info[node] = None
            return
        in_shape = flow.shape(src)
        if (
            in_shape is None
            or info.cdim != (1 if len(in_shape) > 1 else 0)
            or len(info.ids) != mod.num_features
        ):
            flow.unknown(node, "the pruned dimension is not its feature dimension")
            return
        if mod.running_mean is None or mod.running_var is None:
            var = torch.ones_like(info.var)  # batch statistics: a constant channel is not exact after removal
            const = info.const
        else:
            rm = mod.running_mean.detach().to(torch.float64).cpu()
            rv = mod.running_var.detach().to(torch.float64).cpu()
            const = (info.const - rm) / torch.sqrt(rv + mod.eps)
            if mod.weight is not None:
                const = (
                    const * mod.weight.detach().to(torch.float64).cpu()
                    + mod.bias.detach().to(torch.float64).cpu()
                )
            var = info.var
        if flow.discover and mod.weight is not None:  # the affine entries are masked with the channel
            const, var = torch.zeros_like(info.const), info.var
        flow.plans[name] = LayerPlan("bn", out_ids=info.ids)
        flow.info[node] = ChannelInfo(info.cdim, info.ids, torch.where(var, 0.0, const), var)

    def rebuild(self, new: nn.Module, mod: nn.Module, plan: LayerPlan, removed: Removed) -> None:
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

    def members(
        self, mod: nn.Module, plan: LayerPlan, rows: torch.Tensor | None, cols: GroupIds
    ) -> dict[str, Member]:
        out = {"weight": Member(rows, None, False)} if getattr(mod, "weight", None) is not None else {}
        return _with_bias(mod, rows, out)


_LINEAR, _CONV, _BN = LinearRule(), ConvRule(), BatchNormRule()


def linear_flow(flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module, src: Any = None) -> None:
    """``mod`` (an ``nn.Linear``) run by ``node`` on ``src`` (default: the node's first argument)."""
    _LINEAR.flow(flow, node, name, mod, src)


def conv_flow(flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module) -> None:
    """``mod`` (an ``nn.Conv1d/2d/3d``) run by ``node``."""
    _CONV.flow(flow, node, name, mod)


def batchnorm_flow(flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module) -> None:
    """``mod`` (an ``nn.BatchNorm1d/2d/3d``) run by ``node``."""
    _BN.flow(flow, node, name, mod)
