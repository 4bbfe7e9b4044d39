"""Which tensors of which layer types are targeted.

Knowledge about each layer type lives in one registry keyed by module type and
filled by :func:`_register_layer`. Lookups use ``isinstance`` so subclasses
count. Hugging Face's GPT-2 style ``Conv1D`` is matched by duck typing so that
transformers is never imported here.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._checks import Selector, Selectors, check_selectors
from .errors import InvalidTypeError

__all__: list[str] = []  # private module

TargetFn = Callable[[nn.Module], list[str]]


@dataclass(frozen=True)
class _LayerRule:
    tensors: TargetFn
    opt_in: bool  # only targeted when `include` names the type explicitly


_REGISTRY: dict[type, _LayerRule] = {}


def _register_layer(*types: type, opt_in: bool = False) -> Callable[[TargetFn], TargetFn]:
    """Decorator: ``fn(module) -> tensor names`` targeted for modules of ``types``."""

    def decorator(fn: TargetFn) -> TargetFn:
        for t in types:
            _REGISTRY[t] = _LayerRule(fn, opt_in)
        return fn

    return decorator


def _present(module: nn.Module, names: Iterable[str]) -> list[str]:
    return [n for n in names if _tensor_or_none(module, n) is not None]


def _tensor_or_none(module: nn.Module, name: str) -> torch.Tensor | None:
    if parametrize.is_parametrized(module, name):
        return getattr(module, name)
    t = module._parameters.get(name)
    return t


@_register_layer(
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
def _weight_only(module: nn.Module) -> list[str]:
    return _present(module, ["weight"])


@_register_layer(nn.RNNBase)
def _rnn_weights(module: nn.Module) -> list[str]:
    names = [n for n in module._flat_weights_names if n.startswith("weight_")]  # type: ignore[union-attr]
    return _present(module, names)


@_register_layer(nn.MultiheadAttention)
def _mha_weights(module: nn.Module) -> list[str]:
    # out_proj is an nn.Linear child and is targeted on its own.
    return _present(module, ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"])


@_register_layer(nn.Embedding, nn.EmbeddingBag, opt_in=True)
def _embedding_weight(module: nn.Module) -> list[str]:
    return _present(module, ["weight"])


def _is_hf_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: a linear layer with weight of shape (in, out)."""
    cls = parametrize.type_before_parametrizations(module)
    if cls.__name__ != "Conv1D" or not hasattr(module, "nf"):
        return False
    w = _tensor_or_none(module, "weight")
    return w is not None and w.dim() == 2 and w.shape[1] == module.nf


def _rule_for(module: nn.Module) -> _LayerRule | None:
    cls = parametrize.type_before_parametrizations(module)
    for t in cls.__mro__:
        if t in _REGISTRY:
            return _REGISTRY[t]
    if _is_hf_conv1d(module):
        return _LayerRule(_weight_only, opt_in=False)
    return None


def layer_kind(module: nn.Module) -> str:
    """A short name of the layer family, used by structures and export."""
    if _is_hf_conv1d(module):
        return "hf_conv1d"
    cls = parametrize.type_before_parametrizations(module)
    if issubclass(cls, nn.Linear):
        return "linear"
    if issubclass(cls, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose"
    if issubclass(cls, nn.modules.conv._ConvNd):
        return "conv"
    if issubclass(cls, nn.RNNBase):
        return "rnn"
    if issubclass(cls, nn.MultiheadAttention):
        return "mha"
    if issubclass(cls, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    return "other"


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


def _matches(selectors: list[Selector], module_name: str, module: nn.Module, qualified: str) -> bool:
    cls = parametrize.type_before_parametrizations(module)
    for s in selectors:
        if isinstance(s, type):
            if issubclass(cls, s):
                return True
        elif isinstance(s, str):
            if fnmatch.fnmatchcase(qualified, s) or fnmatch.fnmatchcase(module_name, s):
                return True
        elif s(module_name, module):
            return True
    return False


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
            owners.setdefault(id(p), []).append(f"{mod_name}.{pname}" if mod_name else pname)
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

    Returns:
        The list of :class:`Target` in ``model.named_modules()`` order.
    """
    inc = check_selectors(include, "include")
    exc = check_selectors(exclude, "exclude")
    shared = shared_parameter_ids(model)
    targets: list[Target] = []
    seen_modules: set[int] = set()
    for mod_name, module in model.named_modules():
        if _is_internal(mod_name) or isinstance(module, parametrize.ParametrizationList):
            continue
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        rule = _rule_for(module)
        if rule is None:
            continue
        if rule.opt_in and not _names_opted_in(inc, module):
            continue
        for tname in rule.tensors(module):
            t = Target(mod_name, module, tname)
            if inc and not _matches(inc, mod_name, module, t.qualified):
                continue
            if exc and _matches(exc, mod_name, module, t.qualified):
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
    kind = layer_kind(module)
    if kind in ("conv_transpose", "hf_conv1d"):
        return 1, 0
    return 0, 1


_shared_parameter_ids = shared_parameter_ids  # old private name (export), until it switches
