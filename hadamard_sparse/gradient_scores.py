"""Scores for pruning *during* fine-tuning, from gradients gathered while training: movement and oBERT.

A :class:`GradientScores` accumulator is built on the model before training. It puts one removable
hook on every targeted Parameter (the ``original`` of a masked tensor, or the plain weight) and, at
every backward pass, records what the two methods need:

* ``"movement"`` (Sanh et al. 2020, arXiv 2005.07683): the first-order Taylor importance
  ``S = -sum_t w_t * g_t`` over the backward passes since the last reset (``w_t`` the weight and
  ``g_t`` its gradient at pass ``t``). Higher is kept: a weight moving away from zero (``w`` and
  ``-g`` of the same sign) gains score, one moving toward zero loses it.
* ``"obs"`` (Kurtic et al. 2022, oBERT, arXiv 2203.07259): the last ``num_grads`` gradients, from
  which the empirical Fisher ``F = (1/m) sum g g^T + damp * I`` is formed block-diagonally (blocks
  of ``block_size`` consecutive weights of the flattened tensor, i.e. along rows). The score is the
  OBS saliency ``rho_i = w_i^2 / (2 [F^-1]_ii)`` and pruning also updates the kept weights of every
  block with the multi-weight OBS update ``dw = -F^-1[:, S] (F^-1[S, S])^-1 w_S`` (``S``: the
  block's pruned entries), which sets ``w_S`` to zero and compensates on the rest.

The gradient recorded is the one of the Parameter the optimizer trains (``original``): through a
mask it is ``mask * dL/dW_effective``, so masked entries get no gradient and no score; both
methods score entries that are masked when scored at ``-inf`` (pruned first, masks stay nested).

The per-tensor state and the Fisher/OBS math are :class:`~hadamard_sparse.tensor_gradients.TensorGradients`.
The methods are registered by :mod:`hadamard_sparse.builtin_methods` (importing this module registers nothing).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from ._checks import Selectors, check_int, check_module
from ._dtensor import is_dtensor, local_tensor
from ._engine import compute_keep_masks, mask_of
from .errors import InvalidArgumentError, InvalidTypeError, NoTargetsError
from .layers import Target, check_not_wrapped, resolve_targets
from .parametrizations import HadamardMask
from .scores import Apply, ScoreContext
from .tensor_gradients import TensorGradients

__all__ = [
    "MOVEMENT_SCOPES",
    "MOVEMENT_WINDOWS",
    "SCOPES",
    "GradientScores",
    "TensorGradients",
    "check_gradients",
    "leaf_of",
    "movement_score",
    "obs_prune",
    "obs_score",
]

#: The scopes of "movement" (the first is the default: each tensor on its own, as Sanh et al.'s top-k per
#: layer; gradient scales differ a lot between layer types) and of "obs" (oBERT prunes globally).
MOVEMENT_SCOPES = ("layer", "global")
#: What a schedule's pruning step does to the movement: nothing ("run") or reset it ("since_prune").
MOVEMENT_WINDOWS = ("run", "since_prune")
SCOPES = ("global", "layer")


def _sharded_targets(model: nn.Module, include: Selectors, exclude: Selectors) -> list[Target] | None:
    """The masked tensors of an FSDP2-sharded model (those its schedules prune), or ``None`` if not sharded.

    ``fully_shard`` changes the class of the modules it shards, so the layer registry does not
    recognise them; the masks (registered before sharding) say what is targeted.
    """
    if not any(is_dtensor(p) for p in model.parameters()):
        return None
    if include is not None or exclude is not None:
        raise InvalidArgumentError(
            f"GradientScores on an FSDP2-sharded model tracks its masked tensors; include={include!r} and "
            f"exclude={exclude!r} must be None there (choose the tensors when registering the masks)"
        )
    return [
        Target(name, module, tname)
        for name, module in model.named_modules()
        if parametrize.is_parametrized(module)
        for tname in module.parametrizations  # type: ignore[union-attr]
        if mask_of(module, tname) is not None
    ]


def leaf_of(module: nn.Module, name: str) -> torch.Tensor | None:
    """The Parameter whose gradient the optimizer sees for ``module.<name>``, or ``None`` if there is not one.

    A tensor masked by this library trains its ``original``; a plain weight trains itself. Chains with
    several originals (``u * v`` factorizations) or with another parametrization before the mask have
    no single Parameter whose gradient is the weight's: ``None``.
    """
    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]  # type: ignore[index, union-attr]
        if not plist.is_tensor or not isinstance(plist[0], HadamardMask):  # type: ignore[union-attr, index]
            return None
        return plist.original  # type: ignore[union-attr, no-any-return]
    p = module._parameters.get(name)
    return p if isinstance(p, nn.Parameter) else None


class GradientScores(Mapping[str, TensorGradients]):
    r"""Records gradients during training for the ``"movement"`` and ``"obs"`` methods.

    Build it on the model before training; it registers one hook per targeted Parameter (removable
    with :meth:`remove`, or use it as a context manager) and records every backward pass: the
    movement ``-sum w * g`` and, with ``num_grads > 0``, the last ``num_grads`` gradients for
    oBERT's block Fisher. Pass it as ``calibration`` to :func:`~hadamard_sparse.sparsify` or to
    :class:`~hadamard_sparse.GradualPruning`. After each of the schedule's pruning steps the kept
    gradients are dropped (oBERT builds each step's Fisher from fresh gradients) and, with
    ``movement="since_prune"``, the movement too. No optimizer is wrapped and no weight is changed
    by the hooks.

    Each backward pass is one gradient (with gradient accumulation, each micro-batch). Gradients
    are the local ones (the hooks fire before DDP averages them): under DDP, :meth:`synchronize`
    averages the movement over the ranks (schedules call it before pruning). With a ``GradScaler`` or a learning-rate
    dependent weighting, build it with ``hooks=False`` and call :meth:`update` after
    ``scaler.unscale_(optimizer)``: it reads each Parameter's ``.grad`` instead.

    Args:
        model: the model to be trained: under DDP, the plain model before wrapping it; under
            FSDP2, the model *after* ``fully_shard`` (which replaces the Parameters): each rank
            then records the movement of its own block of rows from the reduce-scattered
            gradient (read from ``.grad`` in a post-accumulate-grad hook: zero the gradients
            between backward passes, or skip the reduce-scatter of all micro-batches but the
            last with ``set_requires_gradient_sync(False)``). Masks may be registered before or
            after (under FSDP2: before sharding).
        num_grads: how many of the last gradients to keep for ``"obs"`` (``m``; ``0``: none,
            ``"movement"`` only). oBERT uses ``m`` above ``block_size``. Memory: ``m`` float32
            copies of every targeted tensor. Default: ``0``.
        block_size: ``B``, consecutive weights (flattened tensor) per Fisher block. Default: ``50``.
        damp: ``lambda`` added to the Fisher's diagonal (``F + lambda I``), a real number ``> 0``.
            Default: ``1e-7`` (as in oBERT).
        include: which tensors to track, as for :func:`~hadamard_sparse.sparsify`.
        exclude: which tensors to skip.
        hooks: record automatically at each backward pass (``True``) or only when
            :meth:`update` is called (``False``). Default: ``True``.
        movement: ``"run"``: the movement sums every pass since the accumulator was built (or
            :meth:`reset`), as Sanh et al.'s scores; ``"since_prune"``: a schedule's pruning step
            also resets it, so each step ranks by the movement since the previous one. Default:
            ``"run"`` (on ``benchmarks/fine_tune_scores.py`` it kept far more accuracy).

    Raises:
        InvalidArgumentError: a bad argument, or a targeted tensor without a single trainable
            Parameter (e.g. a factorized one); on an FSDP2-sharded model, ``num_grads > 0`` or
            ``include`` / ``exclude``.
        InvalidTypeError: a model wrapped in DDP or FSDP1 (build it on the plain model first).

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> tracker = hs.GradientScores(model)
        >>> model(torch.randn(4, 8)).square().sum().backward()
        >>> tracker.steps
        1
        >>> hs.sparsify(model, 0.5, method="movement", calibration=tracker)
        Sequential(...)
        >>> tracker.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_grads: int = 0,
        block_size: int = 50,
        damp: float = 1e-7,
        include: Selectors = None,
        exclude: Selectors = None,
        hooks: bool = True,
        movement: str = "run",
    ) -> None:
        check_module(model)
        if not any(is_dtensor(p) for p in model.parameters()):  # FSDP2 shards in place: build after it
            check_not_wrapped(model)  # DDP, FSDP1: build on the plain model before wrapping it
        num_grads = check_int(num_grads, "num_grads", 0)
        block_size = check_int(block_size, "block_size", 1)
        if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not 0 < damp < math.inf:
            raise InvalidArgumentError(f"damp must be a finite real number > 0, got {damp!r}")
        if not isinstance(hooks, bool):
            raise InvalidTypeError(f"hooks must be a bool, got {hooks!r}")
        if movement not in MOVEMENT_WINDOWS:
            raise InvalidArgumentError(f"movement must be one of {list(MOVEMENT_WINDOWS)}, got {movement!r}")
        targets = _sharded_targets(model, include, exclude)
        if targets is None:
            targets = resolve_targets(model, include, exclude)
        if not targets:
            raise NoTargetsError(f"GradientScores: model {type(model).__name__} has no tensor to track")
        leaves = [leaf_of(t.module, t.tensor_name) for t in targets]
        bad = [t.qualified for t, p in zip(targets, leaves) if p is None or not p.requires_grad]
        if bad:
            raise InvalidArgumentError(
                f"GradientScores needs every tracked tensor to be one trainable Parameter (plain or masked, "
                f"mask first in its chain); not so for {bad}: exclude them with exclude=[...]"
            )
        sharded = [t.qualified for t, p in zip(targets, leaves) if is_dtensor(p)]
        if sharded and num_grads:
            raise InvalidArgumentError(
                f"GradientScores: num_grads={num_grads} keeps gradients for 'obs', whose block Fisher needs "
                f"whole rows of every tensor, but {sharded[:3]} are sharded with FSDP2; build it with "
                "num_grads=0 ('movement' works on shards)"
            )
        self.num_grads: int = num_grads
        self.block_size: int = block_size
        self.damp: float = float(damp)
        self.movement: str = movement
        self._tensors: dict[str, TensorGradients] = {
            t.qualified: TensorGradients(t.qualified, p, num_grads, block_size, self.damp)  # type: ignore[arg-type]
            for t, p in zip(targets, leaves)
        }
        self._hooked: bool = hooks
        self._handles: list[Any] = [self._register(tg) for tg in self._tensors.values()] if hooks else []

    @staticmethod
    def _register(tg: TensorGradients) -> Any:
        if tg.sharded:  # FSDP2 sets the sharded .grad after its reduce-scatter, outside autograd
            return tg.param.register_post_accumulate_grad_hook(lambda p: tg.add(p.grad))  # type: ignore[arg-type]
        return tg.param.register_hook(lambda grad: tg.add(grad))

    # -- Mapping --------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> TensorGradients:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return (
            f"GradientScores({len(self)} tensors, steps={self.steps}, num_grads={self.num_grads}, "
            f"block_size={self.block_size}, damp={self.damp:g}, movement={self.movement!r}, hooks={'on' if self._handles else 'off'})"
        )

    # -- recording ------------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Backward passes in the movement since it was last reset (the most over the tracked tensors)."""
        return max((tg.steps for tg in self._tensors.values()), default=0)

    def update(self) -> None:
        """Record the current ``.grad`` of every tracked Parameter (for ``hooks=False``; ``None`` grads are skipped)."""
        if self._hooked:
            raise InvalidArgumentError(
                "GradientScores.update() is for trackers built with hooks=False; this one records every "
                "backward pass through its hooks already (update() would count each gradient twice)"
            )
        for tg in self._tensors.values():
            if tg.param.grad is not None:
                tg.add(tg.param.grad)

    def synchronize(self) -> None:
        """Under ``torch.distributed``, average the movement over the ranks, in place (one all-reduce).

        The hooks see each rank's *local* gradient: they fire before DDP averages the gradients, so
        every rank sums ``-w * g`` of its own micro-batches (the weights are the same on every rank).
        Averaging the sums gives, on every rank, the movement of the averaged gradients, the one a
        single process would record on the concatenated batch (for a loss averaged over equal
        per-rank batches). :class:`~hadamard_sparse.GradualPruning` calls it before each pruning
        step; call it yourself before a one-shot ``hs.sparsify(..., method="movement")`` on every
        rank, so that every rank computes the same masks. Averaging equal values changes nothing,
        so a second call is harmless. Tensors sharded with FSDP2 are skipped: their gradients are
        already reduce-scattered (each rank holds its own block). Without a process group of more
        than one rank it does nothing.
        """
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        local = [tg.movement for tg in self._tensors.values() if not is_dtensor(tg.param)]
        if not local:
            return
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in local) else torch.float32
        with torch.no_grad():
            flat = torch.cat([t.reshape(-1).to(dtype) for t in local])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            offset = 0
            for t in local:
                t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()

    def reset(self) -> None:
        """Forget everything recorded: movement and kept gradients (e.g. after a one-shot ``sparsify``)."""
        for tg in self._tensors.values():
            tg.reset()

    def remove(self) -> None:
        """Remove the hooks (recording stops; the recorded state stays readable). Idempotent."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> GradientScores:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The recorded state (tensors and ints, readable with ``torch.load(..., weights_only=True)``)."""
        return {
            "config": self._config(),
            "tensors": {name: tg.state_dict() for name, tg in self._tensors.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` on an accumulator built with the same arguments."""
        if not isinstance(state_dict, Mapping) or not {"config", "tensors"} <= set(state_dict):
            raise InvalidArgumentError("state_dict must be one saved by GradientScores.state_dict()")
        mine = self._config()
        if dict(state_dict["config"]) != mine or set(state_dict["tensors"]) != set(self._tensors):
            raise InvalidArgumentError(
                f"state_dict was saved by a GradientScores with config {dict(state_dict['config'])} over "
                f"{len(state_dict['tensors'])} tensors; this one has {mine} over {len(self)}: build it with the "
                "same arguments on the same model"
            )
        for name, saved in state_dict["tensors"].items():
            self._tensors[name].load_state_dict(saved)

    def _config(self) -> dict[str, Any]:
        return {
            "num_grads": self.num_grads,
            "block_size": self.block_size,
            "damp": self.damp,
            "movement": self.movement,
        }

    # -- after a schedule's pruning step ----------------------------------------------------------

    def pruned(self, method: str, targets: Sequence[Target], new_masks: Sequence[torch.Tensor]) -> None:
        """Called by schedules before writing ``new_masks``: ``"obs"`` updates the kept weights, then resets.

        The kept gradients are dropped; the movement only with ``movement="since_prune"``.

        Args:
            method: the schedule's method.
            targets: the masked tensors, whose current masks are the old ones.
            new_masks: the masks about to be written (full shape).
        """
        if method == "obs":
            news = []
            for t, keep in zip(targets, new_masks):
                old = mask_of(t.module, t.tensor_name)
                param = self._tensors[t.qualified].param
                k_old = torch.ones(param.shape, dtype=torch.bool) if old is None else old.mask
                news.append(self._tensors[t.qualified].obs_update(param, k_old.to(param.device), keep))
            with torch.no_grad():
                for t, new in zip(targets, news):
                    self._tensors[t.qualified].param.copy_(new)
        for tg in self._tensors.values():
            tg.reset(movement=self.movement == "since_prune", fisher=True)


def check_gradients(
    calibration: Any, targets: Sequence[Target], method: str, *, need_data: bool, structure: Any = None
) -> GradientScores:
    """Refuse ``calibration`` unless it is a :class:`GradientScores` tracking every target (with data if asked).

    Args:
        calibration: what the caller was given.
        targets: the tensors about to be scored.
        method: ``"movement"`` or ``"obs"``, for the messages.
        need_data: also require at least one recorded gradient for every target.
        structure: the parsed structure; only ``None`` is allowed (the scores are signed, or per weight).
    """
    if structure is not None:
        raise InvalidArgumentError(f"method {method!r} prunes unstructured only, got structure={structure}")
    if not isinstance(calibration, GradientScores):
        raise InvalidTypeError(
            f"method {method!r} needs calibration to be the hs.GradientScores(model) that recorded the "
            f"training gradients, got {type(calibration).__name__}"
        )
    missing = [
        t.qualified
        for t in targets
        if t.qualified not in calibration
        or calibration[t.qualified].param is not leaf_of(t.module, t.tensor_name)
    ]
    if missing:
        raise InvalidArgumentError(
            f"method {method!r}: the GradientScores does not track {missing} of this model; build it on "
            "this model, with the same include/exclude, before training (under FSDP2: after fully_shard, "
            "which replaces the Parameters)"
        )
    if method == "obs" and calibration.num_grads == 0:
        raise InvalidArgumentError(
            "method 'obs' needs the last gradients, but the GradientScores was built with num_grads=0; "
            "build it with e.g. hs.GradientScores(model, num_grads=64)"
        )
    if need_data:
        empty = [t.qualified for t in targets if _count(calibration[t.qualified], method) == 0]
        if empty:
            raise InvalidArgumentError(_no_data(method, empty))
    return calibration


def _count(tg: TensorGradients, method: str) -> int:
    """The passes ``method`` would score from: kept gradients for ``"obs"``, movement passes otherwise."""
    return tg.grad_steps if method == "obs" else tg.steps


def _no_data(method: str, names: Sequence[str]) -> str:
    return (
        f"method {method!r} has no gradient recorded for {list(names)} since the GradientScores was built "
        "or last reset; run training steps (loss.backward()) before pruning, or call tracker.update() "
        "after each backward pass if it was built with hooks=False"
    )


def _state(ctx: ScoreContext, method: str) -> TensorGradients:
    st = ctx.stats
    if not isinstance(st, TensorGradients):
        raise InvalidArgumentError(
            f"method {method!r} needs the hs.GradientScores(model) of the training run (as calibration) "
            f"for {ctx.name}, got {st!r}"
        )
    if _count(st, method) == 0:
        raise InvalidArgumentError(_no_data(method, [ctx.name]))
    return st


def _masked_out(ctx: ScoreContext, scores: torch.Tensor) -> torch.Tensor:
    m = mask_of(ctx.module, ctx.tensor_name)
    if m is None:
        return scores
    return scores.masked_fill(~m.mask.expand(scores.shape).to(scores.device), float("-inf"))


def movement_score(ctx: ScoreContext) -> torch.Tensor:
    """Movement ``-sum_t w_t g_t`` (see ``GradientScores(movement=...)``); entries masked now score ``-inf``.

    FSDP2 (``ctx.weight`` a sharded DTensor): a DTensor of the same sharding built from each rank's
    block (no communication); the schedule masks out the masked entries of its block itself.
    """
    st = _state(ctx, "movement")
    if st.sharded:
        from torch.distributed.tensor import DTensor

        w = ctx.weight
        if not is_dtensor(w) or local_tensor(w).shape != st.movement.shape:
            raise InvalidArgumentError(
                f"method 'movement': {ctx.name} was recorded on FSDP2 shards of shape "
                f"{tuple(st.movement.shape)}, but is scored as {type(w).__name__} of local shape "
                f"{tuple(local_tensor(w).shape)}; prune it with the same sharding (e.g. GradualPruning)"
            )
        return DTensor.from_local(
            st.movement.to(torch.float32),
            w.device_mesh,  # type: ignore[attr-defined]
            w.placements,  # type: ignore[attr-defined]
            run_check=False,
            shape=w.shape,
            stride=w.stride(),
        )
    return _masked_out(ctx, st.movement.to(device=ctx.weight.device, dtype=torch.float32, copy=True))


def obs_score(ctx: ScoreContext) -> torch.Tensor:
    """oBERT's saliency ``w^2 / (2 [F^-1]_ii)`` from the block Fisher; entries masked now score ``-inf``."""
    st = _state(ctx, "obs")
    if st.grads is None:
        raise InvalidArgumentError(
            f"method 'obs' needs the last gradients of {ctx.name}, but the GradientScores was built with "
            "num_grads=0; build it with e.g. hs.GradientScores(model, num_grads=64)"
        )
    return _masked_out(ctx, st.obs_scores(ctx.weight).to(torch.float32))


def obs_prune(
    model: nn.Module,
    targets: Sequence[Target],
    sparsities: Sequence[float],
    *,
    scope: str,
    structure: Any,
    calibration: Any,
    apply: Apply,
    min_keep: int = 0,
) -> None:
    """The ``"obs"`` pruner: oBERT masks from the recorded gradients, then the OBS update of the kept weights."""
    tracker = check_gradients(calibration, targets, "obs", need_data=True, structure=structure)
    per: float | list[float] = float(sparsities[0]) if scope == "global" else [float(s) for s in sparsities]
    keeps = compute_keep_masks(targets, per, method="obs", scope=scope, stats=tracker, min_keep=min_keep)
    results = []
    for t, keep in zip(targets, keeps):
        tg = tracker[t.qualified]
        old = mask_of(t.module, t.tensor_name)
        k_old = torch.ones(tg.param.shape, dtype=torch.bool) if old is None else old.mask
        results.append(tg.obs_update(tg.param, k_old.to(tg.param.device), keep))
    for t, keep, new in zip(targets, keeps, results):
        apply(t, keep, new)
