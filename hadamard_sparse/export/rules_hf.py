"""The export rule of Hugging Face's GPT-2 ``Conv1D`` (a linear layer with weight ``(in, out)``).

``Conv1D.forward`` runs ``torch.addmm(self.bias, x.view(-1, nx), self.weight).view(..., nf)``, so a
``torch.export`` capture shows it as ``aten.addmm`` reading the layer's bias and weight placeholders
(the views around it keep the channel dimension last and are handled by the reshape rule). The
layer is handled as the ``nn.Linear`` whose weight is the transposed view of its own: rows are
outputs (``nf``), columns inputs (``nx``). Its rule registers at import with a ``match`` predicate
(the class is recognised by name), so transformers is never imported here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ..groups import Member
from ..layers import layer_kind
from .graph import ChannelFlow, LayerPlan, function_rule
from .heads import is_hf_conv1d
from .layer_rules import (
    ExportRule,
    GroupIds,
    LinearRule,
    Removed,
    SparseSpec,
    rebuild,
    register_layer_rule,
    rule_of,
)
from .rules import arg_at

__all__ = ["HFConv1DRule", "as_linear"]

A = torch.ops.aten


def as_linear(mod: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` whose weight and bias are views of the ``Conv1D``'s (transposed weight, no copy)."""
    with torch.device("meta"):
        lin = nn.Linear(mod.nx, mod.nf, bias=mod.bias is not None)
    lin.weight = nn.Parameter(mod.weight.detach().t(), requires_grad=mod.weight.requires_grad)
    if mod.bias is not None:
        lin.bias = nn.Parameter(mod.bias.detach(), requires_grad=mod.bias.requires_grad)
    return lin


def _weight_bias(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    return mod.weight.detach().t(), mod.bias  # type: ignore[union-attr,operator]


def _is_conv1d(mod: nn.Module) -> bool:
    """The pruning side's test (a ``Conv1D`` with ``nf``); flow and rebuild also need ``nx`` (:func:`is_hf_conv1d`)."""
    return layer_kind(mod) == "hf_conv1d"


@register_layer_rule(match=_is_conv1d)
class HFConv1DRule(ExportRule):
    """Hugging Face's ``Conv1D``: the rules of the ``nn.Linear`` on its transposed weight."""

    label = "Hugging Face Conv1D"
    aten = ("addmm",)
    produces = True

    def flow(self, flow: ChannelFlow, node: fx.Node, name: str, mod: nn.Module, src: Any = None) -> None:
        _LINEAR.flow(flow, node, name, as_linear(mod), src)

    def rebuild(self, new: nn.Module, mod: nn.Module, plan: LayerPlan, removed: Removed) -> None:
        lin = rebuild(as_linear(mod), plan, removed)
        new.weight = nn.Parameter(
            lin.weight.detach().t().contiguous(), requires_grad=mod.weight.requires_grad
        )
        if mod.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=mod.bias.requires_grad)
        new.nf, new.nx = lin.out_features, lin.in_features

    def members(
        self, mod: nn.Module, plan: LayerPlan, rows: torch.Tensor | None, cols: GroupIds
    ) -> dict[str, Member]:
        return _LINEAR.members(mod, plan, rows, cols)

    def sparse(self, mod: nn.Module) -> SparseSpec | None:
        return SparseSpec("Conv1D", _weight_bias, transposed=True)


_LINEAR = LinearRule()


@function_rule(A.addmm)
def _aten_addmm(flow: ChannelFlow, node: fx.Node) -> None:
    bias, weight = node.args[0], node.args[2]
    beta = arg_at(node.args, node.kwargs, 3, "beta", 1)
    alpha = arg_at(node.args, node.kwargs, 4, "alpha", 1)
    qualified = flow.param_of(weight)
    name = qualified.rpartition(".")[0] if qualified is not None else None
    mod = flow.root.get_submodule(name) if name is not None and flow.root is not None else None
    if (
        mod is None
        or not is_hf_conv1d(mod)
        or qualified != (f"{name}.weight" if name else "weight")
        or flow.param_of(bias) != (f"{name}.bias" if name else "bias")
        or beta != 1
        or alpha != 1
    ):
        flow.unknown(node, "only the addmm of a Hugging Face Conv1D (its bias and weight) is modelled")
        return
    if name in flow.frozen:  # shared or read directly: kept whole, outputs unknown
        flow.block(flow.tensor_info(node.args[1]))
        flow.info[node] = None
        return
    rule = rule_of(mod, "flow")
    assert rule is not None  # is_hf_conv1d(mod): this module's rule
    rule.flow(flow, node, name, mod, node.args[1])
