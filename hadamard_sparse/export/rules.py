"""Channel rules of the ops :func:`~hadamard_sparse.export.shrink` understands, one per op.

Each rule tells :class:`~hadamard_sparse.export.graph.ChannelFlow` what an op does to
the channels of its inputs: keeps them (elementwise activations, dropout), maps their
constants (BatchNorm with running statistics, ``x * 2``), produces new ones (Linear,
Conv), ties them together (``a + b``), moves them (``flatten``, ``cat``) or cannot keep
them apart (LayerNorm over channels). To support a new op, add a function here
decorated with :func:`~hadamard_sparse.export.graph.module_rule`,
:func:`~hadamard_sparse.export.graph.function_rule` or
:func:`~hadamard_sparse.export.graph.method_rule`.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import (
    ChannelFlow,
    ChannelInfo,
    LayerPlan,
    flat_nodes,
    function_rule,
    method_rule,
    module_rule,
)

__all__ = ["CONV_DIMS", "conv_dims", "no_padding"]

#: Spatial dimensions of the convolution types shrink rebuilds.
CONV_DIMS: dict[type, int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}

_UNARY_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Identity,
)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_UNARY_FUNCTIONS = (
    torch.relu,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.gelu,
    F.silu,
    F.mish,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.softplus,
)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
_BINARY: dict[Any, str] = {
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    torch.sub: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    torch.div: "div",
}
_BINARY_METHODS = {"add": "add", "add_": "add", "sub": "sub", "mul": "mul", "mul_": "mul", "div": "div"}
BINARY_FNS = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}
_POOL_MODULES: dict[type, int] = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}
_POOL_FUNCTIONS: dict[Any, int] = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def conv_dims(conv: nn.Module) -> int:
    """The number of spatial dimensions of a Conv1d/2d/3d."""
    return next(k for t, k in CONV_DIMS.items() if isinstance(conv, t))


def no_padding(conv: nn.Module) -> bool:
    """Whether ``conv`` pads nothing (then a constant input channel folds exactly into its bias)."""
    p = conv.padding
    if isinstance(p, str):
        return p == "valid" or all(k == 1 for k in _as_tuple(conv.kernel_size))
    return all(v == 0 for v in _as_tuple(p))


def arg_at(args: Any, kwargs: Any, i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


# --------------------------------------------------------------------------------------------
# weighted layers: producers and consumers of channels
# --------------------------------------------------------------------------------------------


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


def _couple(flow: ChannelFlow, ids: torch.Tensor, groups: int) -> None:
    """Tie channel ``j`` of each of ``groups`` equal consecutive groups of ``ids`` together."""
    per = ids.view(groups, -1)
    flow.union(per[:-1].reshape(-1), per[1:].reshape(-1))


@module_rule(nn.Linear, weighted=True)
def linear_flow(flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module, src: Any = None) -> None:
    """``mod`` (an ``nn.Linear``) run by ``node`` on ``src`` (default: the node's first argument)."""
    _linear_or_conv(flow, node, name, mod, "linear", src)


@module_rule(*CONV_DIMS, weighted=True)
def conv_flow(flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module) -> None:
    if mod.groups == mod.in_channels == mod.out_channels > 1:
        _depthwise(flow, node, name, mod)
    else:  # groups == 1, or grouped: channels coupled across the groups
        _linear_or_conv(flow, node, name, mod, "conv")


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


@module_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, weighted=True)
def batchnorm_flow(flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module) -> None:
    src = node.args[0]
    info = flow.tensor_info(src)
    if info is None:
        flow.info[node] = None
        return
    in_shape = flow.shape(src)
    if in_shape is None or info.cdim != (1 if len(in_shape) > 1 else 0) or len(info.ids) != mod.num_features:
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


# --------------------------------------------------------------------------------------------
# modules without channel weights
# --------------------------------------------------------------------------------------------


@module_rule(*_DROPOUT_MODULES)
def _dropout_module(flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module) -> None:
    flow.passthrough(node, node.args[0], None)


@module_rule(*_UNARY_MODULES)
def _unary_module(flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module) -> None:
    flow.passthrough(node, node.args[0], lambda c: mod(c.to(flow.dtype(node))))


@module_rule(nn.PReLU)
def _prelu(flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module) -> None:
    if mod.num_parameters == 1:
        _unary_module(flow, node, name, mod)
    else:
        flow.unknown(node)


@module_rule(nn.Flatten)
def _flatten_module(flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module) -> None:
    flatten_flow(flow, node, node.args[0], mod.start_dim, mod.end_dim)


@module_rule(*_POOL_MODULES)
def _pool_module(flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module) -> None:
    k = next(k for t, k in _POOL_MODULES.items() if isinstance(mod, t))
    pool_flow(flow, node, node.args[0], k, mod)


@module_rule(nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
def norm_over_channels_flow(flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module) -> None:
    # Normalising over the channel dim: removing channels would change the statistics.
    info = flow.tensor_info(node.args[0])
    flow.block(info)
    flow.info[node] = (
        None if info is None else ChannelInfo(info.cdim, info.ids, info.const, torch.ones_like(info.var))
    )


# --------------------------------------------------------------------------------------------
# shape ops shared by modules, functions and methods
# --------------------------------------------------------------------------------------------


def flatten_flow(flow: ChannelFlow, node: fx.Node, src: Any, start: int, end: int) -> None:
    info = flow.tensor_info(src)
    in_shape = flow.shape(src)
    if info is None:
        flow.info[node] = None
        return
    if in_shape is None:
        flow.unknown(node)
        return
    nd = len(in_shape)
    start, end = start % nd if nd else 0, end % nd if nd else 0
    if info.cdim < start:
        flow.info[node] = info
    elif info.cdim > end:
        flow.info[node] = ChannelInfo(info.cdim - (end - start), info.ids, info.const, info.var)
    elif info.cdim == start:
        rep = math.prod(in_shape[start + 1 : end + 1])
        flow.info[node] = ChannelInfo(
            start,
            info.ids.repeat_interleave(rep),
            info.const.repeat_interleave(rep),
            info.var.repeat_interleave(rep),
        )
    else:
        flow.unknown(node, "it flattens dimensions in front of the channel dimension")


def pool_flow(flow: ChannelFlow, node: fx.Node, src: Any, k: int, mod: Any) -> None:
    info = flow.tensor_info(src)
    in_shape = flow.shape(src)
    if info is None:
        flow.info[node] = None
        return
    if in_shape is None or info.cdim >= len(in_shape) - k or getattr(mod, "return_indices", False):
        flow.unknown(node, "it pools over the channel dimension or returns indices")
        return
    var = info.var
    if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        padded = any(p != 0 for p in _as_tuple(mod.padding))
        if (padded and mod.count_include_pad) or getattr(mod, "divisor_override", None):
            var = var | (info.const != 0)
    flow.info[node] = ChannelInfo(info.cdim, info.ids, torch.where(var, 0.0, info.const), var)


def mean_flow(flow: ChannelFlow, node: fx.Node, src: Any, dim: Any, keepdim: Any) -> None:
    info = flow.tensor_info(src)
    in_shape = flow.shape(src)
    if info is None:
        flow.info[node] = None
        return
    dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (tuple, list)) else None
    if in_shape is None or dims is None or not all(isinstance(d, int) for d in dims):
        flow.unknown(node, "mean over all dimensions or over unknown dimensions")
        return
    nd = len(in_shape)
    dims = [d % nd for d in dims]
    if info.cdim in dims:
        flow.unknown(node, "it averages over the channel dimension")
        return
    cdim = info.cdim if keepdim else info.cdim - sum(d < info.cdim for d in dims)
    flow.info[node] = ChannelInfo(cdim, info.ids, info.const, info.var)


def binary_flow(flow: ChannelFlow, node: fx.Node, op: str, a: Any, b: Any) -> None:
    ia, ib = flow.tensor_info(a), flow.tensor_info(b)
    out_shape = flow.shape(node)
    if out_shape is None:
        flow.unknown(node)
        return
    nd = len(out_shape)
    fn = BINARY_FNS[op]
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        if ia is None and ib is None:
            flow.info[node] = None
            return
        sa, sb = flow.shape(a), flow.shape(b)
        if sa is None or sb is None:
            flow.unknown(node)
            return
        ca = None if ia is None else ia.cdim + nd - len(sa)
        cb = None if ib is None else ib.cdim + nd - len(sb)
        if ia is not None and ib is not None:
            if ca != cb or len(ia.ids) != len(ib.ids):
                flow.unknown(node, "its operands carry channels on different dimensions")
                return
            if ca is None or out_shape[ca] != len(ia.ids):
                flow.unknown(node, "its operands are broadcast along the channel dimension")
                return
            flow.union(ia.ids, ib.ids)
            var = ia.var | ib.var
            const = fn(ia.const, ib.const)
            if op == "mul":
                zero_a, zero_b = ~ia.var & (ia.const == 0), ~ib.var & (ib.const == 0)
                var = var & ~(zero_a | zero_b)
                const = torch.where(zero_a | zero_b, 0.0, const)
            var = var | ~torch.isfinite(const)
            flow.info[node] = ChannelInfo(ca, ia.ids, torch.where(var, 0.0, const), var)
            return
        info, c, s_other = (ia, ca, sb) if ia is not None else (ib, cb, sa)
        assert info is not None and c is not None
        pos = c - (nd - len(s_other))
        if pos >= 0 and s_other[pos] != 1:
            flow.block(info)  # the other operand's channels cannot be removed with ours
        keep_zero = op == "mul" or (op == "div" and info is ia)
        zero = ~info.var & (info.const == 0) if keep_zero else torch.zeros_like(info.var)
        flow.info[node] = ChannelInfo(c, info.ids, torch.zeros_like(info.const), ~zero)
        return
    # one operand is a Python number
    if isinstance(a, fx.Node) and isinstance(b, numbers.Number) and not isinstance(b, bool):
        flow.passthrough(node, a, lambda c: fn(c.to(torch.float64), b))
    elif isinstance(b, fx.Node) and isinstance(a, numbers.Number) and not isinstance(a, bool):
        flow.passthrough(
            node, b, lambda c: fn(torch.full_like(c, float(a), dtype=torch.float64), c.to(torch.float64))
        )
    else:
        flow.unknown(node)


# --------------------------------------------------------------------------------------------
# functions
# --------------------------------------------------------------------------------------------


@function_rule(*_UNARY_FUNCTIONS)
def _unary_function(flow: ChannelFlow, node: fx.Node) -> None:
    t, args, kwargs = node.target, node.args, node.kwargs
    if args and isinstance(args[0], fx.Node) and not flat_nodes((args[1:], kwargs)):
        flow.passthrough(node, args[0], lambda c: t(c.to(flow.dtype(node)), *args[1:], **kwargs))
    else:
        flow.unknown(node)


@function_rule(*_DROPOUT_FUNCTIONS)
def _dropout_function(flow: ChannelFlow, node: fx.Node) -> None:
    if node.args and isinstance(node.args[0], fx.Node):
        flow.passthrough(node, node.args[0], None)
    else:
        flow.unknown(node)


@function_rule(*_BINARY)
def _binary_function(flow: ChannelFlow, node: fx.Node) -> None:
    if len(node.args) == 2 and not node.kwargs:
        binary_flow(flow, node, _BINARY[node.target], node.args[0], node.args[1])
    else:
        flow.unknown(node)


@function_rule(torch.cat, torch.concat)
def cat_flow(flow: ChannelFlow, node: fx.Node) -> None:
    tensors = arg_at(node.args, node.kwargs, 0, "tensors", None)
    dim = arg_at(node.args, node.kwargs, 1, "dim", 0)
    out_shape = flow.shape(node)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or out_shape is None:
        flow.unknown(node)
        return
    infos = [flow.tensor_info(t) for t in tensors]
    if all(i is None for i in infos):
        flow.info[node] = None
        return
    dim = dim % len(out_shape)
    if any(i is not None and i.cdim != dim for i in infos):
        flow.unknown(node, "it concatenates along a dimension other than the channel dimension")
        return
    parts: list[ChannelInfo] = []
    for t, i in zip(tensors, infos):
        if i is None:
            s = flow.shape(t)
            if s is None:
                flow.unknown(node)
                return
            n = s[dim]
            ids = flow.fresh(n)
            flow.blocked.update(ids.tolist())
            i = ChannelInfo(dim, ids, torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.bool))
        parts.append(i)
    flow.info[node] = ChannelInfo(
        dim,
        torch.cat([p.ids for p in parts]),
        torch.cat([p.const for p in parts]),
        torch.cat([p.var for p in parts]),
    )


@function_rule(torch.flatten)
def _flatten_function(flow: ChannelFlow, node: fx.Node) -> None:
    if not node.args:
        flow.unknown(node)
        return
    start = arg_at(node.args, node.kwargs, 1, "start_dim", 0)
    end = arg_at(node.args, node.kwargs, 2, "end_dim", -1)
    flatten_flow(flow, node, node.args[0], start, end)


@function_rule(*_POOL_FUNCTIONS)
def _pool_function(flow: ChannelFlow, node: fx.Node) -> None:
    if node.args:
        pool_flow(flow, node, node.args[0], _POOL_FUNCTIONS[node.target], None)
    else:
        flow.unknown(node)


@function_rule(torch.mean)
def _mean_function(flow: ChannelFlow, node: fx.Node) -> None:
    if not node.args:
        flow.unknown(node)
        return
    dim = arg_at(node.args, node.kwargs, 1, "dim", None)
    mean_flow(flow, node, node.args[0], dim, arg_at(node.args, node.kwargs, 2, "keepdim", False))


# --------------------------------------------------------------------------------------------
# tensor methods (args[0] is the tensor)
# --------------------------------------------------------------------------------------------


@method_rule("relu", "sigmoid", "tanh", "contiguous", "clone")
def _unary_method(flow: ChannelFlow, node: fx.Node) -> None:
    name = str(node.target)
    if len(node.args) == 1 and not node.kwargs:
        flow.passthrough(node, node.args[0], lambda c: getattr(c.to(flow.dtype(node)), name)())
    else:
        flow.unknown(node)


@method_rule(*_BINARY_METHODS)
def _binary_method(flow: ChannelFlow, node: fx.Node) -> None:
    if len(node.args) == 2 and not node.kwargs:
        binary_flow(flow, node, _BINARY_METHODS[str(node.target)], node.args[0], node.args[1])
    else:
        flow.unknown(node)


@method_rule("flatten")
def _flatten_method(flow: ChannelFlow, node: fx.Node) -> None:
    start = arg_at(node.args, node.kwargs, 1, "start_dim", 0)
    end = arg_at(node.args, node.kwargs, 2, "end_dim", -1)
    flatten_flow(flow, node, node.args[0], start, end)


@method_rule("size")
def _size(flow: ChannelFlow, node: fx.Node) -> None:
    src = node.args[0]
    info = flow.tensor_info(src)
    dim = arg_at(node.args, node.kwargs, 1, "dim", None)
    in_shape = flow.shape(src)
    if (
        info is not None
        and info.has_candidates
        and (not isinstance(dim, int) or in_shape is None or dim % len(in_shape) == info.cdim)
    ):
        flow.unknown(node, "it reads the size of the channel dimension")
    else:
        flow.info[node] = None


@method_rule("mean")
def _mean_method(flow: ChannelFlow, node: fx.Node) -> None:
    dim = arg_at(node.args, node.kwargs, 1, "dim", None)
    mean_flow(flow, node, node.args[0], dim, arg_at(node.args, node.kwargs, 2, "keepdim", False))
