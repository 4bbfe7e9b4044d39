"""``to_sparse``: run baked linear-like layers with sparse weights, in :class:`SparseLinear`.

Formats: ``csr_kernel`` (CSR with narrow indices, run by the compiled kernel of
:mod:`.kernels` on CPU), CSR and BSR with int32 indices (``torch.sparse``, the MKL kernels
on CPU) and 2:4 semi-structured on CUDA. With ``example_inputs``, :func:`to_sparse` times
every candidate per layer on the real input shapes and keeps the fastest (dense
included); without, a density rule applies. See ``docs/speed.md`` for measured speed.
"""

from __future__ import annotations

import copy
import logging
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .._checks import Selectors, check_selectors
from ..errors import InvalidArgumentError, InvalidTypeError
from ..layers import check_all_used, layer_kind, selector_matches
from ..parametrizations import SparseParametrization
from . import kernels
from .attention import disable_fused_paths, shadow_runs, unpacked_modules
from .choice import (
    DEFAULT_MAX_DENSITY,
    LAYOUTS,
    TIMED_MAX_DENSITY,
    LayerChoice,
    Timer,
    candidate_layouts,
    capture_inputs,
    measure,
    rule_choice,
    split_inputs,
    timed_choice,
)
from .dense_state import load_dense_entries, save_dense_entries
from .sparse_conv import CONV_LAYOUTS, CONV_MAX_DENSITY, SparseConv, conv_weight_bias

__all__ = ["DEFAULT_MAX_DENSITY", "LayerChoice", "SparseLinear", "to_sparse"]

_log = logging.getLogger("hadamard_sparse")


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
    r"""Inference replacement of a baked linear-like layer, holding its weight sparse.

    ``forward(x) = x @ W.T + b`` like ``nn.Linear`` (any leading dimensions). Layouts:

    * ``"csr_kernel"``: CSR with ``int32`` row pointers, ``uint16`` column indices (``int32``
      above 65,536 inputs) and the values, as the buffers ``crow``, ``col`` and ``values``,
      run by the compiled kernel of :mod:`hadamard_sparse.export.kernels` (float32 on CPU;
      other dtypes and devices, or a machine without a C compiler, use ``torch.sparse``);
    * ``"csr"`` / ``"bsr"``: a ``torch.sparse`` tensor with int32 indices in ``weight``
      (the MKL kernels on CPU);
    * ``"semi_structured"``: a 2:4 ``SparseSemiStructuredTensor`` in ``weight`` (CUDA).

    The sparse data are non-persistent buffers, never Parameters, so the module runs under
    ``torch.inference_mode()`` as well as ``torch.no_grad()``. ``state_dict`` stores the dense
    ``weight`` and ``bias`` under the names the original layer used (transposed back for a
    Hugging Face ``Conv1D``), so it loads into the dense model, and a dense state_dict loads
    back into this module (re-sparsified).

    It is an export format for inference, not for training: the weight gets no gradient.

    Args:
        linear: the (baked) ``nn.Linear`` to convert.
        layout: ``"csr_kernel"``, ``"csr"``, ``"bsr"`` or ``"semi_structured"``.
        blocksize: BSR block shape.

    Attributes:
        in_features, out_features: as in ``nn.Linear``.
        weight: the ``torch.sparse`` weight (not for ``"csr_kernel"``, see :meth:`dense_weight`).
        bias: the dense bias Parameter, or ``None``.

    Example::

        >>> lin = nn.Linear(64, 32)
        >>> sl = SparseLinear(lin, "csr_kernel")
        >>> sl(torch.randn(3, 64)).shape
        torch.Size([3, 32])
    """

    weight: torch.Tensor

    def __init__(
        self, linear: nn.Linear, layout: str = "csr_kernel", *, blocksize: tuple[int, int] = (16, 16)
    ) -> None:
        if not isinstance(linear, nn.Linear):
            raise InvalidTypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self._setup(linear.weight.detach(), linear.bias, layout, blocksize, transposed=False)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        layout: str = "csr_kernel",
        *,
        blocksize: tuple[int, int] = (16, 16),
        transposed: bool = False,
    ) -> SparseLinear:
        """Build from a dense weight ``(out_features, in_features)`` and an optional bias.

        Args:
            weight: the dense weight; ``(in_features, out_features)`` when ``transposed``.
            bias: ``(out_features,)`` or ``None``.
            layout: as for the constructor.
            blocksize: BSR block shape.
            transposed: the weight is stored ``(in, out)`` (Hugging Face ``Conv1D``); the
                state_dict keeps that orientation.

        Returns:
            The module.
        """
        new = cls.__new__(cls)
        w = weight.detach()
        new._setup(w.t() if transposed else w, bias, layout, blocksize, transposed=transposed)
        return new

    def _setup(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layout: str,
        blocksize: tuple[int, int],
        *,
        transposed: bool,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise InvalidArgumentError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.layout = layout
        self.blocksize = tuple(blocksize)
        self.transposed = transposed
        self._set_dense(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _set_dense(self, w: torch.Tensor) -> None:
        if self.layout == "csr_kernel":
            packed = self._sparsify(w)
            assert isinstance(packed, kernels.CSRWeight)
            self.register_buffer("crow", packed.crow, persistent=False)
            self.register_buffer("col", packed.col, persistent=False)
            self.register_buffer("values", packed.values, persistent=False)
        else:
            self.register_buffer("weight", self._sparsify(w), persistent=False)

    def _sparsify(self, w: torch.Tensor) -> torch.Tensor | kernels.CSRWeight:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse (CSR|BSR).*beta", category=UserWarning)
            w = w.detach().clone()
            if self.layout == "csr_kernel":
                return kernels.pack_csr(w)
            if self.layout == "csr":
                return _csr32(w)
            if self.layout == "bsr":
                return _bsr32(w, self.blocksize)  # type: ignore[arg-type]
            from torch.sparse import to_sparse_semi_structured

            return to_sparse_semi_structured(w)

    def _packed(self) -> kernels.CSRWeight:
        b = self._buffers  # direct access: this runs on every forward
        return kernels.CSRWeight(b["crow"], b["col"], b["values"], (self.out_features, self.in_features))  # type: ignore[arg-type]

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
        """The weight as a dense (strided) ``(out_features, in_features)`` tensor."""
        if self.layout == "csr_kernel":
            return self._packed().to_dense()
        return self.weight.to_dense()

    @property
    def density(self) -> float:
        """Stored nonzeros over ``out_features * in_features``."""
        n = self.out_features * self.in_features
        if self.layout == "semi_structured":
            return 0.5
        stored = self.values.numel() if self.layout == "csr_kernel" else self.weight.values().numel()
        return float(stored) / n if n else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "csr_kernel":
            return kernels.csr_linear(x, self._packed(), self.bias)
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
        if self.transposed:
            expected = expected[::-1]
        ref = self.values if self.layout == "csr_kernel" else self.weight

        def set_dense(w: torch.Tensor) -> None:
            self._set_dense((w.t() if self.transposed else w).to(ref.device, ref.dtype))

        load_dense_entries(
            state_dict,
            prefix,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
            expected=expected,
            set_dense=set_dense,
            bias=self.bias,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, layout={self.layout}, density={self.density:.3f}"
        )


# --------------------------------------------------------------------------------------------
# Which layers convert, and how: one rule per layer family.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    kind: str
    #: the layer's ``(out, in)`` weight and bias, or a reason it stays as it is
    weight_bias: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None] | str]
    transposed: bool = False
    #: builds the sparse module from the layer and a layout (``None``: a ``SparseLinear``)
    build: Callable[[nn.Module, str], nn.Module] | None = None
    #: the layouts this layer can run in, and its densities for the rule without example inputs
    layouts: tuple[str, ...] = LAYOUTS
    max_density: dict[str, float] | None = None


def _linear_rule(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    assert isinstance(mod, nn.Linear)
    if type(mod).forward is not nn.Linear.forward:
        return f"{type(mod).__name__} overrides nn.Linear.forward"
    return mod.weight.detach(), mod.bias


def _hf_conv1d_rule(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    return mod.weight.detach().t(), mod.bias  # type: ignore[union-attr,operator]


def _rule_for(mod: nn.Module) -> _Rule | None:
    if isinstance(mod, nn.Linear):
        return _Rule("Linear" if type(mod) is nn.Linear else type(mod).__name__, _linear_rule)
    if layer_kind(mod) == "hf_conv1d":
        return _Rule("Conv1D", _hf_conv1d_rule, transposed=True)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return _Rule(type(mod).__name__, conv_weight_bias, False, SparseConv, CONV_LAYOUTS, CONV_MAX_DENSITY)
    return None


def _check_blocksize(blocksize: object) -> tuple[int, int]:
    if (
        not isinstance(blocksize, (tuple, list))
        or len(blocksize) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in blocksize)
    ):
        raise InvalidArgumentError(f"blocksize must be a pair of positive ints, got {blocksize!r}")
    return int(blocksize[0]), int(blocksize[1])


def _check_semi_structured(name: str, w: torch.Tensor) -> None:
    if w.device.type != "cuda":
        raise InvalidArgumentError(
            f"layout='semi_structured' needs CUDA weights, but {name!r} is on {w.device}; "
            "move the model to a GPU first, or use layout='csr'"
        )
    if w.dtype not in (torch.float16, torch.bfloat16):
        raise InvalidArgumentError(
            f"layout='semi_structured' needs float16/bfloat16 weights, {name!r} is {w.dtype}"
        )
    groups = w.reshape(w.shape[0], -1, 4) if w.shape[1] % 4 == 0 else None
    if groups is None or bool((groups.ne(0).sum(-1) > 2).any()):
        raise InvalidArgumentError(
            f"layout='semi_structured' needs a 2:4 pattern; {name!r} does not have one"
        )


@overload
def to_sparse(
    model: nn.Module,
    layout: str = ...,
    *,
    example_inputs: Any = ...,
    max_density: float | None = ...,
    blocksize: tuple[int, int] = ...,
    include: Selectors = ...,
    exclude: Selectors = ...,
    timer: Timer | None = ...,
    return_report: Literal[False] = ...,
) -> nn.Module: ...


@overload
def to_sparse(
    model: nn.Module,
    layout: str = ...,
    *,
    example_inputs: Any = ...,
    max_density: float | None = ...,
    blocksize: tuple[int, int] = ...,
    include: Selectors = ...,
    exclude: Selectors = ...,
    timer: Timer | None = ...,
    return_report: Literal[True],
) -> tuple[nn.Module, list[LayerChoice]]: ...


def to_sparse(
    model: nn.Module,
    layout: str = "auto",
    *,
    example_inputs: Any = None,
    max_density: float | None = None,
    blocksize: tuple[int, int] = (16, 16),
    include: Selectors = None,
    exclude: Selectors = None,
    timer: Timer | None = None,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, list[LayerChoice]]:
    r"""Replace the baked linear-like layers of ``model`` by :class:`SparseLinear` where it pays, in place.

    Layers: ``nn.Linear`` and its subclasses that keep ``nn.Linear.forward``, Hugging
    Face ``Conv1D`` (GPT-2), the projections of ``nn.MultiheadAttention``: it is seen as a
    :class:`~hadamard_sparse.export.attention.ProjectedMultiheadAttention` whose ``q_proj``,
    ``k_proj``, ``v_proj`` and ``out_proj`` (named ``"<attention>.q_proj"`` ... in the report and
    selectors) are chosen like any Linear, and replaced by one when a projection goes sparse
    (an attention it cannot reproduce, e.g. ``add_bias_kv=True``, stays, and the report says
    why), and ``nn.Conv1d``/``nn.Conv2d`` with ``groups=1`` (as :class:`SparseConv`: a direct
    CSR convolution kernel, or im2col + CSR; layouts ``csr_kernel``/``csr``; without
    ``example_inputs`` or ``max_density`` they convert as ``csr_kernel`` at density <= 0.1 when
    the compiled kernel is built, :data:`~.sparse_conv.CONV_MAX_DENSITY`, else stay dense). Grouped
    convolutions and other layers stay dense. The model must be baked (no parametrization of
    this library left); run :func:`remove_parametrizations` first.

    **With** ``example_inputs`` the model runs once on them, and each candidate layer is timed
    on the input it received there: dense against every sparse layout that applies
    (``layout="auto"``: ``csr_kernel`` for float32 CPU weights when the kernel builds,
    ``csr``, and ``bsr`` when the weight's nonzero blocks are sparse enough), and the fastest
    is kept (fastest of interleaved rounds); within 5% of dense the rule below decides. **Without**, the rule is:
    ``layout="auto"`` means ``csr_kernel`` (float32 CPU weights and a working kernel; else
    ``csr``), and a layer converts when its density is at most ``max_density``
    (default :data:`DEFAULT_MAX_DENSITY` of that layout: 0.3 for ``csr_kernel``, 0.2 for
    ``csr``/``bsr``, measured break-even points at 64 tokens).

    Layouts:
        * ``"auto"``: as above.
        * ``"csr_kernel"``: CSR with narrow indices, hadamard_sparse's compiled CPU kernel
          (falls back to ``torch.sparse`` with a warning where it cannot be built).
        * ``"csr"``: compressed sparse rows, int32 indices (``torch.sparse``; CPU or CUDA).
        * ``"bsr"``: blocks of ``blocksize``; a layer whose shape is not divisible by it stays dense.
        * ``"semi_structured"``: 2:4 sparsity with :func:`torch.sparse.to_sparse_semi_structured`
          on CUDA (fp16/bf16 weights, every group of 4 weights along a row holding at most 2
          nonzeros); needs a CUDA device.

    Args:
        model: a baked model.
        layout: ``"auto"``, ``"csr_kernel"``, ``"csr"``, ``"bsr"`` or ``"semi_structured"``.
        example_inputs: the model's input (a tensor, a tuple of positional inputs or a dict of
            keyword inputs) with the real shapes; ``None``: use the density rule.
        max_density: layers denser than this (in ``[0, 1]``) stay dense; ``None``: the
            layout's default without ``example_inputs``, 0.6 with.
        blocksize: BSR block shape ``(rows, cols)``.
        include: the same selectors as :func:`~hadamard_sparse.sparsify` (module types, glob
            patterns on qualified module names, callables ``(name, module) -> bool``); only matching
            linear-like layers are considered (``None``: every one). An exact name is a pattern too.
        exclude: same kinds of selectors; matching layers stay dense. An ``include`` or ``exclude``
            entry that matches no linear-like layer is refused before anything changes.
        timer: ``timer(layer_name, {candidate: fn}) -> {candidate: seconds}`` replacing the
            default :func:`measure` (for tests, or another clock).
        return_report: also return the per-layer :class:`LayerChoice` list.

    Returns:
        ``model`` with sparse layers, or ``(model, report)`` when ``return_report``. The
        choices are also logged at INFO level on the ``"hadamard_sparse"`` logger.

    Example::

        >>> model = hs.remove_parametrizations(hs.sparsify(model, 0.9))
        >>> model, report = hs.to_sparse(model, example_inputs=x, return_report=True)
        >>> print("\n".join(map(str, report)))
        >>> with torch.inference_mode():
        ...     y = model(x)
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if layout != "auto" and layout not in LAYOUTS:
        raise InvalidArgumentError(f"layout must be 'auto' or one of {list(LAYOUTS)}, got {layout!r}")
    if max_density is not None and (
        isinstance(max_density, bool)
        or not isinstance(max_density, numbers.Real)
        or not 0.0 <= float(max_density) <= 1.0
    ):
        raise InvalidArgumentError(f"max_density must be a float in [0, 1] or None, got {max_density!r}")
    bs = _check_blocksize(blocksize)
    if timer is not None and not callable(timer):
        raise InvalidTypeError(f"timer must be callable or None, got {type(timer).__name__}")
    if example_inputs is not None:
        split_inputs(example_inputs)  # type check before anything runs
    inc, exc = check_selectors(include, "include"), check_selectors(exclude, "exclude")
    inc_used: set[int] = set()
    exc_used: set[int] = set()
    wanted: set[str] = set()
    unpacked = unpacked_modules(model)  # nn.MultiheadAttention seen with q/k/v/out_proj modules
    for name, mod in unpacked.modules:
        if _rule_for(mod) is None:
            continue
        included = not inc or selector_matches(inc, name, mod, f"{name}.weight", inc_used)
        excluded = bool(exc) and selector_matches(exc, name, mod, f"{name}.weight", exc_used)
        if included and not excluded:
            wanted.add(name)
    check_all_used(inc, inc_used, "include", model)
    check_all_used(exc, exc_used, "exclude", model)
    foreign: dict[str, str] = {}  # other libraries' parametrizations (weight_norm): those layers stay
    for name, mod in model.named_modules():
        if not parametrize.is_parametrized(mod):
            continue
        params = [p for plist in mod.parametrizations.values() for p in plist]  # type: ignore[union-attr]
        foreign[name] = f"parametrized by {', '.join(type(p).__name__ for p in params)}: left as is"
        if any(isinstance(p, SparseParametrization) for p in params):
            raise InvalidArgumentError(
                f"to_sparse needs a baked model, but {name or type(model).__name__!r} is still parametrized; "
                "run hs.remove_parametrizations(model) first"
            )

    report: list[LayerChoice] = []
    todo: dict[str, tuple[_Rule, nn.Module, torch.Tensor, torch.Tensor | None, float]] = {}
    inside_mha = unpacked.refused
    for name, mod in unpacked.modules:
        rule = _rule_for(mod)
        if rule is None or name not in wanted:
            continue
        if name == "":
            raise InvalidArgumentError(
                "to_sparse cannot replace the root module; wrap the layer in an nn.Sequential"
            )
        got = foreign[name] if name in foreign else rule.weight_bias(mod)
        if isinstance(got, str) or name in inside_mha:
            why = inside_mha[name] if name in inside_mha else got
            report.append(LayerChoice(name, rule.kind, float("nan"), "dense", f"skipped: {why}"))
            continue
        w, b = got
        density = float(w.count_nonzero()) / max(1, w.numel())
        if layout == "semi_structured" and layout in rule.layouts:
            _check_semi_structured(name, w)
        todo[name] = (rule, mod, w, b, density)

    def build(name: str, chosen: str) -> nn.Module:
        rule, mod, w, b, _ = todo[name]
        if rule.build is not None:
            new = rule.build(mod, chosen)
        else:
            new = SparseLinear.from_weight(
                w.t() if rule.transposed else w, b, chosen, blocksize=bs, transposed=rule.transposed
            )
        new.train(mod.training)
        return new

    def layouts_for(rule: _Rule, got: tuple[list[str], str]) -> tuple[list[str], str]:
        sparse, why = got
        if sparse and not set(sparse) & set(rule.layouts):
            return [], f"{rule.kind} runs sparse only as {'/'.join(rule.layouts)}, not {'/'.join(sparse)}"
        return [c for c in sparse if c in rule.layouts], why

    # Build every sparse module before swapping any: a failure leaves the model as it was.
    built: dict[str, nn.Module] = {}
    if example_inputs is not None and todo:
        cap = TIMED_MAX_DENSITY if max_density is None else float(max_density)
        shadows = {model.get_submodule(n): c for n, c in unpacked.copies.items()}
        with shadow_runs(shadows):  # a converted attention's projections see their inputs
            inputs = capture_inputs(model, {n: t[1] for n, t in todo.items()}, example_inputs)
        run = timer or measure
        for name, (rule, mod, w, _, density) in todo.items():
            sparse, why = layouts_for(rule, candidate_layouts(layout, w, density, cap, bs))
            if name not in inputs:
                chosen, why = rule_choice(layout, w, density, max_density, rule.max_density, rule.kind)
                report.append(
                    LayerChoice(name, rule.kind, density, chosen, f"not run by example_inputs; {why}")
                )
                if chosen != "dense":
                    built[name] = build(name, chosen)
                continue
            x = inputs[name]
            if not sparse:
                report.append(LayerChoice(name, rule.kind, density, "dense", why, input_shape=tuple(x.shape)))
                continue
            mods: dict[str, nn.Module] = {"dense": mod}
            for cand in sparse:
                mods[cand] = build(name, cand).eval()
            fns = {c: (lambda m=m, x=x: m(x)) for c, m in mods.items()}
            with torch.inference_mode():
                seconds = run(name, fns)
            ruled = rule_choice(layout, w, density, max_density, rule.max_density, rule.kind)
            chosen, why, seconds = timed_choice(seconds, sparse, *ruled, lambda: run(name, fns))  # noqa: B023
            report.append(LayerChoice(name, rule.kind, density, chosen, why, seconds, tuple(x.shape)))
            if chosen != "dense":
                built[name] = mods[chosen]
                built[name].train(mod.training)
    else:
        for name, (rule, _, w, _, density) in todo.items():
            if layout == "auto":
                chosen, why = rule_choice(layout, w, density, max_density, rule.max_density, rule.kind)
            else:
                cap = (
                    (rule.max_density or DEFAULT_MAX_DENSITY)[layout] if max_density is None else max_density
                )
                sparse, why = layouts_for(rule, candidate_layouts(layout, w, density, float(cap), bs))
                chosen = sparse[0] if sparse and (cap or max_density is not None) else "dense"
                why = why or f"rule: density {density:.3f} <= {cap:.3f} for {layout}"
                if not cap and max_density is None:
                    why = f"rule: {rule.kind} stays dense without example_inputs or max_density"
            report.append(LayerChoice(name, rule.kind, density, chosen, why))
            if chosen != "dense":
                built[name] = build(name, chosen)
    order = {n: i for i, (n, _) in enumerate(unpacked.modules)}
    report.sort(key=lambda c: order[c.name])
    for name, copy_ in unpacked.copies.items():
        if any(b.startswith(name + ".") for b in built):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, copy_)
    for name, new in built.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    disable_fused_paths(model)
    for choice in report:
        _log.info("to_sparse: %s", choice)
    return (model, report) if return_report else model
