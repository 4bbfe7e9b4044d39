"""Loading the dense ``weight`` and ``bias`` entries that the sparse modules save under a dense layer's names.

:class:`~hadamard_sparse.export.sparse.SparseLinear` and
:class:`~hadamard_sparse.export.sparse_conv.SparseConv` save their weight densified under the
original ``weight`` key (and ``bias``), so that their checkpoints and the dense layer's load into
each other; :func:`save_dense_entries` and :func:`load_dense_entries` are their shared
``_save_to_state_dict`` / ``_load_from_state_dict`` bodies, the latter with ``nn.Linear``'s "size
mismatch" messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["load_dense_entries", "save_dense_entries"]


def save_dense_entries(
    destination: dict[str, Any], prefix: str, keep_vars: bool, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Write ``prefix + "weight"`` (the dense weight as the dense layer stores it) and ``prefix + "bias"``.

    Args:
        destination, prefix, keep_vars: as in ``nn.Module._save_to_state_dict``.
        weight: the densified weight.
        bias: the module's bias Parameter, or None.
    """
    destination[prefix + "weight"] = weight
    if bias is not None:
        destination[prefix + "bias"] = bias if keep_vars else bias.detach()


def load_dense_entries(
    state_dict: dict[str, Any],
    prefix: str,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
    *,
    expected: tuple[int, ...],
    set_dense: Callable[[torch.Tensor], None],
    bias: torch.Tensor | None,
) -> None:
    """Load ``prefix + "weight"`` (dense or sparse layout, of shape ``expected``) and ``prefix + "bias"``.

    Args:
        state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs: as in
            ``nn.Module._load_from_state_dict``.
        expected: the weight's shape as the dense layer stores it.
        set_dense: called with the (strided) weight tensor to repack it.
        bias: the module's bias Parameter, or None.

    Example::

        >>> # inside a module's _load_from_state_dict
        >>> # load_dense_entries(state_dict, prefix, strict, missing, unexpected, errors,
        >>> #                    expected=(out, in), set_dense=self._set_dense, bias=self.bias)
    """
    key, bkey = prefix + "weight", prefix + "bias"
    if key in state_dict:
        w = state_dict[key]
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(expected):
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            error_msgs.append(
                f"size mismatch for {key}: expected a dense tensor of shape {expected}, got {got}"
            )
        else:
            set_dense(w.to_dense() if w.layout != torch.strided else w)
    elif strict:
        missing_keys.append(key)
    if bias is not None and bkey in state_dict:
        b = state_dict[bkey]
        if not isinstance(b, torch.Tensor) or tuple(b.shape) != tuple(bias.shape):
            got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            error_msgs.append(f"size mismatch for {bkey}: expected shape {tuple(bias.shape)}, got {got}")
        else:
            with torch.no_grad():
                bias.copy_(b)
    elif bias is not None and strict:
        missing_keys.append(bkey)
    if strict:
        for k in state_dict:
            if k.startswith(prefix) and k not in (key, bkey) and "." not in k[len(prefix) :]:
                unexpected_keys.append(k)
