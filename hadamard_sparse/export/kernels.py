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
      ``$XDG_CACHE_HOME/hadamard_sparse`` or ``~/.cache/hadamard_sparse``); a folder owned by
      another user or writable by group/others is refused with a warning;
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidArgumentError
from .csr_format import CSRWeight, pack_csr

__all__ = ["CSRWeight", "csr_conv2d", "csr_linear", "kernel_status", "pack_csr"]

_SOURCE = Path(__file__).with_name("_kernels.c")
_ABI = 3
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
    """What makes a ``-march=native`` build machine-specific: the platform, and the CPU's model and features."""
    # Linux: /proc/cpuinfo's model and feature flags; macOS: sysctl's CPU brand and features
    # (every Apple-silicon machine says "arm" to platform.processor()).
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if (
                    key in ("flags", "Features", "model name", "CPU part", "CPU implementer")
                    and key not in found
                ):
                    found[key] = line
    except OSError:
        pass
    if sys.platform == "darwin":
        for key in (
            "machdep.cpu.brand_string",
            "machdep.cpu.features",
            "machdep.cpu.leaf7_features",
            "hw.cpufamily",
        ):
            try:
                out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                out = ""
            found[key] = out.strip()
    head = f"{sys.platform} {platform.machine()} {platform.processor()}\n"
    return head + "".join(f"{k}: {v}" for k, v in sorted(found.items()))


def _unsafe_folder(folder: Path) -> str | None:
    """Why ``folder`` (existing) must not hold the kernel: not ours, or writable by others; ``None`` if safe."""
    st = folder.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{folder} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"{folder} is writable by group or others (mode {oct(st.st_mode & 0o777)})"
    return None


def _safe_folder(folder: Path) -> str | None:
    """Create ``folder`` (mode 0700) if needed; the reason it is unsafe for a shared library, or ``None``."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return _unsafe_folder(folder)


def _flag_sets() -> list[list[str]]:
    base = ["-O3", "-std=gnu11", "-shared", "-fPIC"]
    arch = ["-mcpu=native"] if platform.machine().lower() in ("arm64", "aarch64") else ["-march=native"]
    return [base + arch + ["-fopenmp"], base + arch, base]


def build_library(
    source: Path, stem: str, abi_symbol: str, abi: int, declare: Callable[[ctypes.CDLL], None]
) -> tuple[ctypes.CDLL | None, str, str | None]:
    """Compile ``source`` (or load its cached build) into a shared library and declare its entry points.

    The one build-and-cache path of the compiled kernels (``_kernels.c`` and ``_kernels_int8.c``): the
    ``$CC`` rules of :func:`kernel_status`, a cache key over the source, compiler, flags and CPU, and a
    cache folder refused (with a warning) when another user owns it or others can write it.

    Args:
        source: the C file.
        stem: the library's file-name stem in the cache folder.
        abi_symbol: a function of the library returning its ABI version.
        abi: the ABI version expected.
        declare: sets the ``argtypes``/``restype`` of the library's entry points.

    Returns:
        ``(library or None, reason, path or None)``: ``reason`` names the compiler command, or why the
        library could not be built or loaded.
    """
    if os.environ.get("HADAMARD_SPARSE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by HADAMARD_SPARSE_KERNELS=0", None
    if not sys.platform.startswith(("linux", "darwin")):
        return None, f"compiled kernels are built on Linux and macOS only, not {sys.platform}", None
    cc, why = _compiler()
    if cc is None:
        return None, why, None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        code = source.read_bytes()
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"cannot run the C compiler {cc!r}: {e}", None
    errors = []
    for flags in _flag_sets():
        parts = [code, cc.encode(), version.encode(), " ".join(flags).encode(), _cpu_signature().encode()]
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
        suffix = ".dylib" if sys.platform == "darwin" else ".so"
        for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"hadamard_sparse-{os.getuid()}"):
            path = folder / f"{stem}_{key}{suffix}"
            try:
                unsafe = _safe_folder(folder) or (path.exists() and _unsafe_folder(path))
                if unsafe:
                    errors.append(f"refused the cache folder: {unsafe}")
                    warnings.warn(
                        f"hadamard_sparse: refusing to build or load the compiled kernel there: {unsafe}; "
                        "set HADAMARD_SPARSE_CACHE to a folder only you can write",
                        RuntimeWarning,
                        stacklevel=5,
                    )
                    continue
                if not path.exists():
                    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=folder)
                    os.close(fd)
                    try:
                        proc = subprocess.run(
                            [cc, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=300
                        )
                        if proc.returncode != 0:
                            errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-500:]}")
                            break  # a compile error does not depend on the folder
                        os.chmod(tmp, 0o700)  # the linker's mode follows the umask: keep it ours only
                        os.replace(tmp, path)  # atomic: concurrent processes see a whole file
                    finally:
                        if os.path.exists(tmp):
                            os.unlink(tmp)
                lib = ctypes.CDLL(str(path))
                if getattr(lib, abi_symbol)() != abi:
                    errors.append(f"{path} has the wrong ABI version")
                    break
                declare(lib)
                return lib, "compiled with " + " ".join([os.path.basename(cc), *flags]), str(path)
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{folder}: {e}")
    return None, f"{source.name} did not compile: " + " | ".join(errors), None


def _compile() -> tuple[ctypes.CDLL | None, _Status]:
    lib, reason, path = build_library(_SOURCE, "hs_kernels", "hs_kernels_abi", _ABI, _declare)
    return lib, _Status(lib is not None, reason, path)


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
    if bias is not None and bias.shape != (n_out,):
        raise InvalidArgumentError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
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
