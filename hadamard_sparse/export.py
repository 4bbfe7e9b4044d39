"""Turning masks into speed: ``shrink`` (remove pruned channels) and ``to_sparse`` (sparse weights).

A mask alone saves nothing: the masked model does the same dense work. After
baking, two exports make the zeros pay:

* :func:`shrink` physically removes output channels/neurons whose weights are all
  zero, together with the matching inputs of the layers that consume them (and the
  BatchNorm entries in between), found from the model's ``torch.fx`` graph.
* :func:`to_sparse` stores the baked weights of ``nn.Linear`` layers as
  ``torch.sparse`` tensors (CSR or BSR with int32 indices on CPU; 2:4
  semi-structured on CUDA) in a :class:`SparseLinear` inference module.

See ``docs/speed.md`` for the rules, their reasons and measured speed-ups.
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from .api import remove_parametrizations
from .errors import UnsupportedGraphError
from .parametrizations import _SparseParametrization

__all__ = ["DEFAULT_MAX_DENSITY", "SparseLinear", "shrink", "to_sparse"]


# --------------------------------------------------------------------------------------------
# shrink: graph analysis
# --------------------------------------------------------------------------------------------


@dataclass
class _Info:
    """What is known about the channel dimension ``cdim`` of one tensor in the graph.

    ``ids[i]`` names the channel slot at index ``i`` (slots that must be removed or kept
    together share a union-find root); ``var[i]`` is False when that channel is the same
    constant ``const[i]`` at every position and for every input (0.0 for a pruned channel
    without bias).
    """

    cdim: int
    ids: torch.Tensor  # int64 (C,)
    const: torch.Tensor  # float64 (C,)
    var: torch.Tensor  # bool (C,)

    @property
    def has_candidates(self) -> bool:
        return bool((~self.var).any())


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
_DROPOUT_MODULES: tuple[type, ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_UNARY_FUNCTIONS: set[Any] = {
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
}
_DROPOUT_FUNCTIONS: set[Any] = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_UNARY_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}
_BINARY = {
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
_CONV: dict[type, int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class _LayerPlan:
    """Slices and bias corrections gathered for one module during the analysis."""

    kind: str  # "linear", "conv", "depthwise", "bn"
    out_ids: torch.Tensor | None = None  # ids of output channels (rows); depthwise/bn: the channels
    in_cols: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


class _Analysis:
    def __init__(self, gm: fx.GraphModule, frozen: set[str]) -> None:
        self.gm = gm
        self.frozen = frozen
        self.parent: list[int] = []
        self.blocked: set[int] = set()
        self.info: dict[fx.Node, _Info | None] = {}
        self.plans: dict[str, _LayerPlan] = {}
        self.producer_order: list[str] = []

    # union-find over channel ids
    def fresh(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[rx] = ry

    def block(self, info: _Info | None) -> None:
        if info is not None:
            self.blocked.update(info.ids.tolist())

    def removed(self, ids: torch.Tensor) -> torch.Tensor:
        roots = {self.find(b) for b in self.blocked}
        return torch.tensor([self.find(i) not in roots for i in ids.tolist()], dtype=torch.bool)

    # helpers
    @staticmethod
    def shape(node: Any) -> torch.Size | None:
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        return getattr(meta, "shape", None)

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            return f"layer {node.target!r} ({parametrize.type_before_parametrizations(mod).__name__})"
        target = getattr(node.target, "__name__", str(node.target))
        return f"operation {target!r} (graph node {node.name!r})"

    def unknown(self, node: fx.Node, why: str = "") -> None:
        """An operation shrink does not model: fine unless it reads candidate (pruned) channels."""
        for arg in _flat_nodes((node.args, node.kwargs)):
            info = self.info.get(arg)
            if info is not None and info.has_candidates:
                reason = why or "shrink does not know how this operation uses channels"
                raise UnsupportedGraphError(
                    f"shrink cannot handle {self.describe(node)}: it consumes pruned channels of "
                    f"{self.describe(arg) if arg.op != 'placeholder' else arg.name}; {reason}. "
                    "Supported: Linear, Conv1d/2d/3d (groups=1 or depthwise), BatchNorm, elementwise "
                    "activations, dropout, pooling, add/sub/mul/div, cat, flatten (and view(B, -1)), "
                    "mean over non-channel dims"
                )
            self.block(info)
        self.info[node] = None

    def passthrough(
        self, node: fx.Node, src: fx.Node, fn: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> None:
        info = self.info.get(src)
        if info is None:
            self.info[node] = None
            return
        if fn is None:
            const, var = info.const, info.var
        else:
            with torch.no_grad():
                out = fn(torch.where(info.var, torch.zeros_like(info.const), info.const).clone())
            const = out.to(torch.float64)
            var = info.var | ~torch.isfinite(const)
        cdim = info.cdim
        out_shape, in_shape = self.shape(node), self.shape(src)
        if out_shape is not None and in_shape is not None:
            cdim += len(out_shape) - len(in_shape)
            if cdim < 0 or out_shape[cdim] != len(info.ids):
                self.unknown(node, "its output does not keep the channel dimension")
                return
        self.info[node] = _Info(cdim, info.ids, const, var)

    @staticmethod
    def dtype(node: fx.Node) -> torch.dtype:
        meta = node.meta.get("tensor_meta")
        dt = getattr(meta, "dtype", None)
        return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32

    def tensor_info(self, node: Any) -> _Info | None:
        return self.info.get(node) if isinstance(node, fx.Node) else None

    # the dispatcher
    def run(self) -> None:
        calls: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for name, n in calls.items():
            if n > 1:
                self.frozen.add(name)
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.info[node] = None
            elif node.op == "output":
                for arg in _flat_nodes(node.args):
                    self.block(self.info.get(arg))
            elif node.op == "call_module":
                self.module(node)
            elif node.op == "call_function":
                self.function(node)
            elif node.op == "call_method":
                self.method(node)
            else:  # pragma: no cover - fx has no other ops
                self.unknown(node)

    def module(self, node: fx.Node) -> None:
        name = str(node.target)
        mod = self.gm.get_submodule(name)
        src = node.args[0] if node.args else None
        weighted = isinstance(mod, (nn.Linear, *_CONV, *_BATCHNORM))
        if len(node.args) != 1 or node.kwargs or not isinstance(src, fx.Node):
            self.unknown(node)
            return
        if weighted and name in self.frozen:
            self.block(self.tensor_info(src))  # shared or read directly: kept whole, outputs unknown
            self.info[node] = None
            return
        if isinstance(mod, nn.Linear):
            self.linear_or_conv(node, name, mod, "linear")
        elif isinstance(mod, tuple(_CONV)):
            if mod.groups == 1:
                self.linear_or_conv(node, name, mod, "conv")
            elif mod.groups == mod.in_channels == mod.out_channels:
                self.depthwise(node, name, mod)
            else:
                self.unknown(
                    node, f"grouped convolutions (groups={mod.groups}) are supported only when depthwise"
                )
        elif isinstance(mod, _BATCHNORM):
            self.batchnorm(node, name, mod)
        elif isinstance(mod, _DROPOUT_MODULES):
            self.passthrough(node, src, None)
        elif isinstance(mod, _UNARY_MODULES) or (isinstance(mod, nn.PReLU) and mod.num_parameters == 1):
            self.passthrough(node, src, lambda c: mod(c.to(self.dtype(node))))
        elif isinstance(mod, nn.Flatten):
            self.flatten(node, src, mod.start_dim, mod.end_dim)
        elif type(mod) in _POOL_MODULES:
            self.pool(node, src, _POOL_MODULES[type(mod)], mod)
        elif isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)):
            # Normalising over the channel dim: removing channels would change the statistics.
            info = self.tensor_info(src)
            self.block(info)
            self.info[node] = (
                None if info is None else _Info(info.cdim, info.ids, info.const, torch.ones_like(info.var))
            )
        else:
            self.unknown(node)

    def consume(self, name: str, mod: nn.Module, info: _Info | None, width: int, foldable: bool) -> None:
        """Record a weight-reading consumer: drop zero inputs, fold constant ones into the bias."""
        if info is None or len(info.ids) != width:
            self.block(info)
            return
        has_bias = getattr(mod, "bias", None) is not None
        droppable = ~info.var & ((info.const == 0) | bool(has_bias and foldable))
        self.blocked.update(info.ids[~droppable].tolist())
        self.plans[name].in_cols.append((info.ids, info.const, droppable))

    def linear_or_conv(self, node: fx.Node, name: str, mod: nn.Module, kind: str) -> None:
        src = node.args[0]
        info = self.tensor_info(src)
        in_shape, out_shape = self.shape(src), self.shape(node)
        if in_shape is None or out_shape is None:
            self.unknown(node, "its shapes are unknown")
            return
        if kind == "linear":
            cdim_in, cdim_out, width = len(in_shape) - 1, len(out_shape) - 1, mod.in_features
            foldable = True
        else:
            k = _conv_dims(mod)
            cdim_in, cdim_out, width = len(in_shape) - k - 1, len(out_shape) - k - 1, mod.in_channels
            foldable = mod.padding_mode != "zeros" or _no_padding(mod)
        if info is not None and info.cdim != cdim_in:
            self.unknown(node, "the pruned dimension is not its input-channel dimension")
            return
        plan = self.plans.setdefault(name, _LayerPlan(kind))
        self.consume(name, mod, info, width, foldable)
        weight = mod.weight.detach()
        ids = self.fresh(weight.shape[0])
        zero_rows = weight.reshape(weight.shape[0], -1).eq(0).all(dim=1)
        bias = (
            mod.bias.detach().to(torch.float64)
            if mod.bias is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64)
        )
        plan.out_ids = ids
        self.producer_order.append(name)
        self.info[node] = _Info(cdim_out, ids, torch.where(zero_rows, bias.cpu(), 0.0), ~zero_rows.cpu())

    def depthwise(self, node: fx.Node, name: str, mod: nn.Module) -> None:
        src = node.args[0]
        info = self.tensor_info(src)
        k = _conv_dims(mod)
        in_shape = self.shape(src)
        if info is None or in_shape is None:
            self.info[node] = None
            return
        if info.cdim != len(in_shape) - k - 1 or mod.out_channels != len(info.ids):
            self.unknown(node, "the pruned dimension is not its channel dimension")
            return
        w = mod.weight.detach().to(torch.float64).cpu().reshape(mod.out_channels, -1)
        b = (
            mod.bias.detach().to(torch.float64).cpu()
            if mod.bias is not None
            else torch.zeros(mod.out_channels, dtype=torch.float64)
        )
        foldable = mod.padding_mode != "zeros" or _no_padding(mod)
        zero = ~info.var & (info.const == 0)
        const_ok = ~info.var & (zero | foldable)
        const = torch.where(const_ok, info.const * w.sum(dim=1) + b, 0.0)
        self.plans[name] = _LayerPlan("depthwise", out_ids=info.ids)
        self.info[node] = _Info(info.cdim, info.ids, const, ~const_ok)

    def batchnorm(self, node: fx.Node, name: str, mod: nn.Module) -> None:
        src = node.args[0]
        info = self.tensor_info(src)
        if info is None:
            self.info[node] = None
            return
        in_shape = self.shape(src)
        if (
            in_shape is None
            or info.cdim != (1 if len(in_shape) > 1 else 0)
            or len(info.ids) != mod.num_features
        ):
            self.unknown(node, "the pruned dimension is not its feature dimension")
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
        self.plans[name] = _LayerPlan("bn", out_ids=info.ids)
        self.info[node] = _Info(info.cdim, info.ids, torch.where(var, 0.0, const), var)

    def flatten(self, node: fx.Node, src: Any, start: int, end: int) -> None:
        info = self.tensor_info(src)
        in_shape = self.shape(src)
        if info is None:
            self.info[node] = None
            return
        if in_shape is None:
            self.unknown(node)
            return
        nd = len(in_shape)
        start, end = start % nd if nd else 0, end % nd if nd else 0
        if info.cdim < start:
            self.info[node] = info
        elif info.cdim > end:
            self.info[node] = _Info(info.cdim - (end - start), info.ids, info.const, info.var)
        elif info.cdim == start:
            rep = math.prod(in_shape[start + 1 : end + 1])
            self.info[node] = _Info(
                start,
                info.ids.repeat_interleave(rep),
                info.const.repeat_interleave(rep),
                info.var.repeat_interleave(rep),
            )
        else:
            self.unknown(node, "it flattens dimensions in front of the channel dimension")

    def pool(self, node: fx.Node, src: Any, k: int, mod: Any) -> None:
        info = self.tensor_info(src)
        in_shape = self.shape(src)
        if info is None:
            self.info[node] = None
            return
        if in_shape is None or info.cdim >= len(in_shape) - k or getattr(mod, "return_indices", False):
            self.unknown(node, "it pools over the channel dimension or returns indices")
            return
        var = info.var
        if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            padded = any(p != 0 for p in _as_tuple(mod.padding))
            if (padded and mod.count_include_pad) or getattr(mod, "divisor_override", None):
                var = var | (info.const != 0)
        self.info[node] = _Info(info.cdim, info.ids, torch.where(var, 0.0, info.const), var)

    def binary(self, node: fx.Node, op: str, a: Any, b: Any) -> None:
        ia, ib = self.tensor_info(a), self.tensor_info(b)
        out_shape = self.shape(node)
        if out_shape is None:
            self.unknown(node)
            return
        nd = len(out_shape)
        fn = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}[op]
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            if ia is None and ib is None:
                self.info[node] = None
                return
            sa, sb = self.shape(a), self.shape(b)
            if sa is None or sb is None:
                self.unknown(node)
                return
            ca = None if ia is None else ia.cdim + nd - len(sa)
            cb = None if ib is None else ib.cdim + nd - len(sb)
            if ia is not None and ib is not None:
                if ca != cb or len(ia.ids) != len(ib.ids):
                    self.unknown(node, "its operands carry channels on different dimensions")
                    return
                if ca is None or out_shape[ca] != len(ia.ids):
                    self.unknown(node, "its operands are broadcast along the channel dimension")
                    return
                self.union(ia.ids, ib.ids)
                var = ia.var | ib.var
                const = fn(ia.const, ib.const)
                if op == "mul":
                    zero_a, zero_b = ~ia.var & (ia.const == 0), ~ib.var & (ib.const == 0)
                    var = var & ~(zero_a | zero_b)
                    const = torch.where(zero_a | zero_b, 0.0, const)
                var = var | ~torch.isfinite(const)
                self.info[node] = _Info(ca, ia.ids, torch.where(var, 0.0, const), var)
                return
            info, c, s_other = (ia, ca, sb) if ia is not None else (ib, cb, sa)
            assert info is not None and c is not None
            pos = c - (nd - len(s_other))
            if pos >= 0 and s_other[pos] != 1:
                self.block(info)  # the other operand's channels cannot be removed with ours
            keep_zero = op == "mul" or (op == "div" and info is ia)
            zero = ~info.var & (info.const == 0) if keep_zero else torch.zeros_like(info.var)
            self.info[node] = _Info(c, info.ids, torch.zeros_like(info.const), ~zero)
            return
        # one operand is a Python number
        if isinstance(a, fx.Node) and isinstance(b, numbers.Number) and not isinstance(b, bool):
            self.passthrough(node, a, lambda c: fn(c.to(torch.float64), b))
        elif isinstance(b, fx.Node) and isinstance(a, numbers.Number) and not isinstance(a, bool):
            self.passthrough(
                node, b, lambda c: fn(torch.full_like(c, float(a), dtype=torch.float64), c.to(torch.float64))
            )
        else:
            self.unknown(node)

    def function(self, node: fx.Node) -> None:
        t = node.target
        args, kwargs = node.args, node.kwargs
        if (
            t in _UNARY_FUNCTIONS
            and args
            and isinstance(args[0], fx.Node)
            and not _flat_nodes((args[1:], kwargs))
        ):
            self.passthrough(node, args[0], lambda c: t(c.to(self.dtype(node)), *args[1:], **kwargs))
        elif t in _DROPOUT_FUNCTIONS and args and isinstance(args[0], fx.Node):
            self.passthrough(node, args[0], None)
        elif t in _BINARY and len(args) == 2 and not kwargs:
            self.binary(node, _BINARY[t], args[0], args[1])
        elif t in (torch.cat, torch.concat):
            self.cat(
                node,
                args[0] if args else kwargs.get("tensors"),
                args[1] if len(args) > 1 else kwargs.get("dim", 0),
            )
        elif t is torch.flatten and args:
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            self.flatten(node, args[0], start, end)
        elif t in _POOL_FUNCTIONS and args:
            self.pool(node, args[0], _POOL_FUNCTIONS[t], None)
        elif t is torch.mean and args:
            self.mean(
                node,
                args[0],
                args[1] if len(args) > 1 else kwargs.get("dim"),
                args[2] if len(args) > 2 else kwargs.get("keepdim", False),
            )
        else:
            self.unknown(node)

    def method(self, node: fx.Node) -> None:
        name, args, kwargs = str(node.target), node.args, node.kwargs
        src = args[0]
        info = self.tensor_info(src)
        if name in _UNARY_METHODS and len(args) == 1 and not kwargs:
            self.passthrough(node, src, lambda c: getattr(c.to(self.dtype(node)), name)())
        elif name in _BINARY_METHODS and len(args) == 2 and not kwargs:
            self.binary(node, _BINARY_METHODS[name], args[0], args[1])
        elif name == "flatten":
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            self.flatten(node, src, start, end)
        elif name in ("view", "reshape"):
            shape = (
                list(args[1:])
                if not (len(args) == 2 and isinstance(args[1], (tuple, list)))
                else list(args[1])
            )
            in_shape = self.shape(src)
            if info is None:
                self.info[node] = None
            elif len(shape) == 2 and shape[1] == -1 and in_shape is not None and len(in_shape) >= 2:
                self.flatten(node, src, 1, -1)  # x.view(x.size(0), -1) is flatten(1)
            else:
                self.unknown(node, "view/reshape other than x.view(batch, -1) is not supported")
        elif name == "size":
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            in_shape = self.shape(src)
            if (
                info is not None
                and info.has_candidates
                and (not isinstance(dim, int) or in_shape is None or dim % len(in_shape) == info.cdim)
            ):
                self.unknown(node, "it reads the size of the channel dimension")
            else:
                self.info[node] = None
        elif name == "mean":
            self.mean(
                node,
                src,
                args[1] if len(args) > 1 else kwargs.get("dim"),
                args[2] if len(args) > 2 else kwargs.get("keepdim", False),
            )
        else:
            self.unknown(node)

    def mean(self, node: fx.Node, src: Any, dim: Any, keepdim: Any) -> None:
        info = self.tensor_info(src)
        in_shape = self.shape(src)
        if info is None:
            self.info[node] = None
            return
        dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (tuple, list)) else None
        if in_shape is None or dims is None or not all(isinstance(d, int) for d in dims):
            self.unknown(node, "mean over all dimensions or over unknown dimensions")
            return
        nd = len(in_shape)
        dims = [d % nd for d in dims]
        if info.cdim in dims:
            self.unknown(node, "it averages over the channel dimension")
            return
        cdim = info.cdim if keepdim else info.cdim - sum(d < info.cdim for d in dims)
        self.info[node] = _Info(cdim, info.ids, info.const, info.var)

    def cat(self, node: fx.Node, tensors: Any, dim: Any) -> None:
        out_shape = self.shape(node)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or out_shape is None:
            self.unknown(node)
            return
        infos = [self.tensor_info(t) for t in tensors]
        if all(i is None for i in infos):
            self.info[node] = None
            return
        dim = dim % len(out_shape)
        if any(i is not None and i.cdim != dim for i in infos):
            self.unknown(node, "it concatenates along a dimension other than the channel dimension")
            return
        parts: list[_Info] = []
        for t, i in zip(tensors, infos):
            if i is None:
                s = self.shape(t)
                if s is None:
                    self.unknown(node)
                    return
                n = s[dim]
                ids = self.fresh(n)
                self.blocked.update(ids.tolist())
                i = _Info(dim, ids, torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.bool))
            parts.append(i)
        self.info[node] = _Info(
            dim,
            torch.cat([p.ids for p in parts]),
            torch.cat([p.const for p in parts]),
            torch.cat([p.var for p in parts]),
        )


def _conv_dims(conv: nn.Module) -> int:
    return next(k for t, k in _CONV.items() if isinstance(conv, t))


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _no_padding(conv: nn.Module) -> bool:
    p = conv.padding
    if isinstance(p, str):
        return p == "valid" or all(k == 1 for k in _as_tuple(conv.kernel_size))
    return all(v == 0 for v in _as_tuple(p))


def _flat_nodes(obj: Any) -> list[fx.Node]:
    out: list[fx.Node] = []

    def visit(x: Any) -> None:
        if isinstance(x, fx.Node):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)

    visit(obj)
    return out


def _frozen_modules(model: nn.Module, gm: fx.GraphModule) -> set[str]:
    """Modules shrink must leave alone: tensors read directly, shared Parameters, foreign parametrizations."""
    frozen: set[str] = set()
    names = [n for n, _ in model.named_modules()]
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            target = str(node.target)
            frozen.update(n for n in names if n and (target == n or target.startswith(n + ".")))
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        if "parametrizations" in name.split("."):
            continue  # counted with the module that owns them, below
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
        if parametrize.is_parametrized(mod):
            for plist in mod.parametrizations.values():  # type: ignore[union-attr]
                if not any(isinstance(p, _SparseParametrization) for p in plist):
                    frozen.add(name)
                for t in plist.parameters():
                    owners.setdefault(id(t), []).append(name)
    for mods in owners.values():
        if len(set(mods)) > 1:
            frozen.update(mods)
    return frozen


def _as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of the model's positional inputs, got {type(example_inputs).__name__}"
    )


def _trace(model: nn.Module, inputs: tuple[Any, ...]) -> fx.GraphModule:
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        raise UnsupportedGraphError(
            f"shrink could not trace {type(model).__name__} with torch.fx.symbolic_trace: "
            f"{type(exc).__name__}: {exc}; models with data-dependent control flow are not supported"
        ) from exc
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        raise UnsupportedGraphError(
            f"shrink could not run {type(model).__name__} on example_inputs: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for m, mode in modes:
            m.train(mode)
    return gm


# --------------------------------------------------------------------------------------------
# shrink: rebuilding layers
# --------------------------------------------------------------------------------------------


def _param_like(src: torch.Tensor | None, value: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(value.detach().clone().contiguous())
    if src is not None:
        p.requires_grad_(src.requires_grad)
    return p


def _rebuild(mod: nn.Module, plan: _LayerPlan, removed: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A shallow copy of ``mod`` (same class, hooks and attributes) holding the kept slices."""
    new = copy.copy(mod)
    new._parameters = dict(mod._parameters)  # type: ignore[assignment]
    new._buffers = dict(mod._buffers)  # type: ignore[assignment]
    new._modules = dict(mod._modules)  # type: ignore[assignment]
    with torch.no_grad():
        if plan.kind in ("linear", "conv"):
            w = mod.weight.detach()
            keep_rows = (
                ~removed(plan.out_ids)
                if plan.out_ids is not None
                else torch.ones(w.shape[0], dtype=torch.bool)
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
        elif plan.kind == "depthwise":
            assert plan.out_ids is not None
            keep = (~removed(plan.out_ids)).nonzero().squeeze(1).to(mod.weight.device)
            new.weight = _param_like(mod.weight, mod.weight.detach().index_select(0, keep))
            if mod.bias is not None:
                new.bias = _param_like(mod.bias, mod.bias.detach().index_select(0, keep))
            new.out_channels = new.in_channels = new.groups = len(keep)
        else:  # batchnorm
            assert plan.out_ids is not None
            keep = (~removed(plan.out_ids)).nonzero().squeeze(1)
            for pname in ("weight", "bias"):
                if mod._parameters.get(pname) is not None:
                    t = mod._parameters[pname]
                    new._parameters[pname] = _param_like(t, t.detach().index_select(0, keep.to(t.device)))
            for bname in ("running_mean", "running_var"):
                if mod._buffers.get(bname) is not None:
                    t = mod._buffers[bname]
                    new._buffers[bname] = t.index_select(0, keep.to(t.device)).clone()
            new.num_features = len(keep)
    return new


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
    inputs = _as_inputs(example_inputs)
    gm = _trace(model, inputs)
    analysis = _Analysis(gm, _frozen_modules(model, gm))
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
    new_modules = {name: _rebuild(model.get_submodule(name), plan, removed) for name, plan in todo.items()}
    for name, new in new_modules.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model


# --------------------------------------------------------------------------------------------
# to_sparse
# --------------------------------------------------------------------------------------------

#: Largest weight density (fraction of nonzeros) at which a layer is converted by default, per
#: layout; denser layers stay dense. Measured with ``benchmarks/inference_speed.py`` (docs/speed.md).
DEFAULT_MAX_DENSITY: dict[str, float] = {"csr": 0.2, "bsr": 0.2, "semi_structured": 0.5}
_LAYOUTS = ("csr", "bsr", "semi_structured")


def _csr32(w: torch.Tensor) -> torch.Tensor:
    c = w.to_sparse_csr()
    return torch.sparse_csr_tensor(
        c.crow_indices().to(torch.int32),
        c.col_indices().to(torch.int32),
        c.values(),
        c.shape,
        check_invariants=False,
    )


def _bsr32(w: torch.Tensor, blocksize: tuple[int, int]) -> torch.Tensor:
    c = w.to_sparse_bsr(blocksize)
    return torch.sparse_bsr_tensor(
        c.crow_indices().to(torch.int32),
        c.col_indices().to(torch.int32),
        c.values(),
        c.shape,
        check_invariants=False,
    )


class SparseLinear(nn.Module):
    r"""Inference replacement of a baked ``nn.Linear`` whose weight is a ``torch.sparse`` tensor.

    ``forward(x) = x @ W.T + b`` like ``nn.Linear`` (any leading dimensions). The weight
    is held as a non-persistent buffer (CSR or BSR with int32 indices, which use the
    MKL kernels on CPU, or a 2:4 ``SparseSemiStructuredTensor`` on CUDA) and is never
    a Parameter, so the module runs under ``torch.inference_mode()`` as well as
    ``torch.no_grad()``. ``state_dict`` stores the dense ``weight`` and ``bias`` under
    the names ``nn.Linear`` uses, so it loads into the dense model, and a dense
    ``nn.Linear`` state_dict loads back into this module (re-sparsified).

    It is an export format for inference, not for training: the weight gets no gradient.

    Args:
        linear: the (baked) layer to convert.
        layout: ``"csr"``, ``"bsr"`` or ``"semi_structured"``.
        blocksize: BSR block shape.

    Attributes:
        in_features, out_features: as in ``nn.Linear``.
        weight: the sparse weight tensor.
        bias: the dense bias Parameter, or ``None``.

    Example::

        >>> lin = nn.Linear(64, 32)
        >>> sl = SparseLinear(lin, "csr")
        >>> sl(torch.randn(3, 64)).shape
        torch.Size([3, 32])
    """

    weight: torch.Tensor

    def __init__(
        self, linear: nn.Linear, layout: str = "csr", *, blocksize: tuple[int, int] = (16, 16)
    ) -> None:
        super().__init__()
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {list(_LAYOUTS)}, got {layout!r}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.layout = layout
        self.blocksize = tuple(blocksize)
        self.register_buffer("weight", self._sparsify(linear.weight.detach()), persistent=False)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )

    def _sparsify(self, w: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse (CSR|BSR).*beta", category=UserWarning)
            w = w.detach().clone()
            if self.layout == "csr":
                return _csr32(w)
            if self.layout == "bsr":
                return _bsr32(w, self.blocksize)  # type: ignore[arg-type]
            from torch.sparse import to_sparse_semi_structured

            return to_sparse_semi_structured(w)

    def __deepcopy__(self, memo: dict[int, Any]) -> SparseLinear:
        # Sparse compressed tensors have no storage for copy.deepcopy: clone the weight instead.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_buffers":
                value = {
                    k: (v.clone() if k == "weight" else copy.deepcopy(v, memo)) for k, v in value.items()
                }
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        return new

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense (strided) tensor."""
        return self.weight.to_dense()

    @property
    def density(self) -> float:
        """Stored nonzeros over ``out_features * in_features``."""
        n = self.out_features * self.in_features
        if self.layout == "semi_structured":
            return 0.5
        return float(self.weight.values().numel()) / n if n else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "semi_structured":
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 1:
            y = torch.mv(self.weight, x2[0]).unsqueeze(0)
        else:
            y = torch.sparse.mm(self.weight, x2.t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            expected = (self.out_features, self.in_features)
            if not isinstance(w, torch.Tensor) or tuple(w.shape) != expected:
                got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                error_msgs.append(
                    f"size mismatch for {key}: expected a dense tensor of shape {expected}, got {got}"
                )
            else:
                dense = w.to_dense() if w.layout != torch.strided else w
                self.weight = self._sparsify(dense.to(self.weight.device, self.weight.dtype))
        elif strict:
            missing_keys.append(key)
        bkey = prefix + "bias"
        if self.bias is not None and bkey in state_dict:
            with torch.no_grad():
                self.bias.copy_(state_dict[bkey])
        elif self.bias is not None and strict:
            missing_keys.append(bkey)
        if strict:
            for k in state_dict:
                if k.startswith(prefix) and k not in (key, bkey) and "." not in k[len(prefix) :]:
                    unexpected_keys.append(k)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, layout={self.layout}, density={self.density:.3f}"
        )


def _check_blocksize(blocksize: object) -> tuple[int, int]:
    if (
        not isinstance(blocksize, (tuple, list))
        or len(blocksize) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in blocksize)
    ):
        raise ValueError(f"blocksize must be a pair of positive ints, got {blocksize!r}")
    return int(blocksize[0]), int(blocksize[1])


def to_sparse(
    model: nn.Module,
    layout: str = "csr",
    *,
    max_density: float | None = None,
    blocksize: tuple[int, int] = (16, 16),
    include: Iterable[str] | None = None,
) -> nn.Module:
    r"""Replace the baked ``nn.Linear`` layers of ``model`` by :class:`SparseLinear`, in place.

    Only layers sparse enough to profit are converted: those whose weight density
    (nonzeros / numel) is at most ``max_density``; denser ones stay dense
    ``nn.Linear``. The default thresholds (:data:`DEFAULT_MAX_DENSITY`) come from
    ``benchmarks/inference_speed.py`` (single thread): CSR with int32 indices was
    slower than dense at batch 64 at 70% sparsity and broke even or won from 80%, so
    layers with more than 20% nonzeros stay dense. Convolutions stay dense (use :func:`shrink` for
    channel sparsity). The model must be baked (no parametrization of this library
    left); run :func:`remove_parametrizations` first.

    Layouts:
        * ``"csr"``: compressed sparse rows, int32 indices (CPU or CUDA).
        * ``"bsr"``: blocks of ``blocksize``; a layer whose shape is not divisible by it stays dense.
        * ``"semi_structured"``: 2:4 sparsity with :func:`torch.sparse.to_sparse_semi_structured`
          on CUDA (fp16/bf16 weights, every group of 4 weights along a row holding at most 2
          nonzeros); needs a CUDA device.

    Args:
        model: a baked model.
        layout: ``"csr"``, ``"bsr"`` or ``"semi_structured"``.
        max_density: convert layers whose density is at most this (in ``[0, 1]``);
            ``None``: ``DEFAULT_MAX_DENSITY[layout]``.
        blocksize: BSR block shape ``(rows, cols)``.
        include: qualified module names to consider (``None``: every ``nn.Linear``).

    Returns:
        ``model``, with sparse layers.

    Example::

        >>> model = hs.remove_parametrizations(hs.sparsify(model, 0.95))
        >>> to_sparse(model, "csr")
        >>> with torch.inference_mode():
        ...     y = model(x)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {list(_LAYOUTS)}, got {layout!r}")
    if max_density is None:
        max_density = DEFAULT_MAX_DENSITY[layout]
    if (
        isinstance(max_density, bool)
        or not isinstance(max_density, numbers.Real)
        or not 0.0 <= float(max_density) <= 1.0
    ):
        raise ValueError(f"max_density must be a float in [0, 1] or None, got {max_density!r}")
    bs = _check_blocksize(blocksize)
    wanted = None if include is None else set(include)
    names = {n for n, _ in model.named_modules()}
    if wanted is not None and not wanted <= names:
        raise ValueError(f"include names modules that do not exist: {sorted(wanted - names)}")
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            raise ValueError(
                f"to_sparse needs a baked model, but {name or type(model).__name__!r} is still parametrized; "
                "run hs.remove_parametrizations(model) first"
            )
    todo: list[tuple[str, nn.Linear]] = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or (wanted is not None and name not in wanted):
            continue
        if name == "":
            raise ValueError("to_sparse cannot replace the root module; wrap the Linear in an nn.Sequential")
        w = mod.weight.detach()
        density = float(w.count_nonzero()) / max(1, w.numel())
        if density > max_density:
            continue
        if layout == "bsr" and (w.shape[0] % bs[0] or w.shape[1] % bs[1]):
            continue
        if layout == "semi_structured":
            if w.device.type != "cuda":
                raise ValueError(
                    f"layout='semi_structured' needs CUDA weights, but {name!r} is on {w.device}; "
                    "move the model to a GPU first, or use layout='csr'"
                )
            if w.dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(
                    f"layout='semi_structured' needs float16/bfloat16 weights, {name!r} is {w.dtype}"
                )
            groups = w.reshape(w.shape[0], -1, 4) if w.shape[1] % 4 == 0 else None
            if groups is None or bool((groups.ne(0).sum(-1) > 2).any()):
                raise ValueError(f"layout='semi_structured' needs a 2:4 pattern; {name!r} does not have one")
        todo.append((name, mod))
    if not todo:
        return model
    for name, mod in todo:
        new = SparseLinear(mod, layout, blocksize=bs)
        new.train(mod.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model
