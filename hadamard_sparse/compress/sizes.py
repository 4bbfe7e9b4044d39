"""SizeReport: the bytes of a model's tensors dense and compressed, exact or int8, per tensor and in total."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InvalidTypeError
from .layouts import LAYOUT_NAMES, check_state_dict, plan_tensor
from .quant import check_quantize, quantized_keys

__all__ = ["SizeReport", "TensorSize", "size_report"]


@dataclass(frozen=True)
class TensorSize:
    """One row of a :class:`SizeReport`: bytes of one state_dict tensor in four encodings.

    Attributes:
        name: the state_dict key.
        shape: its shape.
        dtype: its dtype, e.g. ``"float32"``.
        nnz: entries that are not zero (``-0.0`` counts as zero); ``numel`` for tensors that are
            never encoded (0-d, empty, dtypes outside ``DTYPE_CODES``).
        quantized: whether ``quantize="int8"`` stores it as int8 (else it stays exact).
        dense: bytes as ``safetensors.torch.save_file`` stores it (``numel * itemsize``).
        dense_int8: bytes as int8 in the dense layout (entries, a float32 scale per row and the
            ``__layout__`` record), or ``dense`` when it is not quantized.
        sparse: bytes :func:`~hadamard_sparse.compress.compress_state_dict` stores (the smallest of
            dense, bitmask + values and CSR, indices included).
        sparse_int8: the same with ``quantize="int8"``.
        layout: the layout ``sparse`` uses (``"dense"``, ``"bitmask"`` or ``"csr"``).
        layout_int8: the layout ``sparse_int8`` uses.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nnz: int
    quantized: bool
    dense: int
    dense_int8: int
    sparse: int
    sparse_int8: int
    layout: str
    layout_int8: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0


_COLUMNS = ("dense", "dense_int8", "sparse", "sparse_int8")


@dataclass(frozen=True)
class SizeReport:
    """Bytes of a state_dict's tensors: dense, dense int8, compressed, compressed int8.

    The numbers are the tensor bytes of the files (``safetensors.torch.save_file`` for the dense
    column, :func:`~hadamard_sparse.compress.save_compressed` for the others) without their
    header (a JSON entry of about 70 bytes plus the key per stored tensor, and the checksums).

    Attributes:
        tensors: one :class:`TensorSize` per state_dict entry, in state_dict order.
    """

    tensors: tuple[TensorSize, ...]

    @property
    def dense(self) -> int:
        return sum(t.dense for t in self.tensors)

    @property
    def dense_int8(self) -> int:
        return sum(t.dense_int8 for t in self.tensors)

    @property
    def sparse(self) -> int:
        return sum(t.sparse for t in self.tensors)

    @property
    def sparse_int8(self) -> int:
        return sum(t.sparse_int8 for t in self.tensors)

    def ratio(self, column: str) -> float:
        """``column``'s total over the dense total, e.g. ``report.ratio("sparse_int8")``."""
        if column not in _COLUMNS:
            raise KeyError(f"column must be one of {_COLUMNS}, got {column!r}")
        return getattr(self, column) / self.dense if self.dense else 1.0

    def __getitem__(self, name: str) -> TensorSize:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``{"tensors": [{name, shape, ..., density}], "dense", ..., "ratios": {column: ratio}}``."""
        return {
            "tensors": [{**asdict(t), "shape": list(t.shape), "density": t.density} for t in self.tensors],
            **{c: getattr(self, c) for c in _COLUMNS},
            "ratios": {c: self.ratio(c) for c in _COLUMNS},
        }

    def __str__(self) -> str:
        def row(t: TensorSize) -> tuple[str, ...]:
            layout = t.layout if t.layout == t.layout_int8 else f"{t.layout}/{t.layout_int8}"
            return (
                t.name,
                "x".join(map(str, t.shape)),
                t.dtype + (" (int8)" if t.quantized else ""),
                f"{t.density:.2%}",
                layout,
                *(f"{getattr(t, c):,}" for c in _COLUMNS),
            )

        head = (
            "tensor",
            "shape",
            "dtype",
            "density",
            "layout",
            "dense",
            "dense int8",
            "sparse",
            "sparse int8",
        )
        total = ("total", "", "", "", "", *(f"{getattr(self, c):,}" for c in _COLUMNS))
        ratio = ("ratio", "", "", "", "", *(f"{self.ratio(c):.3f}x" for c in _COLUMNS))
        rows = [row(t) for t in self.tensors]
        widths = [max(len(r[i]) for r in [head, total, ratio, *rows]) for i in range(len(head))]

        def fmt(r: tuple[str, ...]) -> str:
            return "  ".join(v.ljust(w) if i < 5 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))

        rule = "-" * len(fmt(head))
        return "\n".join([fmt(head), rule, *map(fmt, rows), rule, fmt(total), fmt(ratio)]) + "\n(bytes)"


def size_report(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    *,
    quantize_include: Sequence[str] | None = None,
    quantize_exclude: Sequence[str] = (),
) -> SizeReport:
    """Bytes of every state_dict tensor: dense, dense int8, compressed and compressed int8.

    For each tensor, the layout and bytes are those :func:`~hadamard_sparse.compress.compress_state_dict`
    chooses (index overhead included: bitmask or CSR, whichever is smaller), without quantizing
    and with ``quantize="int8"`` (and the same ``quantize_include`` / ``quantize_exclude``).
    A model's ``state_dict()`` is what is measured: a sparsified model's effective weights and
    ``torch.bool`` masks; tied tensors count under each name, as ``save_compressed`` writes them.

    Args:
        model_or_state_dict: a model, or names to tensors.
        quantize_include: glob patterns of the keys to quantize, replacing the default rule
            (floating tensors with two or more dimensions).
        quantize_exclude: glob patterns of keys kept exact.

    Returns:
        A :class:`SizeReport`; ``str(report)`` is a table, ``report.to_dict()`` plain data.

    Example::

        >>> report = hs.size_report(model)
        >>> print(report)
        >>> report.ratio("sparse_int8")  # compressed int8 bytes over dense bytes
    """
    if isinstance(model_or_state_dict, nn.Module):
        state_dict: Mapping[str, torch.Tensor] = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state_dict = model_or_state_dict
    else:
        raise InvalidTypeError(
            f"model_or_state_dict must be an nn.Module or a mapping of names to tensors, "
            f"got {type(model_or_state_dict).__name__}"
        )
    _, include, exclude = check_quantize("int8", quantize_include, quantize_exclude)
    check_state_dict(state_dict)
    chosen = quantized_keys(state_dict, include, exclude)
    rows = []
    with torch.no_grad():
        for key, t in state_dict.items():
            t = t.detach()
            exact = plan_tensor(key, t)
            q = plan_tensor(key, t, quantized=True) if key in chosen else exact
            dense = t.numel() * t.element_size()
            n_rows = t.shape[0] if t.dim() >= 2 else 1
            dense_int8 = 8 * (5 + t.dim()) + t.numel() + 4 * n_rows if key in chosen else dense
            rows.append(
                TensorSize(
                    name=key,
                    shape=tuple(t.shape),
                    dtype=str(t.dtype).removeprefix("torch."),
                    nnz=exact.nnz,
                    quantized=key in chosen,
                    dense=dense,
                    dense_int8=dense_int8,
                    sparse=exact.payload,
                    sparse_int8=q.payload,
                    layout=LAYOUT_NAMES[exact.layout],
                    layout_int8=LAYOUT_NAMES[q.layout],
                )
            )
    return SizeReport(tuple(rows))
