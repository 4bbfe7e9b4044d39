"""The distillation loss of a recovery run: :class:`~hadamard_sparse.Distiller` set up for the model at hand.

The student matches the frozen dense teacher on every batch (hardness 1: no task loss):

- its output: ``1 - cos`` of the per-example representations (:func:`~.quality.representation`, the
  same vectors the quality report compares) for encoders, or the KL divergence of the logits
  softened at ``temperature`` (times ``temperature**2``) for models with logits (oBERT, Kurtic et al.
  2022); which one is read from the teacher's output on the first batch;
- SquareHead features (Kurtic et al. 2023, arXiv 2310.06927) on the given modules (the transformer
  blocks): ``MSE(student, teacher) / MSE(teacher, 0)`` per module, averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..distill import Distiller
from .data import call_model
from .quality import has_logits, representation

__all__ = ["make_distiller"]


def make_distiller(
    student: nn.Module,
    teacher: nn.Module,
    probe: Any,
    *,
    features: Sequence[str] = (),
    temperature: float = 2.0,
    feature_weight: float = 1.0,
) -> Distiller:
    """A :class:`~hadamard_sparse.Distiller` of ``student`` against ``teacher``.

    Args:
        student: the model being trained.
        teacher: the frozen dense model.
        probe: one batch, on which the teacher's output tells logits from embeddings.
        features: qualified module names matched SquareHead-style (the same names in both models).
        temperature: softening of logits. Default: ``2.0``.
        feature_weight: weight of the SquareHead term. Default: ``1.0``.
    """
    with torch.no_grad():
        logits = has_logits(call_model(teacher.eval(), probe))
    names = list(features) if feature_weight > 0 else []
    return Distiller(
        student,
        teacher,
        logits=logits,
        temperature=temperature,
        hardness=1.0,
        features=names,
        feature_weight=feature_weight,
        embedding=None if logits else "cosine",
        pooling=representation,
        call=call_model,
    )
