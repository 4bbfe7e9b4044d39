"""Pruning schedules that drive the live mask buffers: gradual, iterative (rewinding), SET and RigL.

Every schedule follows the habits of :mod:`torch.optim.lr_scheduler`: it is built on a model whose
masks were registered by :func:`~hadamard_sparse.sparsify` or :func:`~hadamard_sparse.register_mask`,
``step()`` is called once per optimizer step, ``state_dict()`` / ``load_state_dict()`` checkpoint it,
and ``schedule.sparsity`` is the current target. A schedule never replaces a mask or a
parametrization: it writes into the bool mask buffers in place (``mask.copy_(new)`` under
``torch.no_grad()``), so optimizers, compiled graphs and DDP keep their references.

Policy for the weights (``original``) at pruned positions, the same in every schedule: pruning
never zeroes ``original`` (the value is kept under the mask, as with ``sparsify``). Positions that
SET/RigL *grow* get ``original`` set to exactly 0 and their optimizer state (momentum, Adam moments)
set to 0, so a regrown connection starts from zero. ``IterativePruning`` rewinds ``original`` only at
kept positions.

Under ``torch.distributed`` every update is decided identically on all ranks without relying on
DDP's buffer broadcast: RigL all-reduces (averages) the captured gradients, and every schedule
broadcasts the new masks from rank 0 before writing them.

Curves are pure functions of the step: :func:`cubic` and :func:`linear`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from . import _select
from ._targets import Target
from .densities import _check_distribution, _densities
from .errors import HadamardSparseError, NoTargetsError
from .parametrizations import HadamardMask
from .scores import get_score
from .structures import check_sparsity, check_targets, parse_structure

__all__ = ["SET", "GradualPruning", "IterativePruning", "RigL", "cubic", "linear"]

_CURVES = ("cubic", "linear")
_SCOPES = ("global", "layer")
_STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Pure curve functions
# ----------------------------------------------------------------------------------------------


def cubic(step: int, *, initial: float, final: float, start: int, end: int) -> float:
    r"""Zhu & Gupta's cubic sparsity curve (arXiv 1710.01878).

    :math:`s_t = s_f + (s_i - s_f)\,(1 - (t - t_0) / (t_1 - t_0))^3` for :math:`t_0 \le t \le t_1`,
    ``initial`` before ``start`` and ``final`` after ``end``.

    Args:
        step: the step ``t``.
        initial: sparsity at ``start``.
        final: sparsity at ``end``.
        start: first step of the ramp.
        end: last step of the ramp (``end == start`` jumps to ``final`` at ``start``).

    Returns:
        The target sparsity at ``step``.

    Example::

        >>> cubic(50, initial=0.0, final=0.8, start=0, end=100)
        0.7
    """
    if step < start:
        return float(initial)
    if step >= end:
        return float(final)
    progress = (step - start) / (end - start)
    return float(final + (initial - final) * (1.0 - progress) ** 3)


def linear(step: int, *, initial: float, final: float, start: int, end: int) -> float:
    """Linear sparsity ramp from ``initial`` at ``start`` to ``final`` at ``end``.

    Args:
        step: the step ``t``.
        initial: sparsity at ``start``.
        final: sparsity at ``end``.
        start: first step of the ramp.
        end: last step of the ramp.

    Returns:
        The target sparsity at ``step``.

    Example::

        >>> linear(25, initial=0.0, final=0.8, start=0, end=100)
        0.2
    """
    if step < start:
        return float(initial)
    if step >= end:
        return float(final)
    progress = (step - start) / (end - start)
    return float(initial + (final - initial) * progress)


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------


def _check_int(value: object, arg: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{arg} must be an int >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{arg} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_fraction(value: object, arg: str, *, high_open: bool = False) -> float:
    """``api._check_sparsity``, optionally refusing 1.0 too (``[0, 1)``)."""
    from .api import _check_sparsity

    v = _check_sparsity(value, arg)
    if high_open and v >= 1.0:
        raise ValueError(f"{arg} must be a float in [0, 1), got {value!r}")
    return v


def _check_optimizer(
    optimizer: object, arg: str = "optimizer", required: bool = False
) -> torch.optim.Optimizer | None:
    if optimizer is None and not required:
        return None
    if not isinstance(optimizer, torch.optim.Optimizer):
        need = "a torch.optim.Optimizer" if required else "a torch.optim.Optimizer or None"
        raise TypeError(f"{arg} must be {need}, got {optimizer!r}")
    return optimizer


# ----------------------------------------------------------------------------------------------
# The masked tensors a schedule drives
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Masked:
    """One masked tensor: ``module.<tensor_name>`` whose chain holds ``pm``."""

    qualified: str
    module: nn.Module
    tensor_name: str
    pm: HadamardMask

    @property
    def mask(self) -> torch.Tensor:
        return self.pm.mask

    @property
    def plist(self) -> parametrize.ParametrizationList:
        return self.module.parametrizations[self.tensor_name]  # type: ignore[index, union-attr, return-value]

    @property
    def original(self) -> torch.Tensor | None:
        """The single ``original`` Parameter, or ``None`` for multi-tensor chains."""
        plist = self.plist
        return plist.original if plist.is_tensor else None

    def value(self) -> torch.Tensor:
        """The effective (masked) value."""
        return getattr(self.module, self.tensor_name)

    @property
    def shape(self) -> torch.Size:
        plist = self.plist
        if plist.is_tensor:
            return plist.original.shape
        with torch.no_grad():
            return self.value().shape

    @property
    def full_mask(self) -> bool:
        return self.mask.shape == self.shape

    def target(self) -> Target:
        name = self.qualified
        module_name = name[: -len(self.tensor_name) - 1] if name != self.tensor_name else ""
        return Target(module_name, self.module, self.tensor_name)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _masked_tensors(model: object, who: str) -> tuple[nn.Module, list[_Masked]]:
    if isinstance(model, Mapping):
        raise TypeError(
            f"{who}: model must be the nn.Module whose masks to drive (plain, or wrapped in DDP / "
            f"torch.compile), got a {type(model).__name__}; schedules need the weights, not only hs.masks(model)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
    from .api import _mask_of  # local import: api is a sibling at the same layer

    plain = _unwrap(model)
    out: list[_Masked] = []
    for mod_name, module in plain.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tname in module.parametrizations:  # type: ignore[union-attr]
            pm = _mask_of(module, tname)
            if pm is not None:
                out.append(_Masked(f"{mod_name}.{tname}" if mod_name else tname, module, tname, pm))
    if not out:
        raise NoTargetsError(
            f"{who}: model {type(plain).__name__} has no masks; register them first with "
            "hs.sparsify(model, 0.0) (all ones) or hs.register_mask, before wrapping the model in DDP"
        )
    return plain, out


def _expanded_count(m: _Masked) -> int:
    mask = m.mask
    if mask.shape == m.shape:
        return int(mask.sum())
    return int(mask.expand(m.shape).sum())


def _achieved(masked: list[_Masked]) -> float:
    total = sum(m.shape.numel() for m in masked)
    kept = sum(_expanded_count(m) for m in masked)
    return 0.0 if total == 0 else 1.0 - kept / total


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _broadcast_masks(new: list[torch.Tensor]) -> list[torch.Tensor]:
    """Under torch.distributed, replace ``new`` by rank 0's version (one broadcast for all)."""
    if not _distributed() or not new:
        return new
    flat = torch.cat([n.reshape(-1).to(torch.uint8) for n in new])
    torch.distributed.broadcast(flat, src=0)
    out = []
    offset = 0
    for n in new:
        out.append(flat[offset : offset + n.numel()].view(n.shape).bool())
        offset += n.numel()
    return out


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    if not _distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (of ``scores``' shape) of the ``k`` largest scores; ties go to the higher flat index."""
    flat = scores.reshape(-1)
    keep = _select.keep_masks([lambda: flat], flat.numel() - k)[0]
    return keep.view(scores.shape).to(scores.device)


def _write_masks(masked: list[_Masked], new: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for m, n in zip(masked, new):
            m.mask.copy_(n)


def _draw_seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


# ----------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------


class _Schedule:
    """Shared machinery: the step counter, the generator, history and checkpoints."""

    _who = "schedule"

    def __init__(self, model: nn.Module, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.model, self._masked = _masked_tensors(model, self._who)
        self.last_step = 0
        self.history: list[tuple[int, float, float]] = []
        self._gen = torch.Generator().manual_seed(seed)

    # -- public API --------------------------------------------------------------------------

    @property
    def sparsity(self) -> float:
        """The current target sparsity."""
        raise NotImplementedError

    @property
    def generator(self) -> torch.Generator:
        """The schedule's own random generator (its state is part of :meth:`state_dict`)."""
        return self._gen

    def step(self) -> None:
        """Advance by one training step; update the masks in place when this is an update step."""
        self.last_step += 1
        self._on_step(self.last_step)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state: step counter, generator state, history and config.

        Every value is a tensor, number, string, list or dict, so ``torch.load(..., weights_only=True)``
        reads it back. The masks themselves live in ``model.state_dict()``.
        """
        return {
            "type": type(self).__name__,
            "version": _STATE_VERSION,
            "last_step": self.last_step,
            "generator": self._gen.get_state(),
            "history": [[int(s), float(t), float(a)] for s, t, a in self.history],
            "config": self._config(),
            **self._extra_state(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (load the model's state_dict too: masks live there)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        missing = [k for k in ("type", "last_step", "generator", "history") if k not in state_dict]
        if missing:
            raise ValueError(
                f"state_dict is missing the keys {missing}; expected one saved by {type(self).__name__}.state_dict()"
            )
        if state_dict["type"] != type(self).__name__:
            raise ValueError(
                f"state_dict was saved by {state_dict['type']!r}, cannot load it into {type(self).__name__}"
            )
        self.last_step = int(state_dict["last_step"])
        self._gen.set_state(state_dict["generator"])
        self.history = [(int(s), float(t), float(a)) for s, t, a in state_dict["history"]]
        self._load_extra_state(state_dict)

    # -- hooks for subclasses ---------------------------------------------------------------

    def _on_step(self, step: int) -> None:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        return {}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        pass

    def _record(self, step: int, target: float) -> None:
        self.history.append((step, float(target), _achieved(self._masked)))

    # -- pruning to a target with nested masks ----------------------------------------------

    def _prune_nested(self, target: float, method: str, scope: str, structure: Any = None) -> None:
        """Prune the masks to ``target`` keeping them nested (masked entries are pruned first)."""
        from .api import compute_keep_masks

        keeps = compute_keep_masks(
            [m.target() for m in self._masked],
            target,
            method=method,
            scope=scope,
            seed=_draw_seed(self._gen),
            value="effective",
            structure=structure,
        )
        new = []
        for m, keep in zip(self._masked, keeps):
            keep = keep.to(m.mask.device)
            if keep.shape != m.mask.shape:
                keep = keep.expand(m.shape) if m.full_mask else keep
            new.append(m.mask & keep)
        _write_masks(self._masked, _broadcast_masks(new))


def _check_unstructured(masked: list[_Masked], who: str) -> None:
    bad = [m.qualified for m in masked if not m.full_mask]
    if bad:
        raise ValueError(
            f"{who}: the masks of {bad} are structured (broadcast shapes); this schedule needs full-shape "
            "masks (register them with hs.sparsify(model, 0.0) or pass structure= to GradualPruning)"
        )


# ----------------------------------------------------------------------------------------------
# GradualPruning
# ----------------------------------------------------------------------------------------------


class GradualPruning(_Schedule):
    r"""Gradual magnitude pruning along a sparsity curve (Zhu & Gupta 2017, arXiv 1710.01878).

    At the update steps ``start_step, start_step + every, ...`` and ``end_step``, the masks are
    pruned to ``curve(step)`` with exact element counts (``round(s * N)`` zeros over all masked
    tensors with ``scope="global"``, ``round(s * n)`` per tensor with ``scope="layer"``). Masks only
    grow sparser: entries already masked are pruned first and never come back, so the scores are
    those of the *effective* weights. ``original`` is not zeroed at pruned positions.

    Steps count optimizer steps: ``step()`` after the ``t``-th ``optimizer.step()`` moves to step
    ``t``. Step 0 (construction) is an update step when ``start_step == 0``.

    Args:
        model: a model with masks (``hs.sparsify(model, 0.0)`` registers all-ones masks); may be
            wrapped in DDP or ``torch.compile`` (the masks of the inner model are driven).
        final_sparsity: sparsity reached at ``end_step``, in ``[0, 1]``. Default: ``0.9``.
        initial_sparsity: sparsity at ``start_step``, in ``[0, final_sparsity]``. Default: ``0.0``.
        start_step: first update step (``>= 0``). Default: ``0``.
        end_step: last update step (``>= start_step``). Default: ``1000``.
        every: steps between updates (``>= 1``). Default: ``100``.
        curve: ``"cubic"``, ``"linear"`` or a callable ``progress -> sparsity`` with ``progress`` in
            ``[0, 1]``. Default: ``"cubic"``.
        method: a registered score (``"magnitude"``, ``"random"``, ...). Default: ``"magnitude"``.
        scope: ``"global"`` (one threshold over all masked tensors) or ``"layer"``. Default: ``"global"``.
        structure: passed to the pruning engine for structured sparsity (``None``: unstructured).
        seed: seeds the schedule's own generator (used by random scores). Default: ``0``.

    Example::

        >>> model = hs.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), 0.0)
        >>> sched = GradualPruning(model, 0.5, start_step=0, end_step=4, every=2)
        >>> for _ in range(4):
        ...     sched.step()
        >>> sched.sparsity
        0.5
    """

    _who = "GradualPruning"

    def __init__(
        self,
        model: nn.Module,
        final_sparsity: float = 0.9,
        *,
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        end_step: int = 1000,
        every: int = 100,
        curve: str | Callable[[float], float] = "cubic",
        method: str = "magnitude",
        scope: str = "global",
        structure: Any = None,
        seed: int = 0,
    ) -> None:
        final = _check_fraction(final_sparsity, "final_sparsity")
        initial = _check_fraction(initial_sparsity, "initial_sparsity")
        if final < initial:
            raise ValueError(
                f"final_sparsity must be >= initial_sparsity (masks only grow sparser), "
                f"got final_sparsity={final_sparsity!r} < initial_sparsity={initial_sparsity!r}"
            )
        start = _check_int(start_step, "start_step", 0)
        end = _check_int(end_step, "end_step", 0)
        if end < start:
            raise ValueError(
                f"end_step must be >= start_step, got end_step={end_step!r} < start_step={start_step!r}"
            )
        self.every = _check_int(every, "every", 1)
        if not (callable(curve) or (isinstance(curve, str) and curve in _CURVES)):
            raise ValueError(
                f"curve must be one of {list(_CURVES)} or a callable progress -> sparsity, got {curve!r}"
            )
        entry = get_score(method)
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {list(_SCOPES)}, got {scope!r}")
        if scope not in entry.scopes:
            raise ValueError(f"method {method!r} supports scope in {list(entry.scopes)}, got {scope!r}")
        if entry.needs_calibration:
            raise ValueError(f"method {method!r} needs calibration data, which schedules do not take")
        parsed = parse_structure(structure)
        if parsed is not None:
            check_sparsity(parsed, final, "final_sparsity")
        super().__init__(model, seed)
        if parsed is None:
            _check_unstructured(self._masked, self._who)
        else:
            check_targets(parsed, [m.target() for m in self._masked])
        self.final_sparsity = final
        self.initial_sparsity = initial
        self.start_step = start
        self.end_step = end
        self.curve = curve
        self.method = method
        self.scope = scope
        self.structure = structure
        if self._is_update(0):
            self._update(0)

    def _curve_value(self, step: int) -> float:
        if self.curve in ("cubic", "linear"):
            fn = cubic if self.curve == "cubic" else linear
            return fn(
                step,
                initial=self.initial_sparsity,
                final=self.final_sparsity,
                start=self.start_step,
                end=self.end_step,
            )
        if step >= self.end_step:
            progress = 1.0
        elif step <= self.start_step:
            progress = 0.0
        else:
            progress = (step - self.start_step) / (self.end_step - self.start_step)
        value = self.curve(progress)  # type: ignore[operator]
        try:
            return _check_fraction(value, "curve(progress)")
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (progress={progress})") from None

    def _is_update(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.every == 0 or step == self.end_step

    def target_at(self, step: int) -> float:
        """The target sparsity the masks follow after ``step`` (the curve at the last update step)."""
        if step < self.start_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return self._curve_value(self.end_step)
        last = self.start_step + (step - self.start_step) // self.every * self.every
        return self._curve_value(last)

    @property
    def sparsity(self) -> float:
        return self.target_at(self.last_step)

    def _on_step(self, step: int) -> None:
        if self._is_update(step):
            self._update(step)

    def _update(self, step: int) -> None:
        target = self._curve_value(step)
        self._prune_nested(target, self.method, self.scope, self.structure)
        self._record(step, target)

    def _config(self) -> dict[str, Any]:
        return {
            "final_sparsity": self.final_sparsity,
            "initial_sparsity": self.initial_sparsity,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "every": self.every,
            "curve": self.curve if isinstance(self.curve, str) else "callable",
            "method": self.method,
            "scope": self.scope,
        }


# ----------------------------------------------------------------------------------------------
# IterativePruning
# ----------------------------------------------------------------------------------------------


class IterativePruning(_Schedule):
    r"""Iterative magnitude pruning with weight rewinding (lottery-ticket style).

    Training runs in rounds of ``every`` steps. At the end of round ``r`` (step ``r * every``,
    ``r = 1..rounds``) the masks are pruned (nested, exact count) to
    :math:`s_r = 1 - (1 - s_f)^{r / R}` (the same fraction of the remaining weights each round),
    then the weights are rewound: every Parameter of the model goes back to its value in the
    ``rewind_to`` snapshot, except that masked tensors are rewound only at *kept* positions
    (``original`` at pruned positions keeps its value, as in every schedule). If an optimizer is
    given, its state tensors are zeroed at each rewind (a fresh start from the rewound weights).
    Train one more round after the last prune to finish.

    Args:
        model: a model with full-shape masks (``hs.sparsify(model, 0.0)``).
        rounds: number of prune-rewind rounds (``>= 1``). Default: ``5``.
        final_sparsity: sparsity after the last round, in ``[0, 1]``. Default: ``0.9``.
        rewind_to: an ``int`` step ``k`` in ``[0, every)`` (the schedule snapshots the weights after
            step ``k``; ``0`` is the initialisation, "late rewinding" uses a small ``k``) or a
            ``state_dict`` of the model (dense or parametrized keys). Default: ``0``.
        every: training steps per round (``>= 1``). Default: ``1000``.
        method: a registered score. Default: ``"magnitude"``.
        scope: ``"global"`` or ``"layer"``. Default: ``"global"``.
        optimizer: optional optimizer whose state is zeroed at each rewind.
        seed: seeds the schedule's own generator. Default: ``0``.

    Example::

        >>> model = hs.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), 0.0)
        >>> sched = IterativePruning(model, rounds=2, final_sparsity=0.75, rewind_to=0, every=3)
        >>> for _ in range(6):
        ...     sched.step()
        >>> sched.sparsity
        0.75
    """

    _who = "IterativePruning"

    def __init__(
        self,
        model: nn.Module,
        rounds: int = 5,
        final_sparsity: float = 0.9,
        rewind_to: int | Mapping[str, torch.Tensor] = 0,
        *,
        every: int = 1000,
        method: str = "magnitude",
        scope: str = "global",
        optimizer: torch.optim.Optimizer | None = None,
        seed: int = 0,
    ) -> None:
        self.rounds = _check_int(rounds, "rounds", 1)
        self.final_sparsity = _check_fraction(final_sparsity, "final_sparsity")
        self.every = _check_int(every, "every", 1)
        entry = get_score(method)
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {list(_SCOPES)}, got {scope!r}")
        if scope not in entry.scopes:
            raise ValueError(f"method {method!r} supports scope in {list(entry.scopes)}, got {scope!r}")
        if entry.needs_calibration:
            raise ValueError(f"method {method!r} needs calibration data, which schedules do not take")
        self.optimizer = _check_optimizer(optimizer)
        if isinstance(rewind_to, Mapping):
            self.rewind_step: int | None = None
        elif isinstance(rewind_to, bool) or not isinstance(rewind_to, int):
            raise TypeError(
                f"rewind_to must be an int step or a model state_dict, got {type(rewind_to).__name__}"
            )
        elif not 0 <= rewind_to < self.every:
            raise ValueError(f"rewind_to must be a step in [0, every={self.every}), got {rewind_to!r}")
        else:
            self.rewind_step = int(rewind_to)
        super().__init__(model, seed)
        _check_unstructured(self._masked, self._who)
        self.method = method
        self.scope = scope
        self.round = 0
        self._params = {n: p for n, p in self.model.named_parameters()}
        self._snapshot: dict[str, torch.Tensor] | None = None
        if isinstance(rewind_to, Mapping):
            self._snapshot = self._snapshot_from(rewind_to)
        elif self.rewind_step == 0:
            self._take_snapshot()

    def _snapshot_from(self, sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        snap: dict[str, torch.Tensor] = {}
        for name, p in self._params.items():
            value = sd.get(name)
            if value is None and ".parametrizations." in f".{name}" and name.endswith(".original"):
                # dense checkpoint: "fc.parametrizations.weight.original" <- "fc.weight"
                head, _, rest = name.rpartition("parametrizations.")
                value = sd.get(head + rest[: -len(".original")])
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"rewind_to[{name!r}] must be a tensor of shape {tuple(p.shape)}, got {got}")
            snap[name] = value.detach().clone().to(p.device, p.dtype)
        originals = {self._original_name(m) for m in self._masked}
        if not originals & set(snap):
            raise ValueError(
                "rewind_to (a state_dict) holds none of the masked tensors; expected keys like "
                f"{sorted(originals)[:3]} or their dense names"
            )
        return snap

    def _original_name(self, m: _Masked) -> str:
        prefix = m.qualified[: -len(m.tensor_name)]
        return f"{prefix}parametrizations.{m.tensor_name}.original"

    def _take_snapshot(self) -> None:
        with torch.no_grad():
            self._snapshot = {n: p.detach().clone() for n, p in self._params.items()}

    @property
    def sparsity(self) -> float:
        return self.target_of_round(self.round)

    def target_of_round(self, r: int) -> float:
        """Target sparsity after round ``r`` (``0``: none)."""
        if r <= 0:
            return 0.0
        if r >= self.rounds:
            return self.final_sparsity
        return 1.0 - (1.0 - self.final_sparsity) ** (r / self.rounds)

    def _on_step(self, step: int) -> None:
        if self._snapshot is None and self.rewind_step is not None and step == self.rewind_step:
            self._take_snapshot()
        if step % self.every == 0 and self.round < self.rounds:
            self.round += 1
            target = self.target_of_round(self.round)
            self._prune_nested(target, self.method, self.scope)
            self._rewind()
            self._record(step, target)

    def _rewind(self) -> None:
        assert self._snapshot is not None  # taken at step rewind_to < every
        originals = {self._original_name(m): m for m in self._masked}
        with torch.no_grad():
            for name, p in self._params.items():
                snap = self._snapshot.get(name)
                if snap is None:
                    continue
                m = originals.get(name)
                if m is not None:
                    p.copy_(torch.where(m.mask, snap, p))
                else:
                    p.copy_(snap)
            if self.optimizer is not None:
                for p in self._params.values():
                    for v in self.optimizer.state.get(p, {}).values():
                        if isinstance(v, torch.Tensor):
                            v.zero_()

    def _config(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "final_sparsity": self.final_sparsity,
            "every": self.every,
            "rewind_step": -1 if self.rewind_step is None else self.rewind_step,
            "method": self.method,
            "scope": self.scope,
        }

    def _extra_state(self) -> dict[str, Any]:
        return {"round": self.round, "snapshot": None if self._snapshot is None else dict(self._snapshot)}

    def _load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        self.round = int(state_dict.get("round", 0))
        snap = state_dict.get("snapshot")
        if snap is not None:
            self._snapshot = {
                k: v.detach().clone().to(self._params[k].device) for k, v in snap.items() if k in self._params
            }


# ----------------------------------------------------------------------------------------------
# Dynamic sparse training: SET and RigL
# ----------------------------------------------------------------------------------------------

_INITS = ("random", "keep")


class _DynamicSparse(_Schedule):
    """Drop the smallest active weights, grow as many inactive ones; per-layer counts constant."""

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        every: int,
        drop_fraction: float,
        end_step: int | None,
        distribution: str,
        optimizer: torch.optim.Optimizer | None,
        init: str,
        seed: int,
    ) -> None:
        self._sparsity = _check_fraction(sparsity, "sparsity", high_open=True)
        self.every = _check_int(every, "every", 1)
        self.drop_fraction = _check_fraction(drop_fraction, "drop_fraction")
        self.end_step = None if end_step is None else _check_int(end_step, "end_step", 1)
        self.distribution = _check_distribution(distribution)
        if init not in _INITS:
            raise ValueError(f"init must be one of {list(_INITS)}, got {init!r}")
        self.init = init
        super().__init__(model, seed)
        _check_unstructured(self._masked, self._who)
        multi = [m.qualified for m in self._masked if m.original is None]
        if multi:
            raise ValueError(
                f"{self._who}: {multi} have multi-tensor parametrization chains; SET/RigL reset regrown "
                "weights in a single `original` and need a plain masked tensor"
            )
        self.optimizer = optimizer
        if init == "random":
            self._init_random()
        self._record(0, self._sparsity)

    @property
    def sparsity(self) -> float:
        return self._sparsity

    def densities(self) -> dict[str, float]:
        """The per-tensor target densities from ``distribution``."""
        return _densities(
            {m.qualified: tuple(m.shape) for m in self._masked}, self._sparsity, self.distribution
        )

    def _init_random(self) -> None:
        dens = self.densities()
        new = []
        for m in self._masked:
            n = m.shape.numel()
            n_keep = n - _select.n_to_prune(1.0 - dens[m.qualified], n)
            scores = torch.rand(m.shape, generator=self._gen)
            new.append(_top_k(scores, n_keep).to(m.mask.device))
        _write_masks(self._masked, _broadcast_masks(new))

    def current_drop_fraction(self, step: int) -> float:
        """``drop_fraction`` annealed with a cosine to 0 at ``end_step`` (constant if ``end_step`` is None)."""
        if self.end_step is None:
            return self.drop_fraction
        if step >= self.end_step:
            return 0.0
        return self.drop_fraction / 2.0 * (1.0 + math.cos(math.pi * step / self.end_step))

    def _is_update(self, step: int) -> bool:
        return step > 0 and step % self.every == 0 and (self.end_step is None or step < self.end_step)

    def _on_step(self, step: int) -> None:
        if self._is_update(step):
            self._update(step)

    def _grow_scores(self, i: int, m: _Masked) -> torch.Tensor:
        raise NotImplementedError

    def _prepare_update(self) -> None:
        pass

    def _update(self, step: int) -> None:
        self._prepare_update()
        frac = self.current_drop_fraction(step)
        new: list[torch.Tensor] = []
        with torch.no_grad():
            for i, m in enumerate(self._masked):
                active = m.mask
                n = active.numel()
                n_active = int(active.sum())
                k = min(round(frac * n_active), n - n_active)
                grow = self._grow_scores(i, m)  # always computed: keeps the generator in step
                if k <= 0:
                    new.append(active.clone())
                    continue
                drop_scores = m.value().detach().abs().float().masked_fill(~active, float("inf"))
                survivors = active & ~_top_k(-drop_scores, k)
                grown = _top_k(grow.float().masked_fill(active, float("-inf")), k)
                new.append(survivors | grown)
        new = _broadcast_masks(new)
        with torch.no_grad():
            for m, n_mask in zip(self._masked, new):
                regrown = n_mask & ~m.mask
                m.mask.copy_(n_mask)
                original = m.original
                assert original is not None  # checked at construction
                if bool(regrown.any()):
                    original.masked_fill_(regrown, 0.0)
                    self._reset_optimizer_state(original, regrown)
        self._record(step, self._sparsity)

    def _reset_optimizer_state(self, p: torch.Tensor, where: torch.Tensor) -> None:
        if self.optimizer is None:
            return
        for v in self.optimizer.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                v.masked_fill_(where, 0)

    def _config(self) -> dict[str, Any]:
        return {
            "sparsity": self._sparsity,
            "every": self.every,
            "drop_fraction": self.drop_fraction,
            "end_step": -1 if self.end_step is None else self.end_step,
            "distribution": self.distribution,
            "init": self.init,
        }


class SET(_DynamicSparse):
    r"""Sparse Evolutionary Training (Mocanu et al. 2018): drop the smallest weights, grow at random.

    At construction the masks are re-drawn at random with the per-layer densities of
    ``distribution`` (``init="random"``), or kept as they are (``init="keep"``, e.g. after
    ``hs.sparsify(model, 0.9, distribution="erk")``). Every ``every`` steps (before ``end_step``),
    each masked tensor drops the ``f * n_active`` active weights of smallest magnitude and grows as
    many positions chosen uniformly at random among those that were inactive, where ``f`` is
    ``drop_fraction`` annealed with a cosine to 0 at ``end_step``. The count of nonzeros of each
    tensor stays constant. Regrown positions get ``original = 0`` and zero optimizer state.

    Args:
        model: a model with full-shape masks (``hs.sparsify(model, 0.0)`` registers them).
        sparsity: global sparsity in ``[0, 1)``. Default: ``0.9``.
        every: steps between updates (``>= 1``). Default: ``100``.
        drop_fraction: fraction of active weights replaced at an update, in ``[0, 1]``. Default: ``0.3``.
        end_step: last step with updates (exclusive); ``None``: update forever at constant ``drop_fraction``.
        distribution: ``"uniform"``, ``"er"`` or ``"erk"`` per-layer densities. Default: ``"erk"``.
        optimizer: optional optimizer whose state at regrown positions is reset to 0.
        init: ``"random"`` or ``"keep"``. Default: ``"random"``.
        seed: seeds the schedule's own generator (initial masks and random growth). Default: ``0``.

    Example::

        >>> model = hs.sparsify(torch.nn.Sequential(torch.nn.Linear(16, 16)), 0.0)
        >>> sched = SET(model, 0.75, every=1, distribution="uniform")
        >>> sched.step()
        >>> int(hs.masks(model)["0.weight"].sum())
        64
    """

    _who = "SET"

    def __init__(
        self,
        model: nn.Module,
        sparsity: float = 0.9,
        *,
        every: int = 100,
        drop_fraction: float = 0.3,
        end_step: int | None = None,
        distribution: str = "erk",
        optimizer: torch.optim.Optimizer | None = None,
        init: str = "random",
        seed: int = 0,
    ) -> None:
        super().__init__(
            model,
            sparsity,
            every=every,
            drop_fraction=drop_fraction,
            end_step=end_step,
            distribution=distribution,
            optimizer=_check_optimizer(optimizer),
            init=init,
            seed=seed,
        )

    def _grow_scores(self, i: int, m: _Masked) -> torch.Tensor:
        return torch.rand(m.shape, generator=self._gen).to(m.mask.device)


class RigL(_DynamicSparse):
    r"""Rigging the Lottery (Evci et al. 2020, arXiv 1911.11134): drop the smallest, grow the largest gradients.

    Like :class:`SET`, but growth picks the inactive positions with the largest ``|dL/dW|``, the
    dense gradient of the *effective* weight (zero on ``original`` at masked positions, so it
    cannot be read from ``original.grad``). It is captured by a hook on the mask
    parametrization's output that is armed only for the backward pass of an update step (after the
    ``step()`` that precedes it) and removed right after, so other steps pay nothing. Under
    ``torch.distributed`` the captured gradients are averaged over ranks before growing.

    Call ``loss.backward()`` (and ``optimizer.step()``) before ``schedule.step()``; an update step
    without a captured gradient raises a ``ValueError``. Gradient accumulation works: gradients of
    every backward since the previous ``step()`` are summed. With ``torch.compile``, arming the hook
    makes the update steps run a different graph (a recompile or graph break on those steps).

    Args:
        model: a model with full-shape masks.
        optimizer: the training optimizer (required); its state at regrown positions is reset to 0.
        sparsity: global sparsity in ``[0, 1)``. Default: ``0.9``.
        every: steps between updates (``>= 1``). Default: ``100``.
        drop_fraction: fraction of active weights replaced at an update, in ``[0, 1]``. Default: ``0.3``.
        end_step: last step with updates (exclusive); ``None``: update forever at constant ``drop_fraction``.
        distribution: ``"uniform"``, ``"er"`` or ``"erk"``. Default: ``"erk"``.
        init: ``"random"`` or ``"keep"``. Default: ``"random"``.
        seed: seeds the schedule's own generator (initial masks). Default: ``0``.

    Example::

        >>> model = hs.sparsify(torch.nn.Sequential(torch.nn.Linear(16, 4)), 0.0)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sched = RigL(model, opt, 0.5, every=1, distribution="uniform")
        >>> model(torch.randn(8, 16)).sum().backward(); opt.step(); sched.step()
    """

    _who = "RigL"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sparsity: float = 0.9,
        *,
        every: int = 100,
        drop_fraction: float = 0.3,
        end_step: int | None = None,
        distribution: str = "erk",
        init: str = "random",
        seed: int = 0,
    ) -> None:
        opt = _check_optimizer(optimizer, "optimizer", required=True)
        self._grads: list[torch.Tensor | None] = []
        self._handles: list[RemovableHandle] = []
        super().__init__(
            model,
            sparsity,
            every=every,
            drop_fraction=drop_fraction,
            end_step=end_step,
            distribution=distribution,
            optimizer=opt,
            init=init,
            seed=seed,
        )
        self._grads = [None] * len(self._masked)
        self._rearm()

    # -- gradient capture -------------------------------------------------------------------

    @property
    def armed(self) -> bool:
        """Whether the gradient hooks are registered (only before an update step)."""
        return bool(self._handles)

    def _arm(self) -> None:
        if self._handles:
            return
        self._grads = [None] * len(self._masked)
        for i, m in enumerate(self._masked):
            self._handles.append(m.pm.register_forward_hook(self._make_forward_hook(i)))

    def _make_forward_hook(self, i: int) -> Callable[..., None]:
        def store(grad: torch.Tensor) -> None:
            g = grad.detach()
            prev = self._grads[i]
            self._grads[i] = g.clone() if prev is None else prev + g

        def forward_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(store)

        return forward_hook

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _rearm(self) -> None:
        self._disarm()
        if self._is_update(self.last_step + 1):
            self._arm()

    def step(self) -> None:
        super().step()
        self._rearm()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._rearm()

    def _prepare_update(self) -> None:
        missing = [m.qualified for m, g in zip(self._masked, self._grads) if g is None]
        if missing:
            self._disarm()
            raise HadamardSparseError(
                f"RigL.step() at update step {self.last_step}: no gradient was captured for {missing}; "
                "call loss.backward() on a forward pass of the model (with grad enabled) before "
                "schedule.step() on update steps (every "
                f"{self.every} steps), and build the schedule before that forward pass"
            )
        grads = [g for g in self._grads if g is not None]
        _all_reduce_mean(grads)

    def _grow_scores(self, i: int, m: _Masked) -> torch.Tensor:
        g = self._grads[i]
        assert g is not None  # checked in _prepare_update
        return g.abs()

    def _update(self, step: int) -> None:
        try:
            super()._update(step)
        finally:
            self._grads = [None] * len(self._masked)
            self._disarm()
