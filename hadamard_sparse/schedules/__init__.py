"""Pruning schedules that drive the live mask buffers: gradual, iterative (rewinding), SET and RigL.

Every schedule follows the habits of :mod:`torch.optim.lr_scheduler`: it is built on a model whose
masks were registered by :func:`~hadamard_sparse.sparsify` or :func:`~hadamard_sparse.register_mask`,
``step()`` is called once per optimizer step, ``state_dict()`` / ``load_state_dict()`` checkpoint it,
and ``schedule.sparsity`` is the current target. A schedule never replaces a mask or a
parametrization: it writes into the bool mask buffers in place (``mask.copy_(new)`` under
``torch.no_grad()``), so optimizers, compiled graphs and DDP keep their references.

Policy for the weights (``original``) at pruned positions, the same in every schedule: pruning
never zeroes ``original`` (the value is kept under the mask, as with ``sparsify``). Positions that
SET/RigL *grow* get ``original`` set to exactly 0 and their optimizer state (momentum, Adam moments)
set to 0, so a regrown connection starts from zero. ``IterativePruning`` rewinds ``original`` only at
kept positions.

Under ``torch.distributed`` every update is decided identically on all ranks without relying on
DDP's buffer broadcast: RigL all-reduces (averages) the captured gradients, and every schedule
broadcasts the new masks from rank 0 before writing them. Under FSDP2 (``fully_shard``) the masks stay
replicated and each rank scores only its own rows; thresholds come from all-reduced histograms
(:mod:`.sharded`).

Curves are pure functions of the step: :func:`cubic` and :func:`linear`. Every schedule takes
``include``/``exclude`` (the selectors of :func:`~hadamard_sparse.sparsify`) to drive only some of
the masks. :class:`RestartingLR` restarts the learning rate at every pruning step (oBERT's
cyclic-linear schedule, :func:`restart_factor`); :func:`recovery_steps` is the default training
length for a target sparsity.

Layout: ``curves.py`` (the curves), ``base.py`` (mask discovery, ``torch.distributed`` and
mask-write helpers, the base class), ``sharded.py`` (updates on FSDP2-sharded weights), ``gradual.py``, ``iterative.py``, ``dynamic.py``
(the drop/grow core, SET, RigL), ``restarts.py`` (learning rates restarting at pruning steps).
"""

from .curves import cubic, linear, recovery_steps
from .dynamic import SET, RigL
from .gradual import GradualPruning
from .iterative import IterativePruning
from .restarts import RestartingLR, restart_factor, update_steps

__all__ = [
    "SET",
    "GradualPruning",
    "IterativePruning",
    "RestartingLR",
    "RigL",
    "cubic",
    "linear",
    "recovery_steps",
    "restart_factor",
    "update_steps",
]
