"""Structures whose groups span several tensors: channel groups, FFN neurons, attention heads.

A :class:`TensorGroups` knows, for each member tensor (by qualified name), which group each
of its output rows and input columns belongs to (``-1``: none). It is built from a model by
``export/groups.py`` (:class:`~hadamard_sparse.export.groups.ChannelGroups` from the model's
captured graph, :class:`~hadamard_sparse.export.groups.Heads` from its attention blocks) and
used by the pruning engine like any :class:`~hadamard_sparse.structures.Structure`: one
decision per group, scored from all its members' weights, expanded into a mask per tensor.
Biases and normalisation entries are members too (masked, not scored), so a pruned group
outputs exactly zero and :func:`~hadamard_sparse.shrink` removes it without changing the function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import _select
from ._checks import Selectors, check_selectors
from .errors import InvalidArgumentError
from .layers import Target, check_all_used, selector_matches, weight_dims
from .structures import Structure

__all__ = ["Member", "TensorGroups"]


@dataclass
class Member:
    """Group index (``-1``: none) of each output row / input column of one tensor.

    ``rows`` indexes dimension ``out_dim`` (a 1-D tensor: its entries), ``cols`` dimension
    ``in_dim``; ``scored``: the tensor's element scores count towards its groups' scores.
    """

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    scored: bool = True


class TensorGroups(Structure):
    """Groups of rows and columns across tensors, pruned together (base of ChannelGroups and Heads).

    Args:
        members: ``{qualified tensor name: Member}``.
        labels: a layer label per group (``scope="layer"`` prunes each label's groups on its own).
        names: a readable name per group, e.g. ``"conv1[3]"`` (for reports and errors).
        norm: group score: ``"l2"`` (root mean square of the members' element scores) or ``"l1"`` (mean).
    """

    def __init__(
        self, members: dict[str, Member], labels: Sequence[str], names: Sequence[str], norm: str = "l2"
    ) -> None:
        self.members = members
        self.labels = list(labels)
        self.names = list(names)
        self.norm = norm

    @property
    def n(self) -> int:
        """The number of groups."""
        return len(self.labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.n} groups over {len(self.members)} tensors)"

    __str__ = __repr__

    def problem(self, shape: torch.Size, out_dim: int, in_dim: int) -> str | None:
        return None

    def mask_shape(self, shape: torch.Size, out_dim: int, in_dim: int) -> torch.Size:
        if len(shape) < 2:
            return torch.Size(shape)
        return torch.Size(n if i in (out_dim, in_dim) else 1 for i, n in enumerate(shape))

    def n_groups(self, shape: torch.Size, out_dim: int, in_dim: int) -> int:
        return self.n

    def targets(self, model: torch.nn.Module) -> list[Target]:
        """The member tensors of ``model`` as targets, in module order."""
        out, problems = [], []
        for qualified, m in self.members.items():
            mod_name, _, tname = qualified.rpartition(".")
            try:
                t = Target(mod_name, model.get_submodule(mod_name), tname)
                shape = t.value().shape
            except AttributeError:
                problems.append(f"{qualified} does not exist")
                continue
            od, id_ = weight_dims(t.module, tname) if len(shape) > 1 else (0, 0)
            if (m.rows is not None and len(m.rows) != shape[od]) or (
                m.cols is not None and len(m.cols) != shape[id_]
            ):
                problems.append(f"{qualified} has shape {tuple(shape)}")
            out.append(t)
        if problems:
            raise InvalidArgumentError(
                f"structure {self} does not fit this model ({'; '.join(problems)}): it was built from another "
                "model or before shrink; build it again from this model"
            )
        return out

    def restricted(
        self, model: torch.nn.Module, include: Selectors = None, exclude: Selectors = None
    ) -> TensorGroups:
        """The groups ``include``/``exclude`` allow: a group stays when one of its producing layers (a
        scored member with rows) matches ``include`` (if given) and none of its members matches ``exclude``.

        Args:
            model: the model the groups were built from.
            include: selectors (types, globs, callables) of the producing layers to prune.
            exclude: selectors of layers whose groups are never pruned.

        Returns:
            ``self`` when both are empty, else a :class:`TensorGroups` with the other groups removed.
        """
        inc, exc = check_selectors(include, "include"), check_selectors(exclude, "exclude")
        if not inc and not exc:
            return self
        included = torch.zeros(self.n, dtype=torch.bool) if inc else torch.ones(self.n, dtype=torch.bool)
        excluded = torch.zeros(self.n, dtype=torch.bool)
        inc_used: set[int] = set()
        exc_used: set[int] = set()
        for q, m in self.members.items():
            mod_name = q.rpartition(".")[0]
            mod = model.get_submodule(mod_name)
            if exc and selector_matches(exc, mod_name, mod, q, exc_used):
                for idx in (m.rows, m.cols):
                    if idx is not None:
                        excluded[idx[idx >= 0]] = True
            if inc and selector_matches(inc, mod_name, mod, q, inc_used) and m.scored and m.rows is not None:
                included[m.rows[m.rows >= 0]] = True
        check_all_used(inc, inc_used, "include", model)  # an entry matching no member is a typo
        check_all_used(exc, exc_used, "exclude", model)
        kept = (included & ~excluded).nonzero().squeeze(1)
        remap = torch.full((self.n + 1,), -1, dtype=torch.long)
        remap[kept] = torch.arange(len(kept))

        def new(idx: torch.Tensor | None) -> torch.Tensor | None:
            return None if idx is None else remap[torch.where(idx >= 0, idx, self.n)]

        members = {q: Member(new(m.rows), new(m.cols), m.scored) for q, m in self.members.items()}
        members = {
            q: m
            for q, m in members.items()
            if any(x is not None and bool((x >= 0).any()) for x in (m.rows, m.cols))
        }
        return TensorGroups(members, [self.labels[i] for i in kept], [self.names[i] for i in kept], self.norm)

    def _scores(
        self,
        targets: Sequence[Target],
        thunks: Sequence[Callable[[], torch.Tensor]],
        dims: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        total = torch.zeros(self.n, dtype=torch.float64)
        count = torch.zeros(self.n, dtype=torch.float64)
        for t, th, (od, id_) in zip(targets, thunks, dims):
            m = self.members.get(t.qualified)
            if m is None or not m.scored:
                continue
            s = th().detach().to(torch.float64).cpu()
            s = s.abs() if self.norm == "l1" else s.square()
            s = torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
            pairs = [(m.rows, od), (m.cols, id_)] if s.dim() > 1 else [(m.rows, 0)]
            for idx, d in pairs:
                if idx is None:
                    continue
                per = s.movedim(d, 0).reshape(s.shape[d], -1)
                sel = idx >= 0
                total.index_add_(0, idx[sel], per.sum(1)[sel])
                count.index_add_(
                    0, idx[sel], torch.full((int(sel.sum()),), float(per.shape[1]), dtype=torch.float64)
                )
        score = total / count.clamp_min(1)
        return (score if self.norm == "l1" else score.sqrt()).to(torch.float32)

    def keep_masks(
        self,
        targets: Sequence[Target],
        thunks: Sequence[Callable[[], torch.Tensor]],
        per: Sequence[float],
        scope: str,
        dims: Sequence[tuple[int, int]],
    ) -> list[torch.Tensor]:
        """Keep-masks of ``targets`` (compact shapes): ``round(sparsity * G)`` groups pruned per scope."""
        score = self._scores(targets, thunks, dims)
        keep = torch.ones(self.n, dtype=torch.bool)
        if scope == "layer":
            buckets: dict[str, list[int]] = {}
            for i, lab in enumerate(self.labels):
                buckets.setdefault(lab, []).append(i)
            for idx in buckets.values():
                ix = torch.tensor(idx)
                k = _select.n_to_prune(per[0], len(idx))
                keep[ix] = _select.keep_masks([lambda ix=ix: score[ix]], k)[0].reshape(-1)
        else:
            keep = _select.keep_masks([lambda: score], _select.n_to_prune(per[0], self.n))[0].reshape(-1)
        return [self.expand_for(t, keep, d) for t, d in zip(targets, dims)]

    def expand_for(self, t: Target, keep: torch.Tensor, dims: tuple[int, int]) -> torch.Tensor:
        """The compact keep-mask of one tensor from the per-group decisions ``keep``."""
        shape = t.value().shape
        out_dim, in_dim = dims
        mshape = self.mask_shape(shape, out_dim, in_dim)
        mask = torch.ones(mshape, dtype=torch.bool)
        m = self.members.get(t.qualified)
        if m is None:
            return mask
        if len(shape) < 2:
            if m.rows is not None:
                mask &= torch.where(m.rows >= 0, keep[m.rows.clamp_min(0)], True)
            return mask
        for idx, d in ((m.rows, out_dim), (m.cols, in_dim)):
            if idx is None:
                continue
            k = torch.where(idx >= 0, keep[idx.clamp_min(0)], True)
            view = [1] * len(shape)
            view[d] = shape[d]
            mask &= k.reshape(view)
        return mask
