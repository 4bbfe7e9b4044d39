"""The compiled CSR kernel: exactness against a float64 dense reference, fallbacks, threads."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hadamard_sparse.errors import HadamardSparseError
from hadamard_sparse.export import kernels as K

EPS32 = 2.0**-24


def _weight(rows: int, cols: int, density: float, *, empty_rows: bool = False, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    if empty_rows:
        w[::3] = 0
    return w


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """``y`` is within the float32 forward error bound of a float64 dense reference.

    Any summation order satisfies ``|y - ref| <= (n + 2) eps (|x| @ |w|.T + |b|)`` where ``n``
    is the longest row's nonzero count; the kernel's order differs from BLAS's, so both are
    held to the bound rather than to each other.
    """
    xd, wd = x.double(), w.double()
    bd = None if b is None else b.double()
    ref = F.linear(xd, wd, bd)
    scale = F.linear(xd.abs(), wd.abs(), None if bd is None else bd.abs())
    n = int((w != 0).sum(1).max()) if w.numel() else 0
    assert y.shape == ref.shape and y.dtype == torch.float32
    err = (y.double() - ref).abs()
    assert bool((err <= (n + 2) * EPS32 * scale + 1e-30).all()), float(err.max())


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch) -> Iterator[None]:
    """A kernel state of its own (compiled into a temporary cache), restored afterwards."""
    monkeypatch.setenv("HADAMARD_SPARSE_CACHE", str(tmp_path))
    K._reset_for_tests()
    yield
    K._reset_for_tests()


def test_kernel_builds_here() -> None:
    ok, why = K.kernel_status()
    assert ok, why


@pytest.mark.parametrize(
    ("rows", "cols", "density"),
    [(1, 1, 1.0), (37, 53, 0.1), (64, 384, 0.1), (96, 130, 0.35), (33, 1000, 1.0), (40, 200, 0.0)],
    ids=["1x1-dense", "odd", "minilm-like", "medium", "fully-dense", "fully-sparse"],
)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 9, 16, 17, 33, 64, 65, 130])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_dense(rows: int, cols: int, density: float, tokens: int, bias: bool) -> None:
    w = _weight(rows, cols, density)
    b = torch.randn(rows) if bias else None
    x = torch.randn(tokens, cols)
    p = K.pack_csr(w)
    assert K.kernel_applies(x, p)
    _check(K.csr_linear(x, p, b, backend="kernel"), x, w, b)


@pytest.mark.parametrize("lead", [(2, 7), (1, 1), (3, 1, 5)])
def test_leading_dims_and_empty_rows(lead: tuple[int, ...]) -> None:
    w = _weight(48, 72, 0.2, empty_rows=True)
    b = torch.randn(48)
    x = torch.randn(*lead, 72)
    y = K.csr_linear(x, K.pack_csr(w), b, backend="kernel")
    assert y.shape == (*lead, 48)
    _check(y.reshape(-1, 48), x.reshape(-1, 72), w, b)
    assert torch.equal(y.reshape(-1, 48)[:, ::3], b[::3].expand(y.reshape(-1, 48).shape[0], -1))


def test_int32_indices_for_wide_layers() -> None:
    w = _weight(6, 70_000, 0.01)
    p = K.pack_csr(w)
    assert p.col.dtype == torch.int32
    for tokens in (1, 5, 70):
        x = torch.randn(tokens, 70_000)
        _check(K.csr_linear(x, p, None, backend="kernel"), x, w, None)
    assert K.pack_csr(_weight(6, 65_536, 0.001)).col.dtype == torch.uint16


def test_no_tokens_and_strided_inputs() -> None:
    w = _weight(20, 30, 0.3)
    p = K.pack_csr(w)
    assert K.csr_linear(torch.randn(0, 30), p).shape == (0, 20)
    base = torch.randn(30, 40)
    for x in (
        base.t(),
        base[:, :30][::2],
        torch.randn(12, 60)[:, ::2],
    ):  # transposed, row-strided, column-strided
        _check(K.csr_linear(x, p, None, backend="kernel"), x, w, None)


def test_same_bits_for_any_thread_count() -> None:
    w = _weight(256, 512, 0.1)
    p = K.pack_csr(w)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append([K.csr_linear(torch.ones(m, 512).cumsum(1) / 512, p) for m in (1, 64, 200)])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for o in outs[1:] for a, b in zip(o, outs[0]))


@pytest.mark.parametrize("tokens", [320, 1000])
def test_many_tiles_row_strided_any_thread_count(tokens: int) -> None:
    """Whole tiles per thread (1000 tokens: 31 tiles of 32 and one of 8) and shared tiles (320
    tokens: 10 tiles on 3 or 4 threads); features and outputs not multiples of 16; x's rows strided."""
    w = _weight(100, 390, 0.1)
    b = torch.randn(100)
    x = torch.randn(tokens, 400)[:, :390]
    p = K.pack_csr(w)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            outs.append(K.csr_linear(x, p, b, backend="kernel"))
    finally:
        torch.set_num_threads(before)
    _check(outs[0], x, w, b)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_scratch_reused_across_shapes_and_large_scratch_per_call(monkeypatch) -> None:
    cases = [
        (_weight(48, 72, 0.2, seed=1), 130),
        (_weight(30, 500, 0.1, seed=2), 70),
        (_weight(48, 72, 0.2), 3),
    ]
    for keep in (K._KEEP_SCRATCH, 0):  # reused buffer, then a buffer per call
        monkeypatch.setattr(K, "_KEEP_SCRATCH", keep)
        for w, tokens in cases * 2:
            x = torch.randn(tokens, w.shape[1])
            _check(K.csr_linear(x, K.pack_csr(w), None, backend="kernel"), x, w, None)


def test_pack_round_trip_and_refusals() -> None:
    w = _weight(17, 23, 0.3)
    p = K.pack_csr(w)
    assert torch.equal(p.to_dense(), w) and p.nnz == int((w != 0).sum())
    assert p.crow.dtype == torch.int32 and p.col.dtype == torch.uint16
    with pytest.raises(HadamardSparseError, match="2-D floating-point"):
        K.pack_csr(torch.ones(2, 3, 4))
    with pytest.raises(HadamardSparseError, match="2-D floating-point"):
        K.pack_csr(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        K.pack_csr([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(HadamardSparseError, match="last dimension"):
        K.csr_linear(torch.randn(2, 22), p)
    with pytest.raises(HadamardSparseError, match="backend"):
        K.csr_linear(torch.randn(2, 23), p, backend="mkl")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_use_torch_sparse(dtype: torch.dtype) -> None:
    w = _weight(16, 24, 0.3).to(dtype)
    x = torch.randn(4, 24, dtype=dtype)
    p = K.pack_csr(w)
    assert not K.kernel_applies(x, p)
    y = K.csr_linear(x, p)
    assert torch.allclose(y.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(HadamardSparseError, match="float32 CPU"):
        K.csr_linear(x, p, backend="kernel")


def test_autograd_through_input_uses_torch_sparse() -> None:
    w, b = _weight(10, 12, 0.4), torch.randn(10)
    x = torch.randn(3, 12, requires_grad=True)
    K.csr_linear(x, K.pack_csr(w), b).pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_()
    F.linear(xr, w, b).pow(2).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, xr.grad, atol=1e-5)


def _fallback_case() -> tuple[torch.Tensor, torch.Tensor, K.CSRWeight]:
    w = _weight(12, 20, 0.3)
    return torch.randn(5, 20), w, K.pack_csr(w)


@pytest.mark.usefixtures("fresh_kernel")
def test_fallback_when_disabled_by_env(monkeypatch) -> None:
    monkeypatch.setenv("HADAMARD_SPARSE_KERNELS", "0")
    x, w, p = _fallback_case()
    assert K.kernel_status() == (False, "disabled by HADAMARD_SPARSE_KERNELS=0")
    with pytest.warns(RuntimeWarning, match="HADAMARD_SPARSE_KERNELS=0"):
        y = K.csr_linear(x, p)
    assert torch.allclose(y, F.linear(x, w), atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not per call
        K.csr_linear(x, p)
    with pytest.raises(HadamardSparseError, match="disabled"):
        K.csr_linear(x, p, backend="kernel")


@pytest.mark.usefixtures("fresh_kernel")
def test_fallback_without_compiler(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no cc, gcc or clang to find
    x, w, p = _fallback_case()
    ok, why = K.kernel_status()
    assert not ok and why == "no C compiler found (install gcc or clang, or set CC)"
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert torch.allclose(K.csr_linear(x, p), F.linear(x, w), atol=1e-5)


@pytest.mark.parametrize(
    ("cc", "problem"),
    [
        ("/nonexistent/cc", "does not exist"),
        ("NOT_EXEC", "is not an executable file"),
        ("hs-no-such-compiler", "is not found on PATH"),
        ("gcc -m64", "is not found on PATH"),  # one executable, no arguments
    ],
)
@pytest.mark.usefixtures("fresh_kernel")
def test_bad_cc_is_named_and_not_replaced_by_another_compiler(tmp_path, monkeypatch, cc, problem) -> None:
    assert any(shutil.which(c) for c in ("cc", "gcc", "clang"))  # a fallback compiler exists here...
    if cc == "NOT_EXEC":
        cc = str(tmp_path / "cc")
        Path(cc).write_text("#!/bin/sh\n")
        os.chmod(cc, 0o644)
    monkeypatch.setenv("CC", cc)
    x, w, p = _fallback_case()
    ok, why = K.kernel_status()
    assert not ok and why.startswith(f"$CC={cc!r} {problem}; "), why  # ...and is not used
    assert "unset it to use cc, gcc or clang" in why and not list(tmp_path.glob("hs_kernels_*"))
    with pytest.warns(RuntimeWarning, match=re.escape(f"$CC={cc!r} {problem}")):
        assert torch.allclose(K.csr_linear(x, p), F.linear(x, w), atol=1e-5)
    with pytest.raises(HadamardSparseError, match=re.escape(f"$CC={cc!r}")):
        K.csr_linear(x, p, backend="kernel")


@pytest.mark.usefixtures("fresh_kernel")
def test_fallback_on_compile_error(tmp_path, monkeypatch) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C;\n")
    monkeypatch.setattr(K, "_SOURCE", bad)
    x, w, p = _fallback_case()
    ok, why = K.kernel_status()
    assert not ok and "did not compile" in why
    with pytest.warns(RuntimeWarning, match="did not compile"):
        assert torch.allclose(K.csr_linear(x, p), F.linear(x, w), atol=1e-5)


@pytest.mark.usefixtures("fresh_kernel")
def test_compiles_into_cache_and_reuses_it(tmp_path) -> None:
    ok, _ = K.kernel_status()
    assert ok
    built = sorted(tmp_path.glob("hs_kernels_*"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    K._reset_for_tests()
    assert K.kernel_status()[0] and built[0].stat().st_mtime_ns == stamp


def _conv_ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, pad: tuple, **kw) -> tuple:
    """float64 F.conv2d on the F.pad-padded input, and the bound's scale."""
    xd = F.pad(x.double(), pad)
    ref = F.conv2d(xd, w.double(), None if b is None else b.double(), **kw)
    scale = F.conv2d(xd.abs(), w.double().abs(), None if b is None else b.double().abs(), **kw)
    return ref, scale


@pytest.mark.parametrize(
    ("cin", "shape", "kernel", "stride", "pad", "dilation"),
    [
        (5, (2, 5, 9, 40), (3, 3), (1, 1), (2, 0, 1, 3), (1, 1)),  # asymmetric padding, wide rows
        (3, (1, 3, 33, 1), (5, 1), (2, 1), (0, 0, 2, 2), (1, 1)),  # (k, 1) on width 1: run as (1, k)
        (7300, (1, 7300, 4, 5), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # 65700 columns: int32 indices
        (4, (2, 4, 12, 12), (2, 3), (3, 2), (1, 1, 0, 0), (2, 2)),
    ],
    ids=["asymmetric-pad", "k1-width1", "int32-cols", "strided-dilated"],
)
def test_csr_conv2d_matches_dense(
    cin: int, shape: tuple, kernel: tuple, stride: tuple, pad: tuple, dilation: tuple
) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(21, cin, *kernel, generator=g) * (torch.rand(21, cin, *kernel, generator=g) < 0.05)
    b = torch.randn(21, generator=g)
    x = torch.randn(*shape, generator=g)
    p = K.pack_csr(w.permute(0, 2, 3, 1).reshape(21, -1))
    assert p.col.dtype == (torch.int32 if cin == 7300 else torch.uint16)
    y = K.csr_conv2d(x, p, b, kernel, stride, pad, dilation)
    ref, scale = _conv_ref(x, w, b, pad, stride=stride, dilation=dilation)
    n = int((w != 0).flatten(1).sum(1).max())
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert bool(((y.double() - ref).abs() <= (n + 2) * EPS32 * scale + 1e-30).all())
    # non-contiguous input: same bits
    xs = torch.randn(shape[0], shape[1], shape[2], shape[3] + 2)[..., 1:-1].copy_(x)
    assert torch.equal(K.csr_conv2d(xs, p, b, kernel, stride, pad, dilation), y)


def test_csr_conv2d_refusals() -> None:
    w = torch.randn(6, 4, 3, 3)
    p = K.pack_csr(w.permute(0, 2, 3, 1).reshape(6, -1))
    x = torch.randn(1, 4, 8, 8)
    bad = [
        ((x[0], p, None, (3, 3)), "must be 4-D"),
        ((torch.randn(1, 5, 8, 8), p, None, (3, 3)), "expected kh \\* kw \\* C"),
        ((x, p, torch.randn(5), (3, 3)), "bias must have shape"),
        ((x, p, None, (3, 0)), "kernel_size must be a pair"),
        ((x, p, None, (3, 3), (1, 1), (1, 1, 1)), "padding must be 4 ints"),
        ((x, p, None, (3, 3), (1, 1), (0, 0, 0, 0), (1, 9)), "smaller than the kernel"),
        ((x.double(), p, None, (3, 3)), "needs a float32 CPU input"),
    ]
    for args, match in bad:
        with pytest.raises(HadamardSparseError, match=match):
            K.csr_conv2d(*args)
