"""Iterative magnitude pruning with weight rewinding (lottery-ticket style)."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._checks import check_fraction, check_int, check_optimizer
from .._dtensor import replicated
from .._names import dense_key, original_key
from ..errors import InvalidArgumentError, InvalidTypeError
from ..layers import Selectors
from ..structures import check_sparsity, parse_structure
from .base import Schedule, check_schedule_method

__all__ = ["IterativePruning"]

_POSITIONAL = ("rounds", "final_sparsity", "rewind_to")


def _positional_options(args: tuple[Any, ...], **given: Any) -> tuple[Any, ...]:
    """The old positional form ``IterativePruning(model, rounds, final_sparsity, rewind_to)``, deprecated."""
    if len(args) > len(_POSITIONAL):
        raise InvalidTypeError(
            f"IterativePruning takes the model and at most {len(_POSITIONAL)} deprecated positional "
            f"options {list(_POSITIONAL)}, got {len(args)} positional options"
        )
    warnings.warn(
        f"passing {list(_POSITIONAL[: len(args)])} to IterativePruning positionally is deprecated; "
        "pass them as keywords: IterativePruning(model, rounds=..., final_sparsity=..., rewind_to=...)",
        DeprecationWarning,
        stacklevel=3,
    )
    defaults = inspect.signature(IterativePruning.__init__).parameters
    values = dict(given)
    for name, value in zip(_POSITIONAL, args):
        if given[name] is not defaults[name].default:
            raise InvalidTypeError(f"IterativePruning got multiple values for argument {name!r}")
        values[name] = value
    return tuple(values[name] for name in _POSITIONAL)


class IterativePruning(Schedule):
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
        structure: passed to the pruning engine for structured sparsity (``None``: unstructured; e.g.
            ``hs.ChannelGroups(model, x)``, whose masks ``hs.sparsify(model, 0.0, structure=...)`` registers).
        seed: seeds the schedule's own generator. Default: ``0``.
        min_keep: with ``scope="global"``, the best ``min_keep`` weights of every output unit are
            never pruned, as in :func:`~hadamard_sparse.sparsify` (a ``final_sparsity`` the floor
            cannot reach is refused here). ``0``: no floor. Default: ``1``.
        include: only the masked tensors matching one of these selectors are driven (module types,
            glob patterns on qualified names, callables ``(name, module) -> bool``, as in
            :func:`~hadamard_sparse.sparsify`); the others keep their masks. ``None``: all.
        exclude: masked tensors matching one of these selectors are left as they are. An
            ``include``/``exclude`` entry that matches no masked tensor raises before any change.

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
        *args: Any,
        rounds: int = 5,
        final_sparsity: float = 0.9,
        rewind_to: int | Mapping[str, torch.Tensor] = 0,
        every: int = 1000,
        method: str = "magnitude",
        scope: str = "global",
        optimizer: torch.optim.Optimizer | None = None,
        seed: int = 0,
        structure: Any = None,
        min_keep: int = 1,
        include: Selectors = None,
        exclude: Selectors = None,
    ) -> None:
        if args:
            rounds, final_sparsity, rewind_to = _positional_options(
                args, rounds=rounds, final_sparsity=final_sparsity, rewind_to=rewind_to
            )
        self.rounds = check_int(rounds, "rounds", 1)
        self.final_sparsity = check_fraction(final_sparsity, "final_sparsity")
        self.every = check_int(every, "every", 1)
        check_schedule_method(method, scope, who="IterativePruning")
        self.optimizer = check_optimizer(optimizer)
        if isinstance(rewind_to, Mapping):
            self.rewind_step: int | None = None
        elif isinstance(rewind_to, bool) or not isinstance(rewind_to, int):
            raise InvalidTypeError(
                f"rewind_to must be an int step or a model state_dict, got {type(rewind_to).__name__}"
            )
        elif not 0 <= rewind_to < self.every:
            raise InvalidArgumentError(
                f"rewind_to must be a step in [0, every={self.every}), got {rewind_to!r}"
            )
        else:
            self.rewind_step = int(rewind_to)
        parsed = parse_structure(structure)
        if parsed is not None:
            check_sparsity(parsed, self.final_sparsity, "final_sparsity")
        super().__init__(model, seed, include, exclude)
        self._plan = self._plan_nested(
            self.final_sparsity, method=method, scope=scope, structure=parsed, min_keep=min_keep
        )
        self.structure = structure
        self.min_keep = self._plan.min_keep
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
            dense = dense_key(name)
            if value is None and dense is not None:
                value = sd.get(
                    dense
                )  # dense checkpoint: "fc.parametrizations.weight.original" <- "fc.weight"
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise InvalidArgumentError(
                    f"rewind_to[{name!r}] must be a tensor of shape {tuple(p.shape)}, got {got}"
                )
            snap[name] = value.detach().clone().to(p.device, p.dtype)
        originals = {original_key(m.qualified) for m in self._masked}
        if not originals & set(snap):
            raise InvalidArgumentError(
                "rewind_to (a state_dict) holds none of the masked tensors; expected keys like "
                f"{sorted(originals)[:3]} or their dense names"
            )
        return snap

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
            self._prune_nested(target, self._plan)
            self._rewind()
            self._record(step, target)

    def _rewind(self) -> None:
        assert self._snapshot is not None  # taken at step rewind_to < every
        originals = {original_key(m.qualified): m for m in self._masked}
        with torch.no_grad():
            for name, p in self._params.items():
                snap = self._snapshot.get(name)
                if snap is None:
                    continue
                snap = replicated(snap, p)  # a plain snapshot of a sharded (FSDP2) Parameter
                m = originals.get(name)
                if m is not None:
                    p.copy_(torch.where(replicated(m.mask, p), snap, p))
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
            "min_keep": self.min_keep,
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
