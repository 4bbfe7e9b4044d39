"""Dynamic sparse training: the drop/grow core, SET (random growth) and RigL (gradient growth).

Per layer, an update drops the active weights of smallest magnitude and grows as many
inactive positions, so each tensor's count of nonzeros stays constant. Growth is the one
thing a subclass supplies (:meth:`DynamicSparse._grow_scores`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .. import _select
from .._checks import check_choice, check_distribution, check_fraction, check_int, check_optimizer
from .._dtensor import as_dtensor, local_part, local_slices, replicated
from ..densities import densities_for_shapes
from ..errors import HadamardSparseError, InvalidArgumentError
from ..layers import Selectors
from . import sharded
from .base import (
    MaskedTensor,
    Schedule,
    all_reduce_mean,
    broadcast_masks,
    check_unstructured,
    top_k,
    write_masks,
)

__all__ = ["SET", "DynamicSparse", "RigL"]

_INITS = ("random", "keep")


class DynamicSparse(Schedule):
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
        include: Selectors = None,
        exclude: Selectors = None,
    ) -> None:
        self._sparsity = check_fraction(sparsity, "sparsity", high_open=True)
        self.every = check_int(every, "every", 1)
        self.drop_fraction = check_fraction(drop_fraction, "drop_fraction")
        self.end_step = None if end_step is None else check_int(end_step, "end_step", 1)
        self.distribution = check_distribution(distribution)
        self.init = check_choice(init, "init", _INITS)
        super().__init__(model, seed, include, exclude)
        check_unstructured(self._masked, self._who)
        multi = [m.qualified for m in self._masked if m.original is None]
        if multi:
            raise InvalidArgumentError(
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
        return densities_for_shapes(
            {m.qualified: tuple(m.shape) for m in self._masked}, self._sparsity, self.distribution
        )

    def _init_random(self) -> None:
        dens = self.densities()
        new = []
        for m in self._masked:
            n = m.shape.numel()
            n_keep = n - _select.n_to_prune(1.0 - dens[m.qualified], n)
            scores = torch.rand(m.shape, generator=self._gen)
            new.append(top_k(scores, n_keep).to(m.mask.device))
        write_masks(self._masked, broadcast_masks(new))

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

    def _grow_scores(self, i: int, m: MaskedTensor) -> torch.Tensor:
        raise NotImplementedError

    def _prepare_update(self) -> None:
        pass

    def _update(self, step: int) -> None:
        self._prepare_update()
        frac = self.current_drop_fraction(step)
        mesh = sharded.mesh_of(self._masked, self._who)
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
                elif mesh is not None:
                    new.append(self._drop_grow_sharded(m, grow, k, mesh))
                else:
                    drop_scores = m.value().detach().abs().float().masked_fill(~active, float("inf"))
                    survivors = active & ~top_k(-drop_scores, k)
                    grown = top_k(grow.float().masked_fill(active, float("-inf")), k)
                    new.append(survivors | grown)
        if mesh is None:
            new = broadcast_masks(new)
        with torch.no_grad():
            for m, n_mask in zip(self._masked, new):
                regrown = n_mask & ~m.mask
                m.mask.copy_(n_mask)
                original = m.original
                assert original is not None  # checked at construction
                if bool(regrown.any()):
                    original.masked_fill_(replicated(regrown, original), 0.0)
                    self._reset_optimizer_state(original, regrown)
        self._record(step, self._sparsity)

    @staticmethod
    def _drop_grow_sharded(m: MaskedTensor, grow: torch.Tensor, k: int, mesh: Any) -> torch.Tensor:
        """The new mask of ``m`` when its weight is sharded (FSDP2): each rank ranks its own rows."""
        group = mesh.get_group()
        local, sl = local_part(sharded.value(m, mesh))
        active = m.mask[sl]
        if grow.shape == m.shape:  # the same full-shape scores on every rank (SET's random growth)
            grow = grow[sl]
        n = m.mask.numel()
        drop_scores = local.abs().float().masked_fill(~active, float("inf"))
        survivors = active & ~sharded.top_k(-drop_scores, k, n, group)
        grown = sharded.top_k(grow.float().masked_fill(active, float("-inf")), k, n, group)
        return sharded.assemble(survivors | grown, sl, m.mask.shape, group)

    def _reset_optimizer_state(self, p: torch.Tensor, where: torch.Tensor) -> None:
        if self.optimizer is None:
            return
        for v in self.optimizer.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                v.masked_fill_(replicated(where, v), 0)

    def _config(self) -> dict[str, Any]:
        return {
            "sparsity": self._sparsity,
            "every": self.every,
            "drop_fraction": self.drop_fraction,
            "end_step": -1 if self.end_step is None else self.end_step,
            "distribution": self.distribution,
            "init": self.init,
        }


class SET(DynamicSparse):
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
        include: only the masked tensors matching one of these selectors are driven (module types,
            glob patterns on qualified names, callables ``(name, module) -> bool``, as in
            :func:`~hadamard_sparse.sparsify`); the others keep their masks. ``None``: all.
        exclude: masked tensors matching one of these selectors are left as they are. An
            ``include``/``exclude`` entry that matches no masked tensor raises before any change.

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
        include: Selectors = None,
        exclude: Selectors = None,
    ) -> None:
        super().__init__(
            model,
            sparsity,
            every=every,
            drop_fraction=drop_fraction,
            end_step=end_step,
            distribution=distribution,
            optimizer=check_optimizer(optimizer),
            init=init,
            seed=seed,
            include=include,
            exclude=exclude,
        )

    def _grow_scores(self, i: int, m: MaskedTensor) -> torch.Tensor:
        return torch.rand(m.shape, generator=self._gen).to(m.mask.device)


class RigL(DynamicSparse):
    r"""Rigging the Lottery (Evci et al. 2020, arXiv 1911.11134): drop the smallest, grow the largest gradients.

    Like :class:`SET`, but growth picks the inactive positions with the largest ``|dL/dW|``, the
    dense gradient of the *effective* weight (zero on ``original`` at masked positions, so it
    cannot be read from ``original.grad``). It is captured by a hook on the mask
    parametrization's output that is armed only for the backward pass of an update step (after the
    ``step()`` that precedes it) and removed right after, so other steps pay nothing. Under
    ``torch.distributed`` the captured gradients are averaged over ranks before growing; on weights
    sharded with FSDP2's ``fully_shard`` they are averaged in the hook and each rank keeps its rows.

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
        include: only the masked tensors matching one of these selectors are driven (module types,
            glob patterns on qualified names, callables ``(name, module) -> bool``, as in
            :func:`~hadamard_sparse.sparsify`); the others keep their masks. ``None``: all.
        exclude: masked tensors matching one of these selectors are left as they are. An
            ``include``/``exclude`` entry that matches no masked tensor raises before any change.

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
        include: Selectors = None,
        exclude: Selectors = None,
    ) -> None:
        opt = check_optimizer(optimizer, "optimizer", required=True)
        self._grads: list[torch.Tensor | None] = []
        self._handles: list[RemovableHandle] = []
        self._mesh: Any = None  # the FSDP2 device mesh while armed on sharded weights
        self._slices: list[tuple[slice, ...]] = []  # this rank's rows of each tensor then
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
            include=include,
            exclude=exclude,
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
        self._mesh = sharded.mesh_of(self._masked, self._who)
        if self._mesh is not None:
            self._slices = [local_slices(as_dtensor(m.plist.original, self._mesh)) for m in self._masked]
        for i, m in enumerate(self._masked):
            self._handles.append(m.pm.register_forward_hook(self._make_forward_hook(i)))

    def _make_forward_hook(self, i: int) -> Callable[..., None]:
        def store(grad: torch.Tensor) -> None:
            g = grad.detach()
            if self._mesh is not None:  # FSDP2: average over ranks now, keep this rank's rows only
                g = g.clone()
                group = self._mesh.get_group()
                torch.distributed.all_reduce(g, group=group)
                g = g[self._slices[i]] / torch.distributed.get_world_size(group)
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
        if self._mesh is None:  # under FSDP2 the hooks averaged the gradients already
            all_reduce_mean([g for g in self._grads if g is not None])

    def _grow_scores(self, i: int, m: MaskedTensor) -> torch.Tensor:
        g = self._grads[i]
        assert g is not None  # checked in _prepare_update
        return g.abs()

    def _update(self, step: int) -> None:
        try:
            super()._update(step)
        finally:
            self._grads = [None] * len(self._masked)
            self._disarm()
