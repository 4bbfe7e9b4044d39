"""How close a pruned model stays to its dense teacher: embedding cosine and retrieval agreement.

:func:`representation` reads one vector per example from a model's output (a SentenceTransformer's
``sentence_embedding``, the mask-weighted mean of a ``last_hidden_state`` or of per-token logits,
``logits``, or a plain tensor); :func:`compare` scores a student's vectors against the teacher's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._model_io import eval_mode
from ..errors import InvalidTypeError
from .data import call_model

__all__ = ["Quality", "compare", "embeddings", "representation"]


def _attention_mask(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        batch = batch[0]
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        return mask if isinstance(mask, torch.Tensor) else None
    return None


def _pool(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if h.dim() <= 2:
        return h.reshape(h.shape[0], -1) if h.dim() == 2 else h.reshape(1, -1)
    if mask is None or mask.shape != h.shape[:2]:
        return h.mean(dim=1).reshape(h.shape[0], -1)
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def representation(out: Any, batch: Any) -> torch.Tensor:
    """One vector per example of ``out`` (a model's output on ``batch``), shape ``(B, D)``.

    In order: a ``"sentence_embedding"`` entry (SentenceTransformer), ``logits`` (mean over the
    attention mask when per token), ``last_hidden_state`` (mean over the attention mask, the pooling
    of all-MiniLM-L6-v2 and most sentence encoders), a tensor (first of a tuple), pooled the same way.
    """
    if isinstance(out, Mapping) and isinstance(out.get("sentence_embedding"), torch.Tensor):
        return out["sentence_embedding"]
    mask = _attention_mask(batch)
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is None and isinstance(out, Mapping):
            value = out.get(name)
        if isinstance(value, torch.Tensor):
            return _pool(value, mask)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if isinstance(out, torch.Tensor):
        return _pool(out, mask)
    raise InvalidTypeError(
        f"cannot read an embedding from a model output of type {type(out).__name__}; expected a tensor, "
        "a SentenceTransformer's features, or an output with logits or last_hidden_state"
    )


def has_logits(out: Any) -> bool:
    """Whether ``out`` carries ``logits`` (then distillation is on the softened logits)."""
    return isinstance(getattr(out, "logits", None), torch.Tensor) or (
        isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor)
    )


def embeddings(model: nn.Module, batches: Sequence[Any]) -> torch.Tensor:
    """The representations of every example of ``batches``, in eval mode without gradients, ``(N, D)``."""
    with eval_mode(model), torch.no_grad():
        out = [representation(call_model(model, b), b).float() for b in batches]
    return torch.cat(out)


@dataclass(frozen=True)
class Quality:
    """A student's agreement with its teacher on held-out examples.

    Attributes:
        cosine: mean cosine similarity between each example's student and teacher vectors.
        top1: fraction of examples whose nearest neighbour among the other examples (cosine) is
            the same under student and teacher.
        top10: mean overlap of the ``k = min(10, n - 1)`` nearest neighbours, ``|S ∩ T| / k``.
        n: number of examples.
    """

    cosine: float
    top1: float
    top10: float
    n: int

    def __str__(self) -> str:
        return f"cosine {self.cosine:.4f}, top-1 {self.top1:.3f}, top-10 {self.top10:.3f} (n={self.n})"


def compare(teacher: torch.Tensor, student: torch.Tensor) -> Quality:
    """Score ``student`` vectors ``(N, D)`` against ``teacher`` vectors (see :class:`Quality`)."""
    n = teacher.shape[0]
    cos = float(F.cosine_similarity(student, teacher, dim=-1).mean())
    if n < 2:
        return Quality(cos, 1.0, 1.0, n)
    k = min(10, n - 1)

    def neighbours(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e, dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(float("-inf"))
        return sim.topk(k, dim=-1).indices

    t, s = neighbours(teacher), neighbours(student)
    top1 = float((t[:, 0] == s[:, 0]).float().mean())
    overlap = (t.unsqueeze(-1) == s.unsqueeze(-2)).any(-1).float().sum(-1) / k
    return Quality(cos, top1, float(overlap.mean()), n)
