"""Compressed state_dicts: sparse tensors stored as bitmask + values or CSR, as plain tensors.

A baked sparse model's ``state_dict`` still holds its zeros. :func:`compress_state_dict`
stores each tensor in the smallest of three layouts, as *plain tensors under readable keys*,
so the result saves with ``safetensors.torch.save_file`` (or ``torch.save``) and loads with
safetensors alone; :func:`decompress_state_dict` restores the original dict bitwise (same
dtypes, shapes, ``-0.0`` and NaN payloads).

Layouts and keys (``name`` is the original key; ``numel`` counts the entries, ``nnz`` the
nonzero ones: for floating dtypes ``-0.0`` counts as zero and NaN as nonzero):

========== =================================================================== =====================
layout     tensors                                                             bytes (about)
========== =================================================================== =====================
dense      ``name``: the tensor itself (made contiguous), unchanged            ``numel * itemsize``
bitmask    ``name.__layout__``, ``name.__bitmask__`` (uint8, ``ceil(numel/8)``  ``numel/8 + nnz *
           bytes, bit ``i % 8`` of byte ``i // 8`` set where flat entry ``i``  itemsize``
           is nonzero: NumPy's ``packbits(bitorder="little")``),
           ``name.__values__`` (the nonzero entries in row-major order, the
           tensor's dtype)
csr        ``name.__layout__``, ``name.__crow__``, ``name.__col__``,           ``nnz * (index +
           ``name.__values__``: CSR of the 2-D view ``(shape[0], -1)`` (a      itemsize)``
           1-D tensor is one row), indices in the narrowest of int16 / int32
           / int64 that holds them
========== =================================================================== =====================

``name.__layout__`` is a small int64 tensor ``[1, layout, dtype, zero_signs, *shape]``: the
format version (1), the layout (1 = bitmask, 2 = csr), the dtype code (:data:`DTYPE_CODES`),
whether a ``name.__signs__`` entry follows (0 or 1), and the shape. ``name.__signs__`` (uint8,
packed like the bitmask) has one bit per *zero* entry, in row-major order, set where it is
``-0.0``: it is present only when a floating tensor holds a ``-0.0``, which baked weights do
wherever a negative weight was masked (``w * 0``), at ``(numel - nnz) / 8`` bytes.
A ``torch.bool`` tensor (e.g. the ``weight_mask`` entries of a sparsified model's state_dict) has no
``__values__`` entry: its nonzero entries are all ``True``, so the bitmask alone holds it
(1 bit per entry). Empty and 0-d tensors, and dtypes outside :data:`DTYPE_CODES`, stay dense.
The choice compares estimated file bytes, including about ``64 + len(key)`` bytes of
safetensors header per stored tensor, so small tensors with few zeros stay dense.

**Int8** (``compress_state_dict(..., quantize="int8")``, format version 2): a quantized tensor
has ``name.__layout__ = [2, layout, dtype, 0, 1, *shape]`` (the extra ``1`` = int8 with per-row
symmetric scales; ``dtype`` is the tensor's own, which decoding restores), its ``__values__``
are int8 (the nonzero entries in the bitmask / CSR layouts, all entries in layout 0 = dense,
which only quantized tensors use) and ``name.__scale__`` holds one float32 scale per row of the
``(shape[0], -1)`` view; no ``__signs__`` (zeros come back as ``+0.0``). Scales, rounding and
the error bound are documented in :mod:`hadamard_sparse.compress.quant`. Unquantized tensors
keep version 1, so a file without quantization reads in earlier versions too.

Example::

    >>> import torch, hadamard_sparse as hs
    >>> sd = {"w": torch.tensor([[0.0, 1.5, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0]]), "b": torch.ones(2)}
    >>> sorted(hs.compress_state_dict(sd))  # doctest: +SKIP
    ['b', 'w.__bitmask__', 'w.__layout__', 'w.__values__']
    >>> all(torch.equal(v, sd[k]) for k, v in hs.decompress_state_dict(hs.compress_state_dict(sd)).items())
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import InvalidArgumentError, InvalidTypeError
from .quant import check_quantize, dequantize_rows, quantize_rows, quantized_keys

__all__ = [
    "DTYPE_CODES",
    "FILE_METADATA",
    "compress_state_dict",
    "decompress_state_dict",
]

FORMAT_VERSION = 1
QUANTIZED_VERSION = 2  # the __layout__ of an int8-quantized tensor: [2, layout, dtype, 0, quant, *shape]
QUANT_INT8 = 1
LAYOUT_DENSE = 0  # only quantized tensors carry it; an exact dense tensor is stored under its own name
LAYOUT_BITMASK = 1
LAYOUT_CSR = 2
LAYOUT_NAMES = {LAYOUT_DENSE: "dense", LAYOUT_BITMASK: "bitmask", LAYOUT_CSR: "csr"}

#: Dtype codes of the ``__layout__`` tensor. Tensors of other dtypes are stored dense.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
    torch.int8: 5,
    torch.uint8: 6,
    torch.int16: 7,
    torch.int32: 8,
    torch.int64: 9,
    torch.bool: 10,
    torch.float8_e4m3fn: 11,
    torch.float8_e5m2: 12,
}
_CODE_DTYPES = {c: d for d, c in DTYPE_CODES.items()}
# Bitwise work goes through an integer view of the same item size (copies bits, never values).
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)

_LAYOUT, _BITMASK, _VALUES, _CROW, _COL, _SIGNS, _SCALE = (
    "__layout__",
    "__bitmask__",
    "__values__",
    "__crow__",
    "__col__",
    "__signs__",
    "__scale__",
)
_SUFFIXES = (_LAYOUT, _BITMASK, _VALUES, _CROW, _COL, _SIGNS, _SCALE)
# All bits but the sign bit, per item size (the float zero test ignores the sign).
_MAGNITUDE = {1: 0x7F, 2: 0x7FFF, 4: 0x7FFFFFFF, 8: 0x7FFFFFFFFFFFFFFF}
_SIGN = {1: 0x80, 2: -0x8000, 4: -0x80000000, 8: -0x8000000000000000}
_HEADER_BYTES = 64  # estimated safetensors JSON header bytes per stored tensor, plus its key
#: safetensors metadata written by :func:`save_compressed`.
FILE_METADATA = {"format": "pt", "hadamard_sparse.compressed": str(FORMAT_VERSION)}


def _part(key: str) -> tuple[str, str] | None:
    """``("name", "__values__")`` for a key of a compressed group, else ``None``."""
    base, dot, suffix = key.rpartition(".")
    if dot and base and suffix in _SUFFIXES:
        return base, suffix
    return None


def _index_dtype(max_value: int) -> torch.dtype:
    for dt in _INDEX_DTYPES:
        if max_value <= torch.iinfo(dt).max:
            return dt
    raise InvalidArgumentError(f"index {max_value} does not fit in int64")


def _header(key: str) -> int:
    return _HEADER_BYTES + len(key)


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Packs a 1-D bool tensor into uint8, little bit order (``numpy.packbits(bitorder="little")``)."""
    b = flags.view(torch.uint8)
    pad = (-b.numel()) % 8
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    b = b.view(-1, 8)
    out = b[:, 0].clone()
    for i in range(1, 8):
        out |= b[:, i] << i
    return out


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:n].bool()


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _zero_pattern(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(nonzero, negative_zero)`` flags of the integer view ``x`` of a tensor of ``dtype``.

    For floating dtypes ``-0.0`` counts as a zero (baked weights ``w * 0`` are ``-0.0`` wherever
    ``w < 0``); ``negative_zero`` is ``None`` when there is none.
    """
    if not _is_float(dtype):
        return x != 0, None
    magnitude = x & _MAGNITUDE[x.element_size()]
    nz = magnitude != 0
    neg0 = (x != 0) & ~nz
    return nz, neg0 if bool(neg0.any()) else None


@dataclass(frozen=True)
class TensorPlan:
    """How :func:`compress_state_dict` stores one tensor.

    Attributes:
        layout: :data:`LAYOUT_DENSE`, :data:`LAYOUT_BITMASK` or :data:`LAYOUT_CSR`.
        quantized: stored as int8 with per-row scales.
        nnz: entries that are not zero (``-0.0`` counts as zero); ``numel`` for dtypes
            that are never encoded.
        payload: bytes of the stored tensors (without the safetensors header).
    """

    layout: int
    quantized: bool
    nnz: int
    payload: int


def _analyse(
    key: str, t: torch.Tensor, quantized: bool
) -> tuple[TensorPlan, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(plan, integer view, nonzero flags, negative-zero flags)``: the layout of the smallest estimated file."""
    numel, item = t.numel(), t.element_size()
    if t.dtype not in DTYPE_CODES or t.dim() == 0 or numel == 0 or t.device.type == "meta":
        return TensorPlan(LAYOUT_DENSE, False, numel, numel * item), None, None, None
    x = t.reshape(-1).view(_INT_VIEW[item])
    nz, neg0 = _zero_pattern(x, t.dtype)
    if quantized:
        neg0 = None  # an int8 tensor's zeros come back as +0.0
    nnz = int(nz.sum())
    rows = t.shape[0] if t.dim() >= 2 else 1
    cols = numel // rows
    vitem = 1 if quantized else item
    # (payload bytes, header bytes) of the parts every sparse layout stores
    shared = [8 * (4 + quantized + t.dim()), _header(f"{key}.{_LAYOUT}")]
    if t.dtype != torch.bool:
        shared = [shared[0] + nnz * vitem, shared[1] + _header(f"{key}.{_VALUES}")]
    if quantized:
        shared = [shared[0] + 4 * rows, shared[1] + _header(f"{key}.{_SCALE}")]
    if neg0 is not None:
        shared = [shared[0] + (numel - nnz + 7) // 8, shared[1] + _header(f"{key}.{_SIGNS}")]
    crow_dt, col_dt = _index_dtype(nnz), _index_dtype(max(cols - 1, 0))
    costs = {
        LAYOUT_DENSE: (numel * item, _header(key)),
        LAYOUT_BITMASK: (shared[0] + (numel + 7) // 8, shared[1] + _header(f"{key}.{_BITMASK}")),
        LAYOUT_CSR: (
            shared[0] + (rows + 1) * crow_dt.itemsize + nnz * col_dt.itemsize,
            shared[1] + _header(f"{key}.{_CROW}") + _header(f"{key}.{_COL}"),
        ),
    }
    if quantized:
        costs[LAYOUT_DENSE] = (
            8 * (5 + t.dim()) + numel + 4 * rows,
            _header(f"{key}.{_LAYOUT}") + _header(f"{key}.{_VALUES}") + _header(f"{key}.{_SCALE}"),
        )
    layout = min(costs, key=lambda k: (sum(costs[k]), k))  # ties: dense, then bitmask
    return TensorPlan(layout, quantized, nnz, costs[layout][0]), x, nz, neg0


def plan_tensor(key: str, t: torch.Tensor, *, quantized: bool = False) -> TensorPlan:
    """The layout and bytes :func:`compress_state_dict` uses for ``t`` (``quantized``: as int8)."""
    with torch.no_grad():
        return _analyse(key, t.detach(), quantized)[0]


def _compress_one(key: str, t: torch.Tensor, quantized: bool = False) -> dict[str, torch.Tensor]:
    plan, x, nz, neg0 = _analyse(key, t, quantized)
    if x is None or nz is None or (plan.layout == LAYOUT_DENSE and not quantized):
        return {key: t if t.is_contiguous() else t.contiguous()}
    code, shape = DTYPE_CODES[t.dtype], list(t.shape)
    if quantized:
        meta = [QUANTIZED_VERSION, plan.layout, code, 0, QUANT_INT8, *shape]
    else:
        meta = [FORMAT_VERSION, plan.layout, code, int(neg0 is not None), *shape]
    out = {f"{key}.{_LAYOUT}": torch.tensor(meta, dtype=torch.int64, device=t.device)}
    if plan.layout == LAYOUT_BITMASK:
        out[f"{key}.{_BITMASK}"] = _pack_bits(nz)
    elif plan.layout == LAYOUT_CSR:
        rows = t.shape[0] if t.dim() >= 2 else 1
        nz2 = nz.view(rows, -1)
        crow = torch.zeros(rows + 1, dtype=torch.int64, device=t.device)
        torch.cumsum(nz2.sum(1), 0, out=crow[1:])
        out[f"{key}.{_CROW}"] = crow.to(_index_dtype(plan.nnz))
        out[f"{key}.{_COL}"] = nz2.nonzero()[:, 1].to(_index_dtype(max(nz2.shape[1] - 1, 0)))
    if quantized:
        q, scale = quantize_rows(t)
        out[f"{key}.{_VALUES}"] = q if plan.layout == LAYOUT_DENSE else q.masked_select(nz)
        out[f"{key}.{_SCALE}"] = scale
    elif t.dtype != torch.bool:
        out[f"{key}.{_VALUES}"] = x.masked_select(nz).view(t.dtype)
    if neg0 is not None:
        out[f"{key}.{_SIGNS}"] = _pack_bits(neg0.masked_select(~nz))
    return out


def check_state_dict(state_dict: object) -> None:
    """Raises unless ``state_dict`` is a mapping of str keys to strided tensors, none with a reserved suffix."""
    if not isinstance(state_dict, Mapping):
        raise InvalidTypeError(
            f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}"
        )
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise InvalidTypeError(f"state_dict keys must be str, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise InvalidTypeError(
                f"state_dict entry {key!r} must be a torch.Tensor, got {type(value).__name__}; "
                "drop entries that are Python objects (safetensors stores tensors only)"
            )
        if value.layout != torch.strided:
            raise InvalidArgumentError(
                f"state_dict entry {key!r} has layout {value.layout}; only strided (dense) tensors "
                "are allowed, convert with .to_dense()"
            )
        if _part(key) is not None:
            raise InvalidArgumentError(
                f"state_dict key {key!r} ends with a suffix reserved for compressed entries "
                f"({', '.join('.' + s for s in _SUFFIXES)}); is it compressed already? "
                "Rename the entry to compress it"
            )


def compress_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    quantize: str | None = None,
    quantize_include: Sequence[str] | None = None,
    quantize_exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Stores each tensor of a state_dict in the smallest of the dense, bitmask and CSR layouts.

    The result holds plain, contiguous tensors only, so it saves with
    ``safetensors.torch.save_file`` or ``torch.save``; see the module docstring for the
    layouts and keys. :func:`decompress_state_dict` gives back every tensor bitwise, with its
    dtype and shape, ``-0.0`` and NaN payloads included.
    Dense tensors are returned as they are (made contiguous, not copied otherwise), on their
    device. A baked model's state_dict and a sparsified one's (effective weights, zero where
    masked, plus ``torch.bool`` ``weight_mask`` entries, 1 bit each here) both compress.

    With ``quantize="int8"`` the floating tensors of two or more dimensions (weights,
    embeddings) are stored as int8 with one float32 scale per row, in whichever of the three
    layouts is smallest; they decode to their dtype within ``scale / 2 = max|row| / 254`` per
    entry (see :mod:`hadamard_sparse.compress.quant`), their zeros stay exactly zero (as ``+0.0``).
    Biases, LayerNorm and other 1-D tensors, integer tensors and masks stay bitwise.

    Args:
        state_dict: names to tensors, e.g. ``model.state_dict()`` after baking.
        quantize: ``None`` (every tensor bitwise) or ``"int8"``.
        quantize_include: glob patterns (``fnmatch``) of the keys to quantize, replacing the
            default rule (floating, two or more dimensions); e.g. ``["*.weight"]``.
        quantize_exclude: glob patterns of keys to keep exact, e.g. ``["*embeddings*"]``.

    Returns:
        A new dict of names to tensors, in the order of ``state_dict``.

    Raises:
        InvalidTypeError: ``state_dict`` is not a mapping, a key is not a str or a value is not a
            tensor; a pattern argument is not a sequence of str.
        InvalidArgumentError: a tensor is not strided, or a key already uses one of
            the reserved suffixes (``.__layout__``, ``.__bitmask__``, ``.__values__``,
            ``.__crow__``, ``.__col__``, ``.__signs__``, ``.__scale__``); ``quantize`` is not
            ``None`` or ``"int8"``; a pattern matches no key; a selected tensor is not floating or
            holds inf/NaN. Nothing is computed before every entry is checked.

    Example::

        >>> from safetensors.torch import save_file
        >>> hs.remove_parametrizations(hs.sparsify(model, 0.9))
        >>> save_file(hs.compress_state_dict(model.state_dict()), "model.safetensors")
    """
    _, include, exclude = check_quantize(quantize, quantize_include, quantize_exclude)
    check_state_dict(state_dict)
    chosen = quantized_keys(state_dict, include, exclude) if quantize else set()
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in state_dict.items():
            out.update(_compress_one(key, value.detach(), key in chosen))
    return out


def _fail(key: str, what: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"compressed entry {key!r} {what}")


class _Meta(NamedTuple):
    layout: int
    dtype: torch.dtype
    signs: bool
    quantized: bool
    shape: list[int]


def _read_meta(base: str, parts: dict[str, torch.Tensor]) -> _Meta:
    lkey = f"{base}.{_LAYOUT}"
    meta = parts.get(_LAYOUT)
    if meta is None:
        found = sorted(f"{base}.{s}" for s in parts)
        raise _fail(lkey, f"is missing (found {found}); every compressed tensor has one")
    if meta.dtype != torch.int64 or meta.dim() != 1 or meta.numel() < 5:
        raise _fail(
            lkey,
            "must be a 1-D int64 tensor [version, layout, dtype, zero_signs, *shape] (version 1) or "
            f"[version, layout, dtype, zero_signs, quant, *shape] (version 2), got {meta.dtype} {tuple(meta.shape)}",
        )
    version, layout, code, signs, *shape = (int(v) for v in meta.tolist())
    if version not in (FORMAT_VERSION, QUANTIZED_VERSION):
        raise _fail(
            lkey,
            f"has format version {version}; this version of hadamard_sparse reads "
            f"{FORMAT_VERSION} and {QUANTIZED_VERSION} (int8-quantized)",
        )
    quantized = version == QUANTIZED_VERSION
    if quantized:
        quant, *shape = shape
        if quant != QUANT_INT8 or not shape:
            raise _fail(lkey, f"has quantization code {quant}; allowed: {QUANT_INT8} (int8, per-row scales)")
    layouts = LAYOUT_NAMES if quantized else {k: v for k, v in LAYOUT_NAMES.items() if k != LAYOUT_DENSE}
    if layout not in layouts:
        allowed = ", ".join(f"{c} ({n})" for c, n in layouts.items())
        raise _fail(lkey, f"has layout code {layout}; allowed: {allowed}")
    if code not in _CODE_DTYPES:
        raise _fail(lkey, f"has dtype code {code}; allowed: {sorted(_CODE_DTYPES)}")
    dtype = _CODE_DTYPES[code]
    if quantized and not (dtype.is_floating_point and dtype.itemsize >= 2):
        raise _fail(lkey, f"is int8-quantized with dtype {dtype}; only floating dtypes of 2+ bytes are")
    if signs not in (0, 1) or (signs and (not _is_float(dtype) or quantized)):
        raise _fail(lkey, f"has zero_signs {signs}; allowed: 0, or 1 for unquantized floating dtypes")
    if any(s < 0 for s in shape):
        raise _fail(lkey, f"has a negative size in its shape {shape}")
    required = {_LAYOUT, *{LAYOUT_DENSE: (), LAYOUT_BITMASK: (_BITMASK,), LAYOUT_CSR: (_CROW, _COL)}[layout]}
    required |= {_VALUES} if dtype != torch.bool else set()
    required |= {_SIGNS} if signs else set()
    required |= {_SCALE} if quantized else set()
    missing, extra = sorted(required - parts.keys()), sorted(parts.keys() - required)
    if missing or extra:
        what = []
        if missing:
            what.append(f"missing {[f'{base}.{m}' for m in missing]}")
        if extra:
            what.append(f"unexpected {[f'{base}.{e}' for e in extra]}")
        raise InvalidArgumentError(
            f"compressed tensor {base!r} ({LAYOUT_NAMES[layout]} layout, {dtype}"
            f"{', int8' if quantized else ''}) is malformed: " + "; ".join(what)
        )
    return _Meta(layout, dtype, bool(signs), quantized, shape)


def _check_vector(key: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], n: int | None) -> None:
    if t.dtype not in dtypes or t.dim() != 1 or (n is not None and t.numel() != n):
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        size = f" of {n} entries" if n is not None else ""
        raise _fail(key, f"must be a 1-D {names} tensor{size}, got {t.dtype} {tuple(t.shape)}")


def _unpack_exact(key: str, bits: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` flags of a packed bit vector that must have ``ceil(n / 8)`` bytes, padding 0."""
    _check_vector(key, bits, (torch.uint8,), (n + 7) // 8)
    flags = _unpack_bits(bits, bits.numel() * 8)
    if bool(flags[n:].any()):
        raise _fail(key, f"has padding bits set past its {n} flags")
    return flags[:n]


def _decompress_one(base: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    layout, dtype, signs, quantized, shape = _read_meta(base, parts)
    numel = 1
    for s in shape:
        numel *= s
    rows = shape[0] if len(shape) >= 2 else 1
    item = 1 if quantized else dtype.itemsize
    device = parts[_LAYOUT].device
    vkey, values = f"{base}.{_VALUES}", parts.get(_VALUES)
    if values is not None:
        _check_vector(
            vkey, values, (torch.int8 if quantized else dtype,), numel if layout == LAYOUT_DENSE else None
        )
    if quantized:
        skey, scale = f"{base}.{_SCALE}", parts[_SCALE]
        _check_vector(skey, scale, (torch.float32,), rows)
        if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
            raise _fail(skey, "must hold finite, non-negative scales")
    if layout == LAYOUT_DENSE:
        flags = torch.ones(numel, dtype=torch.bool, device=device)
        nnz = numel
    elif layout == LAYOUT_BITMASK:
        bkey = f"{base}.{_BITMASK}"
        flags = _unpack_exact(bkey, parts[_BITMASK], numel)
        nnz = int(flags.sum())
        if values is not None and values.numel() != nnz:
            raise _fail(vkey, f"has {values.numel()} values, but {bkey!r} has {nnz} bits set")
    else:
        cols = numel // rows if rows else 0
        ckey, colkey = f"{base}.{_CROW}", f"{base}.{_COL}"
        crow, col = parts[_CROW], parts[_COL]
        _check_vector(ckey, crow, _INDEX_DTYPES, rows + 1)
        _check_vector(colkey, col, _INDEX_DTYPES, None)
        nnz = col.numel()
        crow64, col64 = crow.long(), col.long()
        counts = crow64.diff()
        if int(crow64[0]) != 0 or bool((counts < 0).any()) or int(crow64[-1]) != nnz:
            raise _fail(
                ckey, f"must start at 0, never decrease and end at the number of column indices ({nnz})"
            )
        if values is not None and values.numel() != nnz:
            raise _fail(vkey, f"has {values.numel()} values, but {colkey!r} has {nnz} column indices")
        row_of = torch.repeat_interleave(torch.arange(rows, device=device), counts)
        same_row = row_of[1:] == row_of[:-1]
        if bool(((col64 < 0) | (col64 >= cols)).any()) or bool((same_row & (col64.diff() <= 0)).any()):
            raise _fail(colkey, f"must hold column indices in [0, {cols}) increasing within each row")
        flags = torch.zeros(numel, dtype=torch.bool, device=device)
        flags[row_of * cols + col64] = True
    neg0 = _unpack_exact(f"{base}.{_SIGNS}", parts[_SIGNS], numel - nnz) if signs else None
    # Bits, not values: scatter through an integer view of the same item size.
    out = torch.zeros(numel, dtype=_INT_VIEW[item], device=device)
    if values is not None:
        out.masked_scatter_(flags, values.view(out.dtype))
    else:
        out.masked_fill_(flags, 1)  # bool: every stored entry is True
    if quantized:
        return dequantize_rows(out.view(torch.int8), parts[_SCALE], shape, dtype)
    if neg0 is not None:
        zeros = torch.zeros(numel - nnz, dtype=out.dtype, device=device).masked_fill_(neg0, _SIGN[item])
        out.masked_scatter_(~flags, zeros)
    return out.view(dtype).view(shape)


def decompress_state_dict(compressed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compress_state_dict`: every tensor back in its dense, original form.

    Keys without a reserved suffix are returned as they are, so a dict that was never
    compressed (e.g. a plain safetensors file) passes through unchanged. Every compressed
    group is checked (all parts present and no others, dtypes, sizes, index ranges, bit
    counts) before anything is built.

    Args:
        compressed: the output of :func:`compress_state_dict`, e.g. loaded with
            ``safetensors.torch.load_file``.

    Returns:
        A new dict of names to dense tensors; a compressed tensor takes the position of its
        first part.

    Raises:
        InvalidTypeError: ``compressed`` is not a mapping or a value is not a tensor.
        InvalidArgumentError: a part is missing, unexpected or
            malformed, or a compressed name is also present as a plain key.

    Example::

        >>> from safetensors.torch import load_file
        >>> model.load_state_dict(hs.decompress_state_dict(load_file("model.safetensors")))
    """
    if not isinstance(compressed, Mapping):
        raise InvalidTypeError(
            f"compressed must be a mapping of names to tensors, got {type(compressed).__name__}"
        )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    order: list[tuple[bool, str]] = []
    for key, value in compressed.items():
        if not isinstance(value, torch.Tensor):
            raise InvalidTypeError(
                f"compressed entry {key!r} must be a torch.Tensor, got {type(value).__name__}"
            )
        part = _part(key) if isinstance(key, str) else None
        if part is None:
            order.append((False, key))
            continue
        base, suffix = part
        if base not in groups:
            groups[base] = {}
            order.append((True, base))
        groups[base][suffix] = value
    for base in groups:
        if base in compressed:
            raise InvalidArgumentError(
                f"key {base!r} is present both as a plain tensor and as a compressed one "
                f"({', '.join(sorted(f'{base}.{s}' for s in groups[base]))})"
            )
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        built = {base: _decompress_one(base, parts) for base, parts in groups.items()}
    for is_group, key in order:
        out[key] = built[key] if is_group else compressed[key]
    return out
