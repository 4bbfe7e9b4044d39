"""What the exports do with a masked model: they bake it (one rule, shared by ``shrink`` and ``to_sparse``).

A model still holding parametrizations of this library (masks, factorizations, fake quantization)
computes with its effective weights; :func:`~hadamard_sparse.shrink` and
:func:`~hadamard_sparse.to_sparse` both export exactly those weights. Each works on a baked
copy (:func:`baked_copy`), so every check and refusal happens before ``model`` changes; once
the work is accepted, ``model`` itself is baked in place (:func:`bake`) and the converted
layers are swapped in. Parametrizations of other libraries (``weight_norm``) are kept, as
:func:`~hadamard_sparse.remove_parametrizations` keeps them.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import parametrize

from ..bake import remove_parametrizations
from ..parametrizations import SparseParametrization

__all__ = ["bake", "baked_copy", "holds_masks"]


def holds_masks(model: nn.Module) -> bool:
    """Whether some tensor of ``model`` is still parametrized by this library (masked, factorized...)."""
    for mod in model.modules():
        if parametrize.is_parametrized(mod):
            chains = mod.parametrizations.values()  # type: ignore[union-attr]
            if any(isinstance(p, SparseParametrization) for chain in chains for p in chain):
                return True
    return False


def baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with this library's parametrizations baked (``model`` is not changed)."""
    return remove_parametrizations(copy.deepcopy(model))


def bake(model: nn.Module) -> nn.Module:
    """Bake this library's parametrizations of ``model`` in place (after the export's checks passed)."""
    return remove_parametrizations(model)
