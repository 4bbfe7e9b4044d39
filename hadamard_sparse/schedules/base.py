"""What every schedule shares: the masked tensors it drives, distributed helpers and the base class.

:func:`masked_tensors` finds the masks a schedule drives (the model may be wrapped in DDP or
``torch.compile``); each is a :class:`MaskedTensor`, the package's
:class:`~hadamard_sparse.layers.Target` plus its :class:`~hadamard_sparse.parametrizations.HadamardMask`,
so it goes straight into the pruning engine. Masks are written only in place
(:func:`write_masks`: ``mask.copy_`` under ``torch.no_grad()``), after
:func:`broadcast_masks` made them identical on every rank. :class:`Schedule` holds the
step counter, the generator, the history and the checkpoint format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import _select
from .._checks import check_choice, check_int, check_method, check_seed
from .._engine import check_floor, mask_of
from .._plan import SparsifyPlan, keep_masks
from ..errors import InvalidArgumentError, InvalidTypeError, NoTargetsError
from ..layers import Selectors, Target, select_targets
from ..parametrizations import HadamardMask
from ..scores import get_score
from ..structures import Structure, check_targets
from . import sharded

__all__ = [
    "SCHEDULE_SCOPES",
    "STATE_VERSION",
    "MaskedTensor",
    "Schedule",
    "achieved",
    "all_reduce_mean",
    "broadcast_masks",
    "check_schedule_method",
    "check_unstructured",
    "draw_seed",
    "is_distributed",
    "masked_tensors",
    "top_k",
    "unwrap",
    "write_masks",
]

STATE_VERSION = 1
#: The scopes schedules prune with.
SCHEDULE_SCOPES = ("global", "layer")


def check_schedule_method(method: str, scope: str, calibration: Any = None, who: str = "") -> None:
    """A registered score without calibration, and a scope among :data:`SCHEDULE_SCOPES` that it supports.

    Methods that read recorded gradients (``"movement"``, ``"obs"``) need ``calibration`` (an
    ``hs.GradientScores``); a schedule that takes none passes ``who`` to refuse them by name.
    """
    check_choice(scope, "scope", SCHEDULE_SCOPES)
    if who and get_score(method).needs_gradients:
        raise InvalidArgumentError(
            f"{who} does not take method={method!r} (it reads gradients recorded during training); use "
            "GradualPruning(..., method=..., calibration=hs.GradientScores(model))"
        )
    check_method(method, scope, takes_calibration=False, calibration=calibration)


# ----------------------------------------------------------------------------------------------
# The masked tensors a schedule drives
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskedTensor(Target):
    """A :class:`~hadamard_sparse.layers.Target` whose parametrization chain holds the mask ``pm``."""

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

    @property
    def shape(self) -> torch.Size:
        plist = self.plist
        if plist.is_tensor:
            return plist.original.shape
        mesh = sharded.mesh_of([self], "schedule")
        with torch.no_grad():
            return (self.value() if mesh is None else sharded.value(self, mesh)).shape

    @property
    def full_mask(self) -> bool:
        return self.mask.shape == self.shape


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def masked_tensors(model: object, who: str) -> tuple[nn.Module, list[MaskedTensor]]:
    """The plain model and its masked tensors, in ``named_modules`` order."""
    if isinstance(model, Mapping):
        raise InvalidTypeError(
            f"{who}: model must be the nn.Module whose masks to drive (plain, or wrapped in DDP / "
            f"torch.compile), got a {type(model).__name__}; schedules need the weights, not only hs.masks(model)"
        )
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
    plain = unwrap(model)
    out: list[MaskedTensor] = []
    for mod_name, module in plain.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tname in module.parametrizations:  # type: ignore[union-attr]
            pm = mask_of(module, tname)
            if pm is not None:
                out.append(MaskedTensor(mod_name, module, tname, pm))
    if not out:
        raise NoTargetsError(
            f"{who}: model {type(plain).__name__} has no masks; register them first with "
            "hs.sparsify(model, 0.0) (all ones) or hs.register_mask, before wrapping the model in DDP"
        )
    return plain, out


def check_unstructured(masked: list[MaskedTensor], who: str) -> None:
    """Refuse structured (broadcast-shape) masks."""
    bad = [m.qualified for m in masked if not m.full_mask]
    if bad:
        raise InvalidArgumentError(
            f"{who}: the masks of {bad} are structured (broadcast shapes); this schedule needs full-shape "
            "masks (register them with hs.sparsify(model, 0.0) or pass structure= to GradualPruning)"
        )


def achieved(masked: list[MaskedTensor]) -> float:
    """The fraction of exact zeros in the effective weights of the masked tensors.

    This is the count :func:`~hadamard_sparse.report.sparsity_report` makes for the same tensors
    (``report.zeros / report.numel`` when every targeted tensor is masked), so a schedule's
    ``history`` agrees with a report taken at the same step. The masks alone hold exactly the
    target's count of zeros; the effective weights may have more: SET and RigL regrow connections
    at exactly 0 (until the next optimizer step moves them), and a kept weight may itself be 0.
    """
    mesh = sharded.mesh_of(masked, "schedule")
    total = sum(m.shape.numel() for m in masked)
    zeros = 0
    with torch.no_grad():
        for m in masked:
            if mesh is None:
                zeros += int((m.value() == 0).sum())
            else:  # FSDP2: count each rank's shard, summed over the mesh (the same on every rank)
                zeros += int((sharded.value(m, mesh) == 0).sum().full_tensor())
    return 0.0 if total == 0 else zeros / total


# ----------------------------------------------------------------------------------------------
# torch.distributed and mask writes
# ----------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def broadcast_masks(new: list[torch.Tensor]) -> list[torch.Tensor]:
    """Under torch.distributed, replace ``new`` by rank 0's version (one broadcast for all)."""
    if not is_distributed() or not new:
        return new
    flat = torch.cat([n.reshape(-1).to(torch.uint8) for n in new])
    torch.distributed.broadcast(flat, src=0)
    out = []
    offset = 0
    for n in new:
        out.append(flat[offset : offset + n.numel()].view(n.shape).bool())
        offset += n.numel()
    return out


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Under torch.distributed, average ``tensors`` over ranks in place (one all-reduce for all)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (of ``scores``' shape) of the ``k`` largest scores; ties go to the higher flat index."""
    flat = scores.reshape(-1)
    keep = _select.keep_masks([lambda: flat], flat.numel() - k)[0]
    return keep.view(scores.shape).to(scores.device)


def write_masks(masked: list[MaskedTensor], new: list[torch.Tensor]) -> None:
    """Copy ``new`` into the mask buffers, in place."""
    with torch.no_grad():
        for m, n in zip(masked, new):
            m.mask.copy_(n)


def draw_seed(gen: torch.Generator) -> int:
    """A fresh seed from the schedule's generator."""
    return int(torch.randint(0, 2**62, (1,), generator=gen))


class Schedule:
    """Shared machinery: the step counter, the generator, history and checkpoints."""

    _who = "schedule"

    def __init__(
        self, model: nn.Module, seed: int, include: Selectors = None, exclude: Selectors = None
    ) -> None:
        check_seed(seed)
        self.model, masked = masked_tensors(model, self._who)
        self._masked = select_targets(masked, include, exclude, self.model, "masked tensors")
        if not self._masked:
            raise NoTargetsError(
                f"{self._who}: include={include!r}, exclude={exclude!r} leave none of the masked tensors "
                f"{[m.qualified for m in masked]} to drive"
            )
        sharded.mesh_of(self._masked, self._who)  # refuse unsupported sharding before any change
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
            "version": STATE_VERSION,
            "last_step": self.last_step,
            "generator": self._gen.get_state(),
            "history": [[int(s), float(t), float(a)] for s, t, a in self.history],
            "config": self._full_config(),
            **self._extra_state(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (load the model's state_dict too: masks live there)."""
        if not isinstance(state_dict, Mapping):
            raise InvalidTypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        missing = [k for k in ("type", "last_step", "generator", "history") if k not in state_dict]
        if missing:
            raise InvalidArgumentError(
                f"state_dict is missing the keys {missing}; expected one saved by {type(self).__name__}.state_dict()"
            )
        if state_dict["type"] != type(self).__name__:
            raise InvalidArgumentError(
                f"state_dict was saved by {state_dict['type']!r}, cannot load it into {type(self).__name__}"
            )
        saved, mine = state_dict.get("config"), self._full_config()
        if isinstance(saved, Mapping):  # states saved before configs were compared have none
            diff = [  # keys only one side has come from another version: not compared
                f"{k}: saved {saved[k]!r}, this schedule {mine[k]!r}"
                for k in sorted(set(saved) & set(mine))
                if saved[k] != mine[k]
            ]
            if diff:
                raise InvalidArgumentError(
                    f"state_dict was saved by a {type(self).__name__} with another configuration ("
                    + "; ".join(diff)
                    + "); build the schedule with the same arguments before loading its state"
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

    def _full_config(self) -> dict[str, Any]:
        # the driven tensors are part of the configuration (include/exclude select them)
        return {**self._config(), "tensors": [m.qualified for m in self._masked]}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        pass

    def _record(self, step: int, target: float) -> None:
        self.history.append((step, float(target), achieved(self._masked)))

    # -- pruning to a target with nested masks ----------------------------------------------

    def _plan_nested(
        self, final: float, *, method: str, scope: str, structure: Structure | None, min_keep: int
    ) -> SparsifyPlan:
        """Check ``method``'s pruning of the masked tensors up to ``final``; the plan every update follows.

        Refuses, before any change: a structure on sharded weights, structured masks without a
        structure (or targets the structure does not fit), and a ``final`` sparsity the global
        ``min_keep`` floor cannot reach. The plan's sparsity and seed are set at each update
        (:meth:`_prune_nested`); its statistics are a subclass's (``dataclasses.replace``).

        Args:
            final: the highest sparsity the schedule prunes to.
            method: a registered score, checked with :func:`check_schedule_method`.
            scope: ``"global"`` or ``"layer"``.
            structure: the parsed structure (``None``: unstructured, full-shape masks).
            min_keep: the floor of a global selection (ignored with ``scope="layer"``).

        Returns:
            The :class:`~hadamard_sparse._plan.SparsifyPlan` over the masked tensors.
        """
        sharded.check_no_structure(self._masked, structure, self._who)
        if structure is None:
            check_unstructured(self._masked, self._who)
        else:
            check_targets(structure, self._masked)
        min_keep = check_int(min_keep, "min_keep", 0) if scope == "global" else 0  # a floor is global
        check_floor(self._masked, final, structure, min_keep, "final_sparsity")
        return SparsifyPlan(
            model=self.model,
            targets=tuple(self._masked),
            sparsity=final,
            method=method,
            entry=get_score(method),
            scope=scope,
            structure=structure,
            seed=0,
            min_keep=min_keep,
            calibration=None,
            stats=None,
        )

    def _prune_nested(self, target: float, plan: SparsifyPlan) -> None:
        """Prune the masks to ``target`` as ``plan`` says, keeping them nested (masked entries go first).

        ``plan.stats``: an ``hs.GradientScores`` for methods that read recorded gradients; it is handed
        to the scores and told about the new masks (``"obs"`` updates the kept weights; the tracker
        drops its kept gradients) before they are written.
        """
        stats, method = plan.stats, plan.method
        if stats is not None and target <= 0:  # nothing to prune: no scores needed, keep recording
            return
        if stats is not None and is_distributed():  # DDP: score the movement of the averaged gradients
            stats.synchronize()  # type: ignore[attr-defined]
        mesh = sharded.mesh_of(self._masked, self._who)
        if mesh is not None:  # FSDP2: each rank scores its shard, thresholds from all-reduced histograms
            sharded.check_no_structure(self._masked, plan.structure, self._who)
            seed = draw_seed(self._gen)
            new = sharded.prune_nested(
                self._masked,
                target,
                method=method,
                scope=plan.scope,
                seed=seed,
                mesh=mesh,
                min_keep=plan.min_keep,
                stats=stats,
            )
            if stats is not None:
                stats.pruned(method, self._masked, new)  # type: ignore[attr-defined]
            write_masks(self._masked, new)
            return
        step_plan = dataclasses.replace(plan, sparsity=float(target), seed=draw_seed(self._gen))
        keeps = keep_masks(step_plan, value="effective", checked=False)
        new = []
        for m, keep in zip(self._masked, keeps):
            keep = keep.to(m.mask.device)
            if keep.shape != m.mask.shape:
                keep = keep.expand(m.shape) if m.full_mask else keep
            new.append(m.mask & keep)
        new = broadcast_masks(new)
        if stats is not None:
            stats.pruned(method, self._masked, new)  # type: ignore[attr-defined]
        write_masks(self._masked, new)
