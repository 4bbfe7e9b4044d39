"""hadamard_sparse: sparse PyTorch models through Hadamard-product parametrizations.

Example::

    >>> import hadamard_sparse as hs
    >>> model = hs.sparsify(model, sparsity=0.7)
    >>> print(hs.sparsity_report(model))
    >>> model = hs.remove_parametrizations(model)
"""

from . import builtin_methods  # noqa: F401  (registers the built-in methods of their own modules, once)
from .api import masks, register_mask, sparsify
from .bake import remove_parametrizations
from .calibration import ActivationStats, LayerStats, calibrate
from .checkpoint import load_sparse_state_dict
from .compress import (
    SizeReport,
    TensorSize,
    compress_state_dict,
    decompress_state_dict,
    load_compressed,
    save_compressed,
    size_report,
)
from .densities import layer_densities
from .distill import Distiller
from .errors import (
    CalibrationError,
    HadamardSparseError,
    InvalidArgumentError,
    InvalidTypeError,
    NoTargetsError,
    TeacherCacheMissError,
    UnsupportedGraphError,
)
from .export import (
    DEFAULT_MAX_DENSITY,
    ChannelGroups,
    Heads,
    LayerChoice,
    ProjectedMultiheadAttention,
    SparseConv,
    SparseLinear,
    SparseLinearInt8,
    shrink,
    to_sparse,
)
from .factorization import (
    HadamardFactorization,
    factor_param_groups,
    factorize,
    l1_penalty,
    register_factorization,
)
from .gradient_scores import GradientScores
from .hf import load_pretrained, save_pretrained
from .parametrizations import HadamardMask
from .quantization import FakeQuant, fake_quantize, register_fake_quant
from .recover import RecoveryReport, recover
from .report import SparsityReport, TensorSparsity, sparsity_report
from .schedules import SET, GradualPruning, IterativePruning, RestartingLR, RigL, recovery_steps
from .scores import ScoreContext, available_scores, register_score
from .structures import NM, Block, Channels, Structure

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_DENSITY",
    "NM",
    "SET",
    "ActivationStats",
    "Block",
    "CalibrationError",
    "ChannelGroups",
    "Channels",
    "Distiller",
    "FakeQuant",
    "GradientScores",
    "GradualPruning",
    "HadamardFactorization",
    "HadamardMask",
    "HadamardSparseError",
    "Heads",
    "InvalidArgumentError",
    "InvalidTypeError",
    "IterativePruning",
    "LayerChoice",
    "LayerStats",
    "NoTargetsError",
    "ProjectedMultiheadAttention",
    "RecoveryReport",
    "RestartingLR",
    "RigL",
    "ScoreContext",
    "SizeReport",
    "SparseConv",
    "SparseLinear",
    "SparseLinearInt8",
    "SparsityReport",
    "Structure",
    "TeacherCacheMissError",
    "TensorSize",
    "TensorSparsity",
    "UnsupportedGraphError",
    "__version__",
    "available_scores",
    "calibrate",
    "compress_state_dict",
    "decompress_state_dict",
    "factor_param_groups",
    "factorize",
    "fake_quantize",
    "l1_penalty",
    "layer_densities",
    "load_compressed",
    "load_pretrained",
    "load_sparse_state_dict",
    "masks",
    "recover",
    "recovery_steps",
    "register_factorization",
    "register_fake_quant",
    "register_mask",
    "register_score",
    "remove_parametrizations",
    "save_compressed",
    "save_pretrained",
    "shrink",
    "size_report",
    "sparsify",
    "sparsity_report",
    "to_sparse",
]
