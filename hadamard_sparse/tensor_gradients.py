"""The gradient state of one tensor: the movement sum, the last gradients and their block Fisher.

:class:`TensorGradients` is what :class:`~hadamard_sparse.GradientScores` keeps per targeted
tensor: the movement accumulator ``-sum_t w_t g_t`` and a ring buffer of the last ``num_grads``
flattened gradients, from which the empirical Fisher ``F = (1/m) sum g g^T + damp * I`` is formed
block-diagonally (blocks of ``block_size`` consecutive weights). It also holds oBERT's math on that
Fisher: the OBS saliency ``w^2 / (2 [F^-1]_ii)`` and the multi-weight OBS update of the kept weights
(Kurtic et al. 2022, arXiv 2203.07259).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ._dtensor import is_dtensor, local_tensor
from .errors import InvalidArgumentError

__all__ = ["TensorGradients"]

_CHUNK = 2048  # Fisher blocks inverted at once (2048 x 50 x 50 float64: 41 MB)


class TensorGradients:
    """The gradient state of one tensor: movement accumulator and the last ``num_grads`` gradients.

    Attributes:
        name: the qualified tensor name.
        param: the Parameter whose gradients are recorded.
        steps: backward passes summed into :attr:`movement` since it was last reset.
        grad_steps: gradients written to :attr:`grads` since they were last reset (the Fisher uses the
            last ``min(grad_steps, num_grads)``).
        movement: ``-sum w * g`` over those passes (the tensor's shape; float32, float64 for float64 weights).
        grads: ``(num_grads, padded numel)`` ring buffer of flattened gradients (same dtype), or ``None``.
    """

    def __init__(self, name: str, param: torch.Tensor, num_grads: int, block_size: int, damp: float) -> None:
        self.name = name
        self.param = param
        self.block_size = block_size
        self.damp = damp
        self.steps = 0
        self.grad_steps = 0
        dtype = torch.promote_types(param.dtype, torch.float32)  # float32, or float64 for a float64 weight
        #: FSDP2: the movement of this rank's block of rows only (gradients are reduce-scattered).
        self.sharded = is_dtensor(param)
        local = local_tensor(param)
        self.movement = torch.zeros(local.shape, dtype=dtype, device=local.device)
        self.n_blocks = math.ceil(param.numel() / block_size)
        self.grads = (
            torch.zeros(num_grads, self.n_blocks * block_size, dtype=dtype, device=param.device)
            if num_grads
            else None
        )
        self._diag: torch.Tensor | None = None

    @property
    def num_grads(self) -> int:
        return 0 if self.grads is None else self.grads.shape[0]

    @property
    def stored(self) -> int:
        """How many gradients the Fisher is built from (``min(grad_steps, num_grads)``)."""
        return min(self.grad_steps, self.num_grads)

    def add(self, grad: torch.Tensor) -> None:
        """Record one gradient of :attr:`param` (taken at its current value)."""
        with torch.no_grad():
            g = local_tensor(grad.detach()).to(self.movement.dtype)
            self.movement.sub_(local_tensor(self.param.detach()).to(g.dtype) * g)
            if self.grads is not None:
                self.grads[self.grad_steps % self.num_grads, : g.numel()].copy_(g.reshape(-1))
            self.steps += 1
            self.grad_steps += 1
            self._diag = None

    def reset(self, *, movement: bool = True, fisher: bool = True) -> None:
        """Forget the recorded movement and/or the kept gradients."""
        if movement:
            self.movement.zero_()
            self.steps = 0
        if fisher:
            self.grad_steps = 0
            self._diag = None

    def fisher_inverse(self, start: int, stop: int) -> torch.Tensor:
        """``(F + damp I)^-1`` of blocks ``start:stop``, float64, shape ``(stop - start, B, B)``."""
        assert self.grads is not None
        k, b = self.stored, self.block_size
        g = self.grads[:k].view(k, self.n_blocks, b)[:, start:stop].permute(1, 0, 2).to(torch.float64)
        eye = torch.eye(b, dtype=torch.float64, device=g.device)
        f = g.transpose(1, 2) @ g / k + self.damp * eye
        chol, info = torch.linalg.cholesky_ex(f)
        if bool((info != 0).any()):
            raise InvalidArgumentError(
                f"method 'obs': a Fisher block of {self.name} is not positive definite in float64 with "
                f"damp={self.damp:g} (its gradients are too large for this dampening); build the "
                "GradientScores with a larger damp"
            )
        return torch.cholesky_inverse(chol)

    def fisher_inverse_diag(self) -> torch.Tensor:
        """The diagonal of the block Fisher inverse, flat (padded numel), float64; cached until the next gradient."""
        if self._diag is None:
            parts = [
                torch.diagonal(
                    self.fisher_inverse(i, min(i + _CHUNK, self.n_blocks)), dim1=1, dim2=2
                ).reshape(-1)
                for i in range(0, self.n_blocks, _CHUNK)
            ]
            self._diag = torch.cat(parts)
        return self._diag

    def obs_scores(self, weight: torch.Tensor) -> torch.Tensor:
        """``w^2 / (2 [F^-1]_ii)`` for the values ``weight`` (float64, the weight's shape)."""
        d = self.fisher_inverse_diag()[: weight.numel()].view(weight.shape)
        return weight.to(torch.float64).square() / (2.0 * d)

    def obs_update(
        self, original: torch.Tensor, keep_old: torch.Tensor, keep_new: torch.Tensor
    ) -> torch.Tensor:
        """``original`` with the multi-weight OBS update applied at the entries ``keep_new`` keeps.

        In every block, ``S`` are the entries ``keep_new`` prunes and ``w = original * keep_old`` the
        effective weights; ``w + dw`` with ``dw = -F^-1[:, S] (F^-1[S, S])^-1 w_S`` is zero on ``S``
        and the least increase of ``dw^T F dw / 2`` elsewhere. Pruned entries keep their value in
        ``original`` (pruning never zeroes it). Returns a new tensor of ``original``'s dtype.
        """
        n, b = original.numel(), self.block_size
        pad = self.n_blocks * b - n
        w = original.detach().to(torch.float64).reshape(-1)
        eff = torch.nn.functional.pad(w * keep_old.expand(original.shape).reshape(-1), (0, pad))
        s_all = torch.nn.functional.pad(~keep_new.expand(original.shape).reshape(-1), (0, pad)).view(-1, b)
        eff = eff.view(-1, b)
        delta = torch.zeros_like(eff)
        for i in range(0, self.n_blocks, _CHUNK):
            stop = min(i + _CHUNK, self.n_blocks)
            s = s_all[i:stop].to(torch.float64)
            if not bool(s.any()):
                continue
            finv = self.fisher_inverse(i, stop)
            a = finv * s[:, :, None] * s[:, None, :] + torch.diag_embed(1.0 - s)
            z = torch.linalg.solve(a, (eff[i:stop] * s).unsqueeze(-1))
            delta[i:stop] = -(finv @ z).squeeze(-1)
        new = w + delta.reshape(-1)[:n]
        keep = keep_new.expand(original.shape).reshape(-1)
        return torch.where(keep, new, w).view(original.shape).to(original.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The recorded state: ``{"steps", "grad_steps", "movement", "grads"}`` (ints and tensors)."""
        return {
            "steps": self.steps,
            "grad_steps": self.grad_steps,
            "movement": self.movement.clone(),
            "grads": self.grads,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (of a state built with the same arguments)."""
        with torch.no_grad():
            self.movement.copy_(state["movement"])
            if self.grads is not None:
                self.grads.copy_(state["grads"])
        self.steps = int(state["steps"])
        self.grad_steps = int(state["grad_steps"])
        self._diag = None
