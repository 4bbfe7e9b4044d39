"""Knowledge distillation from a dense teacher: the loss that recovers a pruned student (issue 19).

A model pruned in one shot to high sparsity loses much of what it knew; training it again on the
task alone recovers little and, at 80-90% sparsity, can diverge. Published recipes distil from the
dense model instead: oBERT (Kurtic et al. 2022) trains on the teacher's softened logits only
(hardness 1.0, temperature 2), SquareHead (Kurtic et al. 2023) adds a per-layer feature loss
normalised by the teacher's feature scale. :class:`Distiller` computes these losses for any training
loop: ``loss = distiller(batch); loss.backward()``.

Three losses, weighted and summed into the *distillation loss*:

``logits``
    Hinton's ``T^2 * KL(softmax(t / T) || softmax(s / T))`` over the last dimension of the outputs'
    ``.logits`` (or of a tensor output), averaged over rows (``batchmean``); for ``(B, L, V)`` logits
    and a batch with an ``attention_mask`` of shape ``(B, L)``, over the unmasked positions.
``features``
    SquareHead: for each hooked module output, ``mean((s - t)^2) / (mean(t^2) + eps)``, averaged
    over the hooked modules (SquareHead sums them: ``feature_weight=len(layers)`` gives its scale).
``embedding``
    For encoders: ``1 - cos(s, t)`` (``"cosine"``, averaged over the batch) or the mean squared error
    (``"mse"``) of pooled outputs: a SentenceTransformer's ``sentence_embedding``, else the
    ``last_hidden_state`` (or a 3-d tensor output) mean-pooled over the batch's ``attention_mask``
    (``pooling="cls"``: its first token), or a 2-d tensor output as it is.

The returned loss is ``hardness * distill + (1 - hardness) * task``, the task loss being given
(``task_loss=``) or the student output's ``.loss``.

The teacher runs in eval mode under ``torch.no_grad()``. By default it is a frozen deep copy of the
student made at construction (``requires_grad=False``): build the distiller *before* pruning. A
student that already carries this library's masks is refused without an explicit teacher, because
its copy would be the pruned model, not the dense one (oBERT's teacher is the dense model).

Cached teacher (``cache="lazy"`` or ``"strict"``): the teacher's outputs are kept on the CPU, keyed by
a hash of the batch's tensor contents, so that epochs after the first run no teacher forward. What a
cache entry holds is what the selected losses need: the logits (``B x V``, or ``B x L x V`` for a
language model: large), the pooled embedding (``B x D``: small), and every hooked module's output
(``B x L x H`` per layer: about the activations of one forward pass); ``cache_dtype=torch.float16``
halves it (with ``"lazy"``, a batch's first step uses the teacher's exact outputs, later steps the cast
ones). Batches must repeat exactly (same examples in the same order, same padding): a shuffling
``DataLoader`` makes new batches every epoch, so build a fixed list of batches and shuffle that list.
"""

from __future__ import annotations

import copy
import difflib
import math
import numbers
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._checks import check_fraction, check_module
from ._dtensor import is_dtensor
from .distill_cache import TeacherCache
from .distill_losses import (
    Pooling,
    batch_key,
    call_model,
    embedding_loss,
    embedding_of,
    first_tensor,
    kl_distill_loss,
    logits_of,
    squarehead_loss,
    unwrap_parallel,
)
from .errors import InvalidArgumentError, InvalidTypeError, TeacherCacheMissError
from .parametrizations import SparseParametrization

__all__ = ["Distiller"]

EMBEDDING_LOSSES = ("cosine", "mse")
POOLINGS = ("mean", "cls")
CACHE_MODES = ("lazy", "strict")

TaskLoss = Union[torch.Tensor, Callable[[Any], torch.Tensor], None]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``*`` matches within one dotted name component, ``**`` across components, ``?`` one character."""
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    table = {"**": ".*", "*": "[^.]*", "?": "[^.]"}
    return re.compile("".join(table.get(p, re.escape(p)) for p in parts))


def _has_our_masks(model: nn.Module) -> bool:
    for m in model.modules():
        if parametrize.is_parametrized(m):
            for plist in m.parametrizations.values():  # type: ignore[union-attr,operator]
                if any(isinstance(p, SparseParametrization) for p in plist):
                    return True
    return False


def _is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) sharded ``model`` or one of its submodules."""
    return any(type(m).__name__.startswith("FSDP") for m in model.modules()) or any(
        is_dtensor(p) for p in model.parameters()
    )


def _check_weight(value: object, arg: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise InvalidArgumentError(f"{arg} must be a finite float >= 0, got {value!r}")
    return float(value)


def _remove_handles(handles: list[Any]) -> None:
    for h in handles:
        h.remove()
    handles.clear()


# ---------------------------------------------------------------- the distiller


class Distiller(nn.Module):
    """The distillation loss of a student against a frozen teacher, for any training loop.

    Args:
        student: the model being trained (may be wrapped in ``DistributedDataParallel``: hooks go on
            its inner module, and calls go through the wrapper; or sharded with FSDP2's
            ``fully_shard``: hooked modules return whole tensors, so the losses are unchanged).
        teacher: the model to imitate; by default a frozen deep copy of ``student`` made now (build the
            distiller before pruning). A given teacher is put in eval mode and run under ``no_grad``.
            An FSDP2-sharded student needs one (a copy made before sharding, sharded too or whole).
        logits: distil the outputs' ``.logits`` (or a tensor output). ``None``: on unless
            ``features`` or ``embedding`` is selected.
        temperature: ``T > 0`` of the logit loss (oBERT: 2.0).
        hardness: weight of the distillation loss against the task loss, in ``[0, 1]`` (oBERT: 1.0,
            distillation only).
        logit_weight: weight of the logit loss in the distillation loss.
        features: glob patterns of qualified module names whose outputs are matched SquareHead-style
            (``"encoder.layer.*"``; ``*`` stays within one dotted component, ``**`` crosses them).
            The teacher must have modules of the same names; a tuple output uses its first tensor.
        feature_weight: weight of the feature loss.
        embedding: ``"cosine"`` or ``"mse"`` between pooled outputs, or ``None``.
        embedding_weight: weight of the embedding loss.
        pooling: ``"mean"`` (over ``attention_mask``), ``"cls"``, or a function ``(output, batch) -> (B, D)``.
        eps: the feature loss's ``eps``.
        cache: ``None`` (run the teacher on every call), ``"lazy"`` (``True``: cache each new batch's
            teacher outputs on first sight) or ``"strict"`` (only :meth:`cache_teacher` fills it; an
            unknown batch raises :class:`~hadamard_sparse.errors.TeacherCacheMissError`).
        cache_dtype: dtype of cached floating tensors (e.g. ``torch.float16``); ``None`` keeps theirs.
        call: how to run a model on a batch, ``call(model, batch) -> output``; by default
            ``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple/list, ``model(batch)``
            for a tensor (or a mapping given to an ``nn.Sequential`` such as a SentenceTransformer).

    Example::

        >>> distiller = hs.Distiller(model, temperature=2.0, hardness=1.0)  # before pruning
        >>> hs.sparsify(model, 0.9)
        >>> for batch in loader:
        ...     loss = distiller(batch)
        ...     loss.backward(); optimizer.step(); optimizer.zero_grad()
    """

    student: nn.Module
    teacher: nn.Module
    owns_teacher: bool
    logits: bool
    temperature: float
    hardness: float
    logit_weight: float
    features: tuple[str, ...]
    feature_weight: float
    embedding: str | None
    embedding_weight: float
    pooling: Pooling
    eps: float
    cache: str | None
    cache_dtype: torch.dtype | None
    _call_fn: Callable[[nn.Module, Any], Any]
    _cache: TeacherCache
    _recording: bool
    _removed: bool
    _handles: list[Any]
    _s_feats: dict[str, list[torch.Tensor]]
    _t_feats: dict[str, list[torch.Tensor]]
    _last: dict[str, torch.Tensor]

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        logits: bool | None = None,
        temperature: float = 2.0,
        hardness: float = 1.0,
        logit_weight: float = 1.0,
        features: str | Sequence[str] = (),
        feature_weight: float = 1.0,
        embedding: str | None = None,
        embedding_weight: float = 1.0,
        pooling: Pooling = "mean",
        eps: float = 1e-6,
        cache: bool | str | None = None,
        cache_dtype: torch.dtype | None = None,
        call: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        # ---- every check first: a refused construction changes nothing
        check_module(student, "student")
        inner = unwrap_parallel(student)
        if teacher is not None:
            check_module(teacher, "teacher")
            if unwrap_parallel(teacher) is inner:
                raise InvalidArgumentError(
                    "teacher must be another model than the student, got the student itself"
                )
        elif _is_sharded(inner):
            raise InvalidArgumentError(
                "teacher=None deep-copies the student, but the student is sharded with FSDP2 (fully_shard): "
                "a copy of a sharded model does not run as a model of its own; make the teacher before "
                "sharding (teacher = copy.deepcopy(model) before hs.sparsify and fully_shard; shard it too, "
                "or keep it whole on every rank) and pass teacher="
            )
        elif _has_our_masks(inner):
            raise InvalidArgumentError(
                "teacher=None copies the student, but the student already carries hadamard_sparse masks, so the "
                "copy would be the pruned model, not the dense teacher; build the Distiller before hs.sparsify, "
                "or pass teacher= (a copy.deepcopy of the dense model kept from before pruning)"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise InvalidTypeError(f"temperature must be a float > 0, got {temperature!r}")
        if not math.isfinite(temperature) or temperature <= 0:
            raise InvalidArgumentError(f"temperature must be a finite float > 0, got {temperature!r}")
        hardness = check_fraction(hardness, "hardness")
        weights = {
            "logit_weight": _check_weight(logit_weight, "logit_weight"),
            "feature_weight": _check_weight(feature_weight, "feature_weight"),
            "embedding_weight": _check_weight(embedding_weight, "embedding_weight"),
        }
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
            raise InvalidArgumentError(f"eps must be a float > 0, got {eps!r}")
        if embedding is not None and embedding not in EMBEDDING_LOSSES:
            raise InvalidArgumentError(
                f"embedding must be one of {list(EMBEDDING_LOSSES)} or None, got {embedding!r}"
            )
        if not callable(pooling) and pooling not in POOLINGS:
            raise InvalidArgumentError(
                f"pooling must be one of {list(POOLINGS)} or a function, got {pooling!r}"
            )
        if logits is not None and not isinstance(logits, bool):
            raise InvalidTypeError(f"logits must be True, False or None, got {logits!r}")
        patterns = [features] if isinstance(features, str) else list(features)
        if not all(isinstance(p, str) and p for p in patterns):
            raise InvalidTypeError(f"features must be a glob pattern or a sequence of them, got {features!r}")
        if logits is None:
            logits = not patterns and embedding is None
        if not (logits or patterns or embedding is not None):
            raise InvalidArgumentError(
                "Distiller needs at least one loss: logits=True, features=[patterns] or embedding='cosine'/'mse'; "
                f"got logits={logits!r}, features={features!r}, embedding={embedding!r}"
            )
        mode = "lazy" if cache is True else None if cache is False else cache
        if mode is not None and mode not in CACHE_MODES:
            raise InvalidArgumentError(f"cache must be None, False, True, 'lazy' or 'strict', got {cache!r}")
        if cache_dtype is not None and not (
            isinstance(cache_dtype, torch.dtype) and cache_dtype.is_floating_point
        ):
            raise InvalidArgumentError(
                f"cache_dtype must be a floating torch.dtype or None, got {cache_dtype!r}"
            )
        if call is not None and not callable(call):
            raise InvalidTypeError(f"call must be a function (model, batch) -> output, got {call!r}")
        names = self._resolve_features(inner, patterns)
        if teacher is None:
            try:
                teacher = copy.deepcopy(inner)
            except Exception as e:
                raise InvalidArgumentError(
                    f"teacher=None deep-copies the student, which failed ({type(e).__name__}: {e}); pass teacher="
                ) from e
            teacher.requires_grad_(False)
            self_made = True
        else:
            self_made = False
        t_modules = dict(unwrap_parallel(teacher).named_modules())
        missing = [n for n in names if n not in t_modules]
        if missing:
            raise InvalidArgumentError(
                f"features: the teacher has no module named {missing} (matched in the student); "
                "student and teacher must share module names"
            )

        # ---- build
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.teacher.eval()
        self.owns_teacher = self_made
        self.logits = bool(logits)
        self.temperature = float(temperature)
        self.hardness = hardness
        self.logit_weight = weights["logit_weight"]
        self.features = tuple(names)
        self.feature_weight = weights["feature_weight"]
        self.embedding = embedding
        self.embedding_weight = weights["embedding_weight"]
        self.pooling = pooling
        self.eps = float(eps)
        self.cache = mode
        self.cache_dtype = cache_dtype
        self._call_fn = call or call_model
        self._cache = TeacherCache()
        self._recording = False
        self._removed = False
        self._s_feats: dict[str, list[torch.Tensor]] = {}
        self._t_feats: dict[str, list[torch.Tensor]] = {}
        self._last: dict[str, torch.Tensor] = {}
        s_modules = dict(inner.named_modules())
        self._handles = [s_modules[n].register_forward_hook(self._hook(self._s_feats, n)) for n in names]
        self._handles += [t_modules[n].register_forward_hook(self._hook(self._t_feats, n)) for n in names]
        # a distiller dropped without remove() takes its hooks with it (they hold it only weakly)
        weakref.finalize(self, _remove_handles, self._handles)

    @staticmethod
    def _resolve_features(inner: nn.Module, patterns: list[str]) -> list[str]:
        all_names = [n for n, _ in inner.named_modules() if n]
        names: list[str] = []
        for p in patterns:
            rx = _glob_regex(p)
            found = [n for n in all_names if rx.fullmatch(n)]
            if not found:
                near = difflib.get_close_matches(p, all_names, n=5, cutoff=0.3) or all_names[:5]
                raise InvalidArgumentError(
                    f"features: pattern {p!r} matches no module of the student (near: {near}); "
                    "'*' stays within one dotted component, '**' crosses them"
                )
            names += [n for n in found if n not in names]
        return names

    def _hook(self, store: dict[str, list[torch.Tensor]], name: str) -> Callable[..., None]:
        owner = weakref.ref(self)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            distiller = owner()
            if distiller is not None and distiller._recording:
                store.setdefault(name, []).append(first_tensor(output, f"module {name!r}"))

        return hook

    # ---------------------------------------------------------------- lifecycle

    def remove(self) -> None:
        """Remove the forward hooks from student and teacher (idempotent); the distiller cannot be called after."""
        _remove_handles(self._handles)
        self._removed = True

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def train(self, mode: bool = True) -> Distiller:
        """Set the student's mode; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    # ---------------------------------------------------------------- the teacher and its cache

    def _run_teacher(self, batch: Any) -> dict[str, Any]:
        """The teacher's outputs the selected losses need: ``logits``, ``embedding``, ``features``."""
        self._t_feats.clear()
        if self.teacher.training:
            self.teacher.eval()
        self._recording = True
        try:
            with torch.no_grad():
                out = self._call_fn(self.teacher, batch)
        finally:
            self._recording = False
        entry: dict[str, Any] = {}
        if self.logits:
            entry["logits"] = logits_of(out, "teacher").detach()
        if self.embedding is not None:
            entry["embedding"] = embedding_of(out, batch, self.pooling, "teacher").detach()
        if self.features:
            not_run = [n for n in self.features if n not in self._t_feats]
            if not_run:
                raise InvalidArgumentError(
                    f"features: modules {not_run} did not run in the teacher's forward"
                )
            entry["features"] = {n: list(self._t_feats[n]) for n in self.features}
            self._t_feats.clear()
        return entry

    def cache_teacher(self, batches: Iterable[Any]) -> Distiller:
        """Run the teacher once on each batch and keep its outputs (needs ``cache="lazy"`` or ``"strict"``).

        Returns:
            ``self``.
        """
        if self.cache is None:
            raise InvalidArgumentError(
                "cache_teacher needs a cache: build the Distiller with cache='lazy' or cache='strict', got cache=None"
            )
        self._check_usable()
        for batch in batches:
            key = batch_key(batch)
            if key not in self._cache:
                self._cache.store(key, self._run_teacher(batch), self.cache_dtype)
        return self

    def clear_cache(self) -> None:
        """Forget every cached teacher output."""
        self._cache.clear()

    def cache_info(self) -> dict[str, int]:
        """``{"batches", "hits", "misses", "bytes"}`` of the teacher cache."""
        return self._cache.info()

    def _teacher_outputs(self, batch: Any, key: str | None) -> dict[str, Any]:
        if key is None:
            return self._run_teacher(batch)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if self.cache == "strict":
            raise TeacherCacheMissError(
                f"this batch (key {key[:12]}) is not in the teacher cache ({len(self._cache)} batches cached, "
                "cache='strict'): add it with distiller.cache_teacher([batch]) before training, or use "
                "cache='lazy' to cache batches on first sight; batches must repeat exactly (a shuffling "
                "DataLoader makes new batches every epoch: shuffle a fixed list of batches instead)"
            )
        entry = self._run_teacher(batch)
        self._cache.store(key, entry, self.cache_dtype)
        return entry

    # ---------------------------------------------------------------- the loss

    def _check_usable(self) -> None:
        if self._removed:
            raise InvalidArgumentError(
                "this Distiller's hooks were removed (remove() or the end of its with block); build a new one"
            )

    @property
    def last(self) -> dict[str, float]:
        """The components of the last call as floats: ``logits``, ``features``, ``embedding`` (those
        selected), ``distill`` (their weighted sum), ``task`` (when there was one) and ``loss``."""
        return {k: float(v) for k, v in self._last.items()}

    def forward(
        self,
        batch: Any,
        *,
        task_loss: TaskLoss = None,
        student: nn.Module | None = None,
        return_outputs: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Run student and teacher on ``batch``; return ``hardness * distill + (1 - hardness) * task``.

        Args:
            batch: a mapping (``model(**batch)``), a tuple/list (``model(*batch)``) or a tensor.
            task_loss: the task loss (a scalar tensor, or a function of the student's output giving
                one); by default the student output's ``.loss``. Needed when ``hardness < 1``.
            student: the module to call instead of the distiller's student, when a trainer wrapped it
                (e.g. ``DistributedDataParallel``); its inner module must be the student.
            return_outputs: also return the student's output.

        Returns:
            The scalar loss (and the student's output with ``return_outputs=True``).
        """
        self._check_usable()
        model = self.student
        if student is not None:
            if unwrap_parallel(student) is not unwrap_parallel(self.student):
                raise InvalidArgumentError(
                    f"student= must be the distiller's student or a wrapper of it, got another "
                    f"{type(student).__name__}"
                )
            model = student
        key = batch_key(batch) if self.cache is not None else None
        self._s_feats.clear()
        self._recording = True
        try:
            out = self._call_fn(model, batch)
        finally:
            self._recording = False
        s_feats = {n: self._s_feats.pop(n, []) for n in self.features}
        t = self._teacher_outputs(batch, key)

        parts: dict[str, torch.Tensor] = {}
        distill: torch.Tensor | None = None

        def add(name: str, value: torch.Tensor, weight: float) -> None:
            nonlocal distill
            parts[name] = value.detach()
            distill = weight * value if distill is None else distill + weight * value

        if self.logits:
            s_logits = logits_of(out, "student")
            t_logits = t["logits"].to(s_logits.device)
            if t_logits.shape != s_logits.shape:
                raise InvalidArgumentError(
                    f"logits: student {tuple(s_logits.shape)} and teacher {tuple(t_logits.shape)} differ in shape"
                )
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            if not (isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(s_logits.shape[:-1])):
                mask = None  # rows weighted by the attention mask only for (B, L, V) logits
            kl = kl_distill_loss(
                s_logits, t_logits, self.temperature, None if mask is None else mask.to(s_logits.device)
            )
            add("logits", kl, self.logit_weight)
        if self.features:
            pairs_s: list[torch.Tensor] = []
            pairs_t: list[torch.Tensor] = []
            for n in self.features:
                ss, ts = s_feats[n], t["features"][n]
                if len(ss) != len(ts):
                    raise InvalidArgumentError(
                        f"features: module {n!r} ran {len(ss)} times in the student and {len(ts)} in the teacher"
                    )
                for a, b in zip(ss, ts):
                    if a.shape != b.shape:
                        raise InvalidArgumentError(
                            f"features: module {n!r} outputs {tuple(a.shape)} in the student and "
                            f"{tuple(b.shape)} in the teacher"
                        )
                    pairs_s.append(a)
                    pairs_t.append(b.to(a.device))
            add("features", squarehead_loss(pairs_s, pairs_t, self.eps), self.feature_weight)
        if self.embedding is not None:
            s_emb = embedding_of(out, batch, self.pooling, "student").float()
            t_emb = t["embedding"].to(s_emb.device).float()
            if t_emb.shape != s_emb.shape:
                raise InvalidArgumentError(
                    f"embedding: student {tuple(s_emb.shape)} and teacher {tuple(t_emb.shape)} differ in shape"
                )
            add("embedding", embedding_loss(s_emb, t_emb, self.embedding), self.embedding_weight)
        assert distill is not None  # at least one loss is selected (checked at construction)
        parts["distill"] = distill.detach()

        task = self._task_loss(task_loss, out)
        if task is not None:
            parts["task"] = task.detach()
        if self.hardness >= 1.0:
            loss = distill
        elif self.hardness <= 0.0:
            loss = task  # type: ignore[assignment]
        else:
            loss = self.hardness * distill + (1.0 - self.hardness) * task  # type: ignore[operator]
        parts["loss"] = loss.detach()
        self._last = parts
        return (loss, out) if return_outputs else loss

    def _task_loss(self, task_loss: TaskLoss, out: Any) -> torch.Tensor | None:
        task: Any
        if isinstance(task_loss, torch.Tensor):
            task = task_loss
        elif task_loss is not None:
            if not callable(task_loss):
                raise InvalidTypeError(
                    f"task_loss must be a scalar tensor, a function of the student's output or None, got {task_loss!r}"
                )
            task = task_loss(out)
        else:
            task = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if task is None:
            if self.hardness < 1.0:
                raise InvalidArgumentError(
                    f"hardness={self.hardness} mixes in a task loss, but task_loss was not given and the student's "
                    "output has no .loss: pass task_loss= (a tensor or a function of the output), include labels "
                    "in the batch, or use hardness=1.0"
                )
            return None
        if not isinstance(task, torch.Tensor) or task.numel() != 1:
            raise InvalidTypeError(f"task_loss must give a scalar tensor, got {task!r}")
        return task.reshape(())

    def extra_repr(self) -> str:
        on = [
            n
            for n, s in (("logits", self.logits), ("features", self.features), ("embedding", self.embedding))
            if s
        ]
        return (
            f"losses={on}, temperature={self.temperature}, hardness={self.hardness}, "
            f"features={list(self.features)}, cache={self.cache!r}"
        )
