"""The registry of export rules: :class:`ExportRule`, :func:`register_layer_rule`, :func:`rule_of`.

The rules themselves (one per layer type) are in ``export/layer_rules.py``, which re-exports
everything here; see its docstring for what a rule owns and how to add one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from ..groups import Member
from .choice import LAYOUTS
from .graph import LAYER_LABELS, ChannelFlow, LayerPlan, module_rule

__all__ = [
    "CAPABILITIES",
    "ExportRule",
    "GroupIds",
    "RebuildFn",
    "Removed",
    "SparseSpec",
    "layer_types",
    "rebuild",
    "rebuild_rule",
    "register_layer_rule",
    "registered_rules",
    "rule_of",
    "rules_by_type",
    "supported",
]

#: ``removed(ids)``: which of the channel ids ``shrink`` removes (a bool tensor).
Removed = Callable[[torch.Tensor], torch.Tensor]
#: ``fn(new, mod, plan, removed)``: slices the tensors of ``new`` (a shallow copy of ``mod``).
RebuildFn = Callable[[nn.Module, nn.Module, LayerPlan, Removed], None]
#: ``cols(ids, droppable)``: the channel group of each input column (``-1``: none).
GroupIds = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

CAPABILITIES = ("flow", "rebuild", "members", "sparse")


@dataclass(frozen=True)
class SparseSpec:
    """How ``to_sparse`` converts one layer.

    Attributes:
        kind: the layer's name in the report (``"Linear"``, ``"Conv1D"``, ``"Conv2d"``).
        weight_bias: the layer's ``(out, in)`` weight and bias, or the reason it stays as it is.
        transposed: the layer stores its weight ``(in, out)`` (the state_dict keeps that).
        build: builds the sparse module from the layer and a layout (``None``: a
            ``SparseLinear``, or ``SparseLinearInt8`` with ``quantize="int8"``).
        layouts: the layouts this layer can run in.
        max_density: its densities for the rule without example inputs (``None``: the defaults).
    """

    kind: str
    weight_bias: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None] | str]
    transposed: bool = False
    build: Callable[[nn.Module, str], nn.Module] | None = None
    layouts: tuple[str, ...] = LAYOUTS
    max_density: dict[str, float] | None = None


class ExportRule:
    """What the export side knows about one layer type; subclass it and register with :func:`register_layer_rule`.

    Override the capabilities the layer has; the others stay unsupported.

    Attributes:
        label: the layer family as error messages list it (``"Linear"``).
        aten: the ATen ops (overload packet names) that run the layer on its own parameters,
            so a ``torch.export`` capture finds it (``("linear",)``).
        produces: its output channels are its own (neurons, filters), which ``shrink`` can remove
            (not BatchNorm, which maps the channels it reads).
    """

    label: ClassVar[str] = ""
    aten: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[bool] = False

    def flow(self, flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module, src: Any = None) -> None:
        """Record in ``flow`` what ``mod`` (run by ``node`` on ``src``, default its first argument) does to channels."""
        raise NotImplementedError

    def rebuild(self, new: nn.Module, mod: nn.Module, plan: LayerPlan, removed: Removed) -> None:
        """Give ``new`` (a shallow copy of ``mod``) the slices of ``mod``'s tensors that ``shrink`` keeps."""
        raise NotImplementedError

    def members(
        self, mod: nn.Module, plan: LayerPlan, rows: torch.Tensor | None, cols: GroupIds
    ) -> dict[str, Member]:
        """The ``ChannelGroups`` members of ``mod``'s tensors, by tensor name.

        Args:
            mod: the layer.
            plan: its plan from the channel flow (discovery mode).
            rows: the group of each output channel (``None``: the layer produces none).
            cols: maps an input's channel ids and droppable flags to the group of each column.
        """
        raise NotImplementedError

    def sparse(self, mod: nn.Module) -> SparseSpec | None:
        """How ``to_sparse`` converts ``mod`` (``None``: it stays dense and is not reported)."""
        return None

    def matches(self, mod: nn.Module) -> bool:
        """For a rule registered with ``match``: whether ``mod`` is one of its layers."""
        return True

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        """The capabilities this rule overrides, among ``flow``, ``rebuild``, ``members`` and ``sparse``."""
        return frozenset(c for c in CAPABILITIES if getattr(cls, c) is not getattr(ExportRule, c))


_BY_TYPE: dict[type, ExportRule] = {}
_BY_MATCH: list[ExportRule] = []


def register_layer_rule(
    *types: type, match: Callable[[nn.Module], bool] | None = None
) -> Callable[[type[ExportRule]], type[ExportRule]]:
    """Class decorator: register an :class:`ExportRule` subclass for modules of ``types`` (and subclasses).

    Args:
        types: the module classes the rule covers (looked up along the MRO).
        match: for a class known only by name (no import): a predicate on the module, tried
            after every type-keyed rule.

    Returns:
        The decorator; it returns the class unchanged.

    Example::

        >>> @register_layer_rule(MyLinear)
        ... class _MyLinearRule(LinearRule):
        ...     label = "MyLinear"
    """

    def decorator(cls: type[ExportRule]) -> type[ExportRule]:
        rule = cls()
        if match is not None:
            rule.matches = match  # type: ignore[method-assign]
            _BY_MATCH.append(rule)
        for t in types:
            _BY_TYPE[t] = rule
        if "flow" in cls.capabilities() and types:
            module_rule(*types, weighted=True)(rule.flow)
        if "flow" in cls.capabilities() and cls.label and cls.label not in LAYER_LABELS:
            LAYER_LABELS.append(cls.label)
        return cls

    return decorator


def rule_of(mod: nn.Module, needs: str | None = None) -> ExportRule | None:
    """The rule of ``mod`` (along its class's MRO, then the ``match`` rules), or ``None``.

    Args:
        mod: the module (a parametrized one is looked up by its original class).
        needs: a capability the rule must have (``"rebuild"``, ``"sparse"``...); rules without it
            are skipped.
    """
    cls = parametrize.type_before_parametrizations(mod)
    for t in cls.__mro__:
        rule = _BY_TYPE.get(t)
        if rule is not None and (needs is None or needs in rule.capabilities()):
            return rule
    for rule in _BY_MATCH:
        if (needs is None or needs in rule.capabilities()) and rule.matches(mod):
            return rule
    return None


def registered_rules() -> list[ExportRule]:
    """Every registered rule, once each, in registration order."""
    out: list[ExportRule] = []
    for rule in [*_BY_TYPE.values(), *_BY_MATCH]:
        if all(rule is not r for r in out):
            out.append(rule)
    return out


def rules_by_type() -> dict[type, ExportRule]:
    """A copy of the type-keyed registry (rules registered with ``match`` are not in it)."""
    return dict(_BY_TYPE)


def rebuild_rule(*types: type) -> Callable[[RebuildFn], RebuildFn]:
    """Register how ``shrink`` rebuilds layers of ``types`` (kept from before the rule objects).

    The type's rule (or, for a new type, a rule with only this capability) gets ``fn`` as its
    :meth:`ExportRule.rebuild`; a new layer type is better one :class:`ExportRule`.
    """

    def decorator(fn: RebuildFn) -> RebuildFn:
        for t in types:
            base = type(_BY_TYPE[t]) if t in _BY_TYPE else ExportRule
            body = {"rebuild": lambda self, new, mod, plan, removed: fn(new, mod, plan, removed)}
            register_layer_rule(t)(type(f"_Rebuild{t.__name__}", (base,), body))
        return fn

    return decorator


def layer_types(aten_op: str) -> tuple[type, ...]:
    """The module types whose rule lists the ATen op ``aten_op`` (e.g. ``"linear"``)."""
    return tuple(t for t, rule in _BY_TYPE.items() if aten_op in rule.aten)


def supported(capability: str, *, producers: bool = False) -> str:
    """The labels of the rules that have ``capability``, joined for a message (``"Linear, BatchNorm"``).

    Args:
        capability: ``"flow"``, ``"rebuild"``, ``"members"`` or ``"sparse"``.
        producers: only rules whose layers produce their own channels (:attr:`ExportRule.produces`).
    """
    return ", ".join(
        r.label
        for r in registered_rules()
        if r.label and capability in r.capabilities() and (r.produces or not producers)
    )


def rebuild(mod: nn.Module, plan: LayerPlan, removed: Removed) -> nn.Module:
    """A shallow copy of ``mod`` (same class, hooks and attributes) holding the kept slices."""
    rule = rule_of(mod, "rebuild")
    if rule is None:  # pragma: no cover - the channel rules only plan layers that have a rebuild rule
        raise TypeError(f"shrink has no rebuild rule for {type(mod).__name__}")
    new = copy.copy(mod)
    new._parameters = dict(mod._parameters)  # type: ignore[assignment]
    new._buffers = dict(mod._buffers)  # type: ignore[assignment]
    new._modules = dict(mod._modules)  # type: ignore[assignment]
    with torch.no_grad():
        rule.rebuild(new, mod, plan, removed)
    return new
