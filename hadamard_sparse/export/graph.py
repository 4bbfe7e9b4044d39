"""Graph capture and channel-flow analysis for :func:`~hadamard_sparse.export.shrink`.

``trace`` captures the model with ``torch.fx`` and propagates example shapes;
``frozen_modules`` lists the modules shrink must leave whole (tensors read
directly, shared Parameters, foreign parametrizations). :class:`ChannelFlow` then
walks the graph once and follows, for every tensor, which channel slot sits at each
index of its channel dimension and whether that channel is a known constant.

What an operation does to channels is one *rule* per op, looked up in three
tables keyed by module type (``MODULE_RULES``), function (``FUNCTION_RULES``) and
method name (``METHOD_RULES``), as in Torch-Pruning's ``pruner/function.py``.
Adding an op is adding a rule with :func:`module_rule`, :func:`function_rule` or
:func:`method_rule` (see ``export/rules.py``); the traversal does not change. An op
without a rule is fine unless it reads candidate (pruned) channels.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from .._model_io import as_inputs, eval_mode
from ..errors import UnsupportedGraphError
from ..layers import shared_parameter_ids
from ..parametrizations import SparseParametrization

__all__ = [
    "FUNCTION_RULES",
    "LAYER_LABELS",
    "METHOD_RULES",
    "MODULE_RULES",
    "WEIGHTED_MODULES",
    "Capture",
    "ChannelFlow",
    "ChannelInfo",
    "FixedSize",
    "LayerPlan",
    "as_inputs",
    "capture",
    "flat_nodes",
    "frozen_modules",
    "function_rule",
    "method_rule",
    "module_rule",
]


@dataclass
class ChannelInfo:
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


@dataclass
class LayerPlan:
    """Slices and bias corrections gathered for one module during the analysis."""

    kind: str  # "linear", "conv", "depthwise", "bn"
    out_ids: torch.Tensor | None = None  # ids of output channels (rows); depthwise/bn: the channels
    in_cols: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class FixedSize:
    """A reshape that sets the size of a dimension holding channels to the constant ``value``."""

    where: str  # the operation and its layer, for messages
    module: str  # qualified name of the module whose forward runs the reshape ("" for the model)
    value: int
    ids: torch.Tensor  # the channel ids along that dimension (its new size: how many are kept)


# --------------------------------------------------------------------------------------------
# the rule tables
# --------------------------------------------------------------------------------------------

#: ``rule(flow, node, name, module)`` for a ``call_module`` node, keyed by module type (looked up
#: along the MRO, so a parametrized ``nn.Linear`` finds the ``nn.Linear`` rule).
ModuleRule = Callable[["ChannelFlow", fx.Node, str, nn.Module], None]
#: ``rule(flow, node)`` for a ``call_function`` / ``call_method`` node.
NodeRule = Callable[["ChannelFlow", fx.Node], None]

MODULE_RULES: dict[type, ModuleRule] = {}
FUNCTION_RULES: dict[Any, NodeRule] = {}
METHOD_RULES: dict[str, NodeRule] = {}
#: Module types whose weights shrink slices; a shared one is kept whole.
WEIGHTED_MODULES: set[type] = set()
#: How messages name the layer families with a channel rule, filled by
#: :func:`~hadamard_sparse.export.layer_rules.register_layer_rule`.
LAYER_LABELS: list[str] = []


def module_rule(*types: type, weighted: bool = False) -> Callable[[ModuleRule], ModuleRule]:
    """Register the channel rule of ``types`` (``weighted``: shrink slices their weights)."""

    def decorator(fn: ModuleRule) -> ModuleRule:
        for t in types:
            MODULE_RULES[t] = fn
            if weighted:
                WEIGHTED_MODULES.add(t)
        return fn

    return decorator


def function_rule(*targets: Any) -> Callable[[NodeRule], NodeRule]:
    """Register the channel rule of the functions ``targets`` (``call_function`` nodes)."""

    def decorator(fn: NodeRule) -> NodeRule:
        for t in targets:
            FUNCTION_RULES[t] = fn
        return fn

    return decorator


def method_rule(*names: str) -> Callable[[NodeRule], NodeRule]:
    """Register the channel rule of the tensor methods ``names`` (``call_method`` nodes)."""

    def decorator(fn: NodeRule) -> NodeRule:
        for n in names:
            METHOD_RULES[n] = fn
        return fn

    return decorator


def _lookup(table: dict[type, Any], cls: type) -> Any:
    for base in cls.__mro__:
        if base in table:
            return table[base]
    return None


# --------------------------------------------------------------------------------------------
# the traversal
# --------------------------------------------------------------------------------------------


class ChannelFlow:
    """One pass over an fx graph: channel info per node, union-find groups, layer plans."""

    def __init__(
        self,
        gm: fx.GraphModule,
        frozen: set[str],
        *,
        root: nn.Module | None = None,
        params: dict[str, str] | None = None,
        discover: bool = False,
    ) -> None:
        self.gm = gm
        self.frozen = frozen
        #: the module tree the graph reads (the captured model); ``gm`` itself for an fx trace
        self.root: nn.Module = gm if root is None else root
        #: placeholder name -> qualified parameter/buffer name (a ``torch.export`` capture)
        self.params: dict[str, str] = {} if params is None else params
        #: discovery mode: every producer channel is assumed pruned (weights, bias and the affine
        #: entries of the norms after it masked), and ops that cannot drop it block it instead of raising
        self.discover = discover
        #: nodes producing several tensors (split/chunk): the channel info of each
        self.multi: dict[fx.Node, list[ChannelInfo | None]] = {}
        #: reshapes that set the size of a dimension holding pruned channels to a constant
        self.fixed: list[FixedSize] = []
        self.parent: list[int] = []
        self.blocked: set[int] = set()
        self.info: dict[fx.Node, ChannelInfo | None] = {}
        self.plans: dict[str, LayerPlan] = {}
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

    def block(self, info: ChannelInfo | None) -> None:
        if info is not None:
            self.blocked.update(info.ids.tolist())

    def removed(self, ids: torch.Tensor) -> torch.Tensor:
        roots = {self.find(b) for b in self.blocked}
        return torch.tensor([self.find(i) not in roots for i in ids.tolist()], dtype=torch.bool)

    # helpers for rules
    @staticmethod
    def shape(node: Any) -> torch.Size | None:
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta", node.meta.get("val"))
        shape = getattr(meta, "shape", None)
        return torch.Size(int(d) for d in shape) if shape is not None else None

    @staticmethod
    def dtype(node: fx.Node) -> torch.dtype:
        meta = node.meta.get("tensor_meta", node.meta.get("val"))
        dt = getattr(meta, "dtype", None)
        return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32

    def tensor_info(self, node: Any) -> ChannelInfo | None:
        return self.info.get(node) if isinstance(node, fx.Node) else None

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            return f"layer {node.target!r} ({parametrize.type_before_parametrizations(mod).__name__})"
        target = getattr(node.target, "__name__", str(node.target))
        if isinstance(node.target, torch._ops.OpOverload):
            target = str(node.target.overloadpacket).replace("aten.", "")
        stack = node.meta.get("nn_module_stack")
        if stack:
            path, cls = list(stack.values())[-1]
            layer = _clean_path(str(path))
            cls_name = getattr(cls, "__name__", str(cls).rpartition(".")[2].rstrip("'>"))
            where = f" in layer {layer!r} ({cls_name})" if layer else f" in {cls_name}"
            return f"operation {target!r}{where} (graph node {node.name!r})"
        return f"operation {target!r} (graph node {node.name!r})"

    def module_path(self, node: fx.Node) -> str:
        """Qualified name of the module whose forward runs ``node`` (``""``: the model itself)."""
        stack = node.meta.get("nn_module_stack")
        return _clean_path(str(list(stack.values())[-1][0])) if stack else ""

    def layer_of(self, weight: Any, types: tuple[type, ...]) -> tuple[str, nn.Module] | None:
        """``(name, module)`` owning the parameter/buffer placeholder ``weight`` when of ``types``."""
        if not isinstance(weight, fx.Node) or weight.op != "placeholder" or weight.name not in self.params:
            return None
        name = self.params[weight.name].rpartition(".")[0]
        mod = self.root.get_submodule(name)
        return (name, mod) if isinstance(mod, types) else None

    def param_of(self, node: Any) -> str | None:
        """The qualified name read by a placeholder (``None`` for inputs and values computed in the graph)."""
        return self.params.get(node.name) if isinstance(node, fx.Node) and node.op == "placeholder" else None

    def unknown(self, node: fx.Node, why: str = "") -> None:
        """An operation shrink does not model: fine unless it reads candidate (pruned) channels."""
        for arg in flat_nodes((node.args, node.kwargs)):
            info = self.info.get(arg)
            if info is not None and info.has_candidates and not self.discover:
                reason = why or "shrink does not know how this operation uses channels"
                raise UnsupportedGraphError(
                    f"shrink cannot handle {self.describe(node)}: it consumes pruned channels of "
                    f"{self.describe(arg) if arg.op != 'placeholder' else arg.name}; {reason}. "
                    f"Supported: {', '.join(LAYER_LABELS)}, elementwise "
                    "activations, dropout, pooling, pad, add/sub/mul/div, cat/split/chunk, permute/"
                    "transpose, flatten/view/reshape that keep each channel whole, mean over non-channel dims"
                )
            self.block(info)
        self.info[node] = None

    def passthrough(
        self, node: fx.Node, src: fx.Node, fn: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> None:
        """``node`` keeps the channels of ``src``; ``fn`` maps their constants (None: unchanged)."""
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
        self.info[node] = ChannelInfo(cdim, info.ids, const, var)

    def run(self) -> None:
        """Visit every node in order and apply its rule."""
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
                for arg in flat_nodes(node.args):
                    self.block(self.info.get(arg))
            elif node.op == "call_module":
                self._module(node)
            elif node.op == "call_function":
                rule = FUNCTION_RULES.get(node.target)
                if rule is None and isinstance(node.target, torch._ops.OpOverload):
                    rule = FUNCTION_RULES.get(node.target.overloadpacket)
                rule(self, node) if rule is not None else self.unknown(node)
            elif node.op == "call_method":
                rule = METHOD_RULES.get(str(node.target))
                rule(self, node) if rule is not None else self.unknown(node)
            else:  # pragma: no cover - fx has no other ops
                self.unknown(node)

    def _module(self, node: fx.Node) -> None:
        name = str(node.target)
        mod = self.gm.get_submodule(name)
        src = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs or not isinstance(src, fx.Node):
            self.unknown(node)
            return
        rule = _lookup(MODULE_RULES, type(mod))
        if rule is None:
            self.unknown(node)
        elif name in self.frozen and isinstance(mod, tuple(WEIGHTED_MODULES)):
            self.block(self.tensor_info(src))  # shared or read directly: kept whole, outputs unknown
            self.info[node] = None
        else:
            rule(self, node, name, mod)


def flat_nodes(obj: Any) -> list[fx.Node]:
    """The fx nodes inside nested lists, tuples and dicts."""
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


# --------------------------------------------------------------------------------------------
# capture and module guards
# --------------------------------------------------------------------------------------------


def _owner_module(qualified: str) -> str:
    """The module that owns a parameter name (a parametrization's ``original`` counts for its module)."""
    parts = qualified.split(".")
    if "parametrizations" in parts:
        return ".".join(parts[: parts.index("parametrizations")])
    return ".".join(parts[:-1])


def frozen_modules(model: nn.Module, gm: fx.GraphModule) -> set[str]:
    """Modules shrink must leave alone: tensors read directly, shared Parameters, foreign parametrizations."""
    frozen: set[str] = set()
    names = [n for n, _ in model.named_modules()]
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            target = str(node.target)
            frozen.update(n for n in names if n and (target == n or target.startswith(n + ".")))
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            for plist in mod.parametrizations.values():  # type: ignore[union-attr]
                if not any(isinstance(p, SparseParametrization) for p in plist):
                    frozen.add(name)
    for qualified in shared_parameter_ids(model).values():
        owners = {_owner_module(q) for q in qualified}
        if len(owners) > 1:
            frozen.update(owners)
    return frozen


def _clean_path(path: str) -> str:
    """``"L['self'].encoder.layer[0]"`` or ``"encoder.layer.0"`` -> ``"encoder.layer.0"``."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


@dataclass
class Capture:
    """A captured forward: the graph, the module tree it reads and how parameters enter it."""

    gm: fx.GraphModule
    root: nn.Module
    params: dict[str, str]  # placeholder name -> qualified parameter/buffer name (export only)
    mode: str  # "export" or "fx"
    frozen: set[str]


def _frozen_by_use(gm: fx.GraphModule, params: dict[str, str]) -> set[str]:
    """Modules whose parameters a captured graph reads more than once (shared or read directly)."""
    frozen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in params and len(node.users) > 1:
            frozen.add(params[node.name].rpartition(".")[0])
    return frozen


def _without_cache(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``use_cache=False`` for a forward that takes it and was not given it.

    Hugging Face decoders (GPT-2, Llama, T5, Whisper) otherwise return a generation cache object,
    which is not a tree of tensors that ``torch.export`` can output; the channel analysis does not
    need it.
    """
    if "use_cache" in kwargs:
        return kwargs
    try:
        takes = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read (builtins, some C++ modules)
        return kwargs
    return {**kwargs, "use_cache": False} if takes else kwargs


def capture(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Capture:
    """Capture the forward of ``model`` on the example inputs: ``torch.export`` first, fx as fallback.

    ``torch.export.export(strict=False)`` runs the model, so Python control flow (``if embed:``),
    ``F.pad``, permutes and views into attention heads are recorded as the ATen ops they run.
    Only when export fails is ``torch.fx.symbolic_trace`` tried (with shapes from ``ShapeProp``).
    """
    errors = []
    kwargs = _without_cache(model, kwargs)
    with eval_mode(model), torch.no_grad():
        try:
            ep = torch.export.export(model, args, kwargs, strict=False)
        except Exception as exc:  # export raises many types for code it cannot capture
            errors.append(
                f"torch.export: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
        else:
            sig = ep.graph_signature
            params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
            gm = ep.graph_module
            frozen = _frozen_by_use(gm, params) | frozen_modules(model, gm)
            return Capture(gm, model, params, "export", frozen)
        try:
            gm = fx.symbolic_trace(model)
        except Exception as exc:
            errors.append(f"torch.fx: {type(exc).__name__}: {exc}")
            raise UnsupportedGraphError(
                f"shrink could not capture {type(model).__name__} on example_inputs ("
                + "; ".join(errors)
                + ")"
            ) from exc
        if kwargs:
            raise UnsupportedGraphError(
                f"shrink could not capture {type(model).__name__} with torch.export ({errors[0]}), and the "
                "fx fallback takes positional example_inputs only"
            )
        try:
            ShapeProp(gm).propagate(*args)
        except Exception as exc:
            raise UnsupportedGraphError(
                f"shrink could not run {type(model).__name__} on example_inputs: {type(exc).__name__}: {exc}"
            ) from exc
    return Capture(gm, gm, {}, "fx", frozen_modules(model, gm))
