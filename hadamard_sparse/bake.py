"""Baking: replace this library's parametrizations by their values (:func:`remove_parametrizations`).

:func:`remove_parametrizations` is the public verb (it checks its arguments);
:func:`bake` is the unchecked worker that :mod:`hadamard_sparse.export` calls on
its own deep copies. The worker's body lives in :mod:`hadamard_sparse.checkpoint`
for now, next to the chain helpers it shares with the ``state_dict`` hooks.
"""

from __future__ import annotations

import numbers

from torch import nn

from ._checks import check_module
from .checkpoint import bake
from .errors import InvalidArgumentError

__all__ = ["bake", "remove_parametrizations"]


def remove_parametrizations(model: nn.Module, threshold: float = 0.0) -> nn.Module:
    r"""Bake: replace every parametrization of this library by its current value, in place.

    Each parametrized tensor whose chain holds one of our parametrizations
    becomes a plain Parameter again (the same Parameter object when the chain
    has a single original), holding exactly the effective sparse weight.
    Modules get their original classes back, so ``pickle``, ``torch.save``,
    ``torch.jit.script`` and ``torch.export`` work. Baking a ``copy.deepcopy``
    leaves the source model untouched.

    Parametrizations of other libraries stay in place with the same outputs:
    on other tensors they are not touched; in the same chain as ours (a mask
    stacked on ``weight_norm``, as in wav2vec2's positional convolution) the
    value after our last parametrization is assigned through their
    ``right_inverse`` (their originals become new Parameters), and the ones
    after ours keep it as their input. A chain whose foreign parametrizations
    cannot represent that value (``orthogonal`` or ``spectral_norm`` before a
    mask, ``weight_norm`` with an entirely pruned slice) is refused before
    anything changes.

    Args:
        model: the parametrized model.
        threshold: after baking, entries with ``|w| <= threshold`` become exactly 0 (a real number
            ``>= 0``, not NaN). Default ``0.0`` leaves values untouched.

    Returns:
        ``model``, baked.

    Raises:
        HadamardSparseError: listing the chains that cannot be baked with their foreign
            parametrizations kept; the model is then unchanged.

    Example::

        >>> baked = remove_parametrizations(sparsify(model, 0.9))
        >>> type(baked[0]) is torch.nn.Linear
        True
    """
    check_module(model)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 0:
        raise InvalidArgumentError(f"threshold must be a real number >= 0, got {threshold!r}")
    return bake(model, float(threshold))
