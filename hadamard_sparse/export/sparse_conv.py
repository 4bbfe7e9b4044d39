"""Sparse execution of baked ``nn.Conv1d`` / ``nn.Conv2d`` layers: :class:`SparseConv`.

Two layouts:

* ``"csr_kernel"``: the weight held as ``(out_channels, kernel positions x in_channels)`` CSR.
  On float32 CPU inputs with the compiled kernel, :func:`~.kernels.csr_conv2d` builds the patch
  tiles straight from the channels-first input and writes the output channels-first (no im2col
  matrix); elsewhere (or with ``direct = False``) the input is copied once into channels-last
  order (zero padding written in the same buffer), the patches are a strided view of it
  (``(tokens, kernel positions x channels)`` rows), and :func:`~.kernels.csr_linear` multiplies
  them by the weight;
* ``"csr"``: channels-first patches ``(in_channels x kernel positions, tokens)`` (none for a 1x1
  convolution with stride 1: the input itself) and ``torch.sparse.mm(W, patches)`` per sample
  (MKL on CPU), whose ``(out_channels, tokens)`` result is already the output's layout.

``to_sparse`` uses it where it measures faster than the dense convolution; see ``docs/speed.md``.

Imports point down only: ``sparse.py`` uses this module, never the reverse.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError, InvalidTypeError, UnsupportedGraphError
from . import kernels, ops
from .dense_state import load_dense_entries, save_dense_entries

__all__ = ["CONV_LAYOUTS", "CONV_MAX_DENSITY", "SparseConv", "conv_weight_bias"]

#: The layouts a convolution can run in: the compiled kernel, or ``torch.sparse`` CSR on the
#: same buffers.
CONV_LAYOUTS = ("csr_kernel", "csr")
#: Largest density at which ``to_sparse`` converts a convolution without ``example_inputs``.
#: ``csr_kernel`` 0.1 (90% sparsity; the direct kernel, float32 CPU with the kernel built): it
#: measured 1.0-3.5x dense oneDNN at 90% on every convolution tried (ResNet 1x1/3x3/7x7 stem,
#: CREPE (64, 1), wav2vec2 Conv1d including the 1-channel one, 1 thread, docs/speed.md; the
#: 1x1 one is the break-even case) and 0.8-1.6x at 80%. ``csr`` (torch.sparse, no kernel) stays 0: it loses on most shapes.
CONV_MAX_DENSITY: dict[str, float] = {"csr_kernel": 0.1, "csr": 0.0, "bsr": 0.0, "semi_structured": 0.0}


def conv_weight_bias(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    """A convolution's weight as ``(out, kernel positions x in)`` in :class:`SparseConv`'s column order.

    Returns:
        ``(weight_2d, bias)``, or the reason the layer stays as it is.
    """
    assert isinstance(mod, (nn.Conv1d, nn.Conv2d))
    base = nn.Conv1d if isinstance(mod, nn.Conv1d) else nn.Conv2d
    if type(mod).forward is not base.forward or type(mod)._conv_forward is not base._conv_forward:
        return f"{type(mod).__name__} overrides {base.__name__}.forward"
    if mod.groups != 1:
        return f"groups={mod.groups}: grouped convolutions stay dense"
    if mod.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        return f"padding_mode={mod.padding_mode!r} is not supported"
    w = mod.weight.detach()
    w2 = w.unsqueeze(2) if w.dim() == 3 else w  # Conv1d as a (1, k) Conv2d
    return w2.permute(0, 2, 3, 1).reshape(w.shape[0], -1), mod.bias


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if len(v) == 2 else (1, int(v[0]))


class SparseConv(nn.Module):
    r"""Inference replacement of a baked ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``), holding its weight sparse.

    ``forward(x)`` equals the convolution's (within float32 rounding): batched ``(N, C, L)`` /
    ``(N, C, H, W)`` or unbatched ``(C, L)`` / ``(C, H, W)`` inputs, any stride, padding
    (ints or ``"same"``/``"valid"``), dilation, bias and padding mode.

    Layouts: ``"csr_kernel"`` (channels-last patches through
    :func:`~hadamard_sparse.export.kernels.csr_linear`: the compiled kernel on float32 CPU
    inputs, ``torch.sparse`` elsewhere) or ``"csr"`` (channels-first patches,
    ``torch.sparse.mm(W, patches)`` per sample), both from the buffers ``crow``, ``col`` and
    ``values`` (non-persistent, never Parameters; the column order follows the layout). ``state_dict`` stores the dense
    ``weight`` ``(out, in, *kernel)`` and ``bias`` under the original names, so it loads into
    the dense model, and a dense state_dict loads back (re-sparsified).

    Args:
        conv: the (baked) ``nn.Conv1d`` or ``nn.Conv2d`` with ``groups == 1``.
        layout: ``"csr_kernel"`` or ``"csr"``.

    Attributes:
        in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode: as in
            the convolution.
        bias: the dense bias Parameter, or ``None``.

    Example::

        >>> conv = nn.Conv2d(16, 32, 3, padding=1)
        >>> sc = SparseConv(conv)
        >>> sc(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor

    def __init__(self, conv: nn.Module, layout: str = "csr_kernel") -> None:
        super().__init__()
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d)):
            raise InvalidTypeError(f"conv must be an nn.Conv1d or nn.Conv2d, got {type(conv).__name__}")
        if layout not in CONV_LAYOUTS:
            raise InvalidArgumentError(f"layout must be one of {list(CONV_LAYOUTS)}, got {layout!r}")
        got = conv_weight_bias(conv)
        if isinstance(got, str):
            raise InvalidArgumentError(f"conv cannot run sparse: {got}")
        w2, bias = got
        self.layout = layout
        self.dims = 1 if isinstance(conv, nn.Conv1d) else 2
        self.in_channels, self.out_channels = int(conv.in_channels), int(conv.out_channels)
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.dilation, self.padding = tuple(conv.dilation), conv.padding
        self.padding_mode = conv.padding_mode
        #: ``csr_kernel`` on float32 CPU inputs: build the patches inside the compiled kernel
        #: (:func:`~.kernels.csr_conv2d`) rather than im2col + :func:`~.kernels.csr_linear`.
        self.direct = True
        # (left, right) padding per spatial dim of the (1, L) / (H, W) view, in F.pad's reversed order.
        rev = [int(p) for p in conv._reversed_padding_repeated_twice]
        self._pad = [*rev, 0, 0] if self.dims == 1 else rev
        self._kernel2, self._stride2, self._dilation2 = (
            _pair(self.kernel_size),
            _pair(self.stride),
            _pair(self.dilation),
        )
        del w2
        self._set_dense(conv.weight.detach())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _set_dense(self, w: torch.Tensor) -> None:
        """Store the dense ``(out, in, *kernel)`` weight as CSR in this layout's column order."""
        w4 = w.detach().unsqueeze(2) if self.dims == 1 else w.detach()
        # csr_kernel: (kernel position, channel) columns, for channels-last patches; csr: the
        # weight's own (channel, kernel position) order, for channels-first patches.
        w2 = w4.permute(0, 2, 3, 1) if self.layout == "csr_kernel" else w4
        with torch.inference_mode(False), torch.no_grad():
            packed = kernels.pack_csr(w2.reshape(w4.shape[0], -1).clone())
        col = packed.col if self.layout == "csr_kernel" else packed.col.to(torch.int32)
        self.register_buffer("crow", packed.crow.to(w.device), persistent=False)  # pack_csr builds it on CPU
        self.register_buffer("col", col, persistent=False)
        self.register_buffer("values", packed.values, persistent=False)

    def _packed(self) -> kernels.CSRWeight:
        b = self._buffers
        k = self._kernel2[0] * self._kernel2[1] * self.in_channels
        return kernels.CSRWeight.unchecked(b["crow"], b["col"], b["values"], (self.out_channels, k))  # type: ignore[arg-type]

    def dense_weight(self) -> torch.Tensor:
        """The weight as the dense convolution's ``(out_channels, in_channels, *kernel_size)`` tensor."""
        kh, kw = self._kernel2
        w = self._packed().to_dense()
        if self.layout == "csr_kernel":
            w = w.reshape(self.out_channels, kh, kw, self.in_channels).permute(0, 3, 1, 2)
        else:
            w = w.reshape(self.out_channels, self.in_channels, kh, kw)
        return (w.squeeze(2) if self.dims == 1 else w).contiguous()

    @property
    def density(self) -> float:
        """Stored nonzeros over the weight's size."""
        n = self.out_channels * self.in_channels * self._kernel2[0] * self._kernel2[1]
        return float(self.values.numel()) / n if n else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == self.dims + 1
        if x.dim() != self.dims + 2 and not unbatched:
            raise InvalidArgumentError(
                f"expected a {self.dims + 1}-D (unbatched) or {self.dims + 2}-D (batched) input, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[-self.dims - 1] != self.in_channels:
            raise InvalidArgumentError(
                f"expected {self.in_channels} input channels, got shape {tuple(x.shape)}"
            )
        x4 = x.unsqueeze(0) if unbatched else x
        if self.dims == 1:
            x4 = x4.unsqueeze(2)
        if self.layout == "csr":
            out, (n, ho, wo) = self._forward_channels_first(x4)
        else:
            pad = tuple(self._pad)
            if self.padding_mode != "zeros" and any(pad):
                x4 = F.pad(x4, self._pad, mode=self.padding_mode)
                pad = (0, 0, 0, 0)
            geometry = (list(self._kernel2), list(self._stride2), list(pad), list(self._dilation2))
            if self.direct and ops.plain_eager(x4):
                out = ops.run_conv2d(x4, self._packed(), self.bias, *geometry)
            elif torch.onnx.is_in_onnx_export():
                ops.warn_onnx_dense("SparseConv")
                out = ops.dense_conv2d(
                    x4,
                    self.crow,
                    self.col,
                    self.values,
                    self.bias,
                    *geometry,
                    self.in_channels,  # type: ignore[arg-type]
                )
            elif self.direct:
                out = ops.csr_conv2d_op(x4, self.crow, self.col, self.values, self.bias, *geometry)
            else:
                cols, (n, ho, wo) = ops.patches(x4, self._kernel2, self._stride2, pad, self._dilation2)  # type: ignore[arg-type]
                k = cols.shape[1]
                y = ops.csr_linear_op(cols, self.crow, self.col, self.values, self.bias, k)
                out = (
                    y.view(n, ho * wo, self.out_channels)
                    .transpose(1, 2)
                    .reshape(n, self.out_channels, ho, wo)
                )
            n, _, ho, wo = out.shape
        out = out.view(n, self.out_channels, wo) if self.dims == 1 else out.view(n, self.out_channels, ho, wo)
        return out.squeeze(0) if unbatched else out

    def _forward_channels_first(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``torch.sparse.mm(W, patches)`` per sample on ``(C * kh * kw, Ho * Wo)`` patches: no transposes."""
        if any(self._pad):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        x = x.contiguous()
        n, c, hp, wp = x.shape
        ho, wo = self._out_size(hp, wp, x.shape[2:])
        (kh, kw), (sh, sw), (dh, dw) = self._kernel2, self._stride2, self._dilation2
        if (kh, kw, sh, sw) == (1, 1, 1, 1):
            patches = x.view(n, c, hp * wp)  # a 1x1 convolution reads the input as it is
        else:
            patches = x.as_strided(
                (n, c, kh, kw, ho, wo), (c * hp * wp, hp * wp, dh * wp, dw, sh * wp, sw)
            ).reshape(n, c * kh * kw, ho * wo)
        w = self._packed().to_torch_csr()
        dtype = x.dtype
        if x.device.type == "cpu" and dtype not in (torch.float32, torch.float64):
            w = w.to(torch.float32)  # torch.sparse has no CPU half-precision kernels
        out = x.new_empty(n, self.out_channels, ho * wo)
        for i in range(n):
            out[i].copy_(torch.sparse.mm(w, patches[i].to(w.dtype)))
        if self.bias is not None:
            out += self.bias.view(-1, 1).to(dtype)
        return out, (n, ho, wo)

    def _out_size(self, hp: int, wp: int, size: Any) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self._kernel2, self._stride2, self._dilation2
        ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
        if ho <= 0 or wo <= 0:
            raise InvalidArgumentError(
                f"padded input of spatial size {tuple(size)[2 - self.dims :]} is smaller than the kernel "
                f"{self.kernel_size} (dilation {self.dilation}, padding {self.padding})"
            )
        return ho, wo

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this before compiling the module: refuse clearly rather than fail in
        # TorchScript's parser on Python-only code.
        raise UnsupportedGraphError(
            "torch.jit.script cannot compile SparseConv (its forward is Python that picks a kernel); use "
            "torch.jit.trace, torch.export.export or torch.compile, which record the "
            "hadamard_sparse operators"
        )

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        save_dense_entries(destination, prefix, keep_vars, self.dense_weight(), self.bias)

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
        load_dense_entries(
            state_dict,
            prefix,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
            expected=(self.out_channels, self.in_channels, *self.kernel_size),
            set_dense=lambda w: self._set_dense(w.to(self.values.device, self.values.dtype)),
            bias=self.bias,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
            f"padding_mode={self.padding_mode}, layout={self.layout}, density={self.density:.3f}"
        )
