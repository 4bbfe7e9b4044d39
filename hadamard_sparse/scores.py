"""Score functions: how important each weight is. Higher scores are kept.

Methods are a registry, not a chain of ifs: :func:`register_score` adds one.
A score function receives a :class:`ScoreContext` and returns a tensor of the
weight's shape. It must be deterministic for a given context (selection may
call it more than once to keep memory bounded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .errors import InvalidArgumentError, InvalidTypeError

__all__ = ["ScoreContext", "available_scores", "get_score", "register_score"]


@dataclass(frozen=True)
class ScoreContext:
    """What a score function may look at for one targeted tensor.

    Attributes:
        name: qualified tensor name, e.g. ``"encoder.0.weight"``.
        module: the module that owns the tensor.
        tensor_name: the tensor's attribute name on ``module``.
        weight: the dense value to score (before any mask), detached.
        seed: a per-tensor seed for methods that draw random numbers.
        stats: optional per-tensor statistics (e.g. from calibration), method specific.
    """

    name: str
    module: nn.Module
    tensor_name: str
    weight: torch.Tensor
    seed: int = 0
    stats: Any = field(default=None, compare=False)


ScoreFn = Callable[[ScoreContext], torch.Tensor]


#: ``apply(target, keep, new_dense_value)``: what a :class:`Pruner` calls for each tensor it prunes;
#: ``sparsify`` registers the mask ``keep`` on the target (a ``layers.Target``) and writes
#: ``new_dense_value`` into its original, undoing every applied tensor if the pruner raises later.
Apply = Callable[[Any, torch.Tensor, torch.Tensor], None]


class Pruner(Protocol):
    """A one-shot pruner: replaces the mask-only path of ``sparsify`` for its method.

    It may also edit the kept weights (SparseGPT's reconstruction, Wanda's refit, oBERT's OBS
    update) and may apply as it goes (SparseGPT gathers each wave's statistics with the earlier
    waves applied). The built-in pruners (``sparsegpt.prune``, ``reconstruct.prune_wanda_refit``,
    ``reconstruct.prune_blocks``, ``dsnot.prune``, ``gradient_scores.obs_prune``) satisfy it; they
    may take further keyword arguments with defaults.

    Args:
        model: the model being pruned.
        targets: the targeted tensors (``layers.Target``), in model order.
        sparsities: one sparsity per target (all equal with ``scope="global"``).
        scope: the method's scope, one of its registered ``scopes``.
        structure: the parsed structure (``structures.NM``, ...) or ``None`` (unstructured).
        calibration: what ``sparsify`` was given as ``calibration`` (batches, ``ActivationStats``,
            a ``GradientScores``).
        apply: :data:`Apply`, called once per pruned tensor.

    Every check should run before the first ``apply``: a refusal then leaves the model unchanged.
    """

    def __call__(
        self,
        model: nn.Module,
        targets: Sequence[Any],
        sparsities: Sequence[float],
        *,
        scope: str,
        structure: Any,
        calibration: Any,
        apply: Apply,
    ) -> None: ...


@dataclass(frozen=True)
class ScoreEntry:
    """One registered method: its score function and what it needs."""

    fn: ScoreFn
    needs_calibration: bool
    scopes: tuple[str, ...]
    needs_gram: bool = False
    pruner: Pruner | None = None
    needs_gradients: bool = False


_SCORES: dict[str, ScoreEntry] = {}


def register_score(
    name: str,
    *,
    needs_calibration: bool = False,
    scopes: tuple[str, ...] = ("global", "layer"),
    needs_gram: bool = False,
    pruner: Pruner | None = None,
    needs_gradients: bool = False,
) -> Callable[[ScoreFn], ScoreFn]:
    """Register a score function under ``name`` (usable as ``sparsify(..., method=name)``).

    Args:
        name: the method name.
        needs_calibration: whether the method needs ``calibration`` data.
        scopes: the ``scope`` values the method supports; others are refused. The first one is
            the method's default scope.
        needs_gram: calibration must also gather the input Gram matrix ``X^T X``.
        pruner: optional :class:`Pruner` that replaces the mask-only path of ``sparsify`` for this
            method (it may edit kept weights, as ``"sparsegpt"`` does); the score function then serves
            mask-only uses such as ``compute_keep_masks``.
        needs_gradients: the method reads gradients gathered during training by a
            :class:`~hadamard_sparse.GradientScores` passed as ``calibration`` (``"movement"``, ``"obs"``);
            its score function then receives that tensor's gradient state as ``ctx.stats``.

    Returns:
        A decorator that registers and returns the function.

    Example::

        >>> @register_score("abs_cubed")
        ... def _abs_cubed(ctx):
        ...     return ctx.weight.abs() ** 3
    """
    if not isinstance(name, str) or not name:
        raise InvalidTypeError(f"name must be a non-empty str, got {name!r}")

    def decorator(fn: ScoreFn) -> ScoreFn:
        _SCORES[name] = ScoreEntry(fn, needs_calibration, tuple(scopes), needs_gram, pruner, needs_gradients)
        return fn

    return decorator


def available_scores() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_SCORES)


def get_score(name: str) -> ScoreEntry:
    """Look up a registered method; raise a ``ValueError`` naming the allowed ones."""
    if not isinstance(name, str) or name not in _SCORES:
        raise InvalidArgumentError(f"method must be one of {available_scores()}, got {name!r}")
    return _SCORES[name]


@register_score("magnitude", scopes=("global", "layer", "row"))
def _magnitude(ctx: ScoreContext) -> torch.Tensor:
    """|w|: the smallest magnitudes are pruned."""
    return ctx.weight.abs()


@register_score("random", scopes=("global", "layer", "row"))
def _random(ctx: ScoreContext) -> torch.Tensor:
    """Uniform random scores from a per-tensor seed (reproducible)."""
    g = torch.Generator(device="cpu").manual_seed(ctx.seed)
    return torch.rand(ctx.weight.shape, generator=g).to(ctx.weight.device)


@register_score("wanda", needs_calibration=True, scopes=("row", "layer"))
def _wanda(ctx: ScoreContext) -> torch.Tensor:
    """Wanda (Sun et al. 2023): ``|W_ij| * ||X_j||_2``, the input feature's norm over calibration data.

    Compared within each output row (``scope="row"``, the default, as in the paper) or within each
    tensor (``"layer"``). ``"global"`` is refused: input norms of different layers are on different
    scales, so one threshold across layers would prune whole layers.
    """
    stats = ctx.stats
    if stats is None or not hasattr(stats, "norms_like_weight"):
        raise InvalidArgumentError(
            f"method 'wanda' needs calibration statistics for {ctx.name}, got {stats!r}"
        )
    norms = stats.norms_like_weight().to(device=ctx.weight.device, dtype=torch.float32)
    return ctx.weight.abs().to(torch.float32) * norms
