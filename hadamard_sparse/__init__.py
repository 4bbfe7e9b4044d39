"""hadamard_sparse: sparse PyTorch models through Hadamard-product parametrizations.

Example::

    >>> import hadamard_sparse as hs
    >>> model = hs.sparsify(model, sparsity=0.7)
    >>> print(hs.sparsity_report(model))
    >>> model = hs.remove_parametrizations(model)
"""

from .api import masks, register_mask, remove_parametrizations, sparsify
from .checkpoint import load_sparse_state_dict
from .errors import HadamardSparseError, NoTargetsError, UnsupportedGraphError
from .parametrizations import HadamardMask
from .report import SparsityReport, TensorSparsity, sparsity_report
from .scores import ScoreContext, available_scores, register_score

__version__ = "0.1.0"

__all__ = [
    "HadamardMask",
    "HadamardSparseError",
    "NoTargetsError",
    "ScoreContext",
    "SparsityReport",
    "TensorSparsity",
    "UnsupportedGraphError",
    "__version__",
    "available_scores",
    "load_sparse_state_dict",
    "masks",
    "register_mask",
    "register_score",
    "remove_parametrizations",
    "sparsify",
    "sparsity_report",
]
