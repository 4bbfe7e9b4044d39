"""``to_sparse``: run baked linear-like layers and convolutions with sparse weights.

Formats: ``csr_kernel`` (CSR with narrow indices, run by the compiled kernel of
:mod:`.kernels` on CPU), CSR and BSR with int32 indices (``torch.sparse``, the MKL kernels
on CPU) and 2:4 semi-structured on CUDA (:class:`SparseLinear`, ``sparse_linear.py``), and
:class:`SparseConv` for convolutions. With ``example_inputs``, :func:`to_sparse` times
every candidate per layer on the real input shapes and keeps the fastest (dense
included); without, a density rule applies. See ``docs/speed.md`` for measured speed.

:func:`to_sparse` runs in four steps: :func:`_plan` (check everything, bake a copy of a masked
model, list the layers whose rule in ``export/layer_rules.py`` converts them), the choice per
layer (:func:`_choose_timed` on example inputs, or :func:`_choose_by_rule`; both end in
:func:`_by_rule`, the one density rule), and :func:`_swap` (bake ``model``, swap the sparse
modules in).
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._checks import Selectors, check_blocksize, check_selectors
from .._model_io import set_submodule
from ..errors import InvalidArgumentError, InvalidTypeError
from ..layers import check_all_used, selector_matches
from .attention import Unpacked, disable_fused_paths, shadow_runs, unpacked_modules
from .baking import bake, baked_copy, holds_masks
from .choice import (
    DEFAULT_MAX_DENSITY,
    LAYOUTS,
    MIN_SPEEDUP,
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
from .kernels_int8 import csr_linear_int8, lanes_path_available
from .layer_rules import SparseSpec, rule_of
from .sparse_int8 import SparseLinearInt8, int8_plan
from .sparse_linear import SparseLinear

__all__ = ["DEFAULT_MAX_DENSITY", "LayerChoice", "SparseLinear", "to_sparse"]

_log = logging.getLogger("hadamard_sparse")


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
    quantize: str | None = ...,
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
    quantize: str | None = ...,
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
    quantize: str | None = None,
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
    convolutions and other layers stay dense. The layers are those with a ``sparse`` capability in
    ``export/layer_rules.py``.

    **A masked model is baked**, as :func:`~hadamard_sparse.shrink` does (one rule, ``export/baking.py``):
    the checks and the choice run on a baked copy, so a refused call leaves ``model`` unchanged;
    then ``model``'s parametrizations of this library are baked in place (as
    :func:`~hadamard_sparse.remove_parametrizations` does, even when no layer converts) and the
    sparse layers swapped in. ``copy.deepcopy`` the model beforehand to keep it masked. Layers
    parametrized by other libraries (``weight_norm``) stay as they are.

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
        model: a baked or masked (parametrized) model.
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
        quantize: ``None`` or ``"int8"``: linear-like layers become :class:`SparseLinearInt8` (int8 CSR, float scales per row;
            layout ``"auto"``/``"csr_kernel"``); learned scales of a last-in-chain ``FakeQuant`` are kept, and
            those layers keep float activations (``activations="fp32"``, what the FakeQuant simulated).
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
    plan = _plan(model, layout, max_density, blocksize, example_inputs, timer, include, exclude, quantize)
    if example_inputs is not None and plan.layers:
        built = _choose_timed(plan, example_inputs, max_density, timer or measure)
    else:
        built = _choose_by_rule(plan, max_density)
    order = {n: i for i, (n, _) in enumerate(plan.unpacked.modules)}
    plan.report.sort(key=lambda c: order[c.name])
    _swap(model, plan, built)
    for choice in plan.report:
        _log.info("to_sparse: %s", choice)
    return (model, plan.report) if return_report else model


# --------------------------------------------------------------------------------------------
# plan: every check, nothing changed
# --------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """A layer ``to_sparse`` may convert: its rule's spec, the module, its ``(out, in)`` weight and bias."""

    spec: SparseSpec
    mod: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    density: float


@dataclass
class _Plan:
    """What :func:`to_sparse` settled before choosing any layout (checked; ``model`` unchanged)."""

    work: nn.Module  # the model, or a baked copy of it when it holds masks
    layout: str
    blocksize: tuple[int, int]
    quantize: str | None
    learned: dict[str, torch.Tensor]  # int8 scales read from FakeQuant, by layer name
    unpacked: Unpacked
    layers: dict[str, _Layer] = field(default_factory=dict)
    report: list[LayerChoice] = field(default_factory=list)

    def build(self, name: str, chosen: str) -> nn.Module:
        """The sparse module of layer ``name`` in layout ``chosen`` (not swapped in)."""
        layer = self.layers[name]
        spec = layer.spec
        if spec.build is not None:
            new = spec.build(layer.mod, chosen)
        elif self.quantize is not None:
            learned = self.learned.get(name)
            # a FakeQuant simulated int8 weights with float activations: export exactly that
            new = SparseLinearInt8.from_weight(
                layer.weight,
                layer.bias,
                scale=learned,
                activations="auto" if learned is None else "fp32",
                transposed=spec.transposed,
            )
        else:
            w = layer.weight.t() if spec.transposed else layer.weight
            new = SparseLinear.from_weight(
                w, layer.bias, chosen, blocksize=self.blocksize, transposed=spec.transposed
            )
        new.train(layer.mod.training)
        return new


def _check_arguments(
    model: nn.Module,
    layout: str,
    max_density: float | None,
    blocksize: tuple[int, int],
    quantize: str | None,
    timer: Timer | None,
    example_inputs: Any,
) -> tuple[str, dict[str, torch.Tensor], tuple[int, int]]:
    """Check the arguments; returns the layout (``int8_plan``'s), the learned int8 scales and the block shape."""
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
    bs = check_blocksize(blocksize)
    layout, learned = int8_plan(model, quantize, layout)
    if timer is not None and not callable(timer):
        raise InvalidTypeError(f"timer must be callable or None, got {type(timer).__name__}")
    if example_inputs is not None:
        split_inputs(example_inputs)  # type check before anything runs
    return layout, learned, bs


def _wanted(model: nn.Module, unpacked: Unpacked, include: Selectors, exclude: Selectors) -> set[str]:
    """The names of the layers with a sparse rule that ``include``/``exclude`` keep (unused entries refused)."""
    inc, exc = check_selectors(include, "include"), check_selectors(exclude, "exclude")
    inc_used: set[int] = set()
    exc_used: set[int] = set()
    wanted: set[str] = set()
    for name, mod in unpacked.modules:
        if _spec(mod) is None:
            continue
        included = not inc or selector_matches(inc, name, mod, f"{name}.weight", inc_used)
        excluded = bool(exc) and selector_matches(exc, name, mod, f"{name}.weight", exc_used)
        if included and not excluded:
            wanted.add(name)
    check_all_used(inc, inc_used, "include", model)
    check_all_used(exc, exc_used, "exclude", model)
    return wanted


def _spec(mod: nn.Module) -> SparseSpec | None:
    rule = rule_of(mod, "sparse")
    return None if rule is None else rule.sparse(mod)


def _foreign(work: nn.Module) -> dict[str, str]:
    """Layers another library's parametrizations hold (``weight_norm``): they stay, with why."""
    out = {}
    for name, mod in work.named_modules():
        if parametrize.is_parametrized(mod):
            params = [p for plist in mod.parametrizations.values() for p in plist]  # type: ignore[union-attr]
            out[name] = f"parametrized by {', '.join(type(p).__name__ for p in params)}: left as is"
    return out


def _plan(
    model: nn.Module,
    layout: str,
    max_density: float | None,
    blocksize: tuple[int, int],
    example_inputs: Any,
    timer: Timer | None,
    include: Selectors,
    exclude: Selectors,
    quantize: str | None,
) -> _Plan:
    """Check every argument and layer, and list the candidates; ``model`` is not changed.

    A model holding this library's parametrizations is planned on a baked copy (``baking.py``).
    """
    layout, learned, bs = _check_arguments(
        model, layout, max_density, blocksize, quantize, timer, example_inputs
    )
    work = baked_copy(model) if holds_masks(model) else model
    unpacked = unpacked_modules(work)  # nn.MultiheadAttention seen with q/k/v/out_proj modules
    wanted = _wanted(model, unpacked, include, exclude)
    plan = _Plan(work, layout, bs, quantize, learned, unpacked)
    foreign = _foreign(work)
    for name, mod in unpacked.modules:
        spec = _spec(mod)
        if spec is None or name not in wanted:
            continue
        if name == "":
            raise InvalidArgumentError(
                "to_sparse cannot replace the root module; wrap the layer in an nn.Sequential"
            )
        got = foreign[name] if name in foreign else spec.weight_bias(mod)
        if isinstance(got, str) or name in unpacked.refused:
            why = unpacked.refused.get(name, got)
            plan.report.append(LayerChoice(name, spec.kind, float("nan"), "dense", f"skipped: {why}"))
            continue
        w, b = got
        density = float(w.count_nonzero()) / max(1, w.numel())
        if layout == "semi_structured" and layout in spec.layouts:
            _check_semi_structured(name, w)
        plan.layers[name] = _Layer(spec, mod, w, b, density)
    return plan


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


# --------------------------------------------------------------------------------------------
# choice: one density rule, timing on example inputs
# --------------------------------------------------------------------------------------------


def _allowed(spec: SparseSpec, got: tuple[list[str], str]) -> tuple[list[str], str]:
    """The candidate layouts ``got`` (``candidate_layouts``) that the layer can run in, or why none."""
    sparse, why = got
    if sparse and not set(sparse) & set(spec.layouts):
        return [], f"{spec.kind} runs sparse only as {'/'.join(spec.layouts)}, not {'/'.join(sparse)}"
    return [c for c in sparse if c in spec.layouts], why


def _by_rule(plan: _Plan, layer: _Layer, max_density: float | None) -> tuple[str, str]:
    """The density rule (no timing): the layout chosen for ``layer``, and why."""
    w, spec = layer.weight, layer.spec
    chosen, why = rule_choice(plan.layout, w, layer.density, max_density, spec.max_density, spec.kind)
    if chosen == "dense" or plan.layout == "auto":
        return chosen, why
    # an explicit layout: the layer must run in it and its shape fit it (BSR blocks)
    sparse, no = _allowed(spec, candidate_layouts(chosen, w, layer.density, 1.0, plan.blocksize))
    return (chosen, why) if sparse else ("dense", no)


def _choose_by_rule(plan: _Plan, max_density: float | None) -> dict[str, nn.Module]:
    """Choose every layer by the density rule; the sparse modules built, by name."""
    built: dict[str, nn.Module] = {}
    for name, layer in plan.layers.items():
        chosen, why = _by_rule(plan, layer, max_density)
        plan.report.append(LayerChoice(name, layer.spec.kind, layer.density, chosen, why))
        if chosen != "dense":
            built[name] = plan.build(name, chosen)
    return built


def _choose_timed(
    plan: _Plan, example_inputs: Any, max_density: float | None, run: Timer
) -> dict[str, nn.Module]:
    """Time every allowed layout of each layer on the input it gets from ``example_inputs``.

    A layer the inputs do not reach is chosen by the rule. Returns the sparse modules built, by name.
    """
    cap = TIMED_MAX_DENSITY if max_density is None else float(max_density)
    shadows = {plan.work.get_submodule(n): c for n, c in plan.unpacked.copies.items()}
    with shadow_runs(shadows):  # a converted attention's projections see their inputs
        inputs = capture_inputs(plan.work, {n: la.mod for n, la in plan.layers.items()}, example_inputs)
    built: dict[str, nn.Module] = {}
    for name, layer in plan.layers.items():
        kind, density = layer.spec.kind, layer.density
        if name not in inputs:
            chosen, why = _by_rule(plan, layer, max_density)
            plan.report.append(LayerChoice(name, kind, density, chosen, f"not run by example_inputs; {why}"))
            if chosen != "dense":
                built[name] = plan.build(name, chosen)
            continue
        x = inputs[name]
        sparse, why = _allowed(
            layer.spec, candidate_layouts(plan.layout, layer.weight, density, cap, plan.blocksize)
        )
        if not sparse:
            plan.report.append(LayerChoice(name, kind, density, "dense", why, input_shape=tuple(x.shape)))
            continue
        mods: dict[str, nn.Module] = {"dense": layer.mod}
        for cand in sparse:
            mods[cand] = plan.build(name, cand).eval()
        fns = {c: (lambda m=m, x=x: m(x)) for c, m in mods.items()}
        q8 = mods.get("csr_kernel")
        if isinstance(q8, SparseLinearInt8) and q8.activations == "auto" and lanes_path_available():
            packed, bias = q8.packed(), q8.bias
            fns[FP32_ACTIVATIONS] = lambda: csr_linear_int8(x, packed, bias, activations="fp32")  # noqa: B023
        with torch.inference_mode():
            seconds = run(name, fns)
        acts = ""
        if FP32_ACTIVATIONS in fns:
            acts = _pick_activations(q8, seconds)  # type: ignore[arg-type]
            del fns[FP32_ACTIVATIONS]  # retimes measure the module as chosen
        ruled = _by_rule(plan, layer, max_density)
        chosen, why, seconds = timed_choice(seconds, sparse, *ruled, lambda: run(name, fns))  # noqa: B023
        why += acts if chosen != "dense" else ""
        plan.report.append(LayerChoice(name, kind, density, chosen, why, seconds, tuple(x.shape)))
        if chosen != "dense":
            built[name] = mods[chosen]
            built[name].train(layer.mod.training)
    return built


#: The timing label of an int8 layer run with float32 activations (beside ``"csr_kernel"``, int8 ones).
FP32_ACTIVATIONS = "csr_kernel/fp32-activations"


def _pick_activations(mod: SparseLinearInt8, seconds: dict[str, float]) -> str:
    """Float32 activations for ``mod`` when they timed :data:`MIN_SPEEDUP` faster than int8 ones (the lanes path).

    ``seconds["csr_kernel"]`` becomes the chosen variant's time. Returns the note for the report.
    """
    t8, t32 = seconds["csr_kernel"], seconds[FP32_ACTIVATIONS]
    faster = t32 > 0 and t8 / t32 >= MIN_SPEEDUP
    if faster:
        mod.activations = "fp32"
        seconds["csr_kernel"] = t32
    return f"; activations {'fp32' if faster else 'int8'} (int8 {t32 / t8 if t8 > 0 else 1.0:.2f}x fp32)"


# --------------------------------------------------------------------------------------------
# swap
# --------------------------------------------------------------------------------------------


def _swap(model: nn.Module, plan: _Plan, built: dict[str, nn.Module]) -> None:
    """Bake ``model`` when it was planned on a baked copy, then swap the sparse modules in."""
    if plan.work is not model:
        bake(model)
    for name, copy_ in plan.unpacked.copies.items():
        if any(b.startswith(name + ".") for b in built):
            set_submodule(model, name, copy_)
    for name, new in built.items():
        set_submodule(model, name, new)
    disable_fused_paths(model)
