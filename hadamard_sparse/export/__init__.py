"""Turning masks into speed: ``shrink`` (remove pruned channels) and ``to_sparse`` (sparse weights).

A mask alone saves nothing: the masked model does the same dense work. After
baking, two exports make the zeros pay:

* :func:`shrink` physically removes output channels/neurons whose weights are all
  zero, together with the matching inputs of the layers that consume them (and the
  BatchNorm entries in between), found from the model's ``torch.fx`` graph.
* :class:`ChannelGroups` / :class:`Heads`: structures whose groups span tensors (a channel with
  its bias, BatchNorm entries and consumer columns; an attention head), found by running the model.
* :func:`to_sparse` stores the (baked) weights of linear-like layers sparse in a
  :class:`SparseLinear` inference module (CSR run by the compiled kernel of
  ``kernels.py`` on CPU, ``torch.sparse`` CSR/BSR, 2:4 semi-structured on CUDA), and of
  ``Conv1d``/``Conv2d`` in :class:`SparseConv` (a direct CSR convolution kernel), keeping
  per layer whichever is fastest on example inputs.

Layout: ``graph.py`` (capture with ``torch.export``, fx as fallback; module guards, the
channel-flow traversal and its rule tables), ``layer_rules.py`` (one rule object per layer type:
its channel flow, rebuild, channel-group members and sparse conversion; adding a layer type is
one rule there), ``rules.py`` (one channel rule per op), ``rules_aten.py`` (the same for ATen ops),
``rules_hf.py`` (Hugging Face ``Conv1D``'s layer rule and its ``addmm``), ``attention.py``
(``ProjectedMultiheadAttention``: torch's multi-head attention with projection modules, for
removed heads and sparse projections), ``heads.py`` (attention blocks, head removal),
``groups.py`` (ChannelGroups, Heads), ``baking.py`` (what both exports do with a masked model:
bake it), ``shrink.py`` (``shrink``), ``sparse.py`` (``to_sparse``: plan, choice, swap),
``sparse_linear.py`` (``SparseLinear`` and its formats),
``sparse_conv.py`` (``SparseConv``: convolutions through the direct CSR kernel or im2col + CSR),
``choice.py`` (the per-layer choice: density rule, timing, report), ``csr_format.py``
(``CSRWeight``, checked when built), ``kernels.py`` + ``_kernels.c`` (the compiled CPU kernel,
built at first use), ``ops.py`` (the kernels as PyTorch operators, ``hadamard_sparse::csr_linear``
and ``csr_conv2d``, so ``torch.compile``, ``torch.export`` and ``torch.jit.trace`` see them),
``sparse_int8.py`` (``SparseLinearInt8``, ``to_sparse(quantize="int8")``) + ``kernels_int8.py`` +
``_kernels_int8.c`` (its int8 CSR kernel).
See ``docs/speed.md`` for the rules, their reasons and measured speed-ups.
"""

from . import rules_hf  # noqa: F401  (registers the HF Conv1D layer rule)
from .attention import ProjectedMultiheadAttention
from .groups import ChannelGroups, Heads
from .shrink import shrink
from .sparse import DEFAULT_MAX_DENSITY, LayerChoice, SparseLinear, to_sparse
from .sparse_conv import SparseConv
from .sparse_int8 import SparseLinearInt8

__all__ = [
    "DEFAULT_MAX_DENSITY",
    "ChannelGroups",
    "Heads",
    "LayerChoice",
    "ProjectedMultiheadAttention",
    "SparseConv",
    "SparseLinear",
    "SparseLinearInt8",
    "shrink",
    "to_sparse",
]
