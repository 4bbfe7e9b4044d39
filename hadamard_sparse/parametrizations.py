"""The Hadamard-product parametrizations: small modules with ``forward`` and ``right_inverse``.

They are registered with :func:`torch.nn.utils.parametrize.register_parametrization`,
so the user's module keeps its class (up to parametrize's injected subclass),
its Parameter objects and its forward code.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["HadamardMask"]


class _SparseParametrization(nn.Module):
    """Base of every parametrization this library owns.

    ``remove_parametrizations`` bakes a tensor whose parametrization chain holds
    at least one of these; ``load_sparse_state_dict`` rebuilds them from the
    ``_extra_state`` entry each one saves (a plain dict with a ``"type"`` key).
    """

    _TYPES: ClassVar[dict[str, type[_SparseParametrization]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _SparseParametrization._TYPES[cls.__name__] = cls

    def get_extra_state(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "version": 1, **self._config()}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("type") != type(self).__name__:
            raise ValueError(
                f"cannot load a {state.get('type') if isinstance(state, dict) else state!r} "
                f"parametrization state into {type(self).__name__}"
            )

    def _config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _from_state(
        cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], original_shape: torch.Size
    ) -> _SparseParametrization:
        """Rebuild from a saved ``_extra_state`` and the module's own tensors (names local to it)."""
        raise NotImplementedError


def _check_mask(mask: torch.Tensor, shape: torch.Size, what: str) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{what} must have dtype torch.bool, got {mask.dtype}; "
            "convert a 0/1 tensor with mask.bool() (a float mask would drift under optimizers)"
        )
    try:
        out = torch.broadcast_shapes(mask.shape, shape)
    except RuntimeError:
        out = None
    if out != shape:
        raise ValueError(
            f"{what} has shape {tuple(mask.shape)}, which does not broadcast to the "
            f"tensor's shape {tuple(shape)}; allowed: that shape or one broadcastable to it"
        )


class HadamardMask(_SparseParametrization):
    r"""Parametrization ``forward(w) = w * mask`` with a boolean mask buffer.

    The mask is a persistent ``torch.bool`` buffer (saved in ``state_dict``,
    never seen by optimizers, unchanged by ``.to(dtype)``). It may have the
    tensor's shape or a shape broadcastable to it (e.g. ``(out, 1)`` for whole
    rows). Update it only in place, e.g. ``mask.copy_(new)`` under
    ``torch.no_grad()``, so that compiled graphs, optimizers and DDP keep
    their references.

    ``right_inverse`` is the identity, so registering keeps the original
    Parameter object and assigning ``module.weight = w`` stores ``w`` in
    ``original``. Values of ``original`` at masked positions are kept, not
    zeroed: setting the mask back to ones undoes the pruning.

    Args:
        mask: boolean tensor, ``True`` where the weight is kept.

    Example::

        >>> from torch.nn.utils import parametrize
        >>> lin = torch.nn.Linear(4, 3)
        >>> parametrize.register_parametrization(lin, "weight", HadamardMask(torch.ones(3, 4, dtype=torch.bool)))
        ParametrizedLinear(...)
    """

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        _check_mask(mask, mask.shape if isinstance(mask, torch.Tensor) else torch.Size(), "mask")
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same values as ``x * self.mask``; on CPU, multiplying by a bool tensor is several times slower
        # than converting it through a uint8 view (same bytes, no copy) to x's dtype first.
        return x * self.mask.view(torch.uint8).to(x.dtype)

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def sparsity(self) -> float:
        """Fraction of masked-out entries of the (broadcast) mask buffer."""
        n = self.mask.numel()
        return 0.0 if n == 0 else 1.0 - int(self.mask.sum()) / n

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mask.shape)}, sparsity={self.sparsity:.4f}"

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "mask"
        if key in state_dict:
            m = state_dict[key]
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != self.mask.shape:
                got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else repr(type(m))
                raise ValueError(
                    f"state_dict entry {key!r} does not fit: expected a torch.bool tensor of shape "
                    f"{tuple(self.mask.shape)}, got {got}"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @classmethod
    def _from_state(
        cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], original_shape: torch.Size
    ) -> HadamardMask:
        mask = tensors.get("mask")
        if mask is None:
            raise ValueError("state_dict has a HadamardMask entry without its 'mask' buffer")
        _check_mask(mask, original_shape, "state_dict mask")
        return cls(mask)
