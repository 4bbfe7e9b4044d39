"""Optional matplotlib helpers: masks, per-layer sparsity, schedule curves and weight histograms.

matplotlib is imported only when a function is called; install it with the ``plot`` extra
(``pip install "hadamard-sparse[plot]"``). Each function draws on ``ax`` (a new figure when
``None``) and returns the Axes; none calls ``plt.show()``.

Example::

    >>> from hadamard_sparse import plot
    >>> ax = plot.layer_sparsity(hs.sparsify(model, 0.9))
    >>> ax.figure.savefig("sparsity.png")
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layers import resolve_targets
from .report import SparsityReport, sparsity_report

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["layer_sparsity", "mask", "sparsity_curve", "weight_histogram"]

_EXTRA_HINT = 'pip install "hadamard-sparse[plot]"'


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            f"hadamard_sparse.plot needs matplotlib; install the plot extra: {_EXTRA_HINT}"
        ) from e
    return plt


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        if not hasattr(ax, "figure") or not hasattr(ax, "imshow"):
            raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
        return ax
    _, new = _pyplot().subplots(figsize=figsize, layout="constrained")
    return new


def _tile(w: torch.Tensor) -> torch.Tensor:
    """A 2-D image of ``w``: conv kernels tiled on an (out x in) grid with one-pixel NaN gaps."""
    w = w.detach().to("cpu", torch.float32)
    if w.dim() == 0:
        return w.reshape(1, 1)
    if w.dim() == 1:
        return w.reshape(1, -1)
    if w.dim() == 2:
        return w
    out_c, in_c = w.shape[0], w.shape[1]
    k = w.reshape(out_c, in_c, w.shape[2], -1)  # Conv3d kernels: depth and height stacked
    kh, kw = k.shape[2], k.shape[3]
    if kh * kw == 1:
        return k.reshape(out_c, in_c)
    img = torch.full((out_c * (kh + 1) - 1, in_c * (kw + 1) - 1), float("nan"))
    for i in range(out_c):
        for j in range(in_c):
            img[i * (kh + 1) : i * (kh + 1) + kh, j * (kw + 1) : j * (kw + 1) + kw] = k[i, j]
    return img


def mask(
    module_or_tensor: nn.Module | torch.Tensor,
    ax: Axes | None = None,
    *,
    name: str = "weight",
    show: str = "mask",
) -> Axes:
    r"""Draw a layer's mask (or its effective weight) as an image; conv filters are tiled.

    A 2-D weight is drawn as ``(out, in)``; a conv weight ``(out, in, kh, kw)`` as an ``out x in``
    grid of ``kh x kw`` kernels separated by thin gaps. Kept entries are dark, pruned ones white.

    Args:
        module_or_tensor: a module (its effective ``name`` tensor is read, i.e. with masks applied),
            a boolean mask, or a weight tensor (its zeros are the pruned entries).
        ax: the Axes to draw on; a new figure when ``None``.
        name: the tensor of a module to draw, or the qualified name of a tensor of one of its
            submodules (``plot.mask(model, name="features.0.weight")``), which then titles the
            plot. Default: ``"weight"`` (titled with the layer type, e.g. ``"Conv2d.weight"``).
        show: ``"mask"`` (kept vs pruned) or ``"weight"`` (signed effective values on a diverging
            colour map, pruned entries white). Default: ``"mask"``.

    Returns:
        The matplotlib Axes.

    Example::

        >>> ax = plot.mask(hs.sparsify(torch.nn.Linear(64, 32), 0.9))
        >>> ax = plot.mask(model, name="features.0.weight")  # titled "features.0.weight [...]"
    """
    if show not in ("mask", "weight"):
        raise ValueError(f"show must be 'mask' or 'weight', got {show!r}")
    if isinstance(module_or_tensor, nn.Module):
        owner = _owner(module_or_tensor, name)
        attr = name.rpartition(".")[2]
        with torch.no_grad():
            w = getattr(owner, attr)
        title = (
            name
            if owner is not module_or_tensor
            else f"{parametrize.type_before_parametrizations(owner).__name__}.{name}"
        )
    elif isinstance(module_or_tensor, torch.Tensor):
        w, title = module_or_tensor, "tensor"
    else:
        raise TypeError(
            f"module_or_tensor must be an nn.Module or a torch.Tensor, got {type(module_or_tensor).__name__}"
        )
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{title} must be a tensor, got {type(w).__name__}")
    w = w.detach()
    kept = w if w.dtype == torch.bool else w != 0
    if show == "weight" and w.dtype == torch.bool:
        raise ValueError("show='weight' needs a weight tensor or a module, got a boolean mask")
    ax = _axes(ax, (6, 4))
    plt = _pyplot()
    n = kept.numel()
    sparsity = 1.0 - int(kept.sum()) / n if n else 0.0
    if show == "mask":
        img = _tile(kept.float())
        from matplotlib.colors import ListedColormap

        cmap = ListedColormap(["white", "#1f2d3d"]).with_extremes(bad="#d0d7de")
        ax.imshow(
            img.numpy(),
            cmap=cmap,
            vmin=0,
            vmax=1,
            interpolation="nearest",
            aspect=_aspect(img, tiled=w.dim() > 2),
        )
    else:
        vals = _tile(w.float().masked_fill(~kept, float("nan")))
        lim = float(torch.nan_to_num(vals, nan=0.0).abs().max()) or 1.0
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
        im = ax.imshow(
            vals.numpy(),
            cmap=cmap,
            vmin=-lim,
            vmax=lim,
            interpolation="nearest",
            aspect=_aspect(vals, tiled=w.dim() > 2),
        )
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    shape = "x".join(map(str, w.shape))
    ax.set_title(f"{title} [{shape}]  sparsity {sparsity:.1%}")
    if w.dim() <= 2 or (w.dim() > 2 and w[0, 0].numel() == 1):
        ax.set_xlabel("input")
        ax.set_ylabel("output")
    else:
        k = w.reshape(w.shape[0], w.shape[1], w.shape[2], -1)
        _channel_ticks(ax.xaxis, w.shape[1], k.shape[3] + 1)
        _channel_ticks(ax.yaxis, w.shape[0], k.shape[2] + 1)
        ax.set_xlabel(f"input channel ({k.shape[2]}x{k.shape[3]} kernels tiled)")
        ax.set_ylabel("output channel")
    return ax


def _owner(module: nn.Module, name: object) -> nn.Module:
    """The submodule that holds tensor ``name`` (an attribute, or a qualified ``"a.b.weight"``)."""
    if isinstance(name, str) and name:
        prefix, _, attr = name.rpartition(".")
        try:
            owner = module.get_submodule(prefix) if prefix else module
        except AttributeError:
            owner = None
        if owner is not None and hasattr(owner, attr):
            return owner
    raise ValueError(
        f"name must name a tensor of {type(module).__name__} or a qualified tensor name of one of its "
        f"submodules (e.g. '0.weight'), got {name!r}"
    )


def _aspect(img: torch.Tensor, tiled: bool) -> str:
    """Square pixels for tiled conv kernels (unless too elongated to read); matrices fill the Axes."""
    h, w = img.shape
    return "equal" if tiled and 1 / 4 <= h / w <= 4 else "auto"


def _channel_ticks(axis: Any, n: int, stride: int, max_ticks: int = 10) -> None:
    """Ticks at the centres of tiled kernels, labelled by channel index."""
    every = max(1, math.ceil(n / max_ticks))
    idx = list(range(0, n, every))
    axis.set_ticks([i * stride + (stride - 2) / 2 for i in idx])
    axis.set_ticklabels([str(i) for i in idx])


def _report_rows(model_or_report: Any) -> list[tuple[str, int, int]]:
    if isinstance(model_or_report, nn.Module):
        model_or_report = sparsity_report(model_or_report)
    if isinstance(model_or_report, SparsityReport):
        return [(t.name, t.numel, t.zeros) for t in model_or_report.tensors]
    if isinstance(model_or_report, Mapping) and "tensors" in model_or_report:
        try:
            return [(str(t["name"]), int(t["numel"]), int(t["zeros"])) for t in model_or_report["tensors"]]
        except (KeyError, TypeError) as e:
            raise ValueError(f"model_or_report dict has malformed 'tensors' rows: {e}") from e
    raise TypeError(
        "model_or_report must be an nn.Module, a SparsityReport or SparsityReport.to_dict(), "
        f"got {type(model_or_report).__name__}"
    )


def layer_sparsity(
    model_or_report: nn.Module | SparsityReport | Mapping[str, Any], ax: Axes | None = None
) -> Axes:
    r"""Draw the sparsity of each tensor as horizontal bars, labelled with its parameter counts.

    Args:
        model_or_report: a model (its :func:`~hadamard_sparse.sparsity_report` is taken), a
            :class:`~hadamard_sparse.SparsityReport`, or its ``to_dict()``.
        ax: the Axes to draw on; a new figure when ``None``.

    Returns:
        The matplotlib Axes.

    Example::

        >>> ax = plot.layer_sparsity(hs.sparsity_report(hs.sparsify(model, 0.8)))
    """
    rows = _report_rows(model_or_report)
    if not rows:
        raise ValueError("model_or_report has no tensors to draw (no targeted or parametrized tensor)")
    ax = _axes(ax, (7, 0.6 + 0.35 * len(rows)))
    names = [r[0] for r in rows]
    sparsities = [r[2] / r[1] if r[1] else 0.0 for r in rows]
    ys = list(range(len(rows)))
    ax.barh(ys, [1.0] * len(rows), color="#e8e8e8")
    ax.barh(ys, sparsities, color="#3b6ea8")
    for y, (_, numel, zeros), s in zip(ys, rows, sparsities):
        ax.text(
            0.99,
            y,
            f"{s:.1%}  ({numel - zeros:,} of {numel:,} kept)",
            va="center",
            ha="right",
            fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 1},
        )
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("sparsity (fraction of exact zeros)")
    total_n = sum(r[1] for r in rows)
    total_z = sum(r[2] for r in rows)
    ax.set_title(f"sparsity per tensor; total {total_z / total_n if total_n else 0.0:.1%} of {total_n:,}")
    return ax


def _history_rows(history: Any) -> list[tuple[int, float, float]]:
    if hasattr(history, "history") and not isinstance(history, (list, tuple)):
        history = history.history
    if not isinstance(history, Iterable) or isinstance(history, (str, bytes, Mapping)):
        raise TypeError(
            f"history must be a schedule or a list of (step, target, achieved) tuples, got {type(history).__name__}"
        )
    rows = []
    for row in history:
        if not isinstance(row, Sequence) or len(row) != 3:
            raise ValueError(f"history rows must be (step, target, achieved) tuples, got {row!r}")
        rows.append((int(row[0]), float(row[1]), float(row[2])))
    if not rows:
        raise ValueError("history is empty: step the schedule before drawing its curve")
    return rows


def sparsity_curve(history: Any, ax: Axes | None = None) -> Axes:
    r"""Draw a schedule's target and achieved sparsity against the training step.

    Args:
        history: a schedule (its ``history`` attribute is read) or a list of
            ``(step, target_sparsity, achieved_sparsity)`` tuples, one per mask update; achieved
            counts the exact zeros of the effective weights, like :func:`hs.sparsity_report`.
        ax: the Axes to draw on; a new figure when ``None``.

    Returns:
        The matplotlib Axes.

    Example::

        >>> sched = hs.GradualPruning(model, 0.9, end_step=1000, every=100)
        >>> ...  # training loop calling sched.step()
        >>> ax = plot.sparsity_curve(sched)
    """
    rows = sorted(_history_rows(history))
    ax = _axes(ax, (6, 3.5))
    steps = [r[0] for r in rows]
    ax.step(steps, [r[1] for r in rows], where="post", color="#888888", label="target")
    ax.plot(steps, [r[2] for r in rows], "o", color="#c0392b", markersize=4, label="achieved")
    ax.set_xlabel("step")
    ax.set_ylabel("sparsity")
    top = max(max(r[1] for r in rows), max(r[2] for r in rows))
    ax.set_ylim(-0.02, max(1.0, top) + 0.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"sparsity schedule: {rows[-1][2]:.1%} at step {rows[-1][0]}")
    return ax


def _effective_weights(model_or_tensor: Any) -> list[torch.Tensor]:
    if isinstance(model_or_tensor, torch.Tensor):
        return [model_or_tensor.detach()]
    if isinstance(model_or_tensor, nn.Module):
        with torch.no_grad():
            ws = [t.value().detach() for t in resolve_targets(model_or_tensor, warn_tied=False)]
        if not ws:
            raise ValueError(f"model {type(model_or_tensor).__name__} has no targeted weight to draw")
        return ws
    raise TypeError(f"model must be an nn.Module or a torch.Tensor, got {type(model_or_tensor).__name__}")


def weight_histogram(model: nn.Module | torch.Tensor, ax: Axes | None = None, *, bins: int = 101) -> Axes:
    r"""Histogram of the effective weights of the targeted tensors, with the exact zeros shown apart.

    Nonzero weights are binned on a log-count axis; the exact zeros (the mass a mask or a collapsed
    factorization puts at 0) are drawn as one red bar at 0 and counted in the title.

    Args:
        model: a model (effective weights of the same tensors as ``sparsify`` targets) or a tensor.
        ax: the Axes to draw on; a new figure when ``None``.
        bins: number of bins. Default: 101.

    Returns:
        The matplotlib Axes.

    Example::

        >>> ax = plot.weight_histogram(hs.sparsify(model, 0.9))
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    ws = _effective_weights(model)
    flat = torch.cat([w.reshape(-1).to("cpu", torch.float32) for w in ws])
    if flat.numel() == 0:
        raise ValueError("model has only empty weights; nothing to draw")
    zeros = int((flat == 0).sum())
    nz = flat[flat != 0].numpy()
    lim = float(flat.abs().max()) or 1.0
    if not math.isfinite(lim):
        raise ValueError("model has non-finite weights; cannot draw a histogram")
    ax = _axes(ax, (6, 3.5))
    width = 2 * lim / bins
    if nz.size:
        ax.hist(nz, bins=bins, range=(-lim, lim), color="#3b6ea8", label="nonzero")
    if zeros:
        ax.bar([0.0], [zeros], width=width, color="#c0392b", label="exact zeros")
    ax.set_yscale("log")
    ax.set_xlabel("effective weight")
    ax.set_ylabel("count (log)")
    ax.legend(loc="upper right")
    n = flat.numel()
    ax.set_title(f"{n:,} weights, {zeros / n:.1%} exactly zero")
    return ax
