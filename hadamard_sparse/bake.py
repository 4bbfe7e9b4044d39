"""Baking: replace this library's parametrizations by their values (:func:`remove_parametrizations`).

:func:`remove_parametrizations` is the public verb (it checks its arguments);
:func:`bake` is the unchecked worker that :mod:`hadamard_sparse.export` calls on
its own deep copies.
"""

from __future__ import annotations

import copy
import numbers

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._chains import Keep, current_originals, forward, fresh_class, right_inverse, split_at_ours, split_chain
from ._checks import check_module
from ._model_io import eval_mode, join_name
from .checkpoint import drop_load_hook
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


def bake(model: nn.Module, threshold: float) -> nn.Module:
    """Replace every parametrization of ours by its value, leaving other libraries' in place.

    A chain ``[head..., tail...]`` split after our last parametrization is baked into the value
    ``Y`` of its head. Foreign parametrizations of the head are registered again with ``Y``
    assigned through their ``right_inverse`` (checked to reproduce ``Y`` before anything
    changes); the tail is appended unchanged with ``Y`` as its input, so outputs are kept.
    """
    work: list[tuple[nn.Module, str, list[nn.Module], list[nn.Module], torch.Tensor | None]] = []
    problems: list[str] = []
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tname, plist in module.parametrizations.items():  # type: ignore[union-attr]
            ours, foreign = split_chain(plist)
            if not ours:
                continue
            if not foreign:
                work.append((module, tname, [], [], None))
                continue
            head_chain, theirs_in_head, tail = split_at_ours(plist, ours, foreign)
            with torch.no_grad(), eval_mode(*[p for _, p in foreign]):
                value = forward(head_chain, current_originals(plist)).detach().clone()
                if threshold > 0:
                    value.masked_fill_(value.abs() <= threshold, 0.0)
                lacking = [type(p).__name__ for p in theirs_in_head if not hasattr(p, "right_inverse")]
                ok = not lacking
                if theirs_in_head and ok:
                    chain = copy.deepcopy(theirs_in_head)  # right_inverse may update their state
                    again = forward(chain, right_inverse(chain, value))
                    ok = again.shape == value.shape and bool(torch.allclose(again, value))
            if not ok:
                qualified = join_name(mod_name, tname)
                why = (
                    f"{lacking} have no right_inverse"
                    if lacking
                    else "their right_inverse cannot reproduce the masked value (e.g. weight_norm with an "
                    "entirely pruned slice, spectral_norm or orthogonal before a mask)"
                )
                problems.append(
                    f"{qualified}: its chain {[type(p).__name__ for p in plist]} also holds parametrizations of "
                    f"another library before ours and {why}; remove theirs first "
                    f"(torch.nn.utils.parametrize.remove_parametrizations(module, {tname!r}, leave_parametrized=True))"
                )
                continue
            work.append((module, tname, theirs_in_head, tail, value))
    if problems:
        raise InvalidArgumentError("cannot bake:\n  " + "\n  ".join(problems))
    done: set[int] = set()
    for module, tname, theirs_in_head, tail, value in work:
        if id(module) not in done:
            fresh_class(module)
            done.add(id(module))
        if value is None:
            parametrize.remove_parametrizations(module, tname, leave_parametrized=True)
            if threshold > 0:
                with torch.no_grad():
                    t = getattr(module, tname)
                    t.masked_fill_(t.abs() <= threshold, 0.0)
            drop_load_hook(module)
            continue
        with eval_mode(*theirs_in_head, *tail):
            parametrize.remove_parametrizations(module, tname, leave_parametrized=True)
        first = theirs_in_head or [Keep()]
        for p in first:
            parametrize.register_parametrization(module, tname, p, unsafe=True)
        with torch.no_grad():
            setattr(
                module, tname, value
            )  # their right_inverse receives the value of our last parametrization
        for p in tail:
            parametrize.register_parametrization(module, tname, p, unsafe=True)
        if not theirs_in_head:
            del module.parametrizations[tname][0]  # type: ignore[index, union-attr]  # the Keep
        drop_load_hook(module)
    return model
