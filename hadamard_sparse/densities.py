"""Per-layer densities for a global sparsity budget: uniform, Erdős-Rényi (ER) and ER-Kernel (ERK).

Follows the RigL paper (Evci et al. 2020, arXiv 1911.11134, section 3): the density of a
tensor of shape ``(n_out, n_in, *kernel)`` is proportional to

- ER: ``(n_out + n_in) / (n_out * n_in)``
- ERK: ``(n_out + n_in + sum(kernel)) / (n_out * n_in * prod(kernel))``, i.e. ``sum(shape) / prod(shape)``

scaled by one factor chosen so that the total number of kept weights is exactly
``(1 - sparsity) * N``. A density that would exceed 1 is capped at 1 (the layer stays dense) and the
excess is redistributed over the other layers, largest raw density first, as in the RigL code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._checks import DISTRIBUTIONS, Selectors, check_distribution, check_sparsity
from .errors import InvalidArgumentError, InvalidTypeError, NoTargetsError
from .layers import resolve_targets

__all__ = ["DISTRIBUTIONS", "densities_for_shapes", "layer_densities"]

ShapeLike = torch.Size | Sequence[int] | torch.Tensor


def _raw(shape: tuple[int, ...], distribution: str) -> float:
    if len(shape) < 2 or distribution == "erk":
        return sum(shape) / max(1, math.prod(shape))
    n_out, n_in = shape[0], shape[1]
    return (n_out + n_in) / max(1, n_out * n_in)


def densities_for_shapes(
    shapes: Mapping[str, tuple[int, ...]], sparsity: float, distribution: str
) -> dict[str, float]:
    """Densities (fraction kept) per name for a total sparsity; the core of :func:`layer_densities`."""
    numel = {k: math.prod(s) for k, s in shapes.items()}
    total = sum(numel.values())
    if distribution == "uniform" or total == 0:
        return {k: 1.0 - sparsity for k in shapes}
    raw = {k: _raw(s, distribution) for k, s in shapes.items()}
    kept_budget = (1.0 - sparsity) * total
    dense: set[str] = {k for k, n in numel.items() if n == 0}
    while True:
        free = [k for k in shapes if k not in dense]
        budget = kept_budget - sum(numel[k] for k in dense)
        weighted = sum(raw[k] * numel[k] for k in free)
        if not free or weighted <= 0:
            eps = 0.0
            break
        eps = budget / weighted
        top = max(raw[k] for k in free)
        if eps * top <= 1.0:
            break
        dense.update(k for k in free if raw[k] == top)
    return {k: (1.0 if k in dense else min(1.0, max(0.0, eps * raw[k]))) for k in shapes}


def layer_densities(
    model: nn.Module | Mapping[str, ShapeLike],
    sparsity: float,
    distribution: str = "uniform",
    *,
    include: Selectors = None,
    exclude: Selectors = None,
) -> dict[str, float]:
    r"""Density (fraction of weights kept) of each targeted tensor for a global ``sparsity``.

    The densities satisfy ``sum(d[k] * numel[k]) == (1 - sparsity) * N`` (up to float rounding),
    with every ``d[k]`` in ``[0, 1]``.

    Args:
        model: a model (its targeted tensors, as :func:`~hadamard_sparse.sparsify` resolves them with
            ``include``/``exclude``), or a mapping ``qualified name -> shape`` (a ``torch.Size``, a
            sequence of ints or a tensor whose shape is used).
        sparsity: the global fraction of zeros, in ``[0, 1]``.
        distribution: ``"uniform"`` (every tensor at ``1 - sparsity``), ``"er"`` (Erdős-Rényi) or
            ``"erk"`` (Erdős-Rényi-Kernel). Default: ``"uniform"``.
        include: selectors restricting the targeted tensors (only when ``model`` is a module).
        exclude: selectors removing targeted tensors (only when ``model`` is a module).

    Returns:
        ``{qualified tensor name: density}`` in module order.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(784, 300), torch.nn.Linear(300, 10))
        >>> d = layer_densities(model, 0.9, "erk")
        >>> round(d["0.weight"] * 784 * 300 + d["1.weight"] * 300 * 10) == round(0.1 * (784 * 300 + 3000))
        True
    """
    s = check_sparsity(sparsity)
    dist = check_distribution(distribution)
    shapes: dict[str, tuple[int, ...]] = {}
    if isinstance(model, nn.Module):
        for t in resolve_targets(model, include, exclude):
            shapes[t.qualified] = tuple(t.value().shape)
        if not shapes:
            raise NoTargetsError(
                f"layer_densities: model {type(model).__name__} has no targeted tensor; check include/exclude"
            )
    elif isinstance(model, Mapping):
        if include is not None or exclude is not None:
            raise InvalidArgumentError("include/exclude only apply when model is an nn.Module, got a mapping")
        for k, v in model.items():
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)
            if not isinstance(k, str) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise InvalidTypeError(
                    f"model as a mapping must map str names to shapes (ints >= 0), got {k!r}: {v!r}"
                )
            shapes[k] = shape
    else:
        raise InvalidTypeError(
            f"model must be an nn.Module or a mapping name -> shape, got {type(model).__name__}"
        )
    return densities_for_shapes(shapes, s, dist)
