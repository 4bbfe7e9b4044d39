"""``to_sparse``: store baked ``nn.Linear`` weights as ``torch.sparse`` tensors in :class:`SparseLinear`.

Formats: CSR and BSR with int32 indices (the MKL kernels on CPU) and 2:4
semi-structured on CUDA. See ``docs/speed.md`` for when each pays.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["DEFAULT_MAX_DENSITY", "SparseLinear", "to_sparse"]

#: Largest weight density (fraction of nonzeros) at which a layer is converted by default, per
#: layout; denser layers stay dense. Measured with ``benchmarks/inference_speed.py`` (docs/speed.md).
DEFAULT_MAX_DENSITY: dict[str, float] = {"csr": 0.2, "bsr": 0.2, "semi_structured": 0.5}
_LAYOUTS = ("csr", "bsr", "semi_structured")


def _csr32(w: torch.Tensor) -> torch.Tensor:
    c = w.to_sparse_csr()
    return torch.sparse_csr_tensor(
        c.crow_indices().to(torch.int32),
        c.col_indices().to(torch.int32),
        c.values(),
        c.shape,
        check_invariants=False,
    )


def _bsr32(w: torch.Tensor, blocksize: tuple[int, int]) -> torch.Tensor:
    c = w.to_sparse_bsr(blocksize)
    return torch.sparse_bsr_tensor(
        c.crow_indices().to(torch.int32),
        c.col_indices().to(torch.int32),
        c.values(),
        c.shape,
        check_invariants=False,
    )


class SparseLinear(nn.Module):
    r"""Inference replacement of a baked ``nn.Linear`` whose weight is a ``torch.sparse`` tensor.

    ``forward(x) = x @ W.T + b`` like ``nn.Linear`` (any leading dimensions). The weight
    is held as a non-persistent buffer (CSR or BSR with int32 indices, which use the
    MKL kernels on CPU, or a 2:4 ``SparseSemiStructuredTensor`` on CUDA) and is never
    a Parameter, so the module runs under ``torch.inference_mode()`` as well as
    ``torch.no_grad()``. ``state_dict`` stores the dense ``weight`` and ``bias`` under
    the names ``nn.Linear`` uses, so it loads into the dense model, and a dense
    ``nn.Linear`` state_dict loads back into this module (re-sparsified).

    It is an export format for inference, not for training: the weight gets no gradient.

    Args:
        linear: the (baked) layer to convert.
        layout: ``"csr"``, ``"bsr"`` or ``"semi_structured"``.
        blocksize: BSR block shape.

    Attributes:
        in_features, out_features: as in ``nn.Linear``.
        weight: the sparse weight tensor.
        bias: the dense bias Parameter, or ``None``.

    Example::

        >>> lin = nn.Linear(64, 32)
        >>> sl = SparseLinear(lin, "csr")
        >>> sl(torch.randn(3, 64)).shape
        torch.Size([3, 32])
    """

    weight: torch.Tensor

    def __init__(
        self, linear: nn.Linear, layout: str = "csr", *, blocksize: tuple[int, int] = (16, 16)
    ) -> None:
        super().__init__()
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {list(_LAYOUTS)}, got {layout!r}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.layout = layout
        self.blocksize = tuple(blocksize)
        self.register_buffer("weight", self._sparsify(linear.weight.detach()), persistent=False)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )

    def _sparsify(self, w: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse (CSR|BSR).*beta", category=UserWarning)
            w = w.detach().clone()
            if self.layout == "csr":
                return _csr32(w)
            if self.layout == "bsr":
                return _bsr32(w, self.blocksize)  # type: ignore[arg-type]
            from torch.sparse import to_sparse_semi_structured

            return to_sparse_semi_structured(w)

    def __deepcopy__(self, memo: dict[int, Any]) -> SparseLinear:
        # Sparse compressed tensors have no storage for copy.deepcopy: clone the weight instead.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_buffers":
                value = {
                    k: (v.clone() if k == "weight" else copy.deepcopy(v, memo)) for k, v in value.items()
                }
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        return new

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense (strided) tensor."""
        return self.weight.to_dense()

    @property
    def density(self) -> float:
        """Stored nonzeros over ``out_features * in_features``."""
        n = self.out_features * self.in_features
        if self.layout == "semi_structured":
            return 0.5
        return float(self.weight.values().numel()) / n if n else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "semi_structured":
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 1:
            y = torch.mv(self.weight, x2[0]).unsqueeze(0)
        else:
            y = torch.sparse.mm(self.weight, x2.t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            expected = (self.out_features, self.in_features)
            if not isinstance(w, torch.Tensor) or tuple(w.shape) != expected:
                got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                error_msgs.append(
                    f"size mismatch for {key}: expected a dense tensor of shape {expected}, got {got}"
                )
            else:
                dense = w.to_dense() if w.layout != torch.strided else w
                self.weight = self._sparsify(dense.to(self.weight.device, self.weight.dtype))
        elif strict:
            missing_keys.append(key)
        bkey = prefix + "bias"
        if self.bias is not None and bkey in state_dict:
            with torch.no_grad():
                self.bias.copy_(state_dict[bkey])
        elif self.bias is not None and strict:
            missing_keys.append(bkey)
        if strict:
            for k in state_dict:
                if k.startswith(prefix) and k not in (key, bkey) and "." not in k[len(prefix) :]:
                    unexpected_keys.append(k)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, layout={self.layout}, density={self.density:.3f}"
        )


def _check_blocksize(blocksize: object) -> tuple[int, int]:
    if (
        not isinstance(blocksize, (tuple, list))
        or len(blocksize) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in blocksize)
    ):
        raise ValueError(f"blocksize must be a pair of positive ints, got {blocksize!r}")
    return int(blocksize[0]), int(blocksize[1])


def to_sparse(
    model: nn.Module,
    layout: str = "csr",
    *,
    max_density: float | None = None,
    blocksize: tuple[int, int] = (16, 16),
    include: Iterable[str] | None = None,
) -> nn.Module:
    r"""Replace the baked ``nn.Linear`` layers of ``model`` by :class:`SparseLinear`, in place.

    Only layers sparse enough to profit are converted: those whose weight density
    (nonzeros / numel) is at most ``max_density``; denser ones stay dense
    ``nn.Linear``. The default thresholds (:data:`DEFAULT_MAX_DENSITY`) come from
    ``benchmarks/inference_speed.py`` (single thread): CSR with int32 indices was
    slower than dense at batch 64 at 70% sparsity and broke even or won from 80%, so
    layers with more than 20% nonzeros stay dense. Convolutions stay dense (use :func:`shrink` for
    channel sparsity). The model must be baked (no parametrization of this library
    left); run :func:`remove_parametrizations` first.

    Layouts:
        * ``"csr"``: compressed sparse rows, int32 indices (CPU or CUDA).
        * ``"bsr"``: blocks of ``blocksize``; a layer whose shape is not divisible by it stays dense.
        * ``"semi_structured"``: 2:4 sparsity with :func:`torch.sparse.to_sparse_semi_structured`
          on CUDA (fp16/bf16 weights, every group of 4 weights along a row holding at most 2
          nonzeros); needs a CUDA device.

    Args:
        model: a baked model.
        layout: ``"csr"``, ``"bsr"`` or ``"semi_structured"``.
        max_density: convert layers whose density is at most this (in ``[0, 1]``);
            ``None``: ``DEFAULT_MAX_DENSITY[layout]``.
        blocksize: BSR block shape ``(rows, cols)``.
        include: qualified module names to consider (``None``: every ``nn.Linear``).

    Returns:
        ``model``, with sparse layers.

    Example::

        >>> model = hs.remove_parametrizations(hs.sparsify(model, 0.95))
        >>> to_sparse(model, "csr")
        >>> with torch.inference_mode():
        ...     y = model(x)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {list(_LAYOUTS)}, got {layout!r}")
    if max_density is None:
        max_density = DEFAULT_MAX_DENSITY[layout]
    if (
        isinstance(max_density, bool)
        or not isinstance(max_density, numbers.Real)
        or not 0.0 <= float(max_density) <= 1.0
    ):
        raise ValueError(f"max_density must be a float in [0, 1] or None, got {max_density!r}")
    bs = _check_blocksize(blocksize)
    wanted = None if include is None else set(include)
    names = {n for n, _ in model.named_modules()}
    if wanted is not None and not wanted <= names:
        raise ValueError(f"include names modules that do not exist: {sorted(wanted - names)}")
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            raise ValueError(
                f"to_sparse needs a baked model, but {name or type(model).__name__!r} is still parametrized; "
                "run hs.remove_parametrizations(model) first"
            )
    todo: list[tuple[str, nn.Linear]] = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or (wanted is not None and name not in wanted):
            continue
        if name == "":
            raise ValueError("to_sparse cannot replace the root module; wrap the Linear in an nn.Sequential")
        w = mod.weight.detach()
        density = float(w.count_nonzero()) / max(1, w.numel())
        if density > max_density:
            continue
        if layout == "bsr" and (w.shape[0] % bs[0] or w.shape[1] % bs[1]):
            continue
        if layout == "semi_structured":
            if w.device.type != "cuda":
                raise ValueError(
                    f"layout='semi_structured' needs CUDA weights, but {name!r} is on {w.device}; "
                    "move the model to a GPU first, or use layout='csr'"
                )
            if w.dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(
                    f"layout='semi_structured' needs float16/bfloat16 weights, {name!r} is {w.dtype}"
                )
            groups = w.reshape(w.shape[0], -1, 4) if w.shape[1] % 4 == 0 else None
            if groups is None or bool((groups.ne(0).sum(-1) > 2).any()):
                raise ValueError(f"layout='semi_structured' needs a 2:4 pattern; {name!r} does not have one")
        todo.append((name, mod))
    # Build every SparseLinear before swapping any: a failure leaves the model as it was.
    built: list[tuple[str, SparseLinear]] = []
    for name, mod in todo:
        new = SparseLinear(mod, layout, blocksize=bs)
        new.train(mod.training)
        built.append((name, new))
    for name, new in built:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model
