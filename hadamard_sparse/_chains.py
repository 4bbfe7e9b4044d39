"""Parametrization chains mixing ours with other libraries': split, evaluate, invert, rebuild.

A tensor's :class:`~torch.nn.utils.parametrize.ParametrizationList` may hold our
parametrizations and foreign ones (``weight_norm``, ``spectral_norm``, ``orthogonal``,
user modules). The checkpoint hooks and ``bake`` treat such a chain as
``[head..., tail...]`` split after our last parametrization. These helpers evaluate
pieces of a chain without side effects and apply ``right_inverse`` the way
``ParametrizationList`` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._model_io import eval_mode
from .parametrizations import SparseParametrization

__all__: list[str] = []


def is_ours(plist: nn.Module) -> bool:
    return any(isinstance(p, SparseParametrization) for p in plist)


def split_chain(
    plist: nn.Module,
) -> tuple[list[tuple[int, SparseParametrization]], list[tuple[int, nn.Module]]]:
    ours: list[tuple[int, SparseParametrization]] = []
    foreign: list[tuple[int, nn.Module]] = []
    for j, p in enumerate(plist):
        (ours if isinstance(p, SparseParametrization) else foreign).append((j, p))  # type: ignore[arg-type]
    return ours, foreign


def right_inverse(chain: list[nn.Module], value: torch.Tensor) -> Any:
    """``right_inverse`` through ``chain`` in reverse, as ``ParametrizationList`` does (identity when absent)."""
    x: Any = value
    for p in reversed(chain):
        if hasattr(p, "right_inverse"):
            x = p.right_inverse(x)
    return x


def forward(chain: list[nn.Module], originals: Any) -> torch.Tensor:
    x = chain[0](*originals) if isinstance(originals, (tuple, list)) else chain[0](originals)
    for p in chain[1:]:
        x = p(x)
    return x


def original_keys(base: str, plist: nn.Module) -> list[str]:
    return [base + "original"] if plist.is_tensor else [f"{base}original{i}" for i in range(plist.ntensors)]


def put_originals(state_dict: dict[str, Any], base: str, originals: Any) -> None:
    if isinstance(originals, torch.Tensor):
        state_dict[base + "original"] = originals
    else:
        for i, t in enumerate(originals):
            state_dict[f"{base}original{i}"] = t


def tensor_shape(module: nn.Module, name: str) -> torch.Size:
    plist = module.parametrizations[name]  # type: ignore[index, union-attr]
    if plist.is_tensor and all(isinstance(p, SparseParametrization) for p in plist):
        return plist.original.shape  # ours keep the shape
    with torch.no_grad(), eval_mode(*plist):  # no side effect (spectral_norm's power iteration)
        return getattr(module, name).shape


def current_originals(plist: nn.Module) -> Any:
    if plist.is_tensor:
        return plist.original
    return tuple(getattr(plist, f"original{i}") for i in range(plist.ntensors))


def split_at_ours(
    plist: nn.Module, ours: list[tuple[int, SparseParametrization]], foreign: list[tuple[int, nn.Module]]
) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """``(head, theirs_in_head, tail)``: the chain up to our last parametrization, the foreign ones in it, the rest."""
    last = ours[-1][0]
    head = list(plist)[: last + 1]
    return head, [p for j, p in foreign if j < last], list(plist)[last + 1 :]


def fresh_class(module: nn.Module) -> None:
    """Give ``module`` its own copy of parametrize's injected class.

    ``copy.deepcopy`` shares the injected class between a model and its copy,
    and ``parametrize.remove_parametrizations`` deletes the property from that
    class, which would break the other copy.
    """
    cls = module.__class__
    ns = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, ns)


class Keep(nn.Module):
    """Identity with an identity ``right_inverse``: registers a given value as a chain's original."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x
