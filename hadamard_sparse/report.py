"""SparsityReport: how sparse each targeted tensor really is, from the effective weights."""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._dtensor import is_dtensor
from .errors import InvalidTypeError
from .layers import resolve_targets

__all__ = ["SparsityReport", "TensorSparsity", "sparsity_report"]


@dataclass(frozen=True)
class TensorSparsity:
    """One row of a :class:`SparsityReport`."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True, repr=False)
class SparsityReport:
    """Per-tensor and total counts of exact zeros in the effective weights.

    ``str(report)`` and ``repr(report)`` are the same text table, so a report left as the last
    expression of a REPL line or an IPython cell shows the table; in a notebook it shows as an
    HTML table (``_repr_html_``).

    Attributes:
        tensors: one :class:`TensorSparsity` per tensor, in module order.
    """

    tensors: tuple[TensorSparsity, ...]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def zeros(self) -> int:
        return sum(t.zeros for t in self.tensors)

    @property
    def sparsity(self) -> float:
        n = self.numel
        return self.zeros / n if n else 0.0

    def __getitem__(self, name: str) -> TensorSparsity:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``{"tensors": [{name, shape, numel, zeros, sparsity}], "numel", "zeros", "sparsity"}``."""
        return {
            "tensors": [{**asdict(t), "shape": list(t.shape), "sparsity": t.sparsity} for t in self.tensors],
            "numel": self.numel,
            "zeros": self.zeros,
            "sparsity": self.sparsity,
        }

    def _cells(self) -> tuple[tuple[str, ...], list[tuple[str, ...]], tuple[str, ...]]:
        """The table's header, one row per tensor, and the total row, as text cells."""
        rows = [
            (t.name, "x".join(map(str, t.shape)), f"{t.numel:,}", f"{t.zeros:,}", f"{t.sparsity:.2%}")
            for t in self.tensors
        ]
        head = ("tensor", "shape", "numel", "zeros", "sparsity")
        total = ("total", "", f"{self.numel:,}", f"{self.zeros:,}", f"{self.sparsity:.2%}")
        return head, rows, total

    def __str__(self) -> str:
        head, rows, total = self._cells()
        widths = [max(len(r[i]) for r in [head, total, *rows]) for i in range(5)]

        def fmt(r: tuple[str, ...]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

        rule = "-" * len(fmt(head))
        return "\n".join([fmt(head), rule, *map(fmt, rows), rule, fmt(total)])

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """IPython's plain-text display: the table."""
        p.text(str(self))

    def _repr_html_(self) -> str:
        """Jupyter's rich display: the table as HTML."""
        head, rows, total = self._cells()

        def tr(cells: tuple[str, ...], tag: str = "td") -> str:
            return (
                "<tr>"
                + "".join(
                    f'<{tag} style="text-align: {"left" if i == 0 else "right"}">{html.escape(c)}</{tag}>'
                    for i, c in enumerate(cells)
                )
                + "</tr>"
            )

        return (
            "<table>"
            f"<thead>{tr(head, 'th')}</thead>"
            f"<tbody>{''.join(map(tr, rows))}</tbody>"
            f"<tfoot>{tr(total, 'th')}</tfoot>"
            "</table>"
        )


def sparsity_report(model: nn.Module) -> SparsityReport:
    r"""Count the exact zeros of every targeted or parametrized tensor of ``model``.

    Counts come from the effective weights (``w * mask``, ``u * v``, or a baked
    plain weight), so the report is the same before and after
    :func:`remove_parametrizations`. A schedule's ``history`` counts its achieved
    sparsity the same way over the tensors it drives, so the two agree at the same step
    (right after a SET/RigL update both include the connections regrown at exactly 0).

    Args:
        model: any model.

    Returns:
        A :class:`SparsityReport`; ``str(report)`` is a table (also its ``repr``, what a REPL or
        a notebook cell shows for ``hs.sparsity_report(model)`` as its last expression),
        ``report.to_dict()`` plain data.

    Example::

        >>> print(sparsity_report(sparsify(model, 0.5)))
        tensor    shape  numel  zeros  sparsity
        ...
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    seen: set[str] = set()
    rows: list[TensorSparsity] = []

    def add(name: str, w: torch.Tensor) -> None:
        if name in seen:
            return
        seen.add(name)
        zeros = (w == 0).sum()
        if is_dtensor(zeros):  # a weight sharded by FSDP2: sum the ranks' counts
            zeros = zeros.full_tensor()
        rows.append(TensorSparsity(name, tuple(w.shape), w.numel(), int(zeros)))

    by_module: dict[int, list[str]] = {}
    for t in resolve_targets(model, warn_tied=False):
        by_module.setdefault(id(t.module), []).append(t.tensor_name)
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            names = list(by_module.get(id(module), []))
            if parametrize.is_parametrized(module):
                names += [n for n in module.parametrizations if n not in names]  # type: ignore[union-attr]
            for tname in names:
                add(f"{mod_name}.{tname}" if mod_name else tname, getattr(module, tname))
    return SparsityReport(tuple(rows))
