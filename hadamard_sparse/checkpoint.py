"""Checkpoints: dense state_dicts into parametrized models, sparse state_dicts into plain ones.

A load pre-hook on every module we parametrize maps a dense entry
(``"fc.weight"``) to the parametrization's original(s) (``"fc.parametrizations.weight.original"``),
through the chain's ``right_inverse``, and keeps the current masks, so a dense
pretrained checkpoint loads into a sparsified model with ``strict=True``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .parametrizations import _SparseParametrization

__all__ = ["load_sparse_state_dict"]

_HOOK_ATTR = "_hadamard_sparse_load_hook"


def _is_ours(plist: nn.Module) -> bool:
    return any(isinstance(p, _SparseParametrization) for p in plist)


def _dense_to_parametrized_hook(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    if not parametrize.is_parametrized(module):
        return
    for name, plist in module.parametrizations.items():  # type: ignore[union-attr]
        key = prefix + name
        if key not in state_dict or not _is_ours(plist):
            continue
        value = state_dict.pop(key)
        base = f"{prefix}parametrizations.{name}."
        with torch.no_grad():
            originals: Any = value
            for p in reversed(plist):
                if hasattr(p, "right_inverse"):
                    originals = p.right_inverse(originals)
        if plist.is_tensor:
            state_dict[base + "original"] = originals
        else:
            for i, t in enumerate(originals):
                state_dict[f"{base}original{i}"] = t
        # Keep the current masks and other parametrization state.
        for k, v in plist.state_dict(prefix=base, keep_vars=False).items():
            if k.split(".")[-1].startswith("original"):
                continue
            state_dict.setdefault(k, v)


def ensure_load_hook(module: nn.Module) -> None:
    """Register the dense-checkpoint pre-hook on ``module`` once."""
    if getattr(module, _HOOK_ATTR, None) is not None:
        return
    handle = module.register_load_state_dict_pre_hook(_dense_to_parametrized_hook)
    object.__setattr__(module, _HOOK_ATTR, handle.id)


def drop_load_hook(module: nn.Module) -> None:
    """Remove the pre-hook once ``module`` has no parametrization of ours left."""
    hook_id = getattr(module, _HOOK_ATTR, None)
    if hook_id is None:
        return
    if parametrize.is_parametrized(module) and any(
        _is_ours(pl)
        for pl in module.parametrizations.values()  # type: ignore[union-attr]
    ):
        return
    module._load_state_dict_pre_hooks.pop(hook_id, None)
    del module.__dict__[_HOOK_ATTR]


_PARAM_KEY = re.compile(
    r"^(?:(?P<mod>.*)\.)?parametrizations\.(?P<tensor>[^.]+)\.(?P<idx>\d+)\._extra_state$"
)


def load_sparse_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any], *, strict: bool = True
) -> nn.Module:
    r"""Load a state_dict saved from a sparsified model into a fresh, unmodified model.

    The parametrizations recorded in ``state_dict`` (masks, factorizations, ...)
    are registered on ``model`` first, then the state_dict is loaded. Tensors
    that are already parametrized the same way are reused. Every entry is
    checked before ``model`` is touched.

    Args:
        model: a model with the same architecture as the one that was saved.
        state_dict: the output of ``sparsified_model.state_dict()``.
        strict: passed to :meth:`torch.nn.Module.load_state_dict`.

    Returns:
        ``model``, parametrized and loaded.

    Example::

        >>> sd = hs.sparsify(make_model(), 0.7).state_dict()
        >>> fresh = hs.load_sparse_state_dict(make_model(), sd)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    plan: dict[tuple[str, str], list[tuple[int, _SparseParametrization]]] = {}
    problems: list[str] = []
    modules = dict(model.named_modules())
    for key, extra in state_dict.items():
        m = _PARAM_KEY.match(key)
        if m is None:
            continue
        mod_name, tensor, idx = m.group("mod") or "", m.group("tensor"), int(m.group("idx"))
        module = modules.get(mod_name)
        if module is None:
            problems.append(f"{key}: model has no submodule {mod_name!r}")
            continue
        if parametrize.is_parametrized(module, tensor):
            continue  # already parametrized: load_state_dict handles (and checks) it
        current = module._parameters.get(tensor)
        if current is None:
            problems.append(f"{key}: {mod_name or 'model'} has no Parameter {tensor!r}")
            continue
        if not isinstance(extra, dict) or extra.get("type") not in _SparseParametrization._TYPES:
            problems.append(f"{key}: unknown parametrization record {extra!r}")
            continue
        local = f"{mod_name + '.' if mod_name else ''}parametrizations.{tensor}.{idx}."
        tensors = {k[len(local) :]: v for k, v in state_dict.items() if k.startswith(local)}
        cls = _SparseParametrization._TYPES[extra["type"]]
        try:
            p = cls._from_state(extra, tensors, current.shape)
        except (ValueError, TypeError) as e:
            problems.append(f"{key}: {e}")
            continue
        plan.setdefault((mod_name, tensor), []).append((idx, p))
    if problems:
        raise ValueError("state_dict does not fit the model:\n  " + "\n  ".join(problems))
    for (mod_name, tensor), items in plan.items():
        module = modules[mod_name]
        for _, p in sorted(items, key=lambda t: t[0]):
            parametrize.register_parametrization(module, tensor, p, unsafe=True)
        ensure_load_hook(module)
    model.load_state_dict(state_dict, strict=strict)
    return model
