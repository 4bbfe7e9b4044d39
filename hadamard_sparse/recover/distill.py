"""The distillation loss of a recovery run: output distillation plus SquareHead features.

The student matches the frozen dense teacher on every batch:

- its output: ``1 - cos`` of the per-example representations (:func:`~.quality.representation`)
  for encoders, or the KL divergence of the logits softened at ``temperature`` (times
  ``temperature**2``, hardness 1: no hard labels) for models with logits (oBERT, Kurtic et al. 2022);
- SquareHead features (Kurtic et al. 2023, arXiv 2310.06927): for each feature module (the
  transformer blocks by default), ``MSE(student, teacher) / MSE(teacher, 0)``, averaged; the
  normalisation keeps every layer's term near 1 whatever the scale of its activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .data import call_model
from .quality import has_logits, representation

__all__ = ["Distillation"]


def _tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _logits(out: Any) -> torch.Tensor:
    value = getattr(out, "logits", None)
    return value if isinstance(value, torch.Tensor) else out["logits"]


class Distillation:
    """Teacher-student loss on one batch: ``loss = distill(batch)``; ``distill.last`` holds the parts.

    Args:
        student: the model being trained.
        teacher: the frozen dense model (eval mode, no gradients).
        features: qualified module names whose outputs are matched (the same names in both models).
        temperature: softening of logits. Default: ``2.0``.
        feature_weight: weight of the SquareHead term (0 switches it off). Default: ``1.0``.
        output_weight: weight of the output term. Default: ``1.0``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        features: Sequence[str] = (),
        temperature: float = 2.0,
        feature_weight: float = 1.0,
        output_weight: float = 1.0,
    ) -> None:
        self.student, self.teacher = student, teacher
        self.temperature = temperature
        self.feature_weight = feature_weight
        self.output_weight = output_weight
        self.last: dict[str, float] = {}
        self._captured: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._handles: list[RemovableHandle] = []
        if feature_weight > 0:
            s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
            for name in features:
                for side, mods in (("student", s_mods), ("teacher", t_mods)):
                    self._handles.append(mods[name].register_forward_hook(self._hook(side, name)))
        self.features = list(features) if feature_weight > 0 else []

    def _hook(self, side: str, name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            t = _tensor(out)
            if t is not None:
                self._captured[side][name] = t

        return hook

    def remove(self) -> None:
        """Remove the feature hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __call__(self, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            t_out = call_model(self.teacher, batch)
        s_out = call_model(self.student, batch)
        if has_logits(t_out):
            temp = self.temperature
            t_logits, s_logits = _logits(t_out), _logits(s_out)
            vocab = t_logits.shape[-1]
            out_loss = F.kl_div(
                F.log_softmax(s_logits.reshape(-1, vocab) / temp, dim=-1),
                F.log_softmax(t_logits.reshape(-1, vocab) / temp, dim=-1),
                log_target=True,
                reduction="batchmean",
            ) * (temp * temp)
        else:
            t_emb, s_emb = representation(t_out, batch), representation(s_out, batch)
            out_loss = (1.0 - F.cosine_similarity(s_emb, t_emb, dim=-1)).mean()
        loss = self.output_weight * out_loss
        self.last = {"output": float(out_loss.detach())}
        if self.features:
            terms = []
            for name in self.features:
                s, t = self._captured["student"].pop(name, None), self._captured["teacher"].pop(name, None)
                if s is None or t is None:
                    continue
                terms.append(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12))
            if terms:
                feat = torch.stack(terms).mean()
                loss = loss + self.feature_weight * feat
                self.last["features"] = float(feat.detach())
        self.last["loss"] = float(loss.detach())
        return loss
