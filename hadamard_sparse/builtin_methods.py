"""The built-in methods that live in modules of their own, registered in one place.

:mod:`hadamard_sparse.scores` registers the plain scores (``"magnitude"``, ``"random"``,
``"wanda"``); the methods below keep their score, pruner and statistics in their own modules,
which register nothing when imported. Importing this module registers them, once: the package's
``__init__`` does, so every entry point (``hs.sparsify``, the schedules, ``hs.available_scores()``)
sees the same list.

Example::

    >>> import hadamard_sparse as hs
    >>> {"sparsegpt", "ria", "dsnot", "movement", "obs"} <= set(hs.available_scores())
    True
"""

from __future__ import annotations

from . import dsnot, gradient_scores, reconstruct, ria, sparsegpt
from .scores import register_score

__all__: list[str] = []

# "sparsegpt": the mask-only OBS saliency as its score, and a pruner that also
# rewrites the kept weights.
register_score(
    "sparsegpt", needs_calibration=True, scopes=sparsegpt.SCOPES, needs_gram=True, pruner=sparsegpt.prune
)(sparsegpt.obs_saliency)
# "wanda_refit": Wanda's masks, then a support-restricted least-squares refit of the kept weights;
# "sparsegpt_block": sequential SparseGPT block by block, then Adam block reconstruction (reconstruct.py).
register_score(
    "wanda_refit",
    needs_calibration=True,
    scopes=reconstruct.SCOPES,
    needs_gram=True,
    pruner=reconstruct.prune_wanda_refit,
)(reconstruct.wanda_score)
register_score(
    "sparsegpt_block",
    needs_calibration=True,
    scopes=reconstruct.SCOPES,
    needs_gram=True,
    pruner=reconstruct.prune_blocks,
)(sparsegpt.obs_saliency)
# "ria": relative importance x activations, mask only (ria.py); "dsnot": Wanda's masks, then DSnoT's
# training-free prune-and-grow swaps per row (dsnot.py), mask only too; its score is Wanda's.
register_score("ria", needs_calibration=True, scopes=ria.SCOPES)(ria.ria_score)
register_score("dsnot", needs_calibration=True, scopes=dsnot.SCOPES, pruner=dsnot.prune)(
    reconstruct.wanda_score
)
# From the gradients an hs.GradientScores recorded: "movement" (mask only), "obs" (oBERT; its pruner updates weights).
register_score("movement", scopes=gradient_scores.MOVEMENT_SCOPES, needs_gradients=True)(
    gradient_scores.movement_score
)
register_score("obs", scopes=gradient_scores.SCOPES, needs_gradients=True, pruner=gradient_scores.obs_prune)(
    gradient_scores.obs_score
)
