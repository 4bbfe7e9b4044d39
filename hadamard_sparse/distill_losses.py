"""Distillation losses and the pieces of model outputs they compare (the functions behind ``Distiller``).

- :func:`kl_distill_loss`: Hinton's temperature-scaled KL divergence of logits.
- :func:`squarehead_loss`: SquareHead's per-layer feature loss normalised by the teacher's scale.
- :func:`embedding_loss`: ``1 - cos`` or MSE of pooled embeddings.
- :func:`logits_of`, :func:`embedding_of`, :func:`first_tensor`: what to compare in a model's output.
- :func:`call_model`: run a model on a batch (tensor, tuple/list or mapping); :func:`batch_key`: hash a batch.

This module sits just above :mod:`errors`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidTypeError

__all__ = [
    "Pooling",
    "batch_key",
    "call_model",
    "embedding_loss",
    "embedding_of",
    "first_tensor",
    "kl_distill_loss",
    "logits_of",
    "squarehead_loss",
    "unwrap_parallel",
]

Pooling = Union[str, Callable[[Any, Any], torch.Tensor]]


def kl_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinton's distillation loss ``T^2 * KL(softmax(t / T) || softmax(s / T))``.

    Args:
        student_logits: ``(..., C)`` logits of the student.
        teacher_logits: the teacher's, same shape.
        temperature: ``T > 0``.
        mask: optional ``(...)`` weights of the rows (e.g. an attention mask); rows are averaged
            with these weights, else uniformly (``reduction="batchmean"`` for 2-d logits).

    Returns:
        A scalar float32 tensor.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_row = (t.exp() * (t - s)).sum(dim=-1)
    if mask is not None:
        w = mask.to(per_row.dtype)
        kl = (per_row * w).sum() / w.sum().clamp_min(1.0)
    else:
        kl = per_row.mean()
    return kl * temperature**2


def squarehead_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], eps: float = 1e-6
) -> torch.Tensor:
    """SquareHead's normalised feature loss, averaged over layers.

    For each pair ``(s, t)``: ``mean((s - t)^2) / (mean(t^2) + eps)``; the result is the mean over pairs.

    Returns:
        A scalar float32 tensor.
    """
    terms = [
        (s.float() - t.float()).square().mean() / (t.float().square().mean() + eps)
        for s, t in zip(student, teacher)
    ]
    return torch.stack(terms).mean()


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """``mean(1 - cos(s, t))`` over the rows (``"cosine"``) or the mean squared error (``"mse"``), in float32."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    return F.mse_loss(s, t)


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` for a tensor (or a dict given to an ``nn.Sequential``, as sentence-transformers
    takes its features), ``model(**batch)`` for other mappings, ``model(*batch)`` for tuples/lists."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        if isinstance(unwrap_parallel(model), nn.Sequential):
            return model(dict(batch))  # a copy: SentenceTransformer writes its outputs into the dict
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise InvalidTypeError(
        f"batch must be a tensor, a tuple/list of positional arguments or a mapping of keyword arguments, "
        f"got {type(batch).__name__}"
    )


def batch_key(batch: Any) -> str:
    """A hash of a batch's structure and tensor contents (dtype, shape and bytes): the teacher cache's key."""
    h = hashlib.blake2b(digest_size=16)

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, Mapping):
            h.update(b"M{")
            for k in sorted(x, key=str):
                h.update(f"{k!s}:".encode())
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (tuple, list)):
            h.update(b"L[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(f"O{type(x).__name__}:{x!r}|".encode())

    feed(batch)
    return h.hexdigest()


def first_tensor(output: Any, where: str) -> torch.Tensor:
    """The tensor of a module's output: itself, the first tensor of a tuple, or ``last_hidden_state``."""
    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    values = (
        output.values()
        if isinstance(output, Mapping)
        else output
        if isinstance(output, (tuple, list))
        else ()
    )
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise InvalidTypeError(f"features: {where} returned {type(output).__name__}, which holds no tensor")


def logits_of(output: Any, who: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise InvalidTypeError(
        f"logits=True needs the {who}'s output to be a tensor or to have .logits, got {type(output).__name__}; "
        f"for an encoder without logits use embedding='cosine' (or features=...) and logits=False"
    )


def embedding_of(output: Any, batch: Any, pooling: Pooling, who: str) -> torch.Tensor:
    if callable(pooling):
        return pooling(output, batch)
    if isinstance(output, Mapping) and isinstance(output.get("sentence_embedding"), torch.Tensor):
        return output["sentence_embedding"]
    hidden = output if isinstance(output, torch.Tensor) else getattr(output, "last_hidden_state", None)
    if (
        hidden is None
        and isinstance(output, (tuple, list))
        and output
        and isinstance(output[0], torch.Tensor)
    ):
        hidden = output[0]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise InvalidTypeError(
            f"embedding needs the {who}'s output to be a 2-d/3-d tensor, a SentenceTransformer output "
            f"(sentence_embedding) or to have .last_hidden_state, got {type(output).__name__}"
            + (f" of shape {tuple(hidden.shape)}" if isinstance(hidden, torch.Tensor) else "")
        )
    if hidden.dim() == 2:
        return hidden
    if pooling == "cls":
        return hidden[:, 0]
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor):
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
