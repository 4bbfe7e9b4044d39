"""Running a model: its inputs, its training flags, its submodules by name (one place for each).

- :func:`as_inputs`: a batch / ``example_inputs`` as ``(positional inputs, keyword inputs)``;
  :func:`call_model`: run a model on one (``model(x)``, ``model(*b)`` or ``model(**b)``).
- :func:`eval_mode` / :func:`train_mode`: a context manager that sets the training flag and, on
  exit (an exception included), restores every submodule's own flag as it was.
- :func:`join_name`: qualified-name joining; :func:`set_submodule`: replace a submodule by name.
- :func:`unwrap_parallel`: the module inside a ``DistributedDataParallel`` / ``DataParallel``.

This module sits on the bottom floor: it imports only torch and :mod:`errors`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import InvalidTypeError

__all__ = [
    "as_inputs",
    "call_model",
    "eval_mode",
    "join_name",
    "set_submodule",
    "train_mode",
    "unwrap_parallel",
]


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (``model`` otherwise)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def as_inputs(
    inputs: Any, model: nn.Module | None = None, *, name: str = "example_inputs"
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``inputs`` as ``(positional inputs, keyword inputs)`` for ``model(*args, **kwargs)``.

    Args:
        inputs: a tensor (``model(x)``), a tuple/list of positional inputs (``model(*b)``) or a
            mapping with string keys of keyword inputs (``model(**b)``).
        model: the model that will be called, if known. An ``nn.Sequential`` (also inside
            ``DistributedDataParallel`` / ``DataParallel``) given a mapping receives a copy of it as
            its one positional input, as a sentence-transformers ``SentenceTransformer`` takes
            its features (a copy: it writes its outputs into the dict).
        name: the argument's name in the error message.

    Returns:
        ``(args, kwargs)``: fresh containers (the caller's are never handed on).

    Raises:
        InvalidTypeError: ``inputs`` is none of these forms.

    Example::

        >>> as_inputs(torch.ones(2))
        ((tensor([1., 1.]),), {})
        >>> as_inputs({"input_ids": 1})
        ((), {'input_ids': 1})
    """
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if isinstance(inputs, Mapping):
        if model is not None and isinstance(unwrap_parallel(model), nn.Sequential):
            return (dict(inputs),), {}
        if all(isinstance(k, str) for k in inputs):
            return (), dict(inputs)
    raise InvalidTypeError(
        f"{name} must be a tensor, a tuple/list of the model's positional inputs or a dict of its "
        f"keyword inputs, got {type(inputs).__name__}"
    )


def call_model(model: nn.Module, inputs: Any, *, name: str = "batch") -> Any:
    """``model`` run on ``inputs`` as :func:`as_inputs` splits them (``model`` given, so an
    ``nn.Sequential`` receives a mapping as one positional input); returns its output.

    Example::

        >>> call_model(nn.Linear(2, 1, bias=False).requires_grad_(False), (torch.zeros(1, 2),))
        tensor([[0.]])
    """
    args, kwargs = as_inputs(inputs, model, name=name)
    return model(*args, **kwargs)


@contextmanager
def train_mode(*modules: nn.Module, mode: bool) -> Iterator[None]:
    """Inside, ``modules`` are in training mode ``mode`` (``module.train(mode)``); on exit, an
    exception included, every submodule's own ``training`` flag is restored as it was.

    The flags are restored one by one (not with ``train()``, which would also set the children and
    call overridden ``train`` methods), so a model whose submodules were in mixed modes (a frozen
    teacher in eval mode inside a training model, a shared module) comes back exactly as it was.

    Example::

        >>> model = nn.Sequential(nn.Dropout(), nn.Dropout().eval())
        >>> with train_mode(model, mode=False):
        ...     [m.training for m in model.modules()]
        [False, False, False]
        >>> [m.training for m in model.modules()]
        [True, True, False]
    """
    flags = {m: m.training for module in modules for m in module.modules()}
    try:
        for module in modules:
            module.train(mode)
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def eval_mode(*modules: nn.Module) -> Any:
    """Inside, ``modules`` are in eval mode; on exit every submodule's own flag is restored
    (:func:`train_mode` with ``mode=False``).

    Example::

        >>> model = nn.Linear(2, 2)
        >>> with eval_mode(model):
        ...     model.training
        False
        >>> model.training
        True
    """
    return train_mode(*modules, mode=False)


def join_name(*parts: str) -> str:
    """The qualified name of ``parts`` with empty parts left out: ``join_name("", "fc", "weight")`` is ``"fc.weight"``."""
    return ".".join(p for p in parts if p)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace ``model``'s submodule named ``name`` (a qualified name, e.g. ``"encoder.fc"``) by ``new``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
