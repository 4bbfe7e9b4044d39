"""Channel and rebuild rules of Hugging Face's GPT-2 ``Conv1D`` (a linear layer with weight ``(in, out)``).

``Conv1D.forward`` runs ``torch.addmm(self.bias, x.view(-1, nx), self.weight).view(..., nf)``, so a
``torch.export`` capture shows it as ``aten.addmm`` reading the layer's bias and weight placeholders
(the views around it keep the channel dimension last and are handled by the reshape rule). The
layer is handled as the ``nn.Linear`` whose weight is the transposed view of its own: rows are
outputs (``nf``), columns inputs (``nx``). Its rebuild rule is registered for the layer's class
when the first one is seen, so transformers is never imported here.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .graph import ChannelFlow, LayerPlan, function_rule
from .heads import is_hf_conv1d
from .rules import arg_at, linear_flow
from .shrink import REBUILD_RULES, Removed, rebuild

__all__ = ["as_linear"]

A = torch.ops.aten


def as_linear(mod: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` whose weight and bias are views of the ``Conv1D``'s (transposed weight, no copy)."""
    with torch.device("meta"):
        lin = nn.Linear(mod.nx, mod.nf, bias=mod.bias is not None)
    lin.weight = nn.Parameter(mod.weight.detach().t(), requires_grad=mod.weight.requires_grad)
    if mod.bias is not None:
        lin.bias = nn.Parameter(mod.bias.detach(), requires_grad=mod.bias.requires_grad)
    return lin


def _rebuild_conv1d(new: nn.Module, mod: nn.Module, plan: LayerPlan, removed: Removed) -> None:
    lin = rebuild(as_linear(mod), plan, removed)
    new.weight = nn.Parameter(lin.weight.detach().t().contiguous(), requires_grad=mod.weight.requires_grad)
    if mod.bias is not None:
        new.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=mod.bias.requires_grad)
    new.nf, new.nx = lin.out_features, lin.in_features


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
    REBUILD_RULES.setdefault(type(mod), _rebuild_conv1d)
    linear_flow(flow, node, name, as_linear(mod), node.args[1])
