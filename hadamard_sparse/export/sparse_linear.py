"""``SparseLinear``: a baked linear-like layer run with a sparse weight.

Formats: ``csr_kernel`` (CSR with narrow indices, run by the compiled kernel of
:mod:`.kernels` on CPU), CSR and BSR with int32 indices (``torch.sparse``, the MKL kernels
on CPU) and 2:4 semi-structured on CUDA. :func:`~hadamard_sparse.export.sparse.to_sparse`
chooses among them per layer.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError, InvalidTypeError, UnsupportedGraphError
from . import kernels, ops
from .choice import LAYOUTS
from .dense_state import load_dense_entries, save_dense_entries

__all__ = ["SparseLinear"]


def _csr32(w: torch.Tensor) -> torch.Tensor:
    c = w.to_sparse_csr()
    return torch.sparse_csr_tensor(
        c.crow_indices().to(torch.int32),
        c.col_indices().to(torch.int32),
        c.values(),
        c.shape,
        check_invariants=False,
    )


def _bsr32(w: torch.Tensor, blocksize: tuple[int, int]) -> torch.Tensor:
    c = w.to_sparse_bsr(blocksize)
    return torch.sparse_bsr_tensor(
        c.crow_indices().to(torch.int32),
        c.col_indices().to(torch.int32),
        c.values(),
        c.shape,
        check_invariants=False,
    )


class SparseLinear(nn.Module):
    r"""Inference replacement of a baked linear-like layer, holding its weight sparse.

    ``forward(x) = x @ W.T + b`` like ``nn.Linear`` (any leading dimensions). Layouts:

    * ``"csr_kernel"``: CSR with ``int32`` row pointers, ``uint16`` column indices (``int32``
      above 65,536 inputs) and the values, as the buffers ``crow``, ``col`` and ``values``,
      run by the compiled kernel of :mod:`hadamard_sparse.export.kernels` (float32 on CPU;
      other dtypes and devices, or a machine without a C compiler, use ``torch.sparse``);
    * ``"csr"`` / ``"bsr"``: a ``torch.sparse`` tensor with int32 indices in ``weight``
      (the MKL kernels on CPU);
    * ``"semi_structured"``: a 2:4 ``SparseSemiStructuredTensor`` in ``weight`` (CUDA).

    The sparse data are non-persistent buffers, never Parameters, so the module runs under
    ``torch.inference_mode()`` as well as ``torch.no_grad()``. ``state_dict`` stores the dense
    ``weight`` and ``bias`` under the names the original layer used (transposed back for a
    Hugging Face ``Conv1D``), so it loads into the dense model, and a dense state_dict loads
    back into this module (re-sparsified).

    It is an export format for inference, not for training: the weight gets no gradient.

    Args:
        linear: the (baked) ``nn.Linear`` to convert.
        layout: ``"csr_kernel"``, ``"csr"``, ``"bsr"`` or ``"semi_structured"``.
        blocksize: BSR block shape.

    Attributes:
        in_features, out_features: as in ``nn.Linear``.
        weight: the ``torch.sparse`` weight (not for ``"csr_kernel"``, see :meth:`dense_weight`).
        bias: the dense bias Parameter, or ``None``.

    Example::

        >>> lin = nn.Linear(64, 32)
        >>> sl = SparseLinear(lin, "csr_kernel")
        >>> sl(torch.randn(3, 64)).shape
        torch.Size([3, 32])
    """

    weight: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor

    def __init__(
        self, linear: nn.Linear, layout: str = "csr_kernel", *, blocksize: tuple[int, int] = (16, 16)
    ) -> None:
        if not isinstance(linear, nn.Linear):
            raise InvalidTypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self._setup(linear.weight.detach(), linear.bias, layout, blocksize, transposed=False)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        layout: str = "csr_kernel",
        *,
        blocksize: tuple[int, int] = (16, 16),
        transposed: bool = False,
    ) -> SparseLinear:
        """Build from a dense weight ``(out_features, in_features)`` and an optional bias.

        Args:
            weight: the dense weight; ``(in_features, out_features)`` when ``transposed``.
            bias: ``(out_features,)`` or ``None``.
            layout: as for the constructor.
            blocksize: BSR block shape.
            transposed: the weight is stored ``(in, out)`` (Hugging Face ``Conv1D``); the
                state_dict keeps that orientation.

        Returns:
            The module.
        """
        new = cls.__new__(cls)
        w = weight.detach()
        new._setup(w.t() if transposed else w, bias, layout, blocksize, transposed=transposed)
        return new

    def _setup(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layout: str,
        blocksize: tuple[int, int],
        *,
        transposed: bool,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise InvalidArgumentError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.layout = layout
        self.blocksize = tuple(blocksize)
        self.transposed = transposed
        self._set_dense(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _set_dense(self, w: torch.Tensor) -> None:
        if self.layout == "csr_kernel":
            packed = self._sparsify(w)
            assert isinstance(packed, kernels.CSRWeight)
            self.register_buffer("crow", packed.crow, persistent=False)
            self.register_buffer("col", packed.col, persistent=False)
            self.register_buffer("values", packed.values, persistent=False)
        else:
            self.register_buffer("weight", self._sparsify(w), persistent=False)

    def _sparsify(self, w: torch.Tensor) -> torch.Tensor | kernels.CSRWeight:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse (CSR|BSR).*beta", category=UserWarning)
            w = w.detach().clone()
            if self.layout == "csr_kernel":
                return kernels.pack_csr(w)
            if self.layout == "csr":
                return _csr32(w)
            if self.layout == "bsr":
                return _bsr32(w, self.blocksize)  # type: ignore[arg-type]
            from torch.sparse import to_sparse_semi_structured

            return to_sparse_semi_structured(w)

    def _packed(self) -> kernels.CSRWeight:
        b = self._buffers  # direct access: this runs on every forward
        shape = (self.out_features, self.in_features)
        return kernels.CSRWeight.unchecked(b["crow"], b["col"], b["values"], shape)  # type: ignore[arg-type]

    def __deepcopy__(self, memo: dict[int, Any]) -> SparseLinear:
        # Sparse compressed tensors have no storage for copy.deepcopy: clone the weight instead.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_buffers":
                value = {
                    k: (v.clone() if k == "weight" else copy.deepcopy(v, memo)) for k, v in value.items()
                }
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        return new

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense (strided) ``(out_features, in_features)`` tensor."""
        if self.layout == "csr_kernel":
            return self._packed().to_dense()
        return self.weight.to_dense()

    @property
    def density(self) -> float:
        """Stored nonzeros over ``out_features * in_features``."""
        n = self.out_features * self.in_features
        if self.layout == "semi_structured":
            return 0.5
        stored = self.values.numel() if self.layout == "csr_kernel" else self.weight.values().numel()
        return float(stored) / n if n else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "csr_kernel":
            if ops.plain_eager(x):
                return kernels.csr_linear(x, self._packed(), self.bias)
            if torch.onnx.is_in_onnx_export():
                ops.warn_onnx_dense("SparseLinear")
                return ops.dense_linear(x, self.crow, self.col, self.values, self.bias, self.in_features)
            return ops.csr_linear_op(x, self.crow, self.col, self.values, self.bias, self.in_features)
        if self.layout == "semi_structured":
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 1 and ops.plain_eager(x):  # a tracer would freeze this branch
            y = torch.mv(self.weight, x2[0]).unsqueeze(0)
        else:
            y = torch.sparse.mm(self.weight, x2.t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this before compiling the module: refuse clearly rather than fail in
        # TorchScript's parser on Python-only code.
        raise UnsupportedGraphError(
            "torch.jit.script cannot compile SparseLinear (its forward is Python that picks a kernel); use "
            "torch.jit.trace, torch.export.export or torch.compile, which record the "
            "hadamard_sparse operators"
        )

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        w = self.dense_weight()
        save_dense_entries(
            destination, prefix, keep_vars, w.t().contiguous() if self.transposed else w, self.bias
        )

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
        expected = (self.out_features, self.in_features)
        if self.transposed:
            expected = expected[::-1]
        ref = self.values if self.layout == "csr_kernel" else self.weight

        def set_dense(w: torch.Tensor) -> None:
            self._set_dense((w.t() if self.transposed else w).to(ref.device, ref.dtype))

        load_dense_entries(
            state_dict,
            prefix,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
            expected=expected,
            set_dense=set_dense,
            bias=self.bias,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, layout={self.layout}, density={self.density:.3f}"
        )
