"""THE layer registry: everything this library knows about each layer type, in one entry per type.

An entry (a :class:`LayerRule` subclass registered with :func:`register_layer`)
says, for modules of its types:

- which tensors are targeted (:meth:`LayerRule.tensors`), and whether the type is opt-in
  (targeted only when ``include`` lists it, as for embeddings);
- which dimensions of a targeted tensor index outputs and inputs (:meth:`LayerRule.dims`);
- the matrix view of a weight as ``(blocks, outputs, input features)`` and back
  (:meth:`LayerRule.to_blocks` / :meth:`LayerRule.from_blocks`), used by calibration and SparseGPT;
- the input features that multiply the weight, seen by a forward pre-hook
  (:meth:`LayerRule.features`), or why they cannot be observed (:attr:`LayerRule.no_features`);
- whether SparseGPT can reconstruct it (:attr:`LayerRule.reconstructable`).

Lookups follow the MRO of the module's class (before parametrization), so subclasses count.
Hugging Face's GPT-2 style ``Conv1D`` is matched by duck typing so that transformers is
never imported here. How :func:`~hadamard_sparse.shrink` rebuilds a layer lives with shrink
(``export/shrink.py``, ``REBUILD_RULES``), since it also covers layers that are never
targeted (BatchNorm). Also here: :class:`Target`, :func:`resolve_targets` (include/exclude
selectors) and tied-weight detection (:func:`shared_parameter_ids`).

Adding a layer type is one entry::

    @register_layer(MyLayer)
    class _MyLayer(LayerRule):
        kind = "my_layer"
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ._checks import Selector, Selectors, check_selectors
from ._model_io import join_name
from .errors import InvalidArgumentError, InvalidTypeError

T_ = TypeVar("T_", bound="Target")

__all__ = [
    "LayerRule",
    "Selector",
    "Selectors",
    "Target",
    "check_not_wrapped",
    "layer_kind",
    "layer_rule",
    "register_layer",
    "resolve_targets",
    "rule_for_kind",
    "select_targets",
    "shared_parameter_ids",
    "supported_layers",
    "targeted_layers",
    "weight_dims",
]


def _tensor_or_none(module: nn.Module, name: str) -> torch.Tensor | None:
    if parametrize.is_parametrized(module, name):
        return getattr(module, name)
    return module._parameters.get(name)


def _present(module: nn.Module, names: Iterable[str]) -> list[str]:
    return [n for n in names if _tensor_or_none(module, n) is not None]


def _unbatched(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    nd = module.weight.dim() - 2  # type: ignore[union-attr]
    return x.unsqueeze(0) if x.dim() == nd + 1 else x


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


class LayerRule:
    """What the library knows about one layer family; subclass it and register with :func:`register_layer`.

    Attributes:
        kind: short family name (``"linear"``, ``"conv"``, ...), also stored in ``LayerStats.kind``.
        label: the family as messages list it (``"ConvNd"``); see :func:`supported_layers`.
        opt_in: targeted only when ``include`` lists the type explicitly.
        no_features: why calibration cannot observe the inputs of this family (``None``: it can,
            through :meth:`features`).
        reconstructable: SparseGPT can prune and reconstruct it.
    """

    kind: ClassVar[str] = "other"
    label: ClassVar[str] = ""
    opt_in: ClassVar[bool] = False
    no_features: ClassVar[str | None] = "this layer kind has no calibration rule (LayerRule.features)"
    reconstructable: ClassVar[bool] = False

    def tensors(self, module: nn.Module) -> list[str]:
        """The names of the targeted tensors of ``module`` (default: ``weight`` when present)."""
        return _present(module, ["weight"])

    def dims(self, tensor_name: str) -> tuple[int, int]:
        """``(out_dim, in_dim)`` of a targeted tensor (default ``(0, 1)``)."""
        return 0, 1

    def to_blocks(self, tensor_name: str, groups: int, w: torch.Tensor) -> torch.Tensor:
        """View a tensor of the weight's shape as ``(B, R, F)``: blocks of outputs x input features."""
        raise InvalidArgumentError(f"no block view for layer kind {self.kind!r}")

    def from_blocks(self, tensor_name: str, groups: int, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`to_blocks`."""
        raise InvalidArgumentError(f"no block view for layer kind {self.kind!r}")

    def features(self, module: nn.Module, tensor_name: str, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """One ``(rows, F)`` tensor per block: the input features multiplying ``module.<tensor_name>``."""
        raise InvalidArgumentError(f"layer kind {self.kind!r} has no calibration rule")


_REGISTRY: dict[type, LayerRule] = {}
_BY_KIND: dict[str, LayerRule] = {}


def register_layer(*types: type, opt_in: bool = False) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator: register a :class:`LayerRule` subclass for modules of ``types`` (and subclasses).

    Args:
        types: the module classes the rule covers (looked up along the MRO).
        opt_in: targeted only when ``include`` lists the type (overrides the class attribute).

    Returns:
        The decorator; it returns the class unchanged.
    """

    def decorator(cls: type[LayerRule]) -> type[LayerRule]:
        if opt_in:
            cls.opt_in = True
        rule = cls()
        for t in types:
            _REGISTRY[t] = rule
        _BY_KIND[cls.kind] = rule
        return cls

    return decorator


class _MatrixRule(LayerRule):
    """A weight ``(out, in)`` fed by the last dimension of the first input (``nn.Linear``)."""

    no_features = None
    reconstructable = True

    def to_blocks(self, tensor_name: str, groups: int, w: torch.Tensor) -> torch.Tensor:
        return w.unsqueeze(0)

    def from_blocks(self, tensor_name: str, groups: int, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return b.reshape(shape)

    def features(self, module: nn.Module, tensor_name: str, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        x = _first_input(args, kwargs)
        return [x.reshape(-1, x.shape[-1])]


@register_layer(nn.Linear)
class _Linear(_MatrixRule):
    kind = "linear"
    label = "Linear"


class _HFConv1D(_MatrixRule):
    """Hugging Face GPT-2 style ``Conv1D``: a linear layer whose weight is ``(in, out)``."""

    kind = "hf_conv1d"
    label = "HF Conv1D"

    def dims(self, tensor_name: str) -> tuple[int, int]:
        return 1, 0

    def to_blocks(self, tensor_name: str, groups: int, w: torch.Tensor) -> torch.Tensor:
        return w.t().unsqueeze(0)

    def from_blocks(self, tensor_name: str, groups: int, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return b[0].t().reshape(shape)


_BY_KIND[_HFConv1D.kind] = _HF_CONV1D = _HFConv1D()


def _conv_k(shape: torch.Size) -> int:
    return math.prod(shape[2:])


def _conv_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """im2col of ``x`` for ``module`` as ``(groups, rows, K * in_g)`` in channels-last feature order."""
    nd = module.weight.dim() - 2  # type: ignore[union-attr]
    x = _unbatched(module, x)
    c = x.shape[1]
    ks = tuple(module.kernel_size)  # type: ignore[arg-type]
    k = math.prod(ks)
    onehot = torch.eye(k, dtype=x.dtype, device=x.device).reshape(k, 1, *ks).repeat(c, 1, *([1] * nd))
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    padding: Any = module.padding
    if module.padding_mode != "zeros":  # type: ignore[union-attr]
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)  # type: ignore[union-attr, arg-type]
        padding = 0
    cols = conv(x, onehot, None, module.stride, padding, module.dilation, c)  # (N, C*K, *L)
    g = module.groups  # type: ignore[union-attr]
    n = cols.shape[0]
    cols = cols.reshape(n, g, c // g, k, -1)  # (N, G, in_g, K, L)
    return cols.permute(1, 0, 4, 3, 2).reshape(g, -1, k * (c // g))


@register_layer(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class _Conv(LayerRule):
    """``ConvNd``: weight ``(out, in // groups, *kernel)``; one block per group, features im2col'ed."""

    kind = "conv"
    label = "ConvNd"
    no_features = None
    reconstructable = True

    def to_blocks(self, tensor_name: str, groups: int, w: torch.Tensor) -> torch.Tensor:
        out, in_g, k = w.shape[0], w.shape[1], _conv_k(w.shape)
        return (
            w.reshape(groups, out // groups, in_g, k).transpose(2, 3).reshape(groups, out // groups, k * in_g)
        )

    def from_blocks(self, tensor_name: str, groups: int, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        out, in_g, k = shape[0], shape[1], _conv_k(shape)
        return b.reshape(groups, out // groups, k, in_g).transpose(2, 3).reshape(shape)

    def features(self, module: nn.Module, tensor_name: str, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        return list(_conv_columns(module, _first_input(args, kwargs)).unbind(0))


@register_layer(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class _ConvTranspose(LayerRule):
    """``ConvTransposeNd``: weight ``(in, out // groups, *kernel)``."""

    kind = "conv_transpose"
    label = "ConvTransposeNd"
    no_features = None

    def dims(self, tensor_name: str) -> tuple[int, int]:
        return 1, 0

    def to_blocks(self, tensor_name: str, groups: int, w: torch.Tensor) -> torch.Tensor:
        in_c, out_g, k = w.shape[0], w.shape[1], _conv_k(w.shape)
        return w.reshape(groups, in_c // groups, out_g * k).transpose(1, 2)

    def from_blocks(self, tensor_name: str, groups: int, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return b.transpose(1, 2).reshape(shape)

    def features(self, module: nn.Module, tensor_name: str, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        # every kernel entry of input channel i multiplies every value of channel i
        x = _unbatched(module, _first_input(args, kwargs))
        g = module.groups  # type: ignore[union-attr]
        return list(x.movedim(1, -1).reshape(-1, g, x.shape[1] // g).unbind(1))


@register_layer(nn.RNNBase)
class _RNN(LayerRule):
    """RNN/LSTM/GRU: every ``weight_*`` tensor."""

    kind = "rnn"
    label = "RNN/LSTM/GRU"
    no_features = "RNN weights see the hidden state and the previous layer's output, not the module's input"

    def tensors(self, module: nn.Module) -> list[str]:
        names = [n for n in module._flat_weights_names if n.startswith("weight_")]  # type: ignore[union-attr]
        return _present(module, names)


_MHA_INPUT = {"q_proj_weight": 0, "k_proj_weight": 1, "v_proj_weight": 2}


@register_layer(nn.MultiheadAttention)
class _MHA(LayerRule):
    """``nn.MultiheadAttention`` input projections (``out_proj`` is an ``nn.Linear`` child, targeted on its own)."""

    kind = "mha"
    label = "MultiheadAttention"
    no_features = None
    reconstructable = True

    def tensors(self, module: nn.Module) -> list[str]:
        return _present(module, ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"])

    def to_blocks(self, tensor_name: str, groups: int, w: torch.Tensor) -> torch.Tensor:
        if tensor_name == "in_proj_weight":
            return w.reshape(3, w.shape[0] // 3, w.shape[1])
        return w.unsqueeze(0)

    def from_blocks(self, tensor_name: str, groups: int, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return b.reshape(shape)

    def features(self, module: nn.Module, tensor_name: str, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        names = ("query", "key", "value")
        qkv = [args[i] if len(args) > i else kwargs[names[i]] for i in range(3)]
        if tensor_name == "in_proj_weight":
            return [t.reshape(-1, t.shape[-1]) for t in qkv]
        t = qkv[_MHA_INPUT[tensor_name]]
        return [t.reshape(-1, t.shape[-1])]


@register_layer(nn.Embedding, nn.EmbeddingBag, opt_in=True)
class _Embedding(LayerRule):
    """Embeddings: targeted only when ``include`` lists the type."""

    kind = "embedding"
    label = "Embedding"
    no_features = "embeddings are lookups, their input has no per-feature norm"


def _is_hf_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: a linear layer with weight of shape (in, out)."""
    cls = parametrize.type_before_parametrizations(module)
    if cls.__name__ != "Conv1D" or not hasattr(module, "nf"):
        return False
    w = _tensor_or_none(module, "weight")
    return w is not None and w.dim() == 2 and w.shape[1] == module.nf


def layer_rule(module: nn.Module) -> LayerRule | None:
    """The registry entry of ``module`` (along its class's MRO), or ``None`` for layers never targeted."""
    cls = parametrize.type_before_parametrizations(module)
    for t in cls.__mro__:
        if t in _REGISTRY:
            return _REGISTRY[t]
    if _is_hf_conv1d(module):
        return _HF_CONV1D
    return None


def rule_for_kind(kind: str) -> LayerRule:
    """The registry entry of a layer family by its :attr:`LayerRule.kind` (as stored in ``LayerStats``)."""
    if kind not in _BY_KIND:
        raise InvalidArgumentError(f"kind must be one of {sorted(_BY_KIND)}, got {kind!r}")
    return _BY_KIND[kind]


def supported_layers(*, opt_in: bool = True, reconstructable: bool = False) -> str:
    """The registered layer families as messages list them, e.g. ``"Linear, HF Conv1D, ConvNd and Embedding"``.

    Args:
        opt_in: include the families targeted only when ``include`` lists them (Embedding).
        reconstructable: only the families SparseGPT can reconstruct.
    """
    labels = [
        r.label
        for r in _BY_KIND.values()
        if r.label and (opt_in or not r.opt_in) and (r.reconstructable or not reconstructable)
    ]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def targeted_layers() -> str:
    """What a model's targets are, for "no target" messages (generated from the registry)."""
    opt_in = [r.label for r in _BY_KIND.values() if r.label and r.opt_in]
    only = f"; {' and '.join(opt_in)} only when include lists its type" if opt_in else ""
    return f"the weights of {supported_layers(opt_in=False)}{only}"


def layer_kind(module: nn.Module) -> str:
    """The short name of the layer family of ``module`` (``"other"`` when it has no entry)."""
    rule = layer_rule(module)
    return "other" if rule is None else rule.kind


@dataclass(frozen=True)
class Target:
    """One targeted tensor: ``module.<tensor_name>`` reachable as ``qualified``."""

    module_name: str
    module: nn.Module
    tensor_name: str

    @property
    def qualified(self) -> str:
        return f"{self.module_name}.{self.tensor_name}" if self.module_name else self.tensor_name

    def value(self) -> torch.Tensor:
        return getattr(self.module, self.tensor_name)


def selector_matches(
    selectors: list[Selector],
    module_name: str,
    module: nn.Module,
    qualified: str,
    used: set[int] | None = None,
) -> bool:
    """Whether one of ``selectors`` matches; with ``used``, every matching entry's index is added to it."""
    cls = parametrize.type_before_parametrizations(module)
    hit = False
    for i, s in enumerate(selectors):
        if isinstance(s, type):
            ok = issubclass(cls, s)
        elif isinstance(s, str):
            ok = fnmatch.fnmatchcase(qualified, s) or fnmatch.fnmatchcase(module_name, s)
        else:
            ok = bool(s(module_name, module))
        if ok:
            if used is None:
                return True
            used.add(i)
            hit = True
    return hit


def _selector_name(s: Selector) -> str:
    if isinstance(s, type):
        return s.__name__
    return repr(s) if isinstance(s, str) else getattr(s, "__name__", repr(s))


def check_all_used(
    selectors: list[Selector], used: set[int], arg: str, model: nn.Module, *, among: str | None = None
) -> None:
    """Refuse ``include``/``exclude`` entries that matched no candidate tensor (a typo protects nothing).

    ``among`` names the candidates when they are not every targetable tensor (e.g. the masked
    tensors a schedule drives); the message then says so.
    """
    unused = [_selector_name(s) for i, s in enumerate(selectors) if i not in used]
    if not unused:
        return
    which = f"entry {unused[0]}" if len(unused) == 1 else f"entries {', '.join(unused)}"
    if among is not None:
        raise InvalidArgumentError(
            f"{arg} {which} matches none of the {among} of {type(model).__name__}; each entry must "
            "match at least one module name, qualified tensor name (glob) or layer type among them "
            "(see hs.masks(model) for the masked ones)"
        )
    raise InvalidArgumentError(
        f"{arg} {which} matches no targetable tensor of {type(model).__name__}; each entry must "
        "match at least one module name, qualified tensor name (glob) or layer type among the weights "
        f"of {supported_layers()} (see hs.sparsity_report(model) for the names)"
    )


def select_targets(
    targets: Sequence[T_], include: Selectors, exclude: Selectors, model: nn.Module, among: str
) -> list[T_]:
    """The ``targets`` kept by ``include``/``exclude`` (same selectors as :func:`resolve_targets`).

    Every entry must match one of ``targets`` (named ``among`` in the error), checked before the
    caller changes anything.
    """
    inc = check_selectors(include, "include")
    exc = check_selectors(exclude, "exclude")
    inc_used: set[int] = set()
    exc_used: set[int] = set()
    kept: list[T_] = []
    for t in targets:
        included = not inc or selector_matches(inc, t.module_name, t.module, t.qualified, inc_used)
        excluded = bool(exc) and selector_matches(exc, t.module_name, t.module, t.qualified, exc_used)
        if included and not excluded:
            kept.append(t)
    check_all_used(inc, inc_used, "include", model, among=among)
    check_all_used(exc, exc_used, "exclude", model, among=among)
    return kept


def _names_opted_in(include: list[Selector], module: nn.Module) -> bool:
    cls = parametrize.type_before_parametrizations(module)
    return any(isinstance(s, type) and issubclass(cls, s) for s in include)


def _is_internal(name: str) -> bool:
    return ".parametrizations." in f".{name}." or name.startswith("parametrizations.")


def shared_parameter_ids(model: nn.Module) -> dict[int, list[str]]:
    """Map id(Parameter) -> the qualified names under which it is registered, when there are several."""
    owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is None:
                continue
            owners.setdefault(id(p), []).append(join_name(mod_name, pname))
    return {k: v for k, v in owners.items() if len(set(v)) > 1}


def resolve_targets(
    model: nn.Module,
    include: Selectors = None,
    exclude: Selectors = None,
    *,
    warn_tied: bool = True,
) -> list[Target]:
    """Resolve the targeted tensors of ``model``, in module order.

    Args:
        model: the model to search.
        include: if given, only tensors matching one of these selectors are kept.
            ``nn.Embedding``/``nn.EmbeddingBag`` are targeted only when their type is listed.
        exclude: tensors matching one of these selectors are dropped.
        warn_tied: warn about Parameters shared by several modules (they are skipped).

    Raises:
        InvalidArgumentError: an ``include`` or ``exclude`` entry matches none of the candidate
            tensors (the weights of every layer type in the registry, embeddings and tied weights
            included), so that a misspelt name never silently protects nothing.

    Returns:
        The list of :class:`Target` in ``model.named_modules()`` order.
    """
    inc = check_selectors(include, "include")
    exc = check_selectors(exclude, "exclude")
    inc_used: set[int] = set()
    exc_used: set[int] = set()
    shared = shared_parameter_ids(model)
    targets: list[Target] = []
    seen_modules: set[int] = set()
    for mod_name, module in model.named_modules():
        if _is_internal(mod_name) or isinstance(module, parametrize.ParametrizationList):
            continue
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        rule = layer_rule(module)
        if rule is None:
            continue
        for tname in rule.tensors(module):
            t = Target(mod_name, module, tname)
            # every candidate is matched against every entry first, so that unused entries are found
            included = not inc or selector_matches(inc, mod_name, module, t.qualified, inc_used)
            excluded = bool(exc) and selector_matches(exc, mod_name, module, t.qualified, exc_used)
            if not included or excluded or (rule.opt_in and not _names_opted_in(inc, module)):
                continue
            if not parametrize.is_parametrized(module, tname):
                p = module._parameters.get(tname)
                if p is not None and id(p) in shared:
                    if warn_tied:
                        warnings.warn(
                            f"skipping {t.qualified}: its Parameter is shared with "
                            f"{sorted(set(shared[id(p)]) - {t.qualified})} (tied weights); "
                            "one mask per shared Parameter is not supported, exclude it to silence this",
                            stacklevel=3,
                        )
                    continue
            targets.append(t)
    check_all_used(inc, inc_used, "include", model)
    check_all_used(exc, exc_used, "exclude", model)
    return targets


def check_not_wrapped(model: nn.Module) -> None:
    """Refuse models already wrapped for distributed training."""
    wrapped = isinstance(model, nn.parallel.DistributedDataParallel) or any(
        "FullyShardedDataParallel" in type(m).__name__ or type(m).__name__.startswith("FSDP")
        for m in model.modules()
    )
    if wrapped:
        raise InvalidTypeError(
            f"model is wrapped in {type(model).__name__}; sparsify (or factorize) the plain model "
            "before wrapping it in DistributedDataParallel or FSDP"
        )


def weight_dims(module: nn.Module, tensor_name: str = "weight") -> tuple[int, int]:
    """``(out_dim, in_dim)``: which dimensions of a targeted tensor index outputs and inputs.

    ``nn.Linear``/``ConvNd``/RNN/MHA weights are ``(out, in, ...)``; ``ConvTransposeNd`` weights are
    ``(in, out // groups, ...)`` and Hugging Face ``Conv1D`` weights are ``(in, out)``.
    """
    rule = layer_rule(module)
    return (0, 1) if rule is None else rule.dims(tensor_name)
