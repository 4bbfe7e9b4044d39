"""Mask structures: which groups of weights are pruned together.

A structure turns per-element scores (from a registered method, e.g. ``|w|``)
into per-group scores, picks the groups to prune with the same exact selection
as unstructured pruning, and expands the chosen groups into a keep-mask:

- :class:`Channels` (``"row"``/``"out_channel"``, ``"column"``/``"in_channel"``): whole output
  neurons / conv filters, or whole inputs. Stored compactly, e.g. ``(out, 1, 1, 1)``.
- :class:`NM` (``"2:4"``, ``"4:8"``, ...): ``N`` zeros in every ``M`` consecutive weights
  along the input dimension. Stored full shape.
- :class:`Block`: whole ``rows x cols`` blocks of the ``(out, in)`` matrix; conv kernels are
  folded in, so the mask is stored as ``(out, in, 1, 1)`` for a Conv2d.

Where the output and input dimensions of each layer type live comes from
:func:`hadamard_sparse.layers.weight_dims`. See ``docs/structured.md`` for the
rules (counts, scopes, normalisation) and the reasons behind them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch

from ._checks import check_norm, check_positive_int
from .errors import InvalidArgumentError, InvalidTypeError
from .layers import Target, weight_dims

__all__ = [
    "MODEL_STRUCTURES",
    "NM",
    "Block",
    "Channels",
    "Structure",
    "StructureLike",
    "check_sparsity",
    "check_targets",
    "parse_structure",
    "register_model_structure",
]

_ROW_NAMES = ("row", "out_channel")
_COLUMN_NAMES = ("column", "in_channel")
_NM_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_DEFAULT_SPARSITY = 0.7


def _normalised_norm(x: torch.Tensor, dims: tuple[int, ...], norm: str) -> torch.Tensor:
    """Mean |x| (``"l1"``) or root mean square (``"l2"``) over ``dims``: the norm divided by size^(1/p)."""
    x = x.to(torch.float32)
    if norm == "l1":
        return x.abs().mean(dim=dims)
    return x.square().mean(dim=dims).sqrt()


class Structure:
    """Base class of the mask structures.

    A structure splits a weight into groups, scores each group from per-element
    scores, and expands a per-group keep decision into a (possibly compact,
    broadcastable) boolean keep-mask. Subclasses: :class:`Channels`, :class:`NM`,
    :class:`Block`.
    """

    @property
    def group_fraction(self) -> float:
        """Fraction of a group's entries that are zeroed when the group is pruned (``N/M`` for N:M)."""
        return 1.0

    @property
    def max_sparsity(self) -> float:
        """The largest ``sparsity`` this structure can reach (``N/M`` for :class:`NM`, else 1)."""
        return 1.0

    @property
    def default_sparsity(self) -> float:
        """The sparsity used when ``sparsify`` gets ``sparsity=None``."""
        return _DEFAULT_SPARSITY

    def problem(self, shape: torch.Size, out_dim: int, in_dim: int) -> str | None:
        """Why this structure cannot apply to a tensor of ``shape`` (``None`` when it can)."""
        if len(shape) < 2:
            return (
                f"has shape {tuple(shape)}; structures need a tensor with at least 2 dimensions (to prune "
                "a channel with its bias and BatchNorm entries use structure=hs.ChannelGroups(model, x))"
            )
        return None

    def mask_shape(self, shape: torch.Size, out_dim: int, in_dim: int) -> torch.Size:
        """Shape of the stored (compact) mask buffer for a tensor of ``shape``."""
        raise NotImplementedError

    def n_groups(self, shape: torch.Size, out_dim: int, in_dim: int) -> int:
        """How many groups a tensor of ``shape`` has."""
        raise NotImplementedError

    def group_scores(self, scores: torch.Tensor, out_dim: int, in_dim: int) -> torch.Tensor:
        """Flat float32 scores of the groups (higher is kept), from element scores of the tensor's shape."""
        raise NotImplementedError

    def expand(
        self,
        keep_groups: torch.Tensor,
        scores: Callable[[], torch.Tensor],
        shape: torch.Size,
        out_dim: int,
        in_dim: int,
    ) -> torch.Tensor:
        """The compact bool keep-mask (shape :meth:`mask_shape`) from a flat per-group keep decision."""
        raise NotImplementedError

    def n_units(self, shape: torch.Size, out_dim: int, in_dim: int) -> int | None:
        """Into how many equal runs the flat group scores split, each of which must keep a group.

        Used by the ``min_keep`` floor of global selection (:func:`~hadamard_sparse.sparsify`):
        if a run loses all its groups, a whole tensor or output unit is gone. Default ``1``: the
        tensor as a whole (rows and columns). ``None``: pruning never empties an output unit (N:M).
        """
        return 1


@dataclass(frozen=True)
class Channels(Structure):
    r"""Whole rows (output neurons / conv filters) or whole columns (inputs / input channels).

    A row is everything that produces one output: ``weight[i]`` of a Linear or
    Conv, ``weight[:, i]`` of a ConvTranspose or Hugging Face ``Conv1D``. A column
    is everything that reads one input (for a grouped conv, input channel ``j`` of
    every group, since the weight's input dimension has ``in_channels // groups``
    entries). Groups are scored by the normalised norm of their element scores:
    the mean (``"l1"``) or root mean square (``"l2"``), i.e. the norm divided by
    ``size^(1/p)``, so that groups of different sizes in different layers compare
    fairly under ``scope="global"``.

    The mask is stored compactly: ``(out, 1)`` for rows of a Linear,
    ``(1, in, 1, 1)`` for columns of a Conv2d, and so on.

    Args:
        axis: ``"row"``/``"out_channel"`` or ``"column"``/``"in_channel"``. Default: ``"row"``.
        norm: ``"l1"`` or ``"l2"``. Default: ``"l2"``.

    Example::

        >>> hs.sparsify(model, 0.5, structure=Channels("row", norm="l1"))
    """

    axis: str = "row"
    norm: str = "l2"

    def __post_init__(self) -> None:
        if self.axis not in _ROW_NAMES + _COLUMN_NAMES:
            raise InvalidArgumentError(
                f"axis must be one of {list(_ROW_NAMES + _COLUMN_NAMES)}, got {self.axis!r}"
            )
        check_norm(self.norm)
        object.__setattr__(self, "axis", "row" if self.axis in _ROW_NAMES else "column")

    def _dim(self, out_dim: int, in_dim: int) -> int:
        return out_dim if self.axis == "row" else in_dim

    def mask_shape(self, shape: torch.Size, out_dim: int, in_dim: int) -> torch.Size:
        d = self._dim(out_dim, in_dim)
        return torch.Size(n if i == d else 1 for i, n in enumerate(shape))

    def n_groups(self, shape: torch.Size, out_dim: int, in_dim: int) -> int:
        return shape[self._dim(out_dim, in_dim)]

    def group_scores(self, scores: torch.Tensor, out_dim: int, in_dim: int) -> torch.Tensor:
        d = self._dim(out_dim, in_dim)
        x = scores.movedim(d, 0).reshape(scores.shape[d], -1)
        return _normalised_norm(x, (1,), self.norm)

    def expand(
        self,
        keep_groups: torch.Tensor,
        scores: Callable[[], torch.Tensor],
        shape: torch.Size,
        out_dim: int,
        in_dim: int,
    ) -> torch.Tensor:
        return keep_groups.reshape(self.mask_shape(shape, out_dim, in_dim))


@dataclass(frozen=True)
class NM(Structure):
    r"""``n`` zeros in every ``m`` consecutive weights along the input dimension (e.g. 2:4).

    Groups run along the dimension that indexes inputs: dim 1 of Linear, Conv,
    RNN and MultiheadAttention weights, dim 0 of ConvTranspose and Hugging Face
    ``Conv1D`` weights. For convolutions a group is ``m`` consecutive input
    channels at one kernel position (the NVIDIA ASP / TensorRT convention): in the
    channels-last GEMM view ``weight.movedim(1, -1).reshape(out, -1)`` every ``m``
    consecutive entries of a row hold exactly ``n`` zeros. The input dimension must
    be divisible by ``m``. Within a group the ``n`` lowest scores are pruned (ties:
    the lower index first). The mask is stored full shape.

    With ``sparsity == n / m`` (the default) every group is pruned. A smaller
    ``sparsity`` N:M-prunes only the groups whose ``n`` lowest scores sum lowest,
    exactly ``round(sparsity * m / n * n_groups)`` of them: this is how gradual
    schedules ramp up to a full N:M pattern.

    Args:
        n: zeros per group, ``1 <= n < m``.
        m: group length.

    Example::

        >>> hs.sparsify(model, structure="2:4")  # same as structure=NM(2, 4)
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        check_positive_int(self.n, "n")
        check_positive_int(self.m, "m")
        if self.n >= self.m:
            raise InvalidArgumentError(f"an N:M structure needs 1 <= N < M, got N={self.n}, M={self.m}")

    @property
    def group_fraction(self) -> float:
        return self.n / self.m

    @property
    def max_sparsity(self) -> float:
        return self.n / self.m

    @property
    def default_sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def problem(self, shape: torch.Size, out_dim: int, in_dim: int) -> str | None:
        p = super().problem(shape, out_dim, in_dim)
        if p is None and shape[in_dim] % self.m:
            p = (
                f"has shape {tuple(shape)}; its input dimension (dim {in_dim}, size {shape[in_dim]}) "
                f"is not divisible by M={self.m}"
            )
        return p

    def mask_shape(self, shape: torch.Size, out_dim: int, in_dim: int) -> torch.Size:
        return torch.Size(shape)

    def n_groups(self, shape: torch.Size, out_dim: int, in_dim: int) -> int:
        return math.prod(shape) // self.m

    def n_units(self, shape: torch.Size, out_dim: int, in_dim: int) -> int | None:
        return None  # every group keeps M - N of its M weights

    def _grouped(self, scores: torch.Tensor, in_dim: int) -> torch.Tensor:
        return scores.to(torch.float32).movedim(in_dim, -1).reshape(-1, self.m)

    def group_scores(self, scores: torch.Tensor, out_dim: int, in_dim: int) -> torch.Tensor:
        g = self._grouped(scores, in_dim)
        return g.sort(dim=1, stable=True).values[:, : self.n].sum(dim=1)

    def expand(
        self,
        keep_groups: torch.Tensor,
        scores: Callable[[], torch.Tensor],
        shape: torch.Size,
        out_dim: int,
        in_dim: int,
    ) -> torch.Tensor:
        s = scores()
        g = self._grouped(s, in_dim)
        order = g.argsort(dim=1, stable=True)
        lowest = torch.zeros(g.shape, dtype=torch.bool, device=g.device)
        lowest.scatter_(1, order[:, : self.n], True)
        keep = ~(lowest & ~keep_groups.to(g.device).reshape(-1, 1))
        moved = list(s.movedim(in_dim, -1).shape)
        return keep.reshape(moved).movedim(-1, in_dim).contiguous()


@dataclass(frozen=True)
class Block(Structure):
    r"""Whole ``rows x cols`` blocks of the ``(out, in)`` weight matrix.

    The 2D view has outputs as rows and inputs as columns whatever the storage
    layout (a Hugging Face ``Conv1D`` weight ``(in, out)`` is viewed transposed).
    For convolutions the kernel positions are folded into the block: a block is
    ``rows`` output channels x ``cols`` input channels x the whole kernel, so the
    mask is stored as ``(out, in, 1, 1)`` for a Conv2d; in either GEMM view of a
    conv this is a union of dense blocks. Both dimensions must be divisible by
    the block (refused otherwise: block-sparse kernels need whole blocks; exclude
    the layer). Blocks are scored by the normalised norm of their element scores
    (mean for ``"l1"``, root mean square for ``"l2"``).

    Args:
        rows: block height (outputs), positive int.
        cols: block width (inputs), positive int.
        norm: ``"l1"`` or ``"l2"``. Default: ``"l2"``.

    Example::

        >>> hs.sparsify(model, 0.75, structure=Block(16, 16))
    """

    rows: int
    cols: int
    norm: str = "l2"

    def __post_init__(self) -> None:
        check_positive_int(self.rows, "rows")
        check_positive_int(self.cols, "cols")
        check_norm(self.norm)

    def problem(self, shape: torch.Size, out_dim: int, in_dim: int) -> str | None:
        p = super().problem(shape, out_dim, in_dim)
        if p is None and (shape[out_dim] % self.rows or shape[in_dim] % self.cols):
            p = (
                f"has shape {tuple(shape)}, i.e. {shape[out_dim]} outputs (dim {out_dim}) x "
                f"{shape[in_dim]} inputs (dim {in_dim}), not divisible into {self.rows}x{self.cols} blocks"
            )
        return p

    def mask_shape(self, shape: torch.Size, out_dim: int, in_dim: int) -> torch.Size:
        return torch.Size(n if i in (out_dim, in_dim) else 1 for i, n in enumerate(shape))

    def n_groups(self, shape: torch.Size, out_dim: int, in_dim: int) -> int:
        return (shape[out_dim] // self.rows) * (shape[in_dim] // self.cols)

    def n_units(self, shape: torch.Size, out_dim: int, in_dim: int) -> int | None:
        return shape[out_dim] // self.rows  # one run of blocks per block row (group scores are row-major)

    def group_scores(self, scores: torch.Tensor, out_dim: int, in_dim: int) -> torch.Tensor:
        x = scores.movedim((out_dim, in_dim), (0, 1))
        o, i = x.shape[0], x.shape[1]
        x = x.reshape(o // self.rows, self.rows, i // self.cols, self.cols, -1)
        return _normalised_norm(x, (1, 3, 4), self.norm).reshape(-1)

    def expand(
        self,
        keep_groups: torch.Tensor,
        scores: Callable[[], torch.Tensor],
        shape: torch.Size,
        out_dim: int,
        in_dim: int,
    ) -> torch.Tensor:
        o, i = shape[out_dim], shape[in_dim]
        k = keep_groups.reshape(o // self.rows, i // self.cols)
        k = k.repeat_interleave(self.rows, 0).repeat_interleave(self.cols, 1)
        k = k.reshape(o, i, *([1] * (len(shape) - 2)))
        return k.movedim((0, 1), (out_dim, in_dim)).contiguous()


StructureLike = Union[str, Structure, None]

#: Structures built from the model itself (and example inputs), by name: ``builder(model, example_inputs)``.
#: Filled by ``export/groups.py`` ("channel_group", "neuron", "head"); ``sparsify`` builds them.
MODEL_STRUCTURES: dict[str, Callable[..., Structure]] = {}


def register_model_structure(*names: str) -> Callable[[Callable[..., Structure]], Callable[..., Structure]]:
    """Register ``builder(model, example_inputs) -> Structure`` under ``names`` for ``structure=`` strings."""

    def decorator(fn: Callable[..., Structure]) -> Callable[..., Structure]:
        for n in names:
            MODEL_STRUCTURES[n] = fn
        return fn

    return decorator


def parse_structure(structure: StructureLike) -> Structure | None:
    """Turn a ``structure=`` argument into a :class:`Structure` (or ``None`` for unstructured).

    Args:
        structure: ``None``; ``"row"``/``"out_channel"``; ``"column"``/``"in_channel"``;
            an ``"N:M"`` string such as ``"2:4"``; or a :class:`Structure` instance.

    Returns:
        The structure, or ``None``.

    Example::

        >>> parse_structure("2:4")
        NM(n=2, m=4)
    """
    if structure is None or isinstance(structure, Structure):
        return structure
    allowed = (
        "None, 'row'/'out_channel', 'column'/'in_channel', an 'N:M' string such as '2:4', "
        "'channel_group'/'neuron'/'head' (with example_inputs), hs.Channels(...), hs.NM(n, m), "
        "hs.Block(rows, cols), hs.ChannelGroups(model, example_inputs) or hs.Heads(model)"
    )
    if not isinstance(structure, str):
        raise InvalidTypeError(f"structure must be one of {allowed}, got {structure!r}")
    if structure in _ROW_NAMES + _COLUMN_NAMES:
        return Channels(structure)
    if structure in MODEL_STRUCTURES:
        raise InvalidArgumentError(
            f"structure={structure!r} is built from the model: use hs.sparsify(model, ..., "
            f"structure={structure!r}, example_inputs=...) or pass hs.ChannelGroups(model, example_inputs) / "
            "hs.Heads(model) as the structure"
        )
    match = _NM_PATTERN.match(structure)
    if match is None:
        raise InvalidArgumentError(f"structure must be one of {allowed}, got {structure!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise InvalidArgumentError(
            f"structure {structure!r}: an 'N:M' structure needs 1 <= N < M, got N={n}, M={m}"
        )
    return NM(n, m)


def check_targets(
    structure: Structure, targets: Sequence[Target], shapes: Sequence[torch.Size] | None = None
) -> None:
    """Raise an :class:`InvalidArgumentError` (a ``ValueError``) listing every target that ``structure`` cannot apply to.

    Args:
        structure: the structure.
        targets: the tensors to check.
        shapes: their shapes, if already known (else read from the targets).
    """
    problems = []
    for i, t in enumerate(targets):
        out_dim, in_dim = weight_dims(t.module, t.tensor_name)
        shape = t.value().shape if shapes is None else shapes[i]
        p = structure.problem(shape, out_dim, in_dim)
        if p is not None:
            problems.append(f"{t.qualified} {p}")
    if problems:
        raise InvalidArgumentError(
            f"structure {structure} does not fit {len(problems)} tensor(s) "
            "(exclude them with exclude=[...]):\n  " + "\n  ".join(problems)
        )


def check_sparsity(structure: Structure, sparsity: float, arg: str = "sparsity") -> None:
    """Refuse a sparsity above what ``structure`` can reach (``N/M`` for N:M)."""
    if sparsity > structure.max_sparsity + 1e-9:
        raise InvalidArgumentError(
            f"{arg} must be at most {structure.max_sparsity:g} with structure {structure} "
            f"(N/M: every group of M holds at most N zeros), got {sparsity!r}"
        )
