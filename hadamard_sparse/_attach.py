"""Attaching masks: register (or update) a :class:`HadamardMask`, and undo what a pruner attached.

:func:`attach_mask` is what :func:`~hadamard_sparse.register_mask` and
:func:`~hadamard_sparse.sparsify` do after their checks: it registers a mask on a
tensor, or updates the existing one in place (masks never stack). A weight-editing
pruner (SparseGPT, OBS, ...) applies its results through :func:`run_pruner`, which
journals every tensor it touches and restores them all if the pruner raises, so a
refused call still leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._engine import broadcasts_to, mask_of
from .checkpoint import drop_load_hook, ensure_load_hook
from .errors import InvalidArgumentError
from .layers import Target
from .parametrizations import HadamardMask

__all__ = ["apply_pruned", "attach_mask", "run_pruner"]


def attach_mask(module: nn.Module, name: str, mask: torch.Tensor) -> HadamardMask:
    """Register ``mask`` on ``module.<name>``, or copy it into the mask already there.

    Args:
        module: the module owning the tensor.
        name: the tensor's attribute name.
        mask: a bool tensor already checked against the tensor (full or broadcastable shape).

    Returns:
        The new or existing :class:`HadamardMask`.

    Example::

        >>> lin = torch.nn.Linear(4, 3)
        >>> pm = attach_mask(lin, "weight", torch.ones(3, 4, dtype=torch.bool))
        >>> pm is attach_mask(lin, "weight", torch.zeros(3, 4, dtype=torch.bool))
        True
    """
    existing = mask_of(module, name)
    if existing is not None:
        with torch.no_grad():
            if broadcasts_to(mask.shape, existing.mask.shape):
                existing.mask.copy_(mask)  # a compact (structured) mask may fill a larger buffer
            else:
                raise InvalidArgumentError(
                    f"mask has shape {tuple(mask.shape)} but {name} already has a mask of shape "
                    f"{tuple(existing.mask.shape)}; masks are updated in place and keep their shape"
                )
        return existing
    pm = HadamardMask(mask.to(getattr(module, name).device))
    parametrize.register_parametrization(module, name, pm)
    ensure_load_hook(module)
    return pm


def apply_pruned(t: Target, keep: torch.Tensor, dense: torch.Tensor) -> None:
    """Register ``keep`` on ``t`` and write ``dense`` into its original (for weight-editing pruners)."""
    attach_mask(t.module, t.tensor_name, keep)
    with torch.no_grad():
        t.module.parametrizations[t.tensor_name].original.copy_(dense)  # type: ignore[index, union-attr]


class _Undo:
    """What ``apply_pruned`` changed on one tensor, to put it back if a pruner raises later."""

    def __init__(self, t: Target) -> None:
        self.t = t
        m = mask_of(t.module, t.tensor_name)
        self.added = m is None
        self.was_parametrized = parametrize.is_parametrized(t.module, t.tensor_name)
        self.order = list(t.module._parameters)
        self.mask = None if m is None else m.mask.clone()
        with torch.no_grad():
            if self.was_parametrized:
                self.original = t.module.parametrizations[t.tensor_name].original.detach().clone()  # type: ignore[index, union-attr]
            else:
                self.original = getattr(t.module, t.tensor_name).detach().clone()

    def restore(self) -> None:
        module, name = self.t.module, self.t.tensor_name
        with torch.no_grad():
            if self.added and not self.was_parametrized:
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                drop_load_hook(module)
                params = dict(module._parameters)  # put the Parameter back at its place (state_dict order)
                module._parameters.clear()
                module._parameters.update({k: params[k] for k in self.order if k in params})
                module._parameters.update(params)
                getattr(module, name).copy_(self.original)
                return
            plist = module.parametrizations[name]  # type: ignore[index, union-attr]
            if self.added:  # the chain had other parametrizations: drop only the mask appended to it
                del plist[-1]
            plist.original.copy_(self.original)
            m = mask_of(module, name)
            if m is not None and self.mask is not None:
                m.mask.copy_(self.mask)


def run_pruner(
    pruner: Any, model: nn.Module, targets: Sequence[Target], sparsities: list[float], **kw: Any
) -> None:
    """Run a weight-editing pruner; if it raises, undo every tensor it already applied, then re-raise.

    Args:
        pruner: the score entry's pruner, called as ``pruner(model, targets, sparsities, apply=..., **kw)``.
        model: the model being pruned.
        targets: the tensors to prune, in order.
        sparsities: one sparsity per target.
        kw: the pruner's keyword arguments (``scope``, ``structure``, ``calibration``, ...).
    """
    journal: list[_Undo] = []

    def apply(t: Target, keep: torch.Tensor, dense: torch.Tensor) -> None:
        journal.append(_Undo(t))
        apply_pruned(t, keep, dense)

    try:
        pruner(model, list(targets), sparsities, apply=apply, **kw)
    except BaseException:
        for undo in reversed(journal):
            undo.restore()
        raise
