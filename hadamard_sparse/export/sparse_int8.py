"""``SparseLinearInt8``: a sparse linear layer with int8 weights, and ``to_sparse(quantize="int8")``'s plan.

The weight is CSR with ``int8`` values and one float32 scale per output row (symmetric:
``W[r] = q[r] * scale[r]``), run by the compiled kernel of :mod:`.kernels_int8` (activations
stay float32; 3 bytes per nonzero instead of 6). :func:`int8_plan` checks the ``quantize``
argument of :func:`~hadamard_sparse.to_sparse` and reads the learned scales of layers fine-tuned
with :func:`~hadamard_sparse.register_fake_quant`, so that the export computes exactly the
simulated model: only configurations that map exactly onto int8 rows are accepted (symmetric,
at most 8 bits, one scale per output row or per tensor, the FakeQuant last in the chain).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import InvalidArgumentError, InvalidTypeError
from ..layers import weight_dims
from ..parametrizations import SparseParametrization
from ..quantization import FakeQuant
from .dense_state import load_dense_entries, save_dense_entries
from .kernels_int8 import ACTIVATIONS, CSRWeightInt8, csr_linear_int8, pack_csr_int8
from .layer_rules import rule_of

__all__ = ["PACKED_BUFFERS", "QUANTIZE", "SparseLinearInt8", "int8_plan"]

#: The allowed values of ``to_sparse``'s ``quantize`` (besides ``None``).
QUANTIZE = ("int8",)
#: The non-persistent buffers of :class:`SparseLinearInt8`: the fields of its ``CSRWeightInt8``, in the
#: order of the ``hadamard_sparse::csr_linear_int8`` operator's arguments.
PACKED_BUFFERS = ("crow", "col", "values", "scale", "lanes", "lane_ptr", "lane_cnt", "rowsum")


class SparseLinearInt8(nn.Module):
    r"""Inference replacement of a linear-like layer with a sparse int8 weight and per-row scales.

    ``forward(x) = (x @ Q.T) * scale + b``, with ``Q`` in CSR (``int32`` row pointers, ``uint16``
    column indices up to 65,536 inputs, else ``int32``; ``int8`` values) held in the non-persistent
    buffers ``crow``, ``col``, ``values`` and ``scale`` (plus ``lanes``, ``lane_ptr`` and
    ``lane_cnt``, the same nonzeros packed 16 rows per vector for the VNNI path, and ``rowsum``),
    run by the compiled kernel (float32 CPU; elsewhere ``torch.sparse`` computes the same).
    ``activations="auto"`` (default): where the CPU has AVX512-VBMI and AVX512-VNNI, each token
    is quantized to int8 (per token, ``max|x| / 127``) and runs the lanes + VNNI path; elsewhere
    activations stay float32 (the int8 values are converted in the loop), which measured faster
    than int8 activations with CSR gathers (see ``docs/speed.md``). ``"fp32"`` / ``"int8"``
    force one of them.

    ``state_dict`` holds the dense float32 ``weight`` (the exact dequantized values ``q * scale``,
    transposed back for a Hugging Face ``Conv1D``) and ``bias`` under the dense layer's names, so
    checkpoints move between the dense model, :class:`SparseLinear` and this module. Loading
    re-derives the int8 values and scales per row with the min-max rule ``max|row| / 127`` (what
    :class:`~hadamard_sparse.FakeQuant` uses): a weight saved by this module reloads to the same
    int8 values, and scales within one float32 rounding.

    Args:
        linear: the (baked) ``nn.Linear`` to convert.
        activations: ``"auto"``, ``"fp32"`` or ``"int8"``.

    Example::

        >>> lin = nn.Linear(64, 32)
        >>> with torch.no_grad():
        ...     lin.weight.mul_(torch.rand(32, 64) < 0.1)
        >>> q = SparseLinearInt8(lin)
        >>> q(torch.randn(3, 64)).shape
        torch.Size([3, 32])
    """

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    scale: torch.Tensor
    lanes: torch.Tensor
    lane_ptr: torch.Tensor
    lane_cnt: torch.Tensor
    rowsum: torch.Tensor

    def __init__(self, linear: nn.Linear, *, activations: str = "auto") -> None:
        if not isinstance(linear, nn.Linear):
            raise InvalidTypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self._setup(linear.weight.detach(), linear.bias, None, activations, transposed=False)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        scale: torch.Tensor | None = None,
        activations: str = "auto",
        transposed: bool = False,
    ) -> SparseLinearInt8:
        """Build from a dense weight ``(out_features, in_features)``.

        Args:
            weight: the dense weight, ``(out_features, in_features)`` (also when ``transposed``).
            bias: ``(out_features,)`` or ``None``.
            scale: per-row scales (``(out_features,)``, or one to broadcast); ``None``: ``max|row| / 127``.
            activations: ``"auto"``, ``"fp32"`` or ``"int8"``.
            transposed: the original layer stores its weight ``(in, out)`` (Hugging Face ``Conv1D``);
                the state_dict keeps that orientation.

        Returns:
            The module.
        """
        new = cls.__new__(cls)
        new._setup(weight.detach(), bias, scale, activations, transposed=transposed)
        return new

    def _setup(
        self,
        w: torch.Tensor,
        bias: torch.Tensor | None,
        scale: torch.Tensor | None,
        activations: str,
        *,
        transposed: bool,
    ) -> None:
        if activations not in ACTIVATIONS:
            raise InvalidArgumentError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
        super().__init__()
        self.out_features, self.in_features = (int(d) for d in w.shape)
        self.activations = activations
        self.transposed = transposed
        self._set_dense(w, scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float(), requires_grad=False)

    def _set_dense(self, w: torch.Tensor, scale: torch.Tensor | None) -> None:
        if scale is not None:
            scale = scale.detach().to(torch.float32).reshape(-1).expand(w.shape[0])
        with torch.inference_mode(False), torch.no_grad():
            p = pack_csr_int8(w.detach().clone(), scale)
        for name in PACKED_BUFFERS:
            self.register_buffer(name, getattr(p, name), persistent=False)

    def packed(self) -> CSRWeightInt8:
        """The weight as a :class:`~.kernels_int8.CSRWeightInt8` (views of the buffers)."""
        b = self._buffers
        return CSRWeightInt8(
            **{n: b[n] for n in PACKED_BUFFERS},  # type: ignore[arg-type]
            shape=(self.out_features, self.in_features),
        )

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight, dense float32 ``(out_features, in_features)``."""
        return self.packed().to_dense()

    @property
    def density(self) -> float:
        """Stored nonzeros over ``out_features * in_features``."""
        n = self.out_features * self.in_features
        return float(self.col.numel()) / n if n else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return csr_linear_int8(x, self.packed(), self.bias, activations=self.activations)

    def __deepcopy__(self, memo: dict[int, Any]) -> SparseLinearInt8:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        w = self.dense_weight()
        save_dense_entries(
            destination, prefix, keep_vars, w.t().contiguous() if self.transposed else w, self.bias
        )

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
        expected = (self.out_features, self.in_features)

        def set_dense(w: torch.Tensor) -> None:
            w = (w.t() if self.transposed else w).to(torch.float32)
            amax = w.double().abs().amax(1) if w.shape[1] else w.new_zeros(w.shape[0], dtype=torch.float64)
            self._set_dense(w, (amax / 127).float())

        load_dense_entries(
            state_dict,
            prefix,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
            expected=expected[::-1] if self.transposed else expected,
            set_dense=set_dense,
            bias=self.bias,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int8, activations={self.activations}, density={self.density:.3f}"
        )


def _learned_scale(name: str, mod: nn.Module, out_dim: int) -> torch.Tensor:
    """The scale the FakeQuant at the end of ``mod.weight``'s chain applies, per output row."""
    chain = mod.parametrizations["weight"]  # type: ignore[index,union-attr]
    fq = chain[-1]
    where = f"{name}.weight"
    if not isinstance(fq, FakeQuant) or any(isinstance(p, FakeQuant) for p in list(chain)[:-1]):
        raise InvalidArgumentError(
            f"to_sparse(quantize='int8') reads the scales of a FakeQuant at the end of {where!r}'s "
            f"parametrization chain, got {[type(p).__name__ for p in chain]}"
        )
    if fq.bits > 8 or fq.channel_dim not in (None, out_dim):
        raise InvalidArgumentError(
            f"{where!r} has FakeQuant(bits={fq.bits}, channel_dim={fq.channel_dim}); the int8 kernels "
            f"take symmetric scales per output row (channel_dim={out_dim}) or per tensor (None) with "
            "bits <= 8; register_fake_quant(..., bits=8, per_channel=True) maps exactly"
        )
    seen: list[torch.Tensor] = []  # the FakeQuant's input, whatever the chain before it (mask, factors)
    handle = fq.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            getattr(mod, "weight")  # noqa: B009  (runs the chain)
    finally:
        handle.remove()
    if not seen:
        raise InvalidArgumentError(
            f"{where!r} came from a cache: call to_sparse outside parametrize.cached()"
        )
    x = seen[-1]
    s = fq.scale(x).to(torch.float32)
    rows = x.shape[out_dim]
    return s.reshape(-1).expand(rows).clone() if s.numel() == 1 else s.reshape(rows)


def int8_plan(model: nn.Module, quantize: object, layout: str) -> tuple[str, dict[str, torch.Tensor]]:
    """Check ``to_sparse``'s ``quantize`` and read the learned scales of fake-quantized layers.

    Args:
        model: the model given to ``to_sparse``.
        quantize: ``None`` or ``"int8"``.
        layout: ``to_sparse``'s layout (``"auto"`` and ``"csr_kernel"`` work with ``"int8"``).

    Returns:
        The layout to use (``"csr_kernel"`` for ``"auto"`` with int8) and, by module name, the
        per-row scales of the layers whose weight ends in a :class:`~hadamard_sparse.FakeQuant`
        (those layers may still be parametrized; ``to_sparse`` bakes them into the int8 module).

    Raises:
        InvalidArgumentError: ``quantize`` is not allowed, does not fit ``layout``, or a
            FakeQuant cannot map exactly onto int8 rows; nothing is changed.
    """
    if quantize is None:
        return layout, {}
    if not isinstance(quantize, str) or quantize not in QUANTIZE:
        raise InvalidArgumentError(f"quantize must be None or one of {QUANTIZE}, got {quantize!r}")
    if layout not in ("auto", "csr_kernel"):
        raise InvalidArgumentError(
            f"quantize='int8' runs the int8 CSR kernel: layout must be 'auto' or 'csr_kernel', got {layout!r}"
        )
    learned: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if not parametrize.is_parametrized(mod, "weight"):
            continue
        chain = mod.parametrizations["weight"]  # type: ignore[index,union-attr]
        if not any(isinstance(p, FakeQuant) for p in chain):
            continue
        rule = rule_of(mod, "sparse")
        spec = None if rule is None else rule.sparse(mod)
        if spec is None or spec.build is not None:  # linear-like: converted by SparseLinear(Int8)
            raise InvalidArgumentError(
                f"{name!r} ({type(mod).__name__}) is fake-quantized but has no int8 sparse export; "
                "run hs.remove_parametrizations on it first"
            )
        others = [p for k, pl in mod.parametrizations.items() if k != "weight" for p in pl]  # type: ignore[union-attr]
        if any(isinstance(p, SparseParametrization) for p in others):
            raise InvalidArgumentError(f"{name!r} has parametrizations besides its weight's; bake them first")
        learned[name] = _learned_scale(name, mod, weight_dims(mod)[0])
    return "csr_kernel", learned
