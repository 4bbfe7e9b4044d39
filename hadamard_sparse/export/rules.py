"""Channel rules of the ops :func:`~hadamard_sparse.export.shrink` understands, one per op.

Each rule tells :class:`~hadamard_sparse.export.graph.ChannelFlow` what an op does to
the channels of its inputs: keeps them (elementwise activations, dropout), maps their
constants (``x * 2``), ties them together (``a + b``), moves them (``flatten``, ``cat``) or
cannot keep them apart (LayerNorm over channels). Layers with weights that shrink slices
(Linear, Conv, BatchNorm: they produce or map channels) have their channel flow in their
rule of ``export/layer_rules.py``. To support a new op, add a function here decorated with :func:`~hadamard_sparse.export.graph.module_rule`,
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

from .graph import ChannelFlow, ChannelInfo, flat_nodes, function_rule, method_rule, module_rule
from .layer_rules import (  # re-exported: the layer rules moved to layer_rules.py
    CONV_DIMS,
    as_tuple,
    batchnorm_flow,
    conv_dims,
    conv_flow,
    linear_flow,
    no_padding,
)

__all__ = ["CONV_DIMS", "batchnorm_flow", "conv_dims", "conv_flow", "linear_flow", "no_padding"]

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


def arg_at(args: Any, kwargs: Any, i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


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
        padded = any(p != 0 for p in as_tuple(mod.padding))
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
