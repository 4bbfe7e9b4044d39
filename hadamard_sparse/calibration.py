"""Calibration: input statistics of each targeted layer, for data-aware pruning (Wanda, SparseGPT).

:func:`calibrate` runs the model once over a few batches with forward pre-hooks
on the modules that own the targeted tensors, and sums, for every *input feature*
of each weight, the squared input values (``||X_j||^2``, what Wanda needs) and,
when asked, the Gram matrix ``X^T X`` (the Hessian of the layer-wise
reconstruction error, what SparseGPT needs).

What an "input feature" is, per layer type:

- ``nn.Linear`` and Hugging Face ``Conv1D``: the last dimension of the input.
- ``nn.ConvNd``: one input channel at one kernel offset (the im2col column), per group,
  in channels-last order (kernel offset major, channel minor), so ``N:M`` groups of
  consecutive features are ``M`` consecutive input channels at one kernel position.
- ``nn.ConvTransposeNd``: one input channel (every kernel entry of channel ``i`` multiplies
  every value of input channel ``i``). Statistics only suit Wanda: SparseGPT refuses these.
- ``nn.MultiheadAttention``: ``in_proj_weight`` has three blocks of rows (q, k, v) fed by
  ``query``, ``key`` and ``value``; ``q/k/v_proj_weight`` by one of them each. Its ``out_proj``
  is an ``nn.Linear`` child that MHA calls functionally, so its hook never fires: it is
  reported in :attr:`ActivationStats.skipped` (with a warning) and data-aware methods refuse it.
- RNN weights (``weight_hh`` sees the hidden state, not the module's input) and embeddings
  are not supported: they are reported in :attr:`ActivationStats.skipped`.

Each weight is viewed as ``B`` blocks of ``R x F`` matrices (``B`` = conv groups, 3 for an
``in_proj_weight``, else 1), rows being outputs and columns the input features above;
:meth:`LayerStats.to_blocks` and :meth:`LayerStats.from_blocks` convert.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._checks import Selectors, check_module
from ._model_io import as_inputs, eval_mode
from .errors import (
    CalibrationError,
    CalibrationRuntimeError,
    CalibrationTypeError,
    InvalidArgumentError,
    InvalidTypeError,
    NoTargetsError,
)
from .layers import LayerRule, Target, layer_rule, resolve_targets, rule_for_kind

__all__ = ["ActivationStats", "LayerStats", "calibrate"]


@dataclass
class LayerStats:
    """Input statistics of one targeted tensor.

    Attributes:
        name: qualified tensor name, e.g. ``"encoder.0.weight"``.
        kind: layer family (``"linear"``, ``"hf_conv1d"``, ``"conv"``, ``"conv_transpose"``, ``"mha"``).
        tensor_name: attribute name of the tensor on its module.
        shape: the weight's shape.
        n_rows: how many input rows (tokens, pixels...) were summed.
        sq_sum: ``(B, F)`` float64, ``sum_rows x_j^2`` per block and input feature.
        gram: ``(B, F, F)`` float32 ``sum_rows x x^T``, or ``None`` when not requested.
        groups: conv groups (``1`` for other layers).
        x_sum: ``(B, F)`` float64, ``sum_rows x_j`` per block and input feature (``None`` for statistics
            built without it); with ``sq_sum`` it gives each feature's mean and variance (DSnoT).
    """

    name: str
    kind: str
    tensor_name: str
    shape: torch.Size
    n_rows: int
    sq_sum: torch.Tensor
    gram: torch.Tensor | None = None
    groups: int = 1
    x_sum: torch.Tensor | None = None

    def input_norms(self) -> torch.Tensor:
        """``(B, F)``: the L2 norm ``||X_j||_2`` of each input feature over all calibration rows."""
        return self.sq_sum.sqrt()

    def input_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, F)`` mean and variance of each input feature over all calibration rows (float64).

        Raises:
            InvalidArgumentError: the statistics hold no ``x_sum`` (built by hand without it) or no rows.
        """
        if self.x_sum is None or self.n_rows == 0:
            why = "no per-feature sums (x_sum=None)" if self.x_sum is None else "no input rows (n_rows=0)"
            raise InvalidArgumentError(
                f"{self.name}: these statistics have {why}; gather them with hs.calibrate(model, batches)"
            )
        mean = self.x_sum / self.n_rows
        return mean, (self.sq_sum / self.n_rows - mean.square()).clamp_min(0.0)

    def to_blocks(self, w: torch.Tensor) -> torch.Tensor:
        """View a tensor of the weight's shape as ``(B, R, F)``: blocks of outputs x input features."""
        return rule_for_kind(self.kind).to_blocks(self.tensor_name, self.groups, w)

    def from_blocks(self, b: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_blocks`: a ``(B, R, F)`` tensor back to the weight's shape."""
        return rule_for_kind(self.kind).from_blocks(self.tensor_name, self.groups, b, self.shape)

    def norms_like_weight(self) -> torch.Tensor:
        """``||X_j||_2`` of the input feature that multiplies each weight entry, in the weight's shape."""
        n = self.input_norms().to(torch.float32)
        b, f = n.shape
        r = self.to_blocks(torch.empty(self.shape, device="meta")).shape[1]
        return self.from_blocks(n[:, None, :].expand(b, r, f))


class ActivationStats(Mapping[str, LayerStats]):
    """Per-tensor input statistics from :func:`calibrate`, keyed by qualified tensor name.

    A read-only mapping ``name -> LayerStats``. Tensors whose inputs could not be
    observed are listed in :attr:`skipped` with the reason.

    Attributes:
        skipped: ``{qualified name: reason}`` for targets without statistics.
        n_batches: number of batches run.
    """

    def __init__(
        self,
        layers: dict[str, LayerStats],
        skipped: dict[str, str],
        n_batches: int,
        *,
        calls: Mapping[str, list[int]] | None = None,
        inputs: Mapping[str, list[tuple]] | None = None,
    ) -> None:
        self._layers = dict(layers)
        self.skipped = dict(skipped)
        self.n_batches = n_batches
        # recorded by the calibration pass: calls per batch and input identities in the first batch
        self._calls = dict(calls or {})
        self._inputs = dict(inputs or {})

    def calls_per_batch(self, name: str) -> list[int]:
        """How many times the module owning ``name`` was called in each batch (``[]`` if unknown)."""
        return self._calls.get(name, [])

    def input_identities(self, name: str) -> list[tuple]:
        """Which tensors (storage pointer, shape) each call of ``name``'s module got in the first batch."""
        return self._inputs.get(name, [])

    def __getitem__(self, key: str) -> LayerStats:
        return self._layers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def has_gram(self) -> bool:
        """Whether every entry holds a Gram matrix (needed by ``method="sparsegpt"``)."""
        return all(s.gram is not None for s in self._layers.values())

    def __repr__(self) -> str:
        return (
            f"ActivationStats({len(self)} tensors, {self.n_batches} batches, gram={self.has_gram}, "
            f"skipped={sorted(self.skipped)})"
        )


@dataclass
class _Accumulator:
    target: Target
    rule: LayerRule
    gram: bool
    n_rows: int = 0
    sq_sum: torch.Tensor | None = None
    x_sum: torch.Tensor | None = None
    gram_sum: torch.Tensor | None = None
    batch_calls: int = 0
    calls: list[int] = field(default_factory=list)
    inputs: list[tuple] = field(default_factory=list)

    def add(self, feats: list[torch.Tensor]) -> None:
        """Accumulate one call's features: one ``(rows, F)`` tensor per block."""
        fs = [f.detach().to(torch.float32) for f in feats]
        if self.sq_sum is None:
            n, d = len(fs), fs[0].shape[1]
            self.sq_sum = torch.zeros(n, d, dtype=torch.float64, device=fs[0].device)
            self.x_sum = torch.zeros(n, d, dtype=torch.float64, device=fs[0].device)
            if self.gram:  # float32 like the reference implementation; in place, no temporaries
                self.gram_sum = torch.zeros(n, d, d, dtype=torch.float32, device=fs[0].device)
        for i, f in enumerate(fs):
            self.sq_sum[i] += f.square().sum(dim=0)
            self.x_sum[i] += f.sum(dim=0)  # type: ignore[index]
            if self.gram_sum is not None:
                self.gram_sum[i].addmm_(f.t(), f)
        self.n_rows += fs[0].shape[0]


def _unsupported_reason(rule: LayerRule | None) -> str | None:
    if rule is None:
        return "layer kind 'other' has no calibration rule"
    if rule.no_features is not None:
        return rule.no_features
    return None


def call_batch(model: nn.Module, batch: Any, index: int, *, passthrough: tuple[type, ...] = ()) -> None:
    """Run ``model`` on one calibration batch: ``model(x)``, ``model(*b)`` or ``model(**b)``.

    An exception of the model's forward is re-raised as a :class:`~hadamard_sparse.errors.CalibrationError`
    (a :class:`CalibrationTypeError`/:class:`CalibrationRuntimeError` for a ``TypeError``/``RuntimeError``)
    naming the batch (``index``, 0-based), how the model was called and the batch's contents, with
    the original chained; exceptions of the ``passthrough`` types (stop signals of the caller's hooks)
    propagate unchanged.
    """
    try:
        args, kwargs = as_inputs(batch)  # no model: a dict is always model(**batch) here (see the hint)
    except InvalidTypeError:
        raise InvalidTypeError(
            f"calibration batches must be tensors, tuples/lists of positional arguments or dicts of "
            f"keyword arguments, got {type(batch).__name__} at index {index} (0-based)"
        ) from None
    tensor, positional = isinstance(batch, torch.Tensor), isinstance(batch, (tuple, list))
    how = "model(batch)" if tensor else "model(*batch)" if positional else "model(**batch)"
    try:
        model(*args, **kwargs)
    except passthrough:
        raise
    except Exception as exc:
        if isinstance(exc, (_StopForward, CalibrationError)):
            raise
        cls = (
            CalibrationTypeError
            if isinstance(exc, TypeError)
            else CalibrationRuntimeError
            if isinstance(exc, RuntimeError)
            else CalibrationError
        )
        raise cls(_batch_failure(model, batch, index, how, exc)) from exc


def _describe(x: Any, depth: int = 0) -> str:
    """A short description of a batch: tensor shapes and dtypes, dict keys, sequence items."""
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if depth >= 2:
        return type(x).__name__
    if isinstance(x, Mapping):
        items = [f"{k}={_describe(v, depth + 1)}" for k, v in list(x.items())[:6]]
        more = ", ..." if len(x) > 6 else ""
        return f"{type(x).__name__}({', '.join(items)}{more})"
    if isinstance(x, (tuple, list)):
        items = [_describe(v, depth + 1) for v in x[:6]]
        more = ", ..." if len(x) > 6 else ""
        open_, close = ("(", ")") if isinstance(x, tuple) else ("[", "]")
        return f"{open_}{', '.join(items)}{',' if len(x) == 1 and isinstance(x, tuple) else ''}{more}{close}"
    return type(x).__name__


def _is_sentence_transformer(model: nn.Module) -> bool:
    return any(c.__name__ == "SentenceTransformer" for c in type(model).__mro__)


def _batch_failure(model: nn.Module, batch: Any, index: int, how: str, exc: BaseException) -> str:
    lines = [
        f"calibration batch {index} (0-based index into the batches) failed: {type(model).__name__} "
        f"was called as {how} with batch = {_describe(batch)}",
        f"the model raised {type(exc).__name__}: {exc}",
    ]
    if _is_sentence_transformer(model):
        lines.append(
            "a SentenceTransformer's forward takes one dict of features, not keyword arguments: give "
            "batches of (st.tokenize(texts),) (st.preprocess(texts) in sentence-transformers >= 6), "
            "called as model(features), or prune the transformer inside it, st[0].auto_model, with "
            "tokenizer dicts as batches"
        )
    else:
        lines.append(
            "a batch is a tensor (model(x)), a tuple/list of positional arguments (model(*b)) or a dict "
            "of keyword arguments (model(**b)); each must run as model's forward expects"
        )
    return "\n".join(lines)


def with_progress(batches: Iterable[Any], show: bool | None, desc: str) -> Iterable[Any]:
    """``batches`` wrapped in a tqdm progress bar labelled ``desc``, or ``batches`` itself.

    Args:
        batches: what is iterated (its ``len``, when it has one, is the bar's total).
        show: ``True``/``False``; ``None``: when stderr is a terminal. Without tqdm installed, no bar.
        desc: the bar's label.

    Returns:
        An iterable over the same items.
    """
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return batches
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    return tqdm(batches, total=total, desc=desc, leave=False)


def collect(
    model: nn.Module,
    targets: Sequence[Target],
    batches: Iterable[Any],
    *,
    gram: bool,
    progress: bool | None = None,
    warn: bool = True,
    stop_after: Mapping[str, int] | None = None,
) -> ActivationStats:
    """One pass over ``batches`` gathering statistics for ``targets`` (the engine of :func:`calibrate`).

    ``stop_after``: ``{name: calls per batch}``; once every listed tensor has seen that many calls
    in a batch, the rest of that batch's forward is skipped (its outputs are not needed).
    """
    accs: dict[str, _Accumulator] = {}
    skipped: dict[str, str] = {}
    by_module: dict[int, tuple[nn.Module, list[_Accumulator]]] = {}
    for t in targets:
        rule = layer_rule(t.module)
        reason = _unsupported_reason(rule)
        if reason is not None:
            skipped[t.qualified] = reason
            continue
        assert rule is not None
        acc = _Accumulator(t, rule, gram)
        accs[t.qualified] = acc
        by_module.setdefault(id(t.module), (t.module, []))[1].append(acc)

    stop = [(accs[k], n) for k, n in stop_after.items() if k in accs] if stop_after else []
    n_batches = 0

    def make_hook(group: list[_Accumulator]) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            for acc in group:
                acc.add(acc.rule.features(module, acc.target.tensor_name, args, kwargs))
                acc.batch_calls += 1
                if n_batches == 0:
                    acc.inputs.append(_identity(args, kwargs))
            if stop and all(a.batch_calls >= n for a, n in stop):
                raise _StopForward

        return hook

    handles = []
    try:
        for module, group in by_module.values():
            handles.append(module.register_forward_pre_hook(make_hook(group), with_kwargs=True))
        with eval_mode(model), torch.inference_mode():
            for index, batch in enumerate(with_progress(batches, progress, "calibrate")):
                for acc in accs.values():
                    acc.batch_calls = 0
                try:
                    call_batch(model, batch, index)
                except _StopForward:
                    pass
                for acc in accs.values():
                    acc.calls.append(acc.batch_calls)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()

    layers: dict[str, LayerStats] = {}
    for name, acc in accs.items():
        if acc.sq_sum is None:
            skipped[name] = (
                "its module's forward was never called during calibration (e.g. the out_proj of "
                "nn.MultiheadAttention, which MHA applies functionally)"
            )
        else:
            w = acc.target.value()
            kind = acc.rule.kind
            groups = int(getattr(acc.target.module, "groups", 1)) if kind.startswith("conv") else 1
            layers[name] = LayerStats(
                name,
                kind,
                acc.target.tensor_name,
                w.shape,
                acc.n_rows,
                acc.sq_sum,
                acc.gram_sum,
                groups,
                acc.x_sum,
            )
    if warn and skipped:
        warnings.warn(
            f"calibrate: no input statistics for {len(skipped)} tensor(s); data-aware methods refuse "
            "them, exclude them from sparsify:\n  " + "\n  ".join(f"{k}: {v}" for k, v in skipped.items()),
            stacklevel=3,
        )
    return ActivationStats(
        layers,
        skipped,
        n_batches,
        calls={k: a.calls for k, a in accs.items()},
        inputs={k: a.inputs for k, a in accs.items()},
    )


class _StopForward(Exception):
    """Raised by a calibration hook to skip the rest of a forward whose outputs are not needed."""


def _identity(args: tuple, kwargs: dict) -> tuple:
    """Which tensors a call received (storage pointer and shape), to find tensors sharing an input."""
    items = [*args, *kwargs.values()]
    return tuple((a.data_ptr(), tuple(a.shape)) for a in items if isinstance(a, torch.Tensor))


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    include: Selectors = None,
    exclude: Selectors = None,
    gram: bool = False,
    progress: bool | None = None,
    targets: Selectors = None,
) -> ActivationStats:
    r"""Gather per-input-feature statistics of the targeted layers of ``model`` in one pass.

    Forward pre-hooks on the modules owning the targeted tensors see each module's
    actual input; they sum ``x_j^2`` per input feature and, with ``gram=True``, the
    Gram matrix ``X^T X``. The pass runs in ``torch.inference_mode`` with the model in
    eval mode (each module's training flag is restored afterwards), and the hooks are
    removed in every case, also when a batch raises.

    Args:
        model: the model; it is not modified.
        batches: an iterable of model inputs: tensors (``model(x)``), tuples or lists of
            positional arguments (``model(*b)``), or dicts of keyword arguments (``model(**b)``,
            e.g. a Hugging Face tokenizer's output).
        include: which tensors (the same selectors as ``include`` of :func:`~hadamard_sparse.sparsify`:
            types, glob patterns, callables). Default: every targeted tensor.
        exclude: the same kinds of selectors; matching tensors are skipped.
        gram: also accumulate ``X^T X`` (``(F, F)`` per block, float32), needed by ``"sparsegpt"``.
        progress: show a tqdm progress bar; ``None`` (default): when tqdm is installed and stderr
            is a terminal.
        targets: deprecated name of ``include`` (a ``DeprecationWarning``).

    Returns:
        :class:`ActivationStats`, keyed by qualified tensor name; tensors whose input could not be
        observed are in ``.skipped`` (and a warning lists them).

    Example::

        >>> stats = calibrate(model, [torch.randn(8, 16) for _ in range(4)])
        >>> stats["0.weight"].input_norms().shape
        torch.Size([1, 16])
        >>> hs.sparsify(model, 0.5, method="wanda", calibration=stats)
    """
    check_module(model)
    if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise InvalidTypeError(
            "batches must be an iterable of model inputs (e.g. a list of tensors or of dicts), "
            f"got {type(batches).__name__}; wrap a single batch in a list"
        )
    if not isinstance(gram, bool):
        raise InvalidTypeError(f"gram must be a bool, got {gram!r}")
    if targets is not None:
        if include is not None:
            raise InvalidArgumentError(
                f"targets is the deprecated name of include; pass only include, got include={include!r} "
                f"and targets={targets!r}"
            )
        warnings.warn(
            "calibrate(targets=...) is deprecated: use include=..., the same selectors as in sparsify",
            DeprecationWarning,
            stacklevel=2,
        )
        include = targets
    if _is_target_list(include):
        resolved = list(include)  # type: ignore[arg-type]
    else:
        resolved = resolve_targets(model, include, exclude)
    if not resolved:
        raise NoTargetsError(
            f"calibrate: include={include!r}, exclude={exclude!r} selects no tensor of {type(model).__name__}"
        )
    return collect(model, resolved, batches, gram=gram, progress=progress)


def _is_target_list(targets: object) -> bool:
    return (
        isinstance(targets, (list, tuple))
        and len(targets) > 0
        and all(isinstance(t, Target) for t in targets)
    )


# ----------------------------------------------------------------------------- for the data-aware methods


def _missing(stats: ActivationStats, targets: Sequence[Target], need_gram: bool) -> list[str]:
    out = []
    for t in targets:
        if t.qualified not in stats:
            reason = stats.skipped.get(t.qualified, "not in the calibration statistics")
            out.append(f"{t.qualified}: {reason}")
        elif need_gram and stats[t.qualified].gram is None:
            out.append(f"{t.qualified}: no Gram matrix (calibrate(..., gram=True))")
    return out


def check_stats(stats: ActivationStats, targets: Sequence[Target], method: str, need_gram: bool) -> None:
    """Raise an :class:`InvalidArgumentError` (a ``ValueError``) listing every target that ``stats`` does not cover."""
    missing = _missing(stats, targets, need_gram)
    if missing:
        raise InvalidArgumentError(
            f"method {method!r} needs input statistics of every targeted tensor; missing for "
            f"{len(missing)} (exclude them with exclude=[...]):\n  " + "\n  ".join(missing)
        )


def stats_for(
    model: nn.Module, targets: Sequence[Target], calibration: Any, *, method: str, need_gram: bool
) -> ActivationStats:
    """Statistics covering ``targets``: ``calibration`` itself if it is stats, else one calibration pass.

    Args:
        model: the model (run once over ``calibration`` when it holds batches).
        targets: the tensors that need statistics.
        calibration: :class:`ActivationStats`, or an iterable of model inputs.
        method: the method asking, for the messages.
        need_gram: also gather (or require) the Gram matrices.

    Returns:
        :class:`ActivationStats` covering every target.

    Raises:
        InvalidTypeError: ``calibration`` is neither.
        InvalidArgumentError: some target has no statistics (all of them are listed).
    """
    if isinstance(calibration, ActivationStats):
        stats = calibration
    else:
        stats = collect(model, targets, check_batches(calibration), gram=need_gram, warn=False)
    check_stats(stats, targets, method, need_gram)
    return stats


def check_batches(calibration: Any) -> Iterable[Any]:
    """``calibration`` checked to be an iterable of model inputs (not one tensor, dict or string).

    Args:
        calibration: what a data-aware method was given as calibration data.

    Returns:
        ``calibration`` itself.

    Raises:
        InvalidTypeError: it is a single tensor, dict or string, or not iterable.
    """
    if isinstance(calibration, (torch.Tensor, dict, str)) or not isinstance(calibration, Iterable):
        raise InvalidTypeError(
            "calibration must be an iterable of model inputs (tensors, tuples, or dicts of keyword "
            f"arguments) or hs.calibrate(...) statistics, got {type(calibration).__name__}; "
            "wrap a single batch in a list"
        )
    return calibration
