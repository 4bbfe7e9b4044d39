"""Channel rules of ATen ops, for graphs captured by ``torch.export`` (one rule per op).

A ``torch.export`` capture records what the forward *ran*, as ATen ops: ``aten.linear``,
``aten.conv2d``, ``aten.batch_norm`` (layers, found from their parameter placeholders),
``aten.pad``, ``aten.permute``, ``aten.reshape``, ``aten.split``... Each op gets one rule
here, registered with :func:`~hadamard_sparse.export.graph.function_rule` on its overload
packet (``torch.ops.aten.relu`` covers ``relu.default`` and ``relu_``). The rules reuse the
helpers of ``export/rules.py``; the general reshape rule also serves fx's ``view``/``reshape``.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import torch
from torch import fx, nn

from .._model_io import join_name
from .graph import ChannelFlow, ChannelInfo, FixedSize, flat_nodes, function_rule, method_rule
from .layer_rules import layer_types, rule_of
from .rules import (
    BINARY_FNS,
    arg_at,
    binary_flow,
    cat_flow,
    flatten_flow,
    mean_flow,
    norm_over_channels_flow,
    pool_flow,
)

__all__ = ["reshape_channels"]

A = torch.ops.aten


def _packets(*names: str) -> list[Any]:
    """The ATen overload packets that exist in this torch version."""
    return [getattr(A, n) for n in names if hasattr(A, n)]


# --------------------------------------------------------------------------------------------
# layers: found from their parameter placeholders
# --------------------------------------------------------------------------------------------


def _is_own(flow: ChannelFlow, node: Any, name: str, mod: nn.Module, attr: str) -> bool:
    """Whether graph value ``node`` is ``mod.<attr>`` (``None`` when the module has none)."""
    if node is None:
        return getattr(mod, attr, None) is None
    return flow.param_of(node) == join_name(name, attr)


def _layer_flow(flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module) -> None:
    """Apply the channel flow of ``mod``'s rule (``export/layer_rules.py``) to ``node``."""
    rule = rule_of(mod, "flow")
    assert rule is not None  # found through layer_types: a type with a rule
    rule.flow(flow, node, name, mod)


def _weighted(flow: ChannelFlow, node: fx.Node, op: str, weight: Any, bias: Any) -> Any:
    """``(name, module)`` of the layer this op runs, or ``None`` after handling it as unknown/frozen.

    The layer types are those whose rule lists the ATen op ``op``.
    """
    hit = flow.layer_of(weight, layer_types(op))
    if hit is None or not _is_own(flow, bias, hit[0], hit[1], "bias"):
        flow.unknown(node, "its weight or bias is not the parameter of a layer shrink rebuilds")
        return None
    if hit[0] in flow.frozen:  # shared or read directly: kept whole, outputs unknown
        flow.block(flow.tensor_info(node.args[0]))
        flow.info[node] = None
        return None
    return hit


@function_rule(A.linear)
def _aten_linear(flow: ChannelFlow, node: fx.Node) -> None:
    bias = arg_at(node.args, node.kwargs, 2, "bias", None)
    hit = _weighted(flow, node, "linear", node.args[1], bias)
    if hit is not None:
        _layer_flow(flow, node, *hit)


@function_rule(*_packets("conv1d", "conv2d", "conv3d", "convolution"))
def _aten_conv(flow: ChannelFlow, node: fx.Node) -> None:
    if node.target.overloadpacket is A.convolution and arg_at(node.args, node.kwargs, 6, "transposed", False):
        flow.unknown(node, "transposed convolutions are not rebuilt")
        return
    bias = arg_at(node.args, node.kwargs, 2, "bias", None)
    hit = _weighted(flow, node, node.target.overloadpacket.__name__, node.args[1], bias)
    if hit is not None:
        _layer_flow(flow, node, *hit)


@function_rule(A.batch_norm)
def _aten_batch_norm(flow: ChannelFlow, node: fx.Node) -> None:
    weight, bias = (
        arg_at(node.args, node.kwargs, 1, "weight", None),
        arg_at(node.args, node.kwargs, 2, "bias", None),
    )
    mean = arg_at(node.args, node.kwargs, 3, "running_mean", None)
    hit = flow.layer_of(mean if mean is not None else weight, layer_types("batch_norm"))
    if hit is None or not _is_own(flow, weight, *hit, "weight") or not _is_own(flow, bias, *hit, "bias"):
        flow.unknown(node, "its parameters are not those of a BatchNorm layer")
    elif hit[0] in flow.frozen:
        flow.block(flow.tensor_info(node.args[0]))
        flow.info[node] = None
    else:
        _layer_flow(flow, node, *hit)


@function_rule(*_packets("layer_norm", "group_norm", "rms_norm", "native_layer_norm"))
def _aten_norm(flow: ChannelFlow, node: fx.Node) -> None:
    norm_over_channels_flow(flow, node, "", nn.Identity())


# --------------------------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------------------------

_UNARY_NAMES = (
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "leaky_relu", "elu", "selu",
    "celu", "mish", "softplus", "hardswish", "hardsigmoid", "neg", "abs", "square", "exp", "log_sigmoid",
    "pow",  # x ** scalar (GPT-2's gelu_new); a tensor exponent is refused by the rule
)  # fmt: skip
_UNARY = _packets(*_UNARY_NAMES, *(n + "_" for n in _UNARY_NAMES))  # in-place variants (ReLU(inplace=True))
_PASS = _packets("dropout", "feature_dropout", "alpha_dropout", "contiguous", "clone", "alias", "detach")


@function_rule(*_UNARY)
def _aten_unary(flow: ChannelFlow, node: fx.Node) -> None:
    fn, args, kwargs = node.target, node.args, node.kwargs
    if args and isinstance(args[0], fx.Node) and not flat_nodes((args[1:], kwargs)):
        flow.passthrough(node, args[0], lambda c: fn(c.to(flow.dtype(node)), *args[1:], **kwargs))
    else:
        flow.unknown(node)


@function_rule(*_PASS, *_packets("_to_copy", "to", "type_as", "lift_fresh_copy"))
def _aten_pass(flow: ChannelFlow, node: fx.Node) -> None:
    if node.args and isinstance(node.args[0], fx.Node) and not flat_nodes((node.args[1:], node.kwargs)):
        flow.passthrough(node, node.args[0], None)
    else:
        flow.unknown(node)


@function_rule(A.add, A.sub, A.mul, A.div, A.rsub, A.add_, A.sub_, A.mul_, A.div_)
def _aten_binary(flow: ChannelFlow, node: fx.Node) -> None:
    packet = node.target.overloadpacket
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    extra = set(node.kwargs) - {"alpha"}
    if len(node.args) < 2 or extra or alpha != 1:
        flow.unknown(node, "only a + b, a - b, a * b and a / b are modelled")
        return
    a, b = node.args[0], node.args[1]
    if packet is A.rsub:
        a, b = b, a
    op = str(packet).rpartition(".")[2].rstrip("_").replace("rsub", "sub")
    if op in BINARY_FNS:
        binary_flow(flow, node, op, a, b)
    else:  # pragma: no cover - every packet above maps to a binary op
        flow.unknown(node)


# --------------------------------------------------------------------------------------------
# shape ops
# --------------------------------------------------------------------------------------------


def reshape_channels(flow: ChannelFlow, node: fx.Node, src: Any, sizes: Any = None) -> None:
    """A view/reshape/squeeze/unsqueeze: where each channel lands, from the input and output shapes.

    The channel dimension may be merged with neighbours on either side (``permute`` + ``reshape``
    into a Linear maps channel ``c`` to inputs ``t * C + c``); it may not be split (a view into
    attention heads), which is refused when pruned channels go through it.
    """
    info = flow.tensor_info(src)
    in_shape, out_shape = flow.shape(src), flow.shape(node)
    if info is None:
        flow.info[node] = None
        return
    if in_shape is None or out_shape is None:
        flow.unknown(node, "its shapes are unknown")
        return
    c, post = in_shape[info.cdim], math.prod(in_shape[info.cdim + 1 :])
    for j, n in enumerate(out_shape):
        q = math.prod(out_shape[j + 1 :])
        if q and post % q == 0 and n % ((post // q) * c) == 0:
            m = post // q
            rep = n // (m * c)
            if isinstance(sizes, (list, tuple)) and len(sizes) == len(out_shape):
                lit = sizes[j]
                if isinstance(lit, int) and lit != -1 and info.has_candidates:
                    where = f"{flow.describe(node)} sets that size to the constant {lit}"
                    ids = info.ids.repeat_interleave(m).repeat(rep)
                    flow.fixed.append(FixedSize(where, flow.module_path(node), lit, ids))
            flow.info[node] = ChannelInfo(
                j,
                info.ids.repeat_interleave(m).repeat(rep),
                info.const.repeat_interleave(m).repeat(rep),
                info.var.repeat_interleave(m).repeat(rep),
            )
            return
    flow.unknown(node, "it splits the channel dimension (e.g. into attention heads)")


@function_rule(*_packets("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "_reshape_alias"))
def _aten_reshape(flow: ChannelFlow, node: fx.Node) -> None:
    sizes = node.args[1] if len(node.args) > 1 else None
    reshape_channels(flow, node, node.args[0], sizes)


@method_rule("view", "reshape", "unsqueeze", "squeeze")
def _view_method(flow: ChannelFlow, node: fx.Node) -> None:
    args = node.args
    sizes = list(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else list(args[1:])
    reshape_channels(flow, node, args[0], sizes)


@function_rule(A.expand)
def _aten_expand(flow: ChannelFlow, node: fx.Node) -> None:
    flow.passthrough(node, node.args[0], None)


def _moved(flow: ChannelFlow, node: fx.Node, perm: list[int]) -> None:
    info = flow.tensor_info(node.args[0])
    if info is None:
        flow.info[node] = None
        return
    nd = len(perm)
    flow.info[node] = ChannelInfo([p % nd for p in perm].index(info.cdim), info.ids, info.const, info.var)


@function_rule(A.permute)
def _aten_permute(flow: ChannelFlow, node: fx.Node) -> None:
    _moved(flow, node, list(node.args[1]))


@method_rule("permute")
def _permute_method(flow: ChannelFlow, node: fx.Node) -> None:
    dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    _moved(flow, node, list(dims))


@function_rule(A.transpose, A.t)
def _aten_transpose(flow: ChannelFlow, node: fx.Node) -> None:
    shape = flow.shape(node.args[0])
    if shape is None:
        flow.unknown(node)
        return
    nd = len(shape)
    d0, d1 = (node.args[1], node.args[2]) if len(node.args) > 2 else (0, 1)
    perm = list(range(nd))
    perm[d0 % nd], perm[d1 % nd] = perm[d1 % nd], perm[d0 % nd]
    _moved(flow, node, perm)


@method_rule("transpose")
def _transpose_method(flow: ChannelFlow, node: fx.Node) -> None:
    _aten_transpose(flow, node)


def _padded(flow: ChannelFlow, node: fx.Node, pad: Any, mode: str, value: float) -> None:
    info = flow.tensor_info(node.args[0])
    shape = flow.shape(node.args[0])
    if info is None:
        flow.info[node] = None
        return
    if shape is None or not isinstance(pad, (list, tuple)):
        flow.unknown(node)
        return
    padded_dims = {len(shape) - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
    if info.cdim in padded_dims:
        flow.unknown(node, "it pads the channel dimension")
        return
    var = info.var
    if mode == "constant" and padded_dims:  # a constant channel stays constant only if padded with it
        var = var | (info.const != value)
    flow.info[node] = ChannelInfo(info.cdim, info.ids, torch.where(var, 0.0, info.const), var)


@function_rule(A.pad)
def _aten_pad(flow: ChannelFlow, node: fx.Node) -> None:
    value = arg_at(node.args, node.kwargs, 3, "value", None)
    _padded(flow, node, node.args[1], arg_at(node.args, node.kwargs, 2, "mode", "constant"), value or 0.0)


@function_rule(A.constant_pad_nd)
def _aten_constant_pad(flow: ChannelFlow, node: fx.Node) -> None:
    _padded(flow, node, node.args[1], "constant", float(arg_at(node.args, node.kwargs, 2, "value", 0.0)))


@function_rule(A.cat, *_packets("concat"))
def _aten_cat(flow: ChannelFlow, node: fx.Node) -> None:
    cat_flow(flow, node)


@function_rule(A.flatten)
def _aten_flatten(flow: ChannelFlow, node: fx.Node) -> None:
    start = arg_at(node.args, node.kwargs, 1, "start_dim", 0)
    flatten_flow(flow, node, node.args[0], start, arg_at(node.args, node.kwargs, 2, "end_dim", -1))


@function_rule(*_packets("max_pool1d", "max_pool2d", "max_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d"))  # fmt: skip
def _aten_pool(flow: ChannelFlow, node: fx.Node) -> None:
    k = int(str(node.target.overloadpacket).rpartition("pool")[2][0])
    pool_flow(flow, node, node.args[0], k, None)


@function_rule(*_packets("avg_pool1d", "avg_pool2d", "avg_pool3d"))
def _aten_avg_pool(flow: ChannelFlow, node: fx.Node) -> None:
    k = int(str(node.target.overloadpacket)[-2])
    pool_flow(flow, node, node.args[0], k, None)
    info = flow.info.get(node)
    padding = arg_at(node.args, node.kwargs, 3, "padding", 0)
    include = arg_at(node.args, node.kwargs, 5, "count_include_pad", True)
    divisor = arg_at(node.args, node.kwargs, 6, "divisor_override", None)
    padded = any(p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding]))
    if info is not None and ((padded and include) or divisor):
        var = info.var | (info.const != 0)
        flow.info[node] = ChannelInfo(info.cdim, info.ids, torch.where(var, 0.0, info.const), var)


@function_rule(A.mean)
def _aten_mean(flow: ChannelFlow, node: fx.Node) -> None:
    dim = arg_at(node.args, node.kwargs, 1, "dim", None)
    mean_flow(flow, node, node.args[0], dim, arg_at(node.args, node.kwargs, 2, "keepdim", False))


@function_rule(A.slice)
def _aten_slice(flow: ChannelFlow, node: fx.Node) -> None:
    info, shape = flow.tensor_info(node.args[0]), flow.shape(node.args[0])
    if info is None:
        flow.info[node] = None
        return
    if shape is None:
        flow.unknown(node)
        return
    dim = arg_at(node.args, node.kwargs, 1, "dim", 0) % len(shape)
    if dim != info.cdim:
        flow.info[node] = info
        return
    start = arg_at(node.args, node.kwargs, 2, "start", None)
    end = arg_at(node.args, node.kwargs, 3, "end", None)
    sl = slice(start, end, arg_at(node.args, node.kwargs, 4, "step", 1))
    flow.info[node] = ChannelInfo(info.cdim, info.ids[sl], info.const[sl], info.var[sl])


@function_rule(A.select)
def _aten_select(flow: ChannelFlow, node: fx.Node) -> None:
    info, shape = flow.tensor_info(node.args[0]), flow.shape(node.args[0])
    if info is None:
        flow.info[node] = None
    elif shape is None or node.args[1] % len(shape) == info.cdim:
        flow.unknown(node, "it selects one channel")
    else:
        cdim = info.cdim - int(node.args[1] % len(shape) < info.cdim)
        flow.info[node] = ChannelInfo(cdim, info.ids, info.const, info.var)


@function_rule(*_packets("split", "split_with_sizes", "chunk", "unsafe_split"))
def _aten_split(flow: ChannelFlow, node: fx.Node) -> None:
    info, shape = flow.tensor_info(node.args[0]), flow.shape(node.args[0])
    outs = node.meta.get("val")
    flow.info[node] = None
    if info is None:
        return
    if shape is None or not isinstance(outs, (list, tuple)):
        flow.unknown(node)
        return
    dim = arg_at(node.args, node.kwargs, 2, "dim", 0) % len(shape)
    if dim != info.cdim:
        flow.multi[node] = [info] * len(outs)
        return
    parts, start = [], 0
    for o in outs:
        n = int(o.shape[dim])
        sl = slice(start, start + n)
        parts.append(ChannelInfo(dim, info.ids[sl], info.const[sl], info.var[sl]))
        start += n
    flow.multi[node] = parts


@function_rule(operator.getitem)
def _getitem(flow: ChannelFlow, node: fx.Node) -> None:
    src, idx = node.args[0], node.args[1]
    if isinstance(src, fx.Node) and src in flow.multi and isinstance(idx, numbers.Integral):
        flow.info[node] = flow.multi[src][int(idx)]
    else:
        flow.unknown(node, "indexing a tensor that carries pruned channels is not modelled")


@function_rule(*_packets("sym_size"))
def _aten_sym_size(flow: ChannelFlow, node: fx.Node) -> None:
    info, shape = flow.tensor_info(node.args[0]), flow.shape(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else None
    channel = shape is None or not isinstance(dim, int) or dim % len(shape) == info.cdim if info else False
    if info is not None and info.has_candidates and channel:
        flow.unknown(node, "it reads the size of the channel dimension")
    else:
        flow.info[node] = None
