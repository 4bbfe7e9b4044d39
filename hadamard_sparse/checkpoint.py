r"""Checkpoints: a ``state_dict`` of plain tensors that every loader understands.

A module parametrized by this library carries two hooks. Its ``state_dict``
post-hook rewrites the entries of each parametrized tensor ``fc.weight`` so
that the checkpoint looks like the baked model's plus a few extra tensors:

=============================  ====================================================================
key                            value
=============================  ====================================================================
``fc.weight``                  the effective tensor (``w ⊙ m``, ``u ⊙ v``, fake-quantized, ...)
``fc.weight_mask``             the ``torch.bool`` mask as stored (full or broadcastable shape)
``fc.weight_fake_quant``       ``int64 [bits, channel_dim or -1, position in the chain]``
``fc.weight_factorization``    ``int64 [depth, group code, group_dim or -1, init code]``
``fc.weight_factor0``, ...     the factors of a factorization (``fc.weight_group_index``: its map)
=============================  ====================================================================

So ``from_pretrained`` or ``load_state_dict`` of a plain model (this library
not imported) loads the sparse model's outputs (the extra keys are merely
unexpected), and :func:`load_sparse_state_dict` rebuilds the parametrizations
on a fresh model bitwise. The dense values at pruned positions are *not*
saved: ``original`` is restored as the effective tensor, zero where masked.
``fc.weight_mask`` is the name :mod:`torch.nn.utils.prune` uses, and its
checkpoints (``fc.weight_orig`` + a 0/1 float ``fc.weight_mask``) load too,
dense values included.

When the tensor also carries parametrizations of other libraries (``weight_norm``
on wav2vec2's positional convolution, ``spectral_norm``, ``orthogonal``, ...),
those stay in the checkpoint under their own keys (renumbered without ours) with
their originals computed by their ``right_inverse`` from the effective value,
exactly as in the baked model.

The load pre-hook maps all of this back (``original ← right_inverse(effective)``,
``mask ← fc.weight_mask``), so ``model.load_state_dict(model.state_dict())``
round-trips and a dense pretrained checkpoint loads into a sparsified model with
``strict=True``, keeping its masks.

The two hooks live in :mod:`hadamard_sparse.plain_view`; each parametrization writes and reads its
own record (the checkpoint protocol of
:class:`~hadamard_sparse.parametrizations.SparseParametrization`).
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._chains import (
    is_ours,
    tensor_shape,
)
from ._model_io import join_name
from .errors import InvalidArgumentError, InvalidTypeError
from .parametrizations import SparseParametrization
from .plain_view import load_state_dict_hook, state_dict_hook

__all__ = ["load_sparse_state_dict"]

_HOOK_ATTR = "_hadamard_sparse_hooks"


# ----------------------------------------------------------------------------------------------
# hooks
# ----------------------------------------------------------------------------------------------


def _record_lookup(parent_getattr: Any) -> Any:
    """A ``__getattr__`` that falls back to the module's ``state_dict`` records of our tensors.

    ``module.<tensor>_<suffix>`` then resolves to that record: tools that map every ``state_dict``
    key to a module attribute (torch's ``torch.distributed.checkpoint.state_dict.get_model_state_dict``
    and ``get_state_dict``, used by FSDP2 and accelerate recipes) accept a sparse model. Only a miss
    that names a record of one of our tensors computes anything.
    """

    def __getattr__(self: nn.Module, name: str) -> Any:
        try:
            return parent_getattr(self, name)
        except AttributeError:
            plists = self.__dict__.get("_modules", {}).get("parametrizations")
            if plists is not None and any(
                name.startswith(t + "_") and is_ours(pl) for t, pl in plists.items()
            ):
                value = self.state_dict().get(name)
                if value is not None:
                    return value
            raise

    return __getattr__


def _resolve_records_as_attributes(module: nn.Module) -> None:
    """Give ``module``'s parametrized class (its own, injected by parametrize) the record lookup."""
    cls = type(module)
    if cls is not parametrize.type_before_parametrizations(module) and "__getattr__" not in cls.__dict__:
        cls.__getattr__ = _record_lookup(cls.__mro__[1].__getattr__)  # type: ignore[method-assign]


def ensure_load_hook(module: nn.Module) -> None:
    """Register the checkpoint hooks (``state_dict`` post-hook, load pre-hook) on ``module`` once."""
    _resolve_records_as_attributes(module)
    if getattr(module, _HOOK_ATTR, None) is not None:
        return
    save = module.register_state_dict_post_hook(state_dict_hook)
    load = module.register_load_state_dict_pre_hook(load_state_dict_hook)
    object.__setattr__(module, _HOOK_ATTR, (save.id, load.id))


def drop_load_hook(module: nn.Module) -> None:
    """Remove the checkpoint hooks once ``module`` has no parametrization of ours left."""
    ids = getattr(module, _HOOK_ATTR, None)
    if ids is None:
        return
    if parametrize.is_parametrized(module) and any(
        is_ours(pl)
        for pl in module.parametrizations.values()  # type: ignore[union-attr]
    ):
        return
    module._state_dict_hooks.pop(ids[0], None)
    module._load_state_dict_pre_hooks.pop(ids[1], None)
    del module.__dict__[_HOOK_ATTR]


# ----------------------------------------------------------------------------------------------
# load_sparse_state_dict
# ----------------------------------------------------------------------------------------------


def _tensor_names(module: nn.Module) -> set[str]:
    names = {k for k, v in module._parameters.items() if v is not None}
    if parametrize.is_parametrized(module):
        names |= set(module.parametrizations.keys())  # type: ignore[union-attr]
    return names


def record_key_pattern() -> re.Pattern[str]:
    """``"<tensor>_<suffix>"`` for the suffixes of our records, their originals and torch prune's ``"orig"``."""
    types = SparseParametrization.record_types().values()
    alts = sorted(
        {re.escape(s) for cls in types for s in cls.RECORD_SUFFIXES} | {"orig"}, key=len, reverse=True
    )
    alts += [rf"{re.escape(cls.RECORD_ORIGINALS)}\d+" for cls in types if cls.RECORD_ORIGINALS]
    return re.compile(rf"^(?P<tensor>.+)_(?P<suffix>{'|'.join(alts)})$")


def _records(
    model: nn.Module, state_dict: Mapping[str, Any], modules: dict[str, nn.Module]
) -> dict[tuple[str, str], dict[str, str]]:
    """``{(module name, tensor name): {suffix: key}}`` for every record key of ``state_dict`` (one pass)."""
    record_key = record_key_pattern()
    tensors: dict[int, set[str]] = {}
    out: dict[tuple[str, str], dict[str, str]] = {}
    for key in state_dict:
        mod_name, _, leaf = key.rpartition(".")
        m = record_key.match(leaf)
        if m is None:
            continue
        suffix = m.group("suffix")
        module = modules.get(mod_name)
        if module is None or leaf in module._parameters or leaf in module._buffers or leaf in module._modules:
            continue
        names = tensors.get(id(module))
        if names is None:
            names = tensors[id(module)] = _tensor_names(module)
        if m.group("tensor") not in names:
            continue
        out.setdefault((mod_name, m.group("tensor")), {})[suffix] = key
    return out


def _hf_saved_names(model: nn.Module, current: Mapping[str, Any]) -> dict[str, str]:
    """``{name in the file: name in the model}`` where Hugging Face ``save_pretrained`` renames keys.

    transformers 5 saves some models (ViT, ...) in their original key format and renames on load.
    The renaming is read off transformers' own reverse conversion, matching tensors by identity;
    empty for other models, or when transformers does not offer it.
    """
    tf = sys.modules.get("transformers")
    if tf is None or not isinstance(model, getattr(tf, "PreTrainedModel", ())):
        return {}
    try:
        revert = importlib.import_module("transformers.core_model_loading").revert_weight_conversion
        saved = revert(model, dict(current))
    except Exception:  # an internal API of transformers: absent or changed means no renaming
        return {}
    by_id = {id(v): k for k, v in current.items()}
    return {k: by_id[id(v)] for k, v in saved.items() if by_id.get(id(v), k) != k}


def _renamed(state_dict: Mapping[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """``state_dict`` with the model's names: a tensor's key and its record keys (``"<tensor>_mask"``...)."""
    record_key = record_key_pattern()
    out = {}
    for key, value in state_dict.items():
        new = names.get(key)
        if new is None:
            m = record_key.match(key)
            if m is not None and m.group("tensor") in names:
                new = f"{names[m.group('tensor')]}_{m.group('suffix')}"
        out[new or key] = value
    return out


def load_sparse_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any], *, strict: bool = True
) -> nn.Module:
    r"""Load a state_dict saved from a sparsified model into a fresh, unmodified model.

    The parametrizations recorded in ``state_dict`` (``"<tensor>_mask"``,
    ``"<tensor>_factorization"``, ``"<tensor>_fake_quant"`` entries, see
    :mod:`hadamard_sparse.checkpoint`) are registered on ``model`` first, then
    the state_dict is loaded: masks are restored bitwise (kept weights that are
    exactly zero stay kept) and the weights hold the effective values. Tensors
    that are already parametrized the same way are reused. A
    :mod:`torch.nn.utils.prune` checkpoint (``"<tensor>_orig"`` and a 0/1
    ``"<tensor>_mask"``) loads too, dense values included.

    Every key, shape and dtype is checked before ``model`` is touched: a refused
    state_dict leaves the model exactly as it was. Time is linear in the number
    of entries. A Hugging Face model whose ``save_pretrained`` writes another key
    format (transformers 5 saves ViT and others in their original format) gets
    the file's keys renamed the way ``from_pretrained`` renames them.

    Args:
        model: a model with the same architecture as the one that was saved.
        state_dict: the output of ``sparsified_model.state_dict()``, e.g. read back with
            ``torch.load`` or ``safetensors.torch.load_file``.
        strict: refuse missing and unexpected keys, as :meth:`torch.nn.Module.load_state_dict` does.

    Returns:
        ``model``, parametrized and loaded.

    Raises:
        HadamardSparseError: listing every entry that does not fit.

    Example::

        >>> sd = hs.sparsify(make_model(), 0.7).state_dict()
        >>> fresh = hs.load_sparse_state_dict(make_model(), sd)
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise InvalidTypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    if not isinstance(strict, bool):
        raise InvalidTypeError(f"strict must be a bool, got {strict!r}")
    modules = dict(model.named_modules(remove_duplicate=False))
    current = model.state_dict(keep_vars=True)
    if any(k not in current for k in state_dict):
        names = _hf_saved_names(model, current)
        if names:
            state_dict = _renamed(state_dict, names)
    problems: list[str] = []
    legacy = [k for k in state_dict if k.endswith("._extra_state") and ".parametrizations." in k]
    if legacy:
        problems.append(
            f"{legacy[0]}: a checkpoint of hadamard_sparse 0.1 (records in '_extra_state'); load it into a "
            "model sparsified the same way with model.load_state_dict(...), then save it again"
        )
    plan: list[tuple[nn.Module, str, list[SparseParametrization], bool]] = []
    consumed: set[str] = set()
    optional: set[str] = set()  # record keys of tensors already parametrized: a dense checkpoint keeps them
    for (mod_name, tname), keys in _records(model, state_dict, modules).items():
        module = modules[mod_name]
        qualified = join_name(mod_name, tname)
        head = f"{qualified}_"
        types = [cls for s, cls in SparseParametrization.record_types().items() if s in keys]
        if not types:
            if "orig" in keys and "mask" not in keys:
                problems.append(f"{head}orig: torch.nn.utils.prune's dense values without {head}mask")
            elif "orig" not in keys:
                problems.append(f"{sorted(keys.values())}: records without their declaring entry")
            continue
        consumed.update(keys.values())
        if "orig" in keys:
            consumed.add(qualified)  # prune's checkpoint has no plain entry
        chain = module.parametrizations[tname] if parametrize.is_parametrized(module, tname) else None  # type: ignore[index, union-attr]
        ours = [] if chain is None else [p for p in chain if isinstance(p, SparseParametrization)]
        if ours:
            if sorted(type(p).__name__ for p in ours) != sorted(c.__name__ for c in types):
                problems.append(
                    f"{qualified}: already parametrized with {[type(p).__name__ for p in ours]}, the state_dict "
                    f"records {[c.__name__ for c in types]}"
                )
            continue  # the load hook checks and loads the records
        if chain is None and not isinstance(module._parameters.get(tname), nn.Parameter):
            problems.append(f"{qualified}: not an nn.Parameter of {type(module).__name__}")
            continue
        shape = module._parameters[tname].shape if chain is None else tensor_shape(module, tname)
        built: list[tuple[int | None, SparseParametrization]] = []
        for cls in types:
            record = {s: state_dict[keys[s]] for s in cls.RECORD_SUFFIXES if s in keys}
            try:
                p, pos = cls.from_record(record, shape, keys[cls.RECORD_SUFFIXES[0]])
                built.append((pos, p))
            except (ValueError, TypeError) as e:
                problems.append(str(e))
        if len(built) != len(types):
            continue
        if chain is not None and any(c.RECORD_ORIGINALS for c in types):
            problems.append(
                f"{qualified}: a factorization must be first in its chain, the tensor is already parametrized"
            )
            continue
        plan.append((module, tname, _ordered(built), chain is not None))
    # keys, shapes and dtypes of everything, against the model's own plain view
    for keys in _records(model, current, modules).values():
        optional.update(keys.values())
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key}: a {type(value).__name__}, state_dicts hold tensors")
            continue
        if key in consumed:
            continue
        ref = current.get(key)
        if ref is None:
            if strict:
                problems.append(f"{key}: unexpected (the model has no such entry)")
            continue
        if value.shape != ref.shape:
            problems.append(f"{key}: shape {tuple(value.shape)}, the model's is {tuple(ref.shape)}")
        elif (value.dtype == torch.bool) != (ref.dtype == torch.bool) or (
            value.is_floating_point() and not (ref.is_floating_point() or ref.is_complex())
        ):
            problems.append(f"{key}: dtype {value.dtype}, the model's is {ref.dtype}")
    if strict:
        present = {id(current[k]) for k in state_dict if k in current}
        missing = [
            k
            for k in current
            if k not in state_dict
            and k not in optional
            and k not in consumed
            and id(current[k]) not in present  # tied to a loaded tensor (save_pretrained keeps one name)
            and not k.endswith("num_batches_tracked")  # BatchNorm fills it in
        ]
        problems.extend(f"{k}: missing" for k in missing)
    if problems:
        raise InvalidArgumentError("state_dict does not fit the model:\n  " + "\n  ".join(problems))
    for module, tname, chain, _ in plan:
        for p in chain:
            parametrize.register_parametrization(module, tname, p, unsafe=True)
        ensure_load_hook(module)
    # Everything was checked above, including what torch's strict mode would refuse except tied
    # tensors saved once (which it would report missing although they are loaded).
    model.load_state_dict(state_dict, strict=False)
    return model


def _ordered(built: list[tuple[int | None, SparseParametrization]]) -> list[SparseParametrization]:
    """Place the parametrizations with a recorded position there, the others in the free slots."""
    slots: list[SparseParametrization | None] = [None] * len(built)
    free = []
    for pos, p in built:
        if pos is not None and pos < len(slots) and slots[pos] is None:
            slots[pos] = p
        else:
            free.append(p)
    it = iter(free)
    return [s if s is not None else next(it) for s in slots]
