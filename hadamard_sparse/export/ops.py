"""The sparse kernels as PyTorch operators: ``hadamard_sparse::csr_linear`` and ``hadamard_sparse::csr_conv2d``.

:mod:`.kernels` calls compiled C through :mod:`ctypes`, which nothing in PyTorch can see: a
graph capture (``torch.compile``, ``torch.export``, ``torch.jit.trace``) either stops there or,
worse, records the result as a constant. Registered with :mod:`torch.library` (``define`` +
``impl``, ``register_fake``, ``register_autograd``: the same as ``torch.library.custom_op``
with a few microseconds less of Python per call), each
kernel is one operator node with a fake implementation (output shape and dtype from the input
shapes, symbolic sizes included), so

* ``torch.compile(model, fullgraph=True)`` compiles through :class:`SparseLinear` /
  :class:`SparseConv` with no graph break (Inductor fuses the dense ops around the node);
* ``torch.export.export`` writes ``torch.ops.hadamard_sparse.csr_linear`` nodes that run on any
  input size (dynamic batch and sequence dimensions with ``torch.export.Dim``);
* ``torch.jit.trace`` records the operator, so the traced model computes on its input.

Each operator has an autograd formula for its input and bias (the gradient of ``x`` is computed
with the dense weight; the sparse weight itself gets none) and a dense equivalent
(:func:`dense_linear`, :func:`dense_conv2d`) that the modules run while ``torch.onnx.export``
traces them: ONNX has no such operator, so the ONNX file holds the dense weight and ONNX Runtime
gets no speed-up from the sparsity (a warning says so).

The operators check the metadata of their inputs on every call (dtypes, dimensions, lengths,
cheap); the index *values* are checked once, when a :class:`~.kernels.CSRWeight` is built.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input

from ..errors import InvalidArgumentError
from . import kernels

__all__ = [
    "csr_conv2d",
    "csr_conv2d_op",
    "csr_linear",
    "csr_linear_op",
    "csr_to_dense",
    "dense_conv2d",
    "dense_linear",
    "patches",
    "plain_eager",
    "run_conv2d",
    "warn_onnx_dense",
]


def csr_to_dense(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, in_features: int
) -> torch.Tensor:
    """The dense ``(rows, in_features)`` weight of CSR arrays, with ops every exporter knows.

    Row ids come from a scatter-add of the row ends and a cumulative sum (no data-dependent
    shapes), the weight from one scatter: ``torch.export``, ``torch.compile`` and both ONNX
    exporters trace it; an ONNX exporter folds it into one dense initializer.

    Args:
        crow: ``(rows + 1,)`` row pointers.
        col: ``(nnz,)`` column indices (``uint16``, ``int32`` or ``int64``).
        values: ``(nnz,)`` values.
        in_features: the number of columns.

    Returns:
        The dense weight, ``values``' dtype and device.
    """
    rows, nnz = crow.shape[0] - 1, values.shape[0]
    ends = crow[1:].to(torch.int64)
    marks = torch.zeros(nnz + 1, dtype=torch.int64, device=values.device).scatter_add(
        0, ends, torch.ones_like(ends)
    )
    row_of = marks.cumsum(0)[:nnz]
    flat = row_of * in_features + col.to(torch.int64)
    dense = values.new_zeros(rows * in_features).scatter(0, flat, values)
    return dense.view(rows, in_features)


def _check_arrays(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor) -> None:
    if crow.dim() != 1 or col.dim() != 1 or values.dim() != 1 or col.shape[0] != values.shape[0]:
        raise InvalidArgumentError(
            "crow, col and values must be 1-D with len(col) == len(values), got shapes "
            f"{tuple(crow.shape)}, {tuple(col.shape)}, {tuple(values.shape)}"
        )
    if crow.dtype != torch.int32 or col.dtype not in (torch.uint16, torch.int32):
        raise InvalidArgumentError(
            f"crow must be int32 and col uint16 or int32, got {crow.dtype} and {col.dtype} "
            "(build the arrays with kernels.pack_csr or kernels.CSRWeight)"
        )


def _check_meta(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, k: int) -> None:
    _check_arrays(crow, col, values)
    if x.shape[-1] != k:
        raise InvalidArgumentError(
            f"x must have {k} features in its last dimension, got shape {tuple(x.shape)}"
        )


def _unchecked(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, k: int) -> kernels.CSRWeight:
    return kernels.CSRWeight.unchecked(crow, col, values, (int(crow.shape[0]) - 1, k))


def plain_eager(x: torch.Tensor) -> bool:
    """Whether nothing traces or differentiates this call, so a module may call the kernel directly.

    An operator call costs tens of microseconds of dispatch in eager mode (a sparse layer of
    MiniLM at one token runs in about as long): the modules call :mod:`.kernels` directly when
    ``x`` is a plain tensor needing no gradient and no compiler, tracer, exporter or dispatch
    mode is watching, and the operator otherwise. Both give the same bits.
    """
    return (
        not torch.compiler.is_compiling()
        and type(x) is torch.Tensor
        and not torch.jit.is_tracing()
        and not (x.requires_grad and torch.is_grad_enabled())
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    )


# --------------------------------------------------------------------------------------------
# csr_linear
# --------------------------------------------------------------------------------------------


#: The ``hadamard_sparse`` operator namespace (kept alive for the life of the process).
_LIB = torch.library.Library("hadamard_sparse", "DEF")
_LIB.define(
    "csr_linear(Tensor x, Tensor crow, Tensor col, Tensor values, Tensor? bias, int in_features) -> Tensor"
)
_LIB.define(
    "csr_conv2d(Tensor x, Tensor crow, Tensor col, Tensor values, Tensor? bias, int[2] kernel_size, "
    "int[2] stride, int[4] padding, int[2] dilation) -> Tensor"
)


def csr_linear(
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
) -> torch.Tensor:
    """``x @ W.T + bias`` for CSR ``W`` (``crow``, ``col``, ``values``): :func:`.kernels.csr_linear` as an operator.

    Called as ``torch.ops.hadamard_sparse.csr_linear(x, crow, col, values, bias, in_features)``.
    The compiled kernel runs where it applies (float32 CPU), ``torch.sparse`` elsewhere.

    Returns:
        ``(..., rows)`` in ``x``'s dtype, contiguous.
    """
    _check_meta(x, crow, col, values, in_features)
    y = kernels.csr_linear(x, _unchecked(crow, col, values, in_features), bias)
    return y.contiguous()


def _csr_linear_fake(
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
) -> torch.Tensor:
    torch._check(
        x.shape[-1] == in_features, lambda: f"x must have {in_features} features in its last dimension"
    )
    torch._check(col.shape[0] == values.shape[0], lambda: "len(col) must equal len(values)")
    return x.new_empty((*x.shape[:-1], crow.shape[0] - 1))


def _linear_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _, crow, col, values, bias, in_features = inputs
    ctx.save_for_backward(crow, col, values)
    ctx.in_features = in_features
    ctx.bias_grad = bias is not None and bias.requires_grad


def _linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    crow, col, values = ctx.saved_tensors
    w = csr_to_dense(crow, col, values, ctx.in_features).to(grad.dtype)
    gx = grad.matmul(w) if ctx.needs_input_grad[0] else None
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_grad else None
    return gx, None, None, None, gb, None


_LIB.impl("csr_linear", csr_linear, "CompositeExplicitAutograd")
torch.library.register_fake("hadamard_sparse::csr_linear", _csr_linear_fake, lib=_LIB)
torch.library.register_autograd(
    "hadamard_sparse::csr_linear", _linear_backward, setup_context=_linear_setup, lib=_LIB
)
#: The operator overload itself: the cheapest way to call it from a module's forward.
csr_linear_op = torch.ops.hadamard_sparse.csr_linear.default


def dense_linear(
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
) -> torch.Tensor:
    """The same as :func:`csr_linear` with the dense weight (for ONNX export)."""
    return F.linear(x, csr_to_dense(crow, col, values, in_features).to(x.dtype), bias)


# --------------------------------------------------------------------------------------------
# csr_conv2d
# --------------------------------------------------------------------------------------------


def _conv_out(size: Any, k: int, s: int, lo: int, hi: int, d: int) -> Any:
    return (size + lo + hi - d * (k - 1) - 1) // s + 1


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> a ``(N, H * W, C)`` tensor with contiguous channels (a view when it already is)."""
    n, c, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1)
    if nhwc.is_contiguous():
        return nhwc.reshape(n, h * w, c)
    out = x.new_empty(n, h * w, c)
    for i in range(n):
        out[i].copy_(x[i].reshape(c, h * w).t())  # 2-D transposes: faster than one 4-D permute copy
    return out


def patches(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The ``(N * Ho * Wo, kh * kw * C)`` channels-last patch matrix of ``(N, C, H, W)`` with zero padding.

    Args:
        x: the input.
        kernel_size, stride, dilation: ``(h, w)`` pairs.
        padding: ``(left, right, top, bottom)``.

    Returns:
        The patches (a strided view of one channels-last copy) and ``(N, Ho, Wo)``.
    """
    n, c, h, w = x.shape
    wl, wr, ht, hb = padding
    hp, wp = h + ht + hb, w + wl + wr
    xc = _channels_last(x)
    if wl or wr or ht or hb:
        padded = x.new_zeros(n, hp, wp, c)
        padded[:, ht : ht + h, wl : wl + w].copy_(xc.view(n, h, w, c))  # whole rows of w * c floats
        xc = padded
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    ho, wo = _conv_out(hp, kh, sh, 0, 0, dh), _conv_out(wp, kw, sw, 0, 0, dw)
    view = xc.as_strided(
        (n, ho, wo, kh, kw, c),
        (hp * wp * c, sh * wp * c, sw * c, dh * wp * c, dw * c, 1),
    )
    return view.reshape(n * ho * wo, kh * kw * c), (n, ho, wo)


def im2col_conv2d(
    x: torch.Tensor,
    weight: kernels.CSRWeight,
    bias: torch.Tensor | None,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """The convolution as channels-last patches times the CSR weight (:func:`.kernels.csr_linear`)."""
    cols, (n, ho, wo) = patches(x, kernel_size, stride, padding, dilation)
    o = weight.shape[0]
    y = kernels.csr_linear(cols, weight, bias)
    out = y.new_empty(n, o, ho * wo)
    for i, yi in enumerate(y.view(n, ho * wo, o)):
        out[i].copy_(yi.t())  # 2-D transposes: several times faster than one 4-D permute copy
    return out.view(n, o, ho, wo)


def csr_conv2d(
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """A zero-padded 2-D convolution with a CSR weight: :func:`.kernels.csr_conv2d` as an operator.

    Called as ``torch.ops.hadamard_sparse.csr_conv2d(x, crow, col, values, bias, kernel_size,
    stride, padding, dilation)`` with ``padding = (left, right, top, bottom)`` and the weight's
    columns in ``(kernel row, kernel column, channel)`` order. The direct kernel runs where it
    applies (float32 CPU, the kernel built), channels-last patches times the weight elsewhere.

    Returns:
        ``(N, out_channels, Ho, Wo)`` in ``x``'s dtype, contiguous.
    """
    if x.dim() != 4:
        raise InvalidArgumentError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    k = kernel_size[0] * kernel_size[1] * x.shape[1]
    _check_arrays(crow, col, values)
    w = _unchecked(crow, col, values, k)
    return run_conv2d(x, w, bias, kernel_size, stride, padding, dilation).contiguous()


def run_conv2d(
    x: torch.Tensor,
    weight: kernels.CSRWeight,
    bias: torch.Tensor | None,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
) -> torch.Tensor:
    """:func:`csr_conv2d`'s body: the direct kernel where it applies, channels-last patches elsewhere."""
    ks, st, pd, dl = tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation)
    if kernels.kernel_applies(x, weight):
        return kernels.csr_conv2d(x, weight, bias, ks, st, pd, dl)
    return im2col_conv2d(x, weight, bias, ks, st, pd, dl)


def _csr_conv2d_fake(
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    torch._check(x.dim() == 4, lambda: "x must be 4-D (N, C, H, W)")
    (kh, kw), (sh, sw), (pl, pr, pt, pb), (dh, dw) = kernel_size, stride, padding, dilation
    ho = _conv_out(x.shape[2], kh, sh, pt, pb, dh)
    wo = _conv_out(x.shape[3], kw, sw, pl, pr, dw)
    return x.new_empty((x.shape[0], crow.shape[0] - 1, ho, wo))


def _conv_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, crow, col, values, bias, kernel_size, stride, padding, dilation = inputs
    ctx.save_for_backward(crow, col, values)
    ctx.geometry = (tuple(x.shape), tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    ctx.bias_grad = bias is not None and bias.requires_grad


def _conv_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    crow, col, values = ctx.saved_tensors
    (n, c, h, w), (kh, kw), stride, (pl, pr, pt, pb), dilation = ctx.geometry
    gx = None
    if ctx.needs_input_grad[0]:
        w4 = _dense_conv_weight(crow, col, values, (kh, kw), c).to(grad.dtype)
        gxp = conv2d_input((n, c, h + pt + pb, w + pl + pr), w4, grad, stride, 0, dilation)
        gx = gxp[:, :, pt : pt + h, pl : pl + w]
    gb = grad.sum((0, 2, 3)) if ctx.bias_grad else None
    return gx, None, None, None, gb, None, None, None, None


_LIB.impl("csr_conv2d", csr_conv2d, "CompositeExplicitAutograd")
torch.library.register_fake("hadamard_sparse::csr_conv2d", _csr_conv2d_fake, lib=_LIB)
torch.library.register_autograd(
    "hadamard_sparse::csr_conv2d", _conv_backward, setup_context=_conv_setup, lib=_LIB
)
csr_conv2d_op = torch.ops.hadamard_sparse.csr_conv2d.default


def _dense_conv_weight(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, kernel_size: Sequence[int], c: int
) -> torch.Tensor:
    kh, kw = kernel_size
    w2 = csr_to_dense(crow, col, values, kh * kw * c)
    return w2.view(-1, kh, kw, c).permute(0, 3, 1, 2)


def dense_conv2d(
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    in_channels: int,
) -> torch.Tensor:
    """The same as :func:`csr_conv2d` with the dense weight (for ONNX export; ``in_channels`` as a Python int)."""
    w4 = _dense_conv_weight(crow, col, values, kernel_size, in_channels).to(x.dtype)
    pl, pr, pt, pb = padding
    if pl == pr and pt == pb:
        return F.conv2d(x, w4, bias, stride, (pt, pl), dilation)
    return F.conv2d(F.pad(x, [pl, pr, pt, pb]), w4, bias, stride, 0, dilation)


def warn_onnx_dense(kind: str) -> None:
    """Warn that an ONNX export holds ``kind``'s weight dense (ONNX has no such sparse operator)."""
    warnings.warn(
        f"hadamard_sparse: torch.onnx.export writes {kind} with its dense weight (ONNX has no CSR "
        "operator): the ONNX model is correct, but ONNX Runtime gets no speed-up and no smaller file "
        "from the sparsity",
        UserWarning,
        stacklevel=3,
    )
