"""Compiled CPU kernels for int8 sparse linear layers, and the ``hadamard_sparse::csr_linear_int8`` operator.

The C source (``_kernels_int8.c`` beside this file) is built like ``_kernels.c`` (same compiler
choice, flags, cache directory and ``HADAMARD_SPARSE_KERNELS=0`` switch, see :mod:`.kernels`) into
its own library. The weight is CSR with ``int8`` values and one float32 scale per output row
(:class:`CSRWeightInt8`); two variants:

* ``activations="fp32"``: the input stays float32; each int8 value is converted in the loop and
  the row sum is multiplied by the row's scale at the end (3 bytes per nonzero instead of 6).
* ``activations="int8"``: each token is quantized to int8 (symmetric, ``max|x| / 127``) and
  products accumulate in int32. On CPUs with AVX512-VBMI and AVX512-VNNI (runtime check) the
  weight is read in its *lanes* form (:class:`CSRWeightInt8`'s ``lanes``): rows in groups of 16,
  one int32 lane each, columns in windows of 128; each 128-byte round is one ``vpermi2b`` (the 64
  activations the round needs, gathered in registers) and one ``vpdpbusd`` (4 products for each of
  the 16 rows), no gathers from memory. Elsewhere, more than one token runs the CSR tile loop with
  int32 lanes, and one token runs ``"fp32"``.
* ``activations="auto"`` (default): ``"int8"`` where the lanes path runs, else ``"fp32"``
  (measured fastest per case, ``docs/speed.md``).

``HADAMARD_SPARSE_INT8_PLAIN=1`` (or ``plain=True``) forces the plain C loops (no AVX-512
gathers, no lanes path), for tests on machines that have them. Threads:
``torch.get_num_threads()``, fewer for small calls, as in :mod:`.kernels`; bits do not depend
on the thread count.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..compress.quant import quantize_rows
from ..errors import InvalidArgumentError
from .csr_format import U16_MAX_COLS
from .kernels import build_library

__all__ = [
    "ACTIVATIONS",
    "CSRWeightInt8",
    "csr_linear_int8",
    "int8_kernel_status",
    "lanes_path_available",
    "pack_csr_int8",
]

_SOURCE = Path(__file__).with_name("_kernels_int8.c")
_ABI = 4
#: The allowed values of ``activations``.
ACTIVATIONS = ("auto", "fp32", "int8")
_PAD = 64  # values are readable this many bytes past the last one (64-byte vector loads)
LANE_ROWS = 16  # rows per group of the lanes form (int32 lanes of a 512-bit register)
LANE_WINDOW = 128  # columns per window of the lanes form (two 64-byte registers, 7-bit offsets)
_LANE_TOKENS = 8  # the lanes kernel's tokens per pass (LT in the C source)
_MIN_WORK_PER_THREAD = 1 << 18
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_warned = False


def _compile() -> tuple[ctypes.CDLL | None, str]:
    lib, reason, _ = build_library(_SOURCE, "hs_kernels_int8", "hs_q8_abi", _ABI, _declare)
    return lib, reason


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    for suf in ("u16", "i32"):
        fn = getattr(lib, f"hs_q8_linear_{suf}")
        fn.restype = c_int
        fn.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c_int, c_int]
        fn = getattr(lib, f"hs_q8a_linear_{suf}")
        fn.restype = c_int
        fn.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c_int]
    lib.hs_q8_work_floats.restype = i64
    lib.hs_q8_work_floats.argtypes = [i64, i64, c_int]
    lib.hs_q8_simd.restype = c_int
    lib.hs_q8_vnni.restype = c_int
    lib.hs_q8_lanes_linear.restype = c_int
    lib.hs_q8_lanes_linear.argtypes = [
        i64,
        i64,
        i64,
        ptr,
        i64,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        c_int,
    ]


def _load() -> ctypes.CDLL | None:
    global _lib, _reason
    if _reason is None:
        with _lock:
            if _reason is None:
                _lib, _reason = _compile()
    return _lib


def int8_kernel_status() -> tuple[bool, str]:
    """Whether the compiled int8 kernel is usable here, and why (or how it was built).

    Returns:
        ``(available, reason)``; ``reason`` ends with ``"; AVX-512 batch-1 path"`` when the
        gathers are compiled in and ``"; VNNI lanes path"`` when this CPU runs it.

    Example::

        >>> ok, why = int8_kernel_status()
    """
    lib = _load()
    assert _reason is not None
    simd = lib is not None and bool(lib.hs_q8_simd())
    vnni = lib is not None and bool(lib.hs_q8_vnni())
    return lib is not None, _reason + ("; AVX-512 batch-1 path" if simd else "") + (
        "; VNNI lanes path" if vnni else ""
    )


def _reset_for_tests() -> None:
    global _lib, _reason, _warned
    with _lock:
        _lib, _reason, _warned = None, None, False


@dataclass
class CSRWeightInt8:
    """A linear layer's weight as CSR with int8 values and one float32 scale per output row.

    ``W[r, c] = values[j] * scale[r]`` for the stored ``j`` of row ``r``.

    Attributes:
        crow: ``int32[out_features + 1]`` row pointers.
        col: ``uint16`` column indices when ``in_features <= 65536``, else ``int32``.
        values: ``int8[nnz + 64]`` in ``[-127, 127]`` (64 zeros of padding at the end).
        scale: ``float32[out_features]``.
        shape: ``(out_features, in_features)``.
        lanes: ``uint8[rounds * 128 + 128]``, the same nonzeros in lanes form (the VNNI path):
            for each group of 16 rows and window of 128 columns, rounds of 64 column offsets
            within the window then 64 values, row ``i`` of the group in bytes ``4i..4i+3`` of
            both halves (zero values pad the rows with fewer nonzeros); 128 zero bytes at the end.
        lane_ptr: ``int64[groups + 1]``, the first round of each group of 16 rows.
        lane_cnt: ``uint8[groups, ceil(in_features / 128)]``, rounds per group and window.
        rowsum: ``int32[out_features]``, the sum of each row's int8 values.
    """

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]
    lanes: torch.Tensor
    lane_ptr: torch.Tensor
    lane_cnt: torch.Tensor
    rowsum: torch.Tensor

    @property
    def nnz(self) -> int:
        return int(self.values.numel()) - _PAD

    def to_dense(self) -> torch.Tensor:
        """The dequantized weight, dense float32 (exact: ``q * scale`` in float32)."""
        rows, cols = self.shape
        w = torch.zeros(rows, cols, dtype=torch.float32)
        counts = (self.crow[1:] - self.crow[:-1]).long()
        r = torch.repeat_interleave(torch.arange(rows), counts)
        w[r, self.col.to(torch.int64)] = self.values[: self.nnz].to(torch.float32) * self.scale[r]
        return w


def pack_csr_int8(weight: torch.Tensor, scale: torch.Tensor | None = None) -> CSRWeightInt8:
    """Quantize a dense 2-D float weight ``(out, in)`` to int8 per output row and pack it as CSR.

    Args:
        weight: dense 2-D floating-point tensor.
        scale: ``(out,)`` float scales to use (e.g. a fake-quant's learned ones); entries are
            ``round(w / scale)`` and must lie in ``[-127, 127]``. ``None``: the symmetric per-row
            rule of :func:`hadamard_sparse.compress.quant.quantize_rows` (``max|row| / 127``,
            rounded up to 17 significant bits so that ``q * scale`` is exact in float32). A row of
            zeros may have scale 0.

    Returns:
        The packed weight; entries that round to 0 are not stored.

    Raises:
        InvalidArgumentError: a shape does not fit, values are not finite, or ``round(w / scale)``
            leaves ``[-127, 127]``.

    Example::

        >>> w = torch.randn(8, 16) * (torch.rand(8, 16) < 0.2)
        >>> p = pack_csr_int8(w)
        >>> bool((p.to_dense() - w).abs().max() <= w.abs().amax() / 254 * 1.001)
        True
    """
    if weight.dim() != 2 or weight.layout != torch.strided or not weight.is_floating_point():
        raise InvalidArgumentError(
            f"weight must be a dense 2-D floating-point tensor, got shape {tuple(weight.shape)}, "
            f"layout {weight.layout}, dtype {weight.dtype}"
        )
    w = weight.detach().cpu()
    rows, cols = w.shape
    if not bool(torch.isfinite(w).all()):
        raise InvalidArgumentError("weight holds non-finite values; int8 needs finite weights")
    if scale is None:
        qflat, s = quantize_rows(w)
        q = qflat.reshape(rows, cols)
    else:
        s = scale.detach().cpu().to(torch.float32).reshape(-1)
        if s.numel() != rows or not bool((s >= 0).all()) or not bool(torch.isfinite(s).all()):
            raise InvalidArgumentError(
                f"scale must hold {rows} finite floats >= 0 (one per output row), got shape {tuple(scale.shape)}"
            )
        zero = s == 0
        if bool((w[zero] != 0).any()):
            raise InvalidArgumentError("scale is 0 for a row with nonzero weights")
        qd = torch.round(w.double() / torch.where(zero, 1.0, s.double()).unsqueeze(1))
        if bool((qd.abs() > 127).any()):
            raise InvalidArgumentError("round(weight / scale) leaves [-127, 127]; the scales do not fit int8")
        q = qd.to(torch.int8)
    nz = q != 0
    crow = torch.zeros(rows + 1, dtype=torch.int32)
    crow[1:] = nz.sum(1).cumsum(0).to(torch.int32)
    col = nz.nonzero()[:, 1].to(torch.int32)
    col = col.to(torch.uint16) if cols <= U16_MAX_COLS else col
    values = torch.cat([q[nz], torch.zeros(_PAD, dtype=torch.int8)])
    rowsum = q.to(torch.int32).sum(1, dtype=torch.int32)
    lanes, lane_ptr, lane_cnt = pack_lanes(q)
    return CSRWeightInt8(
        crow, col.contiguous(), values, s.contiguous(), (int(rows), int(cols)), lanes, lane_ptr, lane_cnt,
        rowsum,
    )  # fmt: skip


def pack_lanes(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nonzeros of an int8 matrix ``(rows, cols)`` in lanes form (see :class:`CSRWeightInt8`).

    Args:
        q: dense ``int8`` tensor ``(rows, cols)``.

    Returns:
        ``(lanes, lane_ptr, lane_cnt)``.

    Example::

        >>> lanes, ptr, cnt = pack_lanes(torch.tensor([[0, 3], [-2, 0]], dtype=torch.int8))
        >>> lanes[:8].tolist(), lanes[64:72].tolist(), cnt.tolist()
        ([1, 0, 0, 0, 0, 0, 0, 0], [3, 0, 0, 0, -2, 0, 0, 0], [[1]])
    """
    rows, cols = q.shape
    nw = -(-cols // LANE_WINDOW)
    ng = -(-rows // LANE_ROWS)
    nz = q != 0
    per_row = torch.zeros(ng * LANE_ROWS, nw, dtype=torch.int64)
    per_row[:rows] = (
        torch.nn.functional.pad(nz, (0, nw * LANE_WINDOW - cols)).reshape(rows, nw, LANE_WINDOW).sum(-1)
    )
    # a group's rounds in a window are set by its fullest row there, 4 entries per row per round
    rounds = torch.div(per_row.reshape(ng, LANE_ROWS, nw).amax(1) + 3, 4, rounding_mode="floor")
    r, c = nz.nonzero(as_tuple=True)  # row-major: by row, then column
    w = torch.div(c, LANE_WINDOW, rounding_mode="floor")
    counts = per_row[:rows].reshape(-1)
    rank = torch.arange(r.numel()) - (counts.cumsum(0) - counts)[r * nw + w]  # place within (row, window)
    flat = rounds.reshape(-1)
    first = flat.cumsum(0) - flat  # first round of each (group, window)
    g = torch.div(r, LANE_ROWS, rounding_mode="floor")
    slot = first[g * nw + w] + torch.div(rank, 4, rounding_mode="floor")
    byte = slot * 128 + 4 * (r % LANE_ROWS) + rank % 4
    lanes = torch.zeros(int(flat.sum()) * 128 + 128, dtype=torch.uint8)
    lanes[byte] = (c % LANE_WINDOW).to(torch.uint8)
    lanes[byte + 64] = q[r, c].view(torch.uint8)
    lane_ptr = torch.zeros(ng + 1, dtype=torch.int64)
    lane_ptr[1:] = rounds.sum(1).cumsum(0)
    return lanes, lane_ptr, rounds.to(torch.uint8).contiguous()


_scratch = threading.local()
#: Largest scratch buffer (floats) kept between calls, per Python thread.
_KEEP_SCRATCH = 1 << 22


def _work(floats: int) -> torch.Tensor:
    """Scratch for the tile loop, reused between calls of this thread when it is small (no page faults)."""
    if floats > _KEEP_SCRATCH:
        return torch.empty(floats, dtype=torch.float32)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < floats:
        buf = _scratch.buf = torch.empty(max(floats, 1 << 16), dtype=torch.float32)
    return buf


_vnni_cache: dict[int, bool] = {}


def _vnni(lib: ctypes.CDLL) -> bool:
    got = _vnni_cache.get(id(lib))
    if got is None:
        got = _vnni_cache[id(lib)] = bool(lib.hs_q8_vnni())
    return got


def _plain_forced() -> bool:
    return os.environ.get("HADAMARD_SPARSE_INT8_PLAIN", "0").strip().lower() in ("1", "true", "yes", "on")


def lanes_path_available() -> bool:
    """Whether ``activations="auto"`` runs the lanes + VNNI path here (kernel built, CPU has it, not forced plain)."""
    lib = _load()
    return lib is not None and not _plain_forced() and _vnni(lib)


def _reference(
    x2: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    n_out: int,
) -> torch.Tensor:
    """``torch.sparse`` fallback: (x @ Q^T) * scale + bias in float32."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Sparse CSR tensor support is in beta", category=UserWarning
        )
        q = torch.sparse_csr_tensor(
            crow,
            col.to(torch.int32),
            values[: col.numel()].to(torch.float32),
            (n_out, x2.shape[1]),
            check_invariants=False,
        )
    y = torch.sparse.mm(q, x2.to(torch.float32).t().contiguous()).t() * scale
    return y if bias is None else y + bias


def _run(
    x2: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    lanes: torch.Tensor,
    lane_ptr: torch.Tensor,
    lane_cnt: torch.Tensor,
    rowsum: torch.Tensor,
    bias: torch.Tensor | None,
    n_out: int,
    activations: str,
    plain: bool,
) -> torch.Tensor:
    lib = _lib if _lib is not None else _load()
    if lib is None or x2.dtype is not torch.float32 or not x2.is_cpu:
        global _warned
        if lib is None and not _warned:
            _warned = True
            warnings.warn(
                f"hadamard_sparse: compiled int8 kernel unavailable ({_reason}); using torch.sparse instead",
                RuntimeWarning,
                stacklevel=4,
            )
        return _reference(x2, crow, col, values, scale, bias, n_out).to(x2.dtype)
    plain = plain or _plain_forced()
    lanes_path = not plain and _vnni(lib)
    if activations == "auto":
        activations = "int8" if lanes_path else "fp32"
    m, k = x2.shape
    if x2.stride(-1) != 1 or (m > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    y = torch.empty(m, n_out, dtype=torch.float32)
    if m == 0 or n_out == 0:
        return y
    b = bias
    if b is not None and (b.dtype is not torch.float32 or not b.is_contiguous()):
        b = b.detach().to(torch.float32).contiguous()
    threads = max(1, min(torch.get_num_threads(), values.numel() * m // _MIN_WORK_PER_THREAD))
    if activations == "int8" and lanes_path:
        tokens = 1 if m == 1 else -(-m // _LANE_TOKENS) * _LANE_TOKENS
        xu = torch.empty(tokens * lane_cnt.shape[1] * LANE_WINDOW, dtype=torch.uint8)
        sx = torch.empty(m, dtype=torch.float32)
        ok = lib.hs_q8_lanes_linear(
            m, k, n_out, x2.data_ptr(), x2.stride(0) if m > 1 else k, lane_ptr.data_ptr(),
            lane_cnt.data_ptr(), lanes.data_ptr(),
            rowsum.data_ptr(), scale.data_ptr(),
            None if b is None else b.data_ptr(), y.data_ptr(), xu.data_ptr(), sx.data_ptr(), threads,
        )  # fmt: skip
        if ok == 0:
            return y
    work = _work(int(lib.hs_q8_work_floats(m, k, threads)) + 16) if m > 1 else None
    suf = "u16" if col.dtype is torch.uint16 else "i32"
    args = [
        m, k, n_out, x2.data_ptr(), x2.stride(0) if m > 1 else k, crow.data_ptr(), col.data_ptr(),
        values.data_ptr(), scale.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
        None if work is None else work.data_ptr(), threads,
    ]  # fmt: skip
    if activations == "int8" and m > 1:
        getattr(lib, f"hs_q8a_linear_{suf}")(*args)
    else:
        getattr(lib, f"hs_q8_linear_{suf}")(*args, int(plain))
    return y


@torch.library.custom_op("hadamard_sparse::csr_linear_int8", mutates_args=())
def _csr_linear_int8_op(
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    lanes: torch.Tensor,
    lane_ptr: torch.Tensor,
    lane_cnt: torch.Tensor,
    rowsum: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    activations: str,
    plain: bool,
) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    y = _run(
        x2, crow, col, values, scale, lanes, lane_ptr, lane_cnt, rowsum, bias, out_features,
        activations, plain,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out_features)


@_csr_linear_int8_op.register_fake
def _(
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    lanes: torch.Tensor,
    lane_ptr: torch.Tensor,
    lane_cnt: torch.Tensor,
    rowsum: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    activations: str,
    plain: bool,
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def csr_linear_int8(
    x: torch.Tensor,
    weight: CSRWeightInt8,
    bias: torch.Tensor | None = None,
    *,
    activations: str = "auto",
    plain: bool = False,
) -> torch.Tensor:
    r"""``x @ W.T + bias`` with ``W`` in :class:`CSRWeightInt8` form, for any leading dimensions.

    Under ``torch.compile`` / ``torch.export`` (and for tensor subclasses) this is the
    ``hadamard_sparse::csr_linear_int8`` operator, one node in the graph; in eager mode the same
    function runs without the dispatcher. Float32 CPU inputs run the compiled kernel; others
    (or no kernel) go through ``torch.sparse``. No autograd.

    Args:
        x: input ``(..., in_features)``.
        weight: the packed weight.
        bias: ``(out_features,)`` or ``None``.
        activations: ``"auto"`` (default), ``"fp32"`` or ``"int8"`` (per-token dynamic quantization
            of ``x``); see the module docstring.
        plain: force the plain C loops (no AVX-512 intrinsics, no VNNI lanes path).

    Returns:
        ``(..., out_features)``, float32.

    Example::

        >>> p = pack_csr_int8(torch.randn(32, 64) * (torch.rand(32, 64) < 0.1))
        >>> csr_linear_int8(torch.randn(5, 7, 64), p).shape
        torch.Size([5, 7, 32])
    """
    if activations not in ACTIVATIONS:
        raise InvalidArgumentError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    n_out, n_in = weight.shape
    if x.shape[-1:] != (n_in,):
        raise InvalidArgumentError(
            f"x must have {n_in} features in its last dimension, got shape {tuple(x.shape)}"
        )
    if type(x) is torch.Tensor and not torch.compiler.is_compiling():
        # eager: the same function without the dispatcher's ~20 us per call (the op is for tracing)
        flat = x.dim() == 2
        y = _run(
            x if flat else x.reshape(-1, n_in), weight.crow, weight.col, weight.values, weight.scale,
            weight.lanes, weight.lane_ptr, weight.lane_cnt, weight.rowsum, bias, n_out,
            activations, plain,
        )  # fmt: skip
        return y if flat else y.reshape(*x.shape[:-1], n_out)
    return _csr_linear_int8_op(
        x,
        weight.crow,
        weight.col,
        weight.values,
        weight.scale,
        weight.lanes,
        weight.lane_ptr,
        weight.lane_cnt,
        weight.rowsum,
        bias,
        n_out,
        activations,
        plain,
    )
