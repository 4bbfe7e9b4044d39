"""Int8 storage of floating tensors for compressed state_dicts: per-row symmetric scales.

A tensor ``w`` of shape ``(rows, ...)`` is viewed as ``(rows, cols)`` (a 1-D tensor is one row).
Each row gets one float32 ``scale = max|row| / 127``, rounded *up* to 17 significant bits, and
its entries are stored as ``q = round(w / scale)`` in ``[-127, 127]`` (int8; an all-zero row has
scale 0 and ``q = 0``). Decoding gives ``ŵ = q * scale``, computed in float32, where it is exact
(7 bits of ``q`` times 17 of ``scale`` fit float32's 24), then cast to the tensor's dtype. So for
float32 and float64 tensors every entry satisfies

    ``|w - ŵ| <= scale / 2``, where ``max|row| / 127 <= scale <= max|row| / 127 * (1 + 2**-16)``,

exactly (no further rounding), i.e. ``max|row| / 254`` per entry up to that 2**-16; float16 /
bfloat16 tensors add the rounding of ``ŵ`` to their dtype (half an ulp). Zeros stay zeros.
Non-finite values are refused.

Which tensors: by default every floating tensor with two or more dimensions (Linear, Conv and
Embedding weights; a 2-byte or wider dtype); 1-D tensors (biases, LayerNorm), 0-d, integer and
``torch.bool`` tensors (masks) stay exact. ``include`` (glob patterns of state_dict keys) replaces
that rule, ``exclude`` removes keys from it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch

from ..errors import InvalidArgumentError, InvalidTypeError

__all__ = [
    "QUANTIZE_MODES",
    "check_quantize",
    "default_quantized",
    "dequantize_rows",
    "quantize_rows",
    "quantized_keys",
]

#: The allowed values of ``quantize`` (besides ``None``).
QUANTIZE_MODES = ("int8",)
_QMAX = 127
_LOW_BITS = 7  # float32 mantissa bits cleared in a scale: 17 significant bits remain


def check_quantize(
    quantize: object, include: object, exclude: object
) -> tuple[str | None, tuple[str, ...] | None, tuple[str, ...]]:
    """Checks the ``quantize`` / ``quantize_include`` / ``quantize_exclude`` arguments; returns them normalised."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        allowed = ", ".join(repr(m) for m in QUANTIZE_MODES)
        raise InvalidArgumentError(f"quantize must be None or one of {allowed}, got {quantize!r}")

    def patterns(name: str, value: object) -> tuple[str, ...]:
        if isinstance(value, str) or not (
            isinstance(value, Sequence) and all(isinstance(p, str) for p in value)
        ):
            raise InvalidTypeError(
                f"{name} must be a sequence of glob patterns (str), e.g. ['*.weight'], got {value!r}"
            )
        return tuple(value)

    inc = None if include is None else patterns("quantize_include", include)
    exc = patterns("quantize_exclude", exclude)
    if quantize is None and (inc is not None or exc):
        raise InvalidArgumentError(
            "quantize_include / quantize_exclude choose the tensors to quantize: pass quantize='int8' too"
        )
    return quantize, inc, exc  # type: ignore[return-value]


def default_quantized(t: torch.Tensor) -> bool:
    """The default rule: a floating tensor (2 bytes or wider) with two or more dimensions and entries."""
    return t.is_floating_point() and t.element_size() >= 2 and t.dim() >= 2 and t.numel() > 0


def quantized_keys(
    state_dict: Mapping[str, torch.Tensor],
    include: tuple[str, ...] | None,
    exclude: tuple[str, ...],
) -> set[str]:
    """The keys to store quantized; every pattern must match a key, every chosen tensor be finite floating."""
    keys = list(state_dict)
    for name, pats in (("quantize_include", include or ()), ("quantize_exclude", exclude)):
        for p in pats:
            if not any(fnmatch.fnmatchcase(k, p) for k in keys):
                raise InvalidArgumentError(f"{name} pattern {p!r} matches no state_dict key")

    def chosen(key: str, t: torch.Tensor) -> bool:
        if any(fnmatch.fnmatchcase(key, p) for p in exclude):
            return False
        if include is None:
            return default_quantized(t)
        return any(fnmatch.fnmatchcase(key, p) for p in include) and t.numel() > 0

    out = {k for k, t in state_dict.items() if chosen(k, t)}
    for key in out:
        t = state_dict[key]
        if not t.is_floating_point() or t.element_size() < 2 or t.dim() == 0:
            raise InvalidArgumentError(
                f"quantize_include selects {key!r} ({t.dtype}, shape {tuple(t.shape)}); only floating "
                "tensors of 2 or more bytes per entry and at least one dimension can be stored as int8"
            )
        if t.device.type == "meta" or not bool(torch.isfinite(t).all()):
            raise InvalidArgumentError(
                f"state_dict entry {key!r} holds non-finite values (or no data) and cannot be stored as int8; "
                "keep it exact with quantize_exclude"
            )
        if t.element_size() > 4 and float(t.abs().max()) > torch.finfo(torch.float32).max:
            raise InvalidArgumentError(
                f"state_dict entry {key!r} holds values beyond float32's range, which the float32 scales "
                "cannot represent; keep it exact with quantize_exclude"
            )
    return out


def _rows(t: torch.Tensor) -> int:
    return t.shape[0] if t.dim() >= 2 else 1


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: the int8 entries of ``t`` (1-D, row-major) and the float32 scale of each row."""
    rows = _rows(t)
    w = t.detach().reshape(rows, -1).double()
    amax = w.abs().amax(1) if w.shape[1] else w.new_zeros(rows)
    bits = (amax / _QMAX).float().view(torch.int32)
    step = 1 << _LOW_BITS
    scale = ((bits + (step - 1)) & ~(step - 1)).view(torch.float32)  # rounded up to 17 significant bits
    s = scale.double().unsqueeze(1)
    q = torch.where(s > 0, w / torch.where(s > 0, s, 1.0), 0.0).round_().clamp_(-_QMAX, _QMAX)
    return q.to(torch.int8).reshape(-1), scale


def dequantize_rows(
    q: torch.Tensor, scale: torch.Tensor, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """``q * scale`` per row (exact in float32), in ``dtype`` and ``shape``."""
    rows = scale.numel()
    w = q.reshape(rows, -1).to(torch.float32) * scale.to(torch.float32).unsqueeze(1)
    return w.to(dtype).reshape(tuple(shape))
