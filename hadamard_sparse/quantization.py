"""Symmetric fake quantization as a parametrization that composes with masks and factorizations.

:class:`FakeQuant` rounds a tensor to ``2**(bits-1) - 1`` positive and as many negative levels
around an exact zero (``weight = scale * round(w / scale)``) with a straight-through gradient.
Appended after a :class:`~hadamard_sparse.HadamardMask`, the chain computes ``q(w * m)``: the
scale is read from the masked weights and masked entries stay exactly zero. Baking with
:func:`~hadamard_sparse.remove_parametrizations` stores the quantized values, and
:func:`~hadamard_sparse.load_sparse_state_dict` rebuilds the chain on a fresh model.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from .checkpoint import ensure_load_hook
from .errors import InvalidArgumentError, InvalidTypeError, NoTargetsError
from .layers import Selectors, resolve_targets, weight_dims
from .parametrizations import SparseParametrization

__all__ = ["FakeQuant", "fake_quantize", "register_fake_quant"]

_MIN_BITS = 2
_MAX_BITS = 16


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise InvalidTypeError(f"bits must be an int in [{_MIN_BITS}, {_MAX_BITS}], got {bits!r}")
    if not (_MIN_BITS <= int(bits) <= _MAX_BITS):
        raise InvalidArgumentError(f"bits must be an int in [{_MIN_BITS}, {_MAX_BITS}], got {bits!r}")
    return int(bits)


def _check_bool(value: object, arg: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidTypeError(f"{arg} must be a bool, got {value!r}")
    return value


def _check_channel_dim(channel_dim: object) -> int | None:
    if channel_dim is None:
        return None
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, numbers.Integral) or channel_dim < 0:
        raise InvalidArgumentError(f"channel_dim must be None or an int >= 0, got {channel_dim!r}")
    return int(channel_dim)


class _RoundSTE(torch.autograd.Function):
    """``scale * clamp(round(x / scale))`` forward, identity backward (straight-through)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
        return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


class FakeQuant(SparseParametrization):
    r"""Parametrization ``forward(w) = scale * round(w / scale)``: symmetric fake quantization.

    The integer levels are ``-qmax .. qmax`` with ``qmax = 2**(bits-1) - 1`` (at most ``2**bits - 1``
    distinct values per scale, zero among them), and ``scale = max|w| / qmax`` over the whole tensor
    or, with ``channel_dim``, over each slice along that dimension. The scale is recomputed from
    the incoming tensor at every forward (a min-max observer; nothing is stored, so there is no
    state to drift), so no value is clipped. A zero stays exactly zero, which is why the chain
    ``w * mask -> FakeQuant`` keeps the mask's sparsity. The gradient is straight-through: the
    gradient of the quantized tensor is passed unchanged to its input (and is then multiplied by
    the mask by the mask's own ``forward``).

    ``right_inverse`` is the identity: assigning ``module.weight = w`` stores ``w`` unquantized.

    Args:
        bits: number of bits, in ``[2, 16]``. Default: 8.
        channel_dim: ``None`` for one scale per tensor, or the dimension indexing channels
            (one scale per slice). Default: ``None``.

    Example::

        >>> q = FakeQuant(bits=4)(torch.randn(64, 32))
        >>> q.unique().numel() <= 2**4 - 1
        True
    """

    RECORD_SUFFIXES: ClassVar[tuple[str, ...]] = ("fake_quant",)

    def __init__(self, bits: int = 8, channel_dim: int | None = None) -> None:
        super().__init__()
        self.bits = _check_bits(bits)
        self.channel_dim = _check_channel_dim(channel_dim)

    @property
    def qmax(self) -> int:
        """The largest integer level, ``2**(bits-1) - 1``."""
        return 2 ** (self.bits - 1) - 1

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The scale used for ``x`` (a tensor broadcastable to ``x``; 1 where ``x`` is all zero)."""
        with torch.no_grad():
            a = x.detach().abs()
            if self.channel_dim is None or x.dim() < 2:
                amax = a.amax() if a.numel() else a.new_zeros(())
            else:
                if self.channel_dim >= x.dim():
                    raise InvalidArgumentError(
                        f"channel_dim={self.channel_dim} is out of range for a tensor with {x.dim()} dims"
                    )
                dims = tuple(d for d in range(x.dim()) if d != self.channel_dim)
                amax = a.amax(dim=dims, keepdim=True)
            s = amax / self.qmax
            return torch.where(s > 0, s, torch.ones_like(s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RoundSTE.apply(x, self.scale(x), self.qmax)

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channel_dim={self.channel_dim}"

    def record(self, position: int) -> dict[str, torch.Tensor]:
        cd = -1 if self.channel_dim is None else self.channel_dim
        return {"fake_quant": torch.tensor([self.bits, cd, position], dtype=torch.int64)}

    @staticmethod
    def _parse_record(record: dict[str, Any], what: str) -> tuple[int, int | None, int]:
        t = record["fake_quant"]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (3,):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidTypeError(
                f"{what} must be an int64 tensor [bits, channel_dim or -1, position], got {got}"
            )
        bits, cd, pos = (int(v) for v in t.tolist())
        if cd < -1 or pos < 0:
            raise InvalidArgumentError(
                f"{what} holds [bits, channel_dim, position] = {[bits, cd, pos]}; allowed: >= 0 (-1: no channel_dim)"
            )
        return _check_bits(bits), (None if cd == -1 else cd), pos

    @classmethod
    def from_record(
        cls, record: dict[str, Any], shape: torch.Size, what: str
    ) -> tuple[FakeQuant, int | None]:
        bits, cd, pos = cls._parse_record(record, what)
        if cd is not None and cd >= len(shape):
            raise InvalidArgumentError(
                f"{what} has channel_dim={cd}, out of range for a tensor of shape {tuple(shape)}"
            )
        return cls(bits=bits, channel_dim=cd), pos

    def record_to_state(self, record: dict[str, Any], position: int, what: str) -> dict[str, Any]:
        if "fake_quant" not in record:
            return {}
        got = self._parse_record(record, what)
        if got != (self.bits, self.channel_dim, position):
            raise InvalidArgumentError(
                f"{what} records FakeQuant(bits, channel_dim, position) = {got}, the model has "
                f"{(self.bits, self.channel_dim, position)}"
            )
        return {}


def _fake_quant_of(module: nn.Module, name: str) -> FakeQuant | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:  # type: ignore[index, union-attr]
        if isinstance(p, FakeQuant):
            return p
    return None


def _check_tensor(module: nn.Module, name: object) -> torch.Tensor:
    if not isinstance(module, nn.Module):
        raise InvalidTypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str) or not hasattr(module, name):
        raise InvalidArgumentError(f"name must name a tensor of {type(module).__name__}, got {name!r}")
    current = getattr(module, name)
    if not isinstance(current, torch.Tensor) or not current.is_floating_point():
        got = current.dtype if isinstance(current, torch.Tensor) else type(current).__name__
        raise InvalidArgumentError(f"module.{name} must be a floating-point tensor, got {got}")
    if not parametrize.is_parametrized(module, name) and not isinstance(
        module._parameters.get(name), nn.Parameter
    ):
        raise InvalidArgumentError(
            f"module.{name} must be a Parameter or a parametrized tensor, got a buffer or attribute"
        )
    if _fake_quant_of(module, name) is not None:
        raise InvalidArgumentError(
            f"module.{name} already has a FakeQuant parametrization; register it only once"
        )
    return current


def _deprecated_positional(positional: tuple, bits: int, per_channel: bool) -> tuple[int, bool]:
    """``register_fake_quant(module, name, bits, per_channel)``, the old positional form."""
    if len(positional) > 2:
        raise InvalidTypeError(
            f"register_fake_quant takes at most 4 positional arguments (module, name, bits, per_channel), "
            f"got {2 + len(positional)}"
        )
    warnings.warn(
        "register_fake_quant(module, name, bits, per_channel) with bits/per_channel by position is "
        "deprecated: pass them by keyword, register_fake_quant(module, name, bits=..., per_channel=...)",
        DeprecationWarning,
        stacklevel=3,
    )
    bits = positional[0]
    return bits, (positional[1] if len(positional) > 1 else per_channel)


def register_fake_quant(
    module: nn.Module,
    name: str = "weight",
    *positional: Any,
    bits: int = 8,
    per_channel: bool = True,
) -> FakeQuant:
    r"""Append symmetric fake quantization to ``module.<name>``'s parametrization chain.

    Registered after a mask (``sparsify`` or ``register_mask`` first), the tensor becomes
    ``q(w * mask)``: masked entries stay exactly zero and the quantization scale comes from the
    kept weights. Registered on a plain Parameter, it is ``q(w)`` and the Parameter object is kept.
    Training goes through a straight-through gradient; :func:`~hadamard_sparse.remove_parametrizations`
    bakes the quantized values, which then take at most ``2**bits - 1`` distinct values per channel.

    Args:
        module: the module owning the tensor.
        name: the tensor's attribute name. Default: ``"weight"``.
        bits: number of bits, in ``[2, 16]``. Default: 8.
        per_channel: one scale per output channel (the output dimension of the layer: dim 0 for
            ``Linear``/``ConvNd``/RNN weights, dim 1 for ``ConvTransposeNd`` and HF ``Conv1D``);
            ``False``: one scale for the whole tensor. 1-D tensors always use one scale.
            Default: ``True``.
        positional: deprecated: ``bits`` and ``per_channel`` given by position still work, with a
            ``DeprecationWarning``; pass them by keyword.

    Returns:
        The registered :class:`FakeQuant`.

    Example::

        >>> lin = torch.nn.Linear(16, 4)
        >>> hs.sparsify(lin, 0.5)
        >>> fq = register_fake_quant(lin, bits=4)
        >>> baked = hs.remove_parametrizations(lin)
        >>> int((baked.weight == 0).sum()) >= 32
        True
    """
    if positional:
        bits, per_channel = _deprecated_positional(positional, bits, per_channel)
    current = _check_tensor(module, name)
    bits = _check_bits(bits)
    per_channel = _check_bool(per_channel, "per_channel")
    channel_dim = weight_dims(module, name)[0] if per_channel and current.dim() >= 2 else None
    fq = FakeQuant(bits=bits, channel_dim=channel_dim)
    parametrize.register_parametrization(module, name, fq)
    ensure_load_hook(module)
    return fq


def fake_quantize(
    model: nn.Module,
    bits: int = 8,
    *,
    per_channel: bool = True,
    include: Selectors = None,
    exclude: Selectors = None,
) -> nn.Module:
    r"""Register :func:`register_fake_quant` on every targeted tensor of ``model`` (same targets as ``sparsify``).

    Call it after ``sparsify`` so that each weight becomes ``q(w * mask)``. Every target and
    argument is checked before the model is changed.

    Args:
        model: the model, changed in place.
        bits: number of bits, in ``[2, 16]``. Default: 8.
        per_channel: one scale per output channel (see :func:`register_fake_quant`). Default: ``True``.
        include: selectors of the tensors to quantize (types, glob patterns or callables), as in ``sparsify``.
        exclude: selectors of tensors to leave alone.

    Returns:
        ``model``.

    Example::

        >>> model = hs.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)), 0.5)
        >>> model = fake_quantize(model, bits=4)
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_bits(bits)
    _check_bool(per_channel, "per_channel")
    targets = resolve_targets(model, include, exclude)
    if not targets:
        raise NoTargetsError(
            f"fake_quantize: model {type(model).__name__} has no tensor to act on; check include/exclude"
        )
    for t in targets:
        _check_tensor(t.module, t.tensor_name)
    for t in targets:
        register_fake_quant(t.module, t.tensor_name, bits=bits, per_channel=per_channel)
    return model
