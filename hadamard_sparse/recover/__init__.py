"""Recovering a pretrained model's quality at high sparsity: one-shot init, gradual ramp, distillation.

Layout: ``recipe.py`` (:func:`recover`, checks and the run's assembly), ``data.py`` (texts or model
inputs, one batch per step as a pure function of the step), ``distill.py`` (the :class:`~hadamard_sparse.Distiller` of a run),
``loop.py`` (the plan, training steps, checkpoints and exact resume, budget), ``quality.py``
(embedding cosine and retrieval agreement against the teacher).
"""

from .data import read_texts
from .loop import CHECKPOINT_FILE, Plan
from .quality import Quality
from .recipe import HEAD_PATTERNS, RecoveryReport, recover

__all__ = ["CHECKPOINT_FILE", "HEAD_PATTERNS", "Plan", "Quality", "RecoveryReport", "read_texts", "recover"]
