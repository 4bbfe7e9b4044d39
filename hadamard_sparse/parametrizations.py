"""The Hadamard-product parametrizations: small modules with ``forward`` and ``right_inverse``.

They are registered with :func:`torch.nn.utils.parametrize.register_parametrization`,
so the user's module keeps its class (up to parametrize's injected subclass),
its Parameter objects and its forward code.
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

import torch
from torch import nn

from ._dtensor import is_dtensor, replicated
from .errors import InvalidArgumentError, InvalidTypeError

__all__ = ["HadamardMask"]


class SparseParametrization(nn.Module):
    """Base of every parametrization this library owns.

    ``remove_parametrizations`` bakes a tensor whose parametrization chain holds
    at least one of these. In a ``state_dict`` (see :mod:`hadamard_sparse.checkpoint`)
    each one is recorded as plain tensors beside the tensor it parametrizes:
    ``"<tensor>_<suffix>"`` for each suffix of ``RECORD_SUFFIXES`` (the first one is always
    written and declares the parametrization), so that a fresh model can rebuild it.

    The checkpoint protocol (what :mod:`hadamard_sparse.checkpoint` calls), defined by subclasses:

    - ``RECORD_SUFFIXES``: the record's key suffixes, the declaring one first.
    - ``RECORD_ORIGINALS``: for a parametrization that must be first in its chain and owns the
      chain's originals (the factors of a factorization), the prefix of their keys
      (``"<tensor>_<prefix>0"``, ...); ``None`` otherwise.
    - :meth:`record`, :meth:`from_record` and :meth:`record_to_state`.

    Every subclass with ``RECORD_SUFFIXES`` is registered under its declaring suffix
    (:meth:`record_types`).
    """

    _TYPES: ClassVar[dict[str, type[SparseParametrization]]] = {}
    RECORD_SUFFIXES: ClassVar[tuple[str, ...]] = ()
    RECORD_ORIGINALS: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.RECORD_SUFFIXES:
            SparseParametrization._TYPES[cls.RECORD_SUFFIXES[0]] = cls

    @staticmethod
    def record_types() -> dict[str, type[SparseParametrization]]:
        """Every parametrization type with a checkpoint record, keyed by its declaring suffix.

        Returns:
            A new dict ``{declaring suffix: class}``, e.g. ``{"mask": HadamardMask, ...}``.

        Example::

            >>> SparseParametrization.record_types()["mask"] is HadamardMask
            True
        """
        return dict(SparseParametrization._TYPES)

    def record(self, position: int) -> dict[str, torch.Tensor]:
        """The checkpoint record of this parametrization.

        Args:
            position: its index among this library's parametrizations in the chain.

        Returns:
            ``{suffix: tensor}``, written as ``"<tensor>_<suffix>"`` in the ``state_dict``.
        """
        raise NotImplementedError

    @classmethod
    def from_record(
        cls, record: dict[str, Any], shape: torch.Size, what: str
    ) -> tuple[SparseParametrization, int | None]:
        """Rebuild a parametrization from a checkpoint record, for a tensor of ``shape``.

        Args:
            record: ``{suffix: value}`` of the suffixes present in the checkpoint.
            shape: the shape of the tensor it will parametrize.
            what: the record's key, for the messages.

        Returns:
            ``(parametrization, position)``: its position among ours in the chain (``None``: any free slot).

        Raises:
            ValueError, TypeError: (this library's error types) naming ``what`` when the record does not fit.
        """
        raise NotImplementedError

    def record_to_state(self, record: dict[str, Any], position: int, what: str) -> dict[str, Any]:
        """Check a checkpoint record against this (already registered) parametrization.

        Args:
            record: ``{suffix: value}`` of the suffixes present in the checkpoint.
            position: its index among this library's parametrizations in the chain.
            what: the record's key, for the messages.

        Returns:
            Its own ``state_dict`` entries (local names) taken from the record.

        Raises:
            ValueError, TypeError: (this library's error types) naming ``what`` when the record
                describes another configuration.
        """
        raise NotImplementedError


def _mask_from_record(value: Any, shape: torch.Size, what: str) -> torch.Tensor:
    """A checkpoint's mask as a bool tensor: bool, or 0/1 numbers (``torch.nn.utils.prune``'s float masks)."""
    if not isinstance(value, torch.Tensor):
        raise InvalidTypeError(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.bool:
        if value.is_complex() or not bool(((value == 0) | (value == 1)).all()):
            raise InvalidTypeError(
                f"{what} must be a torch.bool tensor (or hold only 0 and 1, as torch.nn.utils.prune's "
                f"masks do), got {value.dtype} with other values"
            )
        value = value != 0
    check_mask(value, shape, what)
    return value


def check_mask(mask: torch.Tensor, shape: torch.Size, what: str) -> None:
    if not isinstance(mask, torch.Tensor):
        raise InvalidTypeError(f"{what} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise InvalidTypeError(
            f"{what} must have dtype torch.bool, got {mask.dtype}; "
            "convert a 0/1 tensor with mask.bool() (a float mask would drift under optimizers)"
        )
    if mask.shape == shape:
        return  # the common case, without the (slow) general broadcast check
    try:
        out = torch.broadcast_shapes(mask.shape, shape)
    except RuntimeError:
        out = None
    if out != shape:
        raise InvalidArgumentError(
            f"{what} has shape {tuple(mask.shape)}, which does not broadcast to the "
            f"tensor's shape {tuple(shape)}; allowed: that shape or one broadcastable to it"
        )


class HadamardMask(SparseParametrization):
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

    RECORD_SUFFIXES: ClassVar[tuple[str, ...]] = ("mask",)
    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        check_mask(mask, mask.shape if isinstance(mask, torch.Tensor) else torch.Size(), "mask")
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_dtensor(x):  # a weight sharded by FSDP2, read outside its forward (state_dict, schedules)
            return x * replicated(self.mask.to(x.dtype), x)
        # Same values as ``x * self.mask``: multiplying by a bool tensor is several times slower on CPU,
        # so the mask is used in x's dtype, cached until the buffer changes (see _mask_in).
        return x * _mask_in(self, x)

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
                raise InvalidArgumentError(
                    f"state_dict entry {key!r} does not fit: expected a torch.bool tensor of shape "
                    f"{tuple(self.mask.shape)}, got {got}"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def record(self, position: int) -> dict[str, torch.Tensor]:
        return {"mask": self.mask}

    @classmethod
    def from_record(
        cls, record: dict[str, Any], shape: torch.Size, what: str
    ) -> tuple[HadamardMask, int | None]:
        return cls(_mask_from_record(record["mask"], shape, what)), None

    def record_to_state(self, record: dict[str, Any], position: int, what: str) -> dict[str, Any]:
        if "mask" not in record:
            return {}
        mask = _mask_from_record(record["mask"], self.mask.shape, what)
        if mask.shape != self.mask.shape:
            raise InvalidArgumentError(
                f"{what} has shape {tuple(mask.shape)}, the model's mask has shape {tuple(self.mask.shape)}; "
                "masks are loaded in place and keep their shape"
            )
        return {"mask": mask}


# The bool mask in a compute dtype, per HadamardMask: (buffer, its _version, its data_ptr, dtype, device,
# the converted mask or None). Held here rather than on the module, so it is not in
# state_dict, pickles or deep copies; an entry goes with its module. The buffer stays the saved truth:
# any in-place update (``mask.copy_``, ``load_state_dict``) bumps its version counter, a device move or
# ``.to()`` replaces it, and a new dtype of the weight misses the key, so the next forward converts again.
# Autograd keeps the converted tensor of each forward for its backward, and it is never written in place.
# The conversion is stored only on the second forward with grad and an unchanged key (training): it costs
# one tensor of the weight's dtype per mask, which one-off calls (registration, sparsify, inference
# under no_grad) should not leave behind; they reuse a stored conversion but do not create one.
_MASK_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[Any, ...]] = weakref.WeakKeyDictionary()


def _mask_in(module: HadamardMask, x: torch.Tensor) -> torch.Tensor:
    """``module.mask`` converted to ``x``'s dtype (0/1), cached while the buffer is unchanged."""
    mask = module.mask
    if torch.compiler.is_compiling() or type(mask) is not torch.Tensor or mask.is_inference():
        # Traced graphs read the buffer at every call; tensor subclasses (DTensor, fake tensors) and
        # inference tensors (no version counter) are converted at every call.
        return mask.view(torch.uint8).to(x.dtype) if type(mask) is torch.Tensor else mask.to(x.dtype)
    key = (mask._version, mask.data_ptr(), x.dtype, x.device)
    entry = _MASK_CACHE.get(module)
    hit = entry is not None and entry[0] is mask and entry[1:5] == key
    if hit and entry[5] is not None:
        return entry[5]
    with torch.no_grad():
        converted = mask.view(torch.uint8).to(device=x.device, dtype=x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:  # never in inference mode: no inference tensor kept
        # First such call: remember the key; second with the same key: keep the conversion.
        _MASK_CACHE[module] = (mask, *key, converted if hit else None)
    return converted
