"""How ``to_sparse`` chooses a layout per layer: the density rule, timing on example inputs, the report.

Imports point down only: ``sparse.py`` uses this module, never the reverse.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, InvalidTypeError
from . import kernels

__all__ = ["DEFAULT_MAX_DENSITY", "LayerChoice", "Timer", "measure", "timed_choice"]

#: Largest weight density (fraction of nonzeros) at which a layer is converted without
#: ``example_inputs``, per layout; denser layers stay dense. Measured with
#: ``benchmarks/inference_speed.py`` (docs/speed.md): at 64-256 tokens the compiled kernel was
#: 1.1-1.5x dense at 30% density and 0.7-0.9x at 50% (it wins earlier at 1-8 tokens); torch's
#: CSR broke even near 20%.
DEFAULT_MAX_DENSITY: dict[str, float] = {"csr_kernel": 0.3, "csr": 0.2, "bsr": 0.2, "semi_structured": 0.5}
LAYOUTS = ("csr_kernel", "csr", "bsr", "semi_structured")
#: With ``example_inputs`` and no ``max_density``, denser layers are not even timed.
TIMED_MAX_DENSITY = 0.6
#: Timing noise: a timed layout overrides the density rule's answer only when it is at least this
#: much faster than the other side (a sparse layout must beat dense by 5%, and dense must beat the
#: fastest sparse layout by 5% to keep a layer the rule converts); closer timings follow the rule.
MIN_SPEEDUP = 1.05


@dataclass
class LayerChoice:
    """What :func:`to_sparse` did with one layer.

    Attributes:
        name: the layer's qualified name.
        kind: its type (``"Linear"``, ``"Conv1D"``, a Linear subclass's name).
        density: nonzeros over weight size.
        layout: the layout it now runs with: ``"dense"`` (unchanged) or one of ``SparseLinear``'s.
        reason: why (``"timed"``; ``"timed within noise (...); rule: ..."`` when dense and the
            fastest sparse layout were within 5% and the density rule decided; the density rule
            applied; or why it was skipped).
        seconds: time per call of each candidate on the example input, the fastest of
            interleaved rounds (empty when not timed).
        input_shape: the input shape the layer was timed on, or ``None``.
    """

    name: str
    kind: str
    density: float
    layout: str
    reason: str
    seconds: dict[str, float] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None

    @property
    def speedup(self) -> float | None:
        """Dense time over the chosen layout's time (timed layers only)."""
        if "dense" not in self.seconds or self.layout not in self.seconds:
            return None
        return self.seconds["dense"] / self.seconds[self.layout]

    def __str__(self) -> str:
        timed = "" if self.speedup is None else f", {self.speedup:.2f}x dense on {self.input_shape}"
        return f"{self.name} ({self.kind}, density {self.density:.3f}): {self.layout} [{self.reason}{timed}]"


#: ``timer(layer_name, {candidate: fn}) -> {candidate: seconds}``.
Timer = Callable[[str, dict[str, Callable[[], object]]], dict[str, float]]


def measure(
    name: str, candidates: dict[str, Callable[[], object]], *, rounds: int = 9, min_sample_s: float = 1e-3
) -> dict[str, float]:
    """The default timer of :func:`to_sparse`: the fastest sample's seconds per call of each candidate.

    Candidates run interleaved (round-robin) so that machine noise hits all alike; each sample
    repeats a call until it lasts ``min_sample_s``. The *minimum* over rounds is returned, not the
    median: other processes only ever add time, so on a busy machine the fastest sample is the
    closest to what the layer costs, while a median moves with the load of the moment.

    Args:
        name: the layer's name (unused; part of the timer signature).
        candidates: ``{label: zero-argument callable}``.
        rounds: samples per candidate.
        min_sample_s: the shortest sample.

    Returns:
        ``{label: seconds per call}``.
    """
    del name
    reps: dict[str, int] = {}
    for label, fn in candidates.items():
        fn()  # warm-up (and first-use compilation)
        one = float("inf")
        for _ in range(2):  # the faster of two calls: one preempted call would make the samples short
            t0 = time.perf_counter()
            fn()
            one = min(one, time.perf_counter() - t0)
        reps[label] = max(1, min(1000, int(min_sample_s / max(one, 1e-7))))
    samples: dict[str, list[float]] = {label: [] for label in candidates}
    for _ in range(rounds):
        for label, fn in candidates.items():
            t0 = time.perf_counter()
            for _ in range(reps[label]):
                fn()
            samples[label].append((time.perf_counter() - t0) / reps[label])
    return {label: min(v) for label, v in samples.items()}


#: How many times a layer whose timing contradicts the density rule is timed again (the fastest
#: time of each candidate over all timings counts): one unlucky timing on a busy machine must not decide.
RETIMES = 2


def timed_choice(
    seconds: Mapping[str, float],
    sparse: list[str],
    rule_layout: str,
    rule_why: str,
    retime: Callable[[], Mapping[str, float]] | None = None,
) -> tuple[str, str, dict[str, float]]:
    """The layout chosen from timings, why, and the timings used; within timing noise the rule decides.

    The fastest sparse layout replaces dense when it is at least :data:`MIN_SPEEDUP` faster, and
    dense stays when it is at least that much faster than every sparse layout. In between, the
    timings cannot tell the two apart (on a busy machine they rarely can at that margin), so the
    density rule's answer (``rule_layout``, ``rule_why`` from :func:`rule_choice`) is kept. When the
    timings contradict the rule, ``retime()`` (new timings of the same candidates) is called up to
    :data:`RETIMES` times and each candidate's fastest time over all of them decides.
    """
    best_of = dict(seconds)
    for attempt in range(RETIMES + 1):
        best = min(sparse, key=lambda c: best_of[c])
        ratio = best_of["dense"] / best_of[best] if best_of[best] > 0 else float("inf")
        if ratio >= MIN_SPEEDUP:
            chosen, why = best, "timed"
        elif ratio * MIN_SPEEDUP <= 1.0:
            chosen, why = "dense", "timed"
        else:
            chosen = "dense" if rule_layout == "dense" else rule_layout if rule_layout in sparse else best
            return chosen, f"timed within noise ({best} {ratio:.2f}x dense); {rule_why}", best_of
        if (chosen == "dense") == (rule_layout == "dense") or retime is None or attempt == RETIMES:
            return chosen, why, best_of
        with torch.inference_mode():
            again = retime()
        best_of = {c: min(t, again.get(c, t)) for c, t in best_of.items()}
    raise AssertionError("unreachable")  # pragma: no cover


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping) and all(isinstance(k, str) for k in example_inputs):
        return (), dict(example_inputs)
    raise InvalidTypeError(
        "example_inputs must be a tensor, a tuple of the model's positional inputs or a dict of its "
        f"keyword inputs, got {type(example_inputs).__name__}"
    )


def capture_inputs(
    model: nn.Module, mods: dict[str, nn.Module], example_inputs: Any
) -> dict[str, torch.Tensor]:
    """Each layer's first input when ``model`` runs on ``example_inputs``."""
    args, kwargs = split_inputs(example_inputs)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in mods.items():

        def hook(_m: nn.Module, a: tuple[Any, ...], name: str = name) -> None:
            if name not in seen and a and isinstance(a[0], torch.Tensor):
                seen[name] = a[0].detach().clone()

        handles.append(mod.register_forward_pre_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.inference_mode():
            model(*args, **kwargs)
    except Exception as exc:
        raise InvalidArgumentError(
            f"to_sparse could not run {type(model).__name__} on example_inputs: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return seen


def _block_density(w: torch.Tensor, bs: tuple[int, int]) -> float:
    r, c = w.shape
    blocks = (w != 0).reshape(r // bs[0], bs[0], c // bs[1], bs[1]).any(3).any(1)
    return float(blocks.float().mean()) if blocks.numel() else 0.0


def candidate_layouts(
    layout: str, w: torch.Tensor, density: float, cap: float, bs: tuple[int, int]
) -> tuple[list[str], str]:
    """Sparse layouts worth trying for weight ``w``, and why none when the list is empty."""
    if density > cap:
        return [], f"density {density:.3f} > max_density {cap:.3f}"
    if layout != "auto":
        if layout == "bsr" and (w.shape[0] % bs[0] or w.shape[1] % bs[1]):
            return [], f"shape {tuple(w.shape)} is not divisible into {bs} blocks"
        return [layout], ""
    out = []
    if w.device.type == "cpu" and w.dtype == torch.float32 and kernels.kernel_status()[0]:
        out.append("csr_kernel")
    out.append("csr")
    if not (w.shape[0] % bs[0] or w.shape[1] % bs[1]) and _block_density(w, bs) <= cap:
        out.append("bsr")
    return out, ""


def rule_choice(
    layout: str,
    w: torch.Tensor,
    density: float,
    max_density: float | None,
    defaults: Mapping[str, float] | None = None,
    kind: str = "",
) -> tuple[str, str]:
    """The layout chosen without timing, and why.

    ``defaults``: the layer kind's per-layout caps (else :data:`DEFAULT_MAX_DENSITY`); a cap of 0
    means the kind stays dense unless timed or given ``max_density``.
    """
    if layout == "auto":
        if w.device.type == "cpu" and w.dtype == torch.float32 and kernels.kernel_status()[0]:
            layout = "csr_kernel"
        else:
            layout = "csr"
    cap = (defaults or DEFAULT_MAX_DENSITY)[layout] if max_density is None else float(max_density)
    if max_density is None and cap == 0.0:
        return "dense", f"rule: {kind or 'this layer'} stays dense without example_inputs or max_density"
    if density <= cap:
        return layout, f"rule: density {density:.3f} <= {cap:.3f} for {layout}"
    return "dense", f"rule: density {density:.3f} > {cap:.3f} for {layout}"
