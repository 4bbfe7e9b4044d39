"""The plain view of a parametrized tensor in a ``state_dict``: written by a post-hook, read back by a pre-hook.

:mod:`hadamard_sparse.checkpoint` registers :func:`state_dict_hook` and :func:`load_state_dict_hook`
on every module this library parametrizes (and documents the format). The post-hook rewrites the
entries of each tensor whose chain holds parametrizations of ours into the baked model's entries
plus the records of ours (``"<tensor>_<suffix>"``, see
:class:`~hadamard_sparse.parametrizations.SparseParametrization`); the pre-hook maps them (or a
dense checkpoint) back into the parametrizations' internal keys.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._chains import (
    current_originals,
    forward,
    original_keys,
    put_originals,
    right_inverse,
    split_at_ours,
    split_chain,
    tensor_shape,
)
from ._model_io import eval_mode
from .errors import InvalidArgumentError
from .parametrizations import SparseParametrization

__all__ = ["load_state_dict_hook", "state_dict_hook"]

_MISSING = object()


# ----------------------------------------------------------------------------------------------
# state_dict: write the plain view
# ----------------------------------------------------------------------------------------------


def state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` post-hook: each tensor parametrized by us as its baked entry plus our records.

    Args:
        module: the module whose entries (under ``prefix``) are rewritten in place in ``state_dict``.
        state_dict: the dict being built by :meth:`torch.nn.Module.state_dict`.
        prefix: ``module``'s key prefix (``"encoder.fc."``).
        local_metadata: unused (the hook signature of torch).
    """
    if not parametrize.is_parametrized(module):
        return
    for name, plist in module.parametrizations.items():  # type: ignore[union-attr]
        ours, foreign = split_chain(plist)
        if ours:
            _write_plain_view(module, name, plist, ours, foreign, state_dict, prefix)


def _write_plain_view(
    module: nn.Module,
    name: str,
    plist: nn.Module,
    ours: list[tuple[int, SparseParametrization]],
    foreign: list[tuple[int, nn.Module]],
    state_dict: dict[str, Any],
    prefix: str,
) -> None:
    base = f"{prefix}parametrizations.{name}."
    originals = [state_dict.pop(k, None) for k in original_keys(base, plist)]
    keep_vars = isinstance(originals[0], nn.Parameter)
    own_state: dict[int, dict[str, Any]] = {}
    for j, p in enumerate(plist):
        local = {}
        for k in p.state_dict(keep_vars=True):
            v = state_dict.pop(f"{base}{j}.{k}", _MISSING)
            if v is not _MISSING:
                local[k] = v
        own_state[j] = local
    with torch.no_grad():
        if not foreign:
            state_dict[prefix + name] = getattr(module, name).detach()
        else:
            # The baked model's view: their chain (ours removed) holding the value after our last one.
            head_chain, theirs_in_head, _ = split_at_ours(plist, ours, foreign)
            with eval_mode(*[p for _, p in foreign]):
                value = forward(head_chain, current_originals(plist)).detach()
            # Their right_inverse may update their own state (orthogonal does): run it on copies.
            copies = {id(p): copy.deepcopy(p) for p in theirs_in_head}
            chain = [copies[id(p)] for p in theirs_in_head]
            put_originals(state_dict, base, right_inverse(chain, value) if chain else value)
            for new, (j, p) in enumerate(foreign):
                local = copies[id(p)].state_dict() if id(p) in copies else own_state[j]
                for k, v in local.items():
                    state_dict[f"{base}{new}.{k}"] = v
    head = f"{prefix}{name}_"
    for position, (_, p) in enumerate(ours):
        for suffix, t in p.record(position).items():
            state_dict[head + suffix] = t if keep_vars else t.detach()
    first = ours[0][1]
    if ours[0][0] == 0 and first.RECORD_ORIGINALS is not None:
        for i, t in enumerate(originals):
            state_dict[f"{head}{first.RECORD_ORIGINALS}{i}"] = t


# ----------------------------------------------------------------------------------------------
# load_state_dict: map the plain view (or a dense checkpoint) back into the parametrizations
# ----------------------------------------------------------------------------------------------


def load_state_dict_hook(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``load_state_dict`` pre-hook: the plain view (or a dense checkpoint) back into our internal keys.

    The arguments are those of :meth:`torch.nn.Module._load_from_state_dict`; ``state_dict`` is
    rewritten in place. Raises :class:`~hadamard_sparse.errors.InvalidArgumentError` when a record
    does not fit the registered parametrization.
    """
    if not parametrize.is_parametrized(module):
        return
    for name, plist in module.parametrizations.items():  # type: ignore[union-attr]
        ours, foreign = split_chain(plist)
        if ours:
            _read_plain_view(module, name, plist, ours, foreign, state_dict, prefix)


def _read_plain_view(
    module: nn.Module,
    name: str,
    plist: nn.Module,
    ours: list[tuple[int, SparseParametrization]],
    foreign: list[tuple[int, nn.Module]],
    state_dict: dict[str, Any],
    prefix: str,
) -> None:
    base = f"{prefix}parametrizations.{name}."
    head = f"{prefix}{name}_"
    # Checkpoints of hadamard_sparse 0.1 stored a dict per parametrization under "_extra_state";
    # their other keys are the internal ones, which load as they are.
    legacy = False
    for j, _ in ours:
        legacy |= state_dict.pop(f"{base}{j}._extra_state", _MISSING) is not _MISSING
    # 1. records of ours -> their own state (masks, group maps), checked against the live configuration
    for position, (j, p) in enumerate(ours):
        record = {s: state_dict.pop(head + s) for s in p.RECORD_SUFFIXES if head + s in state_dict}
        try:
            local = p.record_to_state(record, position, head + p.RECORD_SUFFIXES[0])
        except (ValueError, TypeError) as e:
            raise InvalidArgumentError(f"state_dict does not fit {prefix}{name}: {e}") from None
        for k, v in local.items():
            state_dict[f"{base}{j}.{k}"] = v
    # 2. originals
    first = ours[0][1] if ours[0][0] == 0 else None
    factor_keys = []
    if first is not None and first.RECORD_ORIGINALS is not None:
        factor_keys = [f"{head}{first.RECORD_ORIGINALS}{i}" for i in range(plist.ntensors)]
    value_key = prefix + name
    dense = state_dict.pop(head + "orig", _MISSING)  # torch.nn.utils.prune's dense values
    effective = state_dict.pop(value_key, _MISSING)
    source = dense if dense is not _MISSING else effective
    if factor_keys and all(k in state_dict for k in factor_keys):
        for k in [base + "original", *(f"{base}original{i}" for i in range(plist.ntensors))]:
            state_dict.pop(k, None)  # a foreign view's originals, computed from the product
        put_originals(state_dict, base, [state_dict.pop(k) for k in factor_keys])
    elif source is not _MISSING:
        shape = tensor_shape(module, name)
        if not isinstance(source, torch.Tensor) or source.shape != shape:
            got = tuple(source.shape) if isinstance(source, torch.Tensor) else type(source).__name__
            raise InvalidArgumentError(
                f"state_dict entry {value_key!r} does not fit: expected a tensor of shape {tuple(shape)}, got {got}"
            )
        with torch.no_grad():
            put_originals(state_dict, base, right_inverse(list(plist), source))
    # else: the originals are under their internal keys (a foreign view: ours have identity right_inverse,
    # so their chain's originals are the whole chain's)
    if foreign and not legacy:
        # Their state was numbered without ours: move it to the chain's indices.
        moved = {}
        for new, (j, p) in enumerate(foreign):
            if new != j:
                for k in p.state_dict(keep_vars=True):
                    v = state_dict.pop(f"{base}{new}.{k}", _MISSING)
                    if v is not _MISSING:
                        moved[f"{base}{j}.{k}"] = v
        state_dict.update(moved)
    # 3. keep the current state of ours where the checkpoint has none (a dense checkpoint keeps the masks)
    for j, p in ours:
        for k, v in p.state_dict().items():
            state_dict.setdefault(f"{base}{j}.{k}", v)
