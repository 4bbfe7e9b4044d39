"""The CSR weight the compiled kernels read: :class:`CSRWeight`, validated when built, and :func:`pack_csr`.

The kernels of :mod:`.kernels` read these arrays through raw pointers: an index out of range
or a decreasing row pointer would read outside the arrays, so every :class:`CSRWeight` is
checked when it is built (dtypes, shapes, devices, index ranges, monotone row pointers), and
integer index dtypes other than the kernel's are converted (``int64`` column indices to
``uint16`` or ``int32``, ``int64`` row pointers to ``int32``), never reinterpreted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, InvalidTypeError

__all__ = ["U16_MAX_COLS", "CSRWeight", "pack_csr"]

#: Largest number of input features stored with uint16 column indices.
U16_MAX_COLS = 1 << 16
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.int64)


def _index_array(name: str, t: object, limit: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.dim() != 1 or t.dtype not in _INT_DTYPES:
        raise InvalidArgumentError(
            f"{name} must be a 1-D dense integer tensor, got shape {tuple(t.shape)}, layout {t.layout}, "
            f"dtype {t.dtype}"
        )
    wide = t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int32)  # uint16 has no min/max
    if t.numel() and (int(wide.min()) < 0 or int(wide.max()) >= limit):
        raise InvalidArgumentError(
            f"{name} must hold values in [0, {limit}), got min {int(wide.min())}, max {int(wide.max())}"
        )
    return t


@dataclass
class CSRWeight:
    """A linear layer's weight in CSR form, as plain tensors the compiled kernel reads.

    Checked when built: ``crow`` must be 1-D with ``out_features + 1`` entries, start at 0, never
    decrease and end at ``nnz``; ``col`` must have ``nnz`` entries in ``[0, in_features)``;
    ``values`` must be a 1-D floating-point tensor; all three on one device. Index dtypes are
    converted to the kernel's (``crow`` to ``int32``; ``col`` to ``uint16`` when
    ``in_features <= 65536``, else ``int32``; a ``uint16`` or ``int32`` ``col`` is kept), and
    the arrays made contiguous.

    Attributes:
        crow: ``int32[out_features + 1]`` row pointers.
        col: column indices, ``uint16`` when ``in_features <= 65536`` (6 bytes per nonzero
            with the value), else ``int32``.
        values: ``float32[nnz]`` nonzero values (other floating dtypes run on ``torch.sparse``).
        shape: ``(out_features, in_features)``.

    Raises:
        InvalidTypeError: an array is not a tensor.
        InvalidArgumentError: a dtype, shape, device or index value does not fit.

    Example::

        >>> w = CSRWeight(torch.tensor([0, 1, 2]), torch.tensor([1, 0]), torch.tensor([2.0, 3.0]), (2, 2))
        >>> w.to_dense()
        tensor([[0., 2.],
                [3., 0.]])
    """

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        shape = self.shape
        if (
            not isinstance(shape, (tuple, list))
            or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise InvalidArgumentError(
                f"shape must be (out_features, in_features), two ints >= 0, got {shape!r}"
            )
        rows, cols = int(shape[0]), int(shape[1])
        v = self.values
        if not isinstance(v, torch.Tensor):
            raise InvalidTypeError(f"values must be a torch.Tensor, got {type(v).__name__}")
        if v.layout != torch.strided or v.dim() != 1 or not v.is_floating_point():
            raise InvalidArgumentError(
                f"values must be a 1-D dense floating-point tensor, got shape {tuple(v.shape)}, "
                f"layout {v.layout}, dtype {v.dtype}"
            )
        nnz = v.numel()
        if nnz >= 2**31:
            raise InvalidArgumentError(f"values has {nnz} entries; the CSR kernel takes fewer than 2**31")
        crow = _index_array("crow", self.crow, nnz + 1)
        col = _index_array("col", self.col, max(cols, 1) if nnz else 1)
        if crow.numel() != rows + 1:
            raise InvalidArgumentError(
                f"crow must have out_features + 1 = {rows + 1} entries, got {crow.numel()}"
            )
        if col.numel() != nnz:
            raise InvalidArgumentError(f"col must have as many entries as values ({nnz}), got {col.numel()}")
        if nnz and cols == 0:
            raise InvalidArgumentError(f"a weight with in_features = 0 holds no values, got {nnz}")
        if int(crow[0]) != 0 or int(crow[-1]) != nnz:
            raise InvalidArgumentError(
                f"crow must start at 0 and end at nnz = {nnz}, got {int(crow[0])} and {int(crow[-1])}"
            )
        if rows and bool((crow[1:] < crow[:-1]).any()):
            raise InvalidArgumentError("crow must not decrease (row r holds col[crow[r]:crow[r + 1]])")
        if not (crow.device == col.device == v.device):
            raise InvalidArgumentError(
                f"crow, col and values must be on one device, got {crow.device}, {col.device}, {v.device}"
            )
        if col.dtype not in (torch.uint16, torch.int32):
            col = col.to(torch.int32).to(torch.uint16) if cols <= U16_MAX_COLS else col.to(torch.int32)
        self.crow = crow.to(torch.int32).contiguous()
        self.col = col.contiguous()
        self.values = v.contiguous()
        self.shape = (rows, cols)

    @classmethod
    def unchecked(
        cls, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
    ) -> CSRWeight:
        """Wrap arrays already checked (a module's own buffers) without checking them again: no cost per call."""
        new = cls.__new__(cls)
        new.crow, new.col, new.values, new.shape = crow, col, values, shape
        return new

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
    crow = torch.zeros(rows + 1, dtype=torch.int32, device=w.device)
    crow[1:] = nz.sum(1).cumsum(0).to(torch.int32)
    col = nz.nonzero()[:, 1]
    col = col.to(torch.int32).to(torch.uint16) if cols <= U16_MAX_COLS else col.to(torch.int32)
    return CSRWeight(crow.contiguous(), col.contiguous(), w[nz].contiguous(), (int(rows), int(cols)))
