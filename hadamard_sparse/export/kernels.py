"""Compiled CPU kernels for sparse linear layers, built at first use.

The C source (``_kernels.c`` beside this file) is compiled the first time a kernel is
needed, with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``), into a
cache directory, and loaded with :mod:`ctypes`: nothing is built when the package is
installed, and nothing needs torch's headers or ``ninja``. Where the kernel cannot run (no
compiler, a compile error, a platform without ``ctypes`` loading) :func:`csr_linear` falls
back to ``torch.sparse`` with one warning naming the reason.

Environment variables:
    * ``HADAMARD_SPARSE_KERNELS=0`` disables the compiled kernel (the ``torch.sparse``
      fallback is used, with a warning);
    * ``HADAMARD_SPARSE_CACHE`` sets the cache directory (default
      ``$XDG_CACHE_HOME/hadamard_sparse`` or ``~/.cache/hadamard_sparse``);
    * ``CC`` picks the compiler: one executable, a path or a name on ``PATH`` (no arguments).
      When it is set but not executable or not found, the kernel is not built with another
      compiler: :func:`kernel_status` and the fallback's warning say ``$CC='...' does not
      exist`` (or is not executable, or not found on ``PATH``) and ``torch.sparse`` is used.

Threads: the kernel runs on ``torch.get_num_threads()`` OpenMP threads (the same OpenMP
runtime as torch when both use libgomp).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidArgumentError, InvalidTypeError

__all__ = ["CSRWeight", "csr_conv2d", "csr_linear", "kernel_status", "pack_csr"]

_SOURCE = Path(__file__).with_name("_kernels.c")
_ABI = 3
#: Largest number of input features stored with uint16 column indices.
_U16_MAX_COLS = 1 << 16
#: Multiply-adds per extra thread: smaller calls use fewer threads (a fork/join costs microseconds on
#: a quiet machine, and up to a scheduler time slice when another process holds a core).
_MIN_WORK_PER_THREAD = 1 << 18


@dataclass(frozen=True)
class _Status:
    available: bool
    reason: str
    path: str | None = None


#: Largest scratch buffer (in floats) kept between calls, per Python thread; larger ones are
#: allocated per call.
_KEEP_SCRATCH = 1 << 22

_lock = threading.Lock()
_scratch = threading.local()
_lib: ctypes.CDLL | None = None
_status: _Status | None = None
_warned = False


def _cache_dir() -> Path:
    env = os.environ.get("HADAMARD_SPARSE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hadamard_sparse"


def _compiler() -> tuple[str | None, str]:
    """The C compiler's path, or ``None`` and why there is none.

    A non-empty ``$CC`` is the user's choice: when it is not an executable (a path) or not found on
    ``PATH`` (a name), there is no compiler, rather than a silent fall back to ``cc``/``gcc``/``clang``.
    """
    cc = os.environ.get("CC", "").strip()
    if cc:
        found = shutil.which(cc)
        if found:
            return found, ""
        if os.sep in cc or (os.altsep and os.altsep in cc):
            problem = "is not an executable file" if os.path.exists(cc) else "does not exist"
        else:
            problem = "is not found on PATH"
        return None, (
            f"$CC={cc!r} {problem}; set CC to a C compiler (one executable, no arguments), or unset it "
            "to use cc, gcc or clang"
        )
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found, ""
    return None, "no C compiler found (install gcc or clang, or set CC)"


def _cpu_signature() -> str:
    # -march=native output depends on the CPU: key the cache on its feature flags.
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features", "model name", "CPU part") and key not in found:
                    found[key] = line
    except OSError:
        pass
    return "".join(found.values()) or platform.processor() or platform.machine()


def _flag_sets() -> list[list[str]]:
    base = ["-O3", "-std=gnu11", "-shared", "-fPIC"]
    arch = ["-mcpu=native"] if platform.machine().lower() in ("arm64", "aarch64") else ["-march=native"]
    return [base + arch + ["-fopenmp"], base + arch, base]


def _compile() -> tuple[ctypes.CDLL | None, _Status]:
    if os.environ.get("HADAMARD_SPARSE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, _Status(False, "disabled by HADAMARD_SPARSE_KERNELS=0")
    if not sys.platform.startswith(("linux", "darwin")):
        return None, _Status(False, f"compiled kernels are built on Linux and macOS only, not {sys.platform}")
    cc, why = _compiler()
    if cc is None:
        return None, _Status(False, why)
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        source = _SOURCE.read_bytes()
    except (OSError, subprocess.SubprocessError) as e:
        return None, _Status(False, f"cannot run the C compiler {cc!r}: {e}")
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256(
            b"\0".join(
                [source, cc.encode(), version.encode(), " ".join(flags).encode(), _cpu_signature().encode()]
            )
        ).hexdigest()[:16]
        suffix = ".dylib" if sys.platform == "darwin" else ".so"
        for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"hadamard_sparse-{os.getuid()}"):
            path = folder / f"hs_kernels_{key}{suffix}"
            try:
                if not path.exists():
                    folder.mkdir(parents=True, exist_ok=True)
                    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=folder)
                    os.close(fd)
                    try:
                        proc = subprocess.run(
                            [cc, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300
                        )
                        if proc.returncode != 0:
                            errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-500:]}")
                            break  # a compile error does not depend on the folder
                        os.replace(tmp, path)  # atomic: concurrent processes see a whole file
                    finally:
                        if os.path.exists(tmp):
                            os.unlink(tmp)
                lib = ctypes.CDLL(str(path))
                if lib.hs_kernels_abi() != _ABI:
                    errors.append(f"{path} has the wrong ABI version")
                    break
                _declare(lib)
                return lib, _Status(
                    True, "compiled with " + " ".join([os.path.basename(cc), *flags]), str(path)
                )
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{folder}: {e}")
    return None, _Status(False, "the kernel did not compile: " + " | ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for name in ("hs_csr_linear_u16", "hs_csr_linear_i32"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.hs_work_floats.restype = i64
    lib.hs_work_floats.argtypes = [i64, i64, ctypes.c_int]
    for name in ("hs_conv_u16", "hs_conv_i32"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.hs_conv_work_floats.restype = i64
    lib.hs_conv_work_floats.argtypes = [i64, ctypes.c_int]


def _load() -> ctypes.CDLL | None:
    global _lib, _status
    if _status is None:
        with _lock:
            if _status is None:
                _lib, _status = _compile()
    return _lib


def kernel_status() -> tuple[bool, str]:
    """Whether the compiled kernel is usable here, and why (or how it was built).

    Compiles the kernel on the first call (about two seconds), then answers from memory.

    Returns:
        ``(available, reason)``: ``reason`` gives the compiler command, or why the
        ``torch.sparse`` fallback is used.

    Example::

        >>> ok, why = kernel_status()
    """
    _load()
    assert _status is not None
    return _status.available, _status.reason


def _reset_for_tests() -> None:
    global _lib, _status, _warned
    with _lock:
        _lib, _status, _warned = None, None, False
        _work_floats.cache_clear()


@dataclass
class CSRWeight:
    """A linear layer's weight in CSR form, as plain tensors the compiled kernel reads.

    Attributes:
        crow: ``int32[out_features + 1]`` row pointers.
        col: column indices, ``uint16`` when ``in_features <= 65536`` (6 bytes per nonzero
            with the value), else ``int32``.
        values: ``float32[nnz]`` nonzero values.
        shape: ``(out_features, in_features)``.
    """

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def to_dense(self) -> torch.Tensor:
        """The weight as a dense tensor."""
        return self.to_torch_csr().to_dense()

    def to_torch_csr(self) -> torch.Tensor:
        """The same weight as a ``torch.sparse_csr`` tensor (int32 indices)."""
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Sparse CSR tensor support is in beta", category=UserWarning
            )
            return torch.sparse_csr_tensor(
                self.crow, self.col.to(torch.int32), self.values, self.shape, check_invariants=False
            )


def pack_csr(weight: torch.Tensor) -> CSRWeight:
    """Pack a dense 2-D float weight ``(out_features, in_features)`` into :class:`CSRWeight`.

    Args:
        weight: a dense (strided) 2-D floating-point tensor; zeros are dropped.

    Returns:
        The packed weight (values keep ``weight``'s dtype; the kernel runs float32).

    Raises:
        InvalidArgumentError: ``weight`` is not a 2-D floating-point strided tensor, or has
            ``2**31`` nonzeros or more.

    Example::

        >>> w = torch.randn(8, 16) * (torch.rand(8, 16) < 0.1)
        >>> p = pack_csr(w)
        >>> torch.equal(p.to_dense(), w)
        True
    """
    if not isinstance(weight, torch.Tensor):
        raise InvalidTypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.layout != torch.strided or not weight.is_floating_point():
        raise InvalidArgumentError(
            f"weight must be a dense 2-D floating-point tensor, got shape {tuple(weight.shape)}, "
            f"layout {weight.layout}, dtype {weight.dtype}"
        )
    w = weight.detach()
    rows, cols = w.shape
    nz = w != 0
    nnz = int(nz.sum())
    if nnz >= 2**31:
        raise InvalidArgumentError(f"weight has {nnz} nonzeros; the CSR kernel takes fewer than 2**31")
    crow = torch.zeros(rows + 1, dtype=torch.int32)
    crow[1:] = nz.sum(1).cumsum(0).to(torch.int32)
    col = nz.nonzero()[:, 1]
    col = col.to(torch.int32).to(torch.uint16) if cols <= _U16_MAX_COLS else col.to(torch.int32)
    return CSRWeight(crow.contiguous(), col.contiguous(), w[nz].contiguous(), (int(rows), int(cols)))


def kernel_applies(x: torch.Tensor, weight: CSRWeight) -> bool:
    """Whether :func:`csr_linear` would run the compiled kernel for this input (not a fallback)."""
    v = weight.values
    return (
        x.dtype is torch.float32
        and v.dtype is torch.float32
        and x.is_cpu  # cheap checks only (no device objects): this runs on every forward
        and v.is_cpu
        and not (x.requires_grad and torch.is_grad_enabled())
        and (_lib is not None or _load() is not None)
    )


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        assert _status is not None
        warnings.warn(
            f"hadamard_sparse: compiled sparse kernel unavailable ({_status.reason}); "
            "using torch.sparse instead (slower)",
            RuntimeWarning,
            stacklevel=3,
        )


def csr_linear(
    x: torch.Tensor, weight: CSRWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    r"""``x @ W.T + bias`` with ``W`` in :class:`CSRWeight` form, for any leading dimensions.

    The compiled kernel runs for float32 CPU inputs that need no gradient; other inputs
    (float64, half precision, CUDA, autograd through ``x``) go through ``torch.sparse``.

    Args:
        x: input ``(..., in_features)``.
        weight: the packed weight.
        bias: ``(out_features,)`` or ``None``.
        backend: ``"auto"`` (the kernel where it applies, else ``torch.sparse``; a warning
            when the kernel cannot be built), ``"kernel"`` (raise if it cannot run) or
            ``"torch"`` (always ``torch.sparse``).

    Returns:
        ``(..., out_features)``.

    Example::

        >>> p = pack_csr(torch.randn(32, 64) * (torch.rand(32, 64) < 0.1))
        >>> csr_linear(torch.randn(5, 7, 64), p).shape
        torch.Size([5, 7, 32])
    """
    if backend not in ("auto", "kernel", "torch"):
        raise InvalidArgumentError(f"backend must be 'auto', 'kernel' or 'torch', got {backend!r}")
    n_out, n_in = weight.shape
    if x.shape[-1:] != (n_in,):
        raise InvalidArgumentError(
            f"x must have {n_in} features in its last dimension, got shape {tuple(x.shape)}"
        )
    flat = x.dim() == 2  # the common case skips both reshapes (about 1 us each)
    x2 = x if flat else x.reshape(-1, n_in)
    use_kernel = backend != "torch" and kernel_applies(x2, weight)
    if backend == "kernel" and not use_kernel:
        _, why = kernel_status()
        raise InvalidArgumentError(
            "backend='kernel' needs a float32 CPU input without autograd and a built kernel; "
            f"got dtype {x.dtype} on {x.device}, kernel: {why}"
        )
    if use_kernel:
        y = _run_kernel(x2, weight, bias)
    else:
        if backend == "auto" and _status is not None and not _status.available:
            _warn_fallback()
        y = _torch_csr_linear(x2, weight, bias)
    return y if flat else y.reshape(*x.shape[:-1], n_out)


def _torch_csr_linear(x2: torch.Tensor, weight: CSRWeight, bias: torch.Tensor | None) -> torch.Tensor:
    w = weight.to_torch_csr()
    dtype = x2.dtype
    if x2.device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        # torch.sparse has no CPU half-precision kernels: compute in float32.
        w, x2 = w.to(torch.float32), x2.to(torch.float32)
    if x2.shape[0] == 1:
        y = torch.mv(w, x2[0].to(w.dtype)).unsqueeze(0)
    else:
        y = torch.sparse.mm(w, x2.t().to(w.dtype).contiguous()).t()
    if bias is not None:
        y = y + bias
    return y.to(dtype)


@functools.lru_cache(maxsize=1024)
def _work_floats(m: int, k: int, threads: int) -> int:
    """Scratch floats the kernel needs (its own rule, asked once per shape)."""
    assert _lib is not None
    return int(_lib.hs_work_floats(m, k, threads))


def _work(floats: int) -> torch.Tensor:
    """Scratch for the kernel: a buffer reused between calls of this thread when it is small."""
    if floats > _KEEP_SCRATCH:
        return torch.empty(floats, dtype=torch.float32)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < floats:
        buf = _scratch.buf = torch.empty(max(floats, 1 << 16), dtype=torch.float32)
    return buf


def _run_kernel(x2: torch.Tensor, weight: CSRWeight, bias: torch.Tensor | None) -> torch.Tensor:
    lib = _lib
    assert lib is not None
    m, k = x2.shape
    n = weight.shape[0]
    if x2.stride(-1) != 1 or (m > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    if m == 0 or n == 0:
        return y
    b = bias
    if b is not None and (b.dtype is not torch.float32 or not b.is_contiguous()):
        b = b.detach().to(torch.float32).contiguous()
    threads = max(1, min(torch.get_num_threads(), weight.values.numel() * m // _MIN_WORK_PER_THREAD))
    work = _work(_work_floats(m, k, threads)) if m > 1 else None
    fn = lib.hs_csr_linear_u16 if weight.col.dtype is torch.uint16 else lib.hs_csr_linear_i32
    fn(
        m,
        k,
        n,
        x2.data_ptr(),
        x2.stride(0) if m > 1 else k,
        weight.crow.data_ptr(),
        weight.col.data_ptr(),
        weight.values.data_ptr(),
        None if b is None else b.data_ptr(),
        y.data_ptr(),
        None if work is None else work.data_ptr(),
        threads,
    )
    return y


def _pair_arg(name: str, v: tuple[int, ...], least: int) -> tuple[int, int]:
    if not isinstance(v, (tuple, list)) or len(v) != 2 or any(not isinstance(i, int) or i < least for i in v):
        raise InvalidArgumentError(f"{name} must be a pair of ints >= {least}, got {v!r}")
    return int(v[0]), int(v[1])


def csr_conv2d(
    x: torch.Tensor,
    weight: CSRWeight,
    bias: torch.Tensor | None,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    r"""A zero-padded 2-D convolution (``groups=1``) with the weight in CSR, straight from channels-first input.

    The compiled kernel builds each tile of 32 output positions from ``x`` itself (zero
    padding by bounds): no im2col matrix, no padded or channels-last copy and no transposes;
    the output is written channels-first. A 1-D convolution is the ``(1, k)`` case of an
    ``(N, C, 1, L)`` input. Bits do not depend on the thread count. Needs the compiled kernel
    (float32 CPU tensors, no autograd): see :func:`kernel_status`; ``SparseConv`` falls back
    to im2col + :func:`csr_linear` elsewhere.

    Args:
        x: input ``(N, C, H, W)``, float32, CPU.
        weight: ``(out_channels, kh * kw * C)`` with columns in ``(kernel row, kernel column,
            channel)`` order: ``w.permute(0, 2, 3, 1).reshape(out_channels, -1)`` of a dense
            ``(out, C, kh, kw)`` weight, packed by :func:`pack_csr`.
        bias: ``(out_channels,)`` or ``None``.
        kernel_size: ``(kh, kw)``.
        stride: ``(sh, sw)``.
        padding: zero padding ``(left, right, top, bottom)`` (``F.pad``'s order).
        dilation: ``(dh, dw)``.

    Returns:
        ``(N, out_channels, Ho, Wo)``, float32.

    Raises:
        InvalidArgumentError: a shape or geometry argument does not fit, or the kernel cannot
            run on these tensors.

    Example::

        >>> w = torch.randn(8, 4, 3, 3) * (torch.rand(8, 4, 3, 3) < 0.2)
        >>> p = pack_csr(w.permute(0, 2, 3, 1).reshape(8, -1))
        >>> csr_conv2d(torch.randn(2, 4, 10, 10), p, None, (3, 3), padding=(1, 1, 1, 1)).shape
        torch.Size([2, 8, 10, 10])
    """
    kh, kw = _pair_arg("kernel_size", kernel_size, 1)
    sh, sw = _pair_arg("stride", stride, 1)
    dh, dw = _pair_arg("dilation", dilation, 1)
    if not isinstance(padding, (tuple, list)) or len(padding) != 4 or any(int(p) < 0 for p in padding):
        raise InvalidArgumentError(f"padding must be 4 ints >= 0 (left, right, top, bottom), got {padding!r}")
    pl, pr, pt, pb = (int(p) for p in padding)
    if x.dim() != 4:
        raise InvalidArgumentError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    o = weight.shape[0]
    if weight.shape[1] != kh * kw * c:
        raise InvalidArgumentError(
            f"weight has {weight.shape[1]} columns, expected kh * kw * C = {kh} * {kw} * {c} = {kh * kw * c}"
        )
    if bias is not None and tuple(bias.shape) != (o,):
        raise InvalidArgumentError(f"bias must have shape ({o},), got {tuple(bias.shape)}")
    ho, wo = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if ho <= 0 or wo <= 0:
        raise InvalidArgumentError(
            f"padded input of spatial size ({h + pt + pb}, {w + pl + pr}) is smaller than the kernel "
            f"({kh}, {kw}) with dilation ({dh}, {dw})"
        )
    if not kernel_applies(x, weight):
        _, why = kernel_status()
        raise InvalidArgumentError(
            "csr_conv2d needs a float32 CPU input without autograd and a built kernel; "
            f"got dtype {x.dtype} on {x.device}, kernel: {why}"
        )
    if w == 1 and kw == 1 and pl == pr == 0 and h > 1:
        # (k, 1) kernels on width-1 inputs (CREPE): run as (1, k) on (N, C, 1, H), so that the
        # tokens of a tile are consecutive in memory (the column order is the same).
        y = csr_conv2d(x.view(n, c, 1, h), weight, bias, (1, kh), (1, sh), (pt, pb, 0, 0), (1, dh))
        return y.view(n, o, ho, wo)
    lib = _lib
    assert lib is not None
    y = torch.empty(n, o, ho, wo, dtype=torch.float32)
    if y.numel() == 0:
        return y
    x = x.contiguous()
    b = bias
    if b is not None and (b.dtype is not torch.float32 or not b.is_contiguous()):
        b = b.detach().to(torch.float32).contiguous()
    geom = torch.tensor([n, c, h, w, o, ho, wo, kh, kw, sh, sw, pt, pl, dh, dw], dtype=torch.int64)
    threads = max(
        1, min(torch.get_num_threads(), weight.values.numel() * n * ho * wo // _MIN_WORK_PER_THREAD)
    )
    work = _work(int(lib.hs_conv_work_floats(kh * kw * c, threads)))
    fn = lib.hs_conv_u16 if weight.col.dtype is torch.uint16 else lib.hs_conv_i32
    fn(
        geom.data_ptr(),
        x.data_ptr(),
        weight.crow.data_ptr(),
        weight.col.data_ptr(),
        weight.values.data_ptr(),
        None if b is None else b.data_ptr(),
        y.data_ptr(),
        work.data_ptr(),
        threads,
    )
    return y
