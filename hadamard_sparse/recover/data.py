"""The data of a recovery run: texts or model inputs, one batch per step as a pure function of the step.

:class:`Batches` turns what the user gives (an iterable of texts with a tokenizer, or an iterable /
``DataLoader`` of model inputs) into a list it can index, and :meth:`Batches.at` gives the batch of
training step ``t`` from ``(seed, t)`` alone: epoch ``t // n`` visits the ``n`` batches (or, for texts,
the texts) in an order drawn from a generator seeded with ``seed`` and the epoch. A run resumed at
step ``t`` therefore sees exactly the batches an uninterrupted run sees, with no data position to
save. :func:`call_model` runs a model on a batch the way calibration does.

Texts are grouped by length by default, as the Hugging Face ``Trainer``'s ``group_by_length`` does:
each epoch's shuffled texts are cut into chunks of :data:`GROUP_BATCHES` batches, each chunk sorted by
token count and cut into batches, and the batches shuffled again, so a batch pads to the length of
texts like its own rather than to the longest of 32 random ones (on the standard library's docstring
sentences, 26 tokens on average, random batches of 32 pad to about 90).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, InvalidTypeError

__all__ = ["GROUP_BATCHES", "Batches", "call_model", "is_sentence_transformer", "read_texts", "tokenizer_of"]


GROUP_BATCHES = 50
"""Batches per length-sorted chunk when texts are grouped by length (the ``Trainer``'s megabatch)."""


def is_sentence_transformer(model: nn.Module) -> bool:
    """Whether ``model`` is a ``sentence_transformers.SentenceTransformer`` (checked by name: no import)."""
    return any(c.__name__ == "SentenceTransformer" for c in type(model).__mro__)


def tokenizer_of(model: nn.Module, tokenizer: Any) -> Any:
    """``tokenizer``, or the one a SentenceTransformer carries; ``None`` when there is none."""
    if tokenizer is not None:
        if not callable(tokenizer):
            raise InvalidTypeError(
                f"tokenizer must be a callable Hugging Face tokenizer, got {type(tokenizer).__name__}"
            )
        return tokenizer
    return getattr(model, "tokenizer", None) if is_sentence_transformer(model) else None


def read_texts(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, one text per line.

    Raises:
        InvalidArgumentError: the file cannot be read as UTF-8 text or has no non-empty line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"cannot read {str(path)!r} as UTF-8 text: {e}") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InvalidArgumentError(f"{str(path)!r} has no non-empty line; put one text per line")
    return lines


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list, ``model(batch)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):  # a SentenceTransformer adds its outputs to its features dict
        return model(*(dict(b) if isinstance(b, Mapping) else b for b in batch))
    return model(batch)


def _is_texts(items: Sequence[Any]) -> bool:
    return all(isinstance(x, str) for x in items)


class Batches:
    """Training or evaluation batches, indexable by step (see the module docstring).

    Args:
        data: an iterable of texts (then ``tokenizer`` is needed) or of model inputs (tensors,
            tuples, dicts of keyword arguments), e.g. a ``DataLoader``. It is read once.
        arg: the argument's name, for messages.
        tokenizer: a Hugging Face tokenizer (``tokenizer(texts, padding=True, truncation=True,
            max_length=..., return_tensors="pt")``), used for texts only.
        batch_size: texts per batch. Default: ``32``.
        max_length: tokens kept per text. Default: ``128``.
        wrap: pass each tokenized batch as a 1-tuple (a SentenceTransformer takes the features
            dict as its one positional argument).
        group_by_length: batch training texts of similar token counts together (see the module
            docstring); every text is still seen once per epoch. Default: ``True``.
    """

    def __init__(
        self,
        data: object,
        arg: str,
        *,
        tokenizer: Any = None,
        batch_size: int = 32,
        max_length: int = 128,
        wrap: bool = False,
        group_by_length: bool = True,
    ) -> None:
        if not isinstance(group_by_length, bool):
            raise InvalidTypeError(f"group_by_length must be a bool, got {group_by_length!r}")
        if isinstance(data, (str, bytes, torch.Tensor, Mapping)) or not isinstance(data, Iterable):
            raise InvalidTypeError(
                f"{arg} must be an iterable of texts or of model inputs (a list, a DataLoader), "
                f"got {type(data).__name__}"
            )
        items = list(data)
        if not items:
            raise InvalidArgumentError(f"{arg} is empty; give at least one text or batch")
        self.texts: list[str] | None = None
        self.inputs: list[Any] | None = None
        if _is_texts(items):
            if tokenizer is None:
                raise InvalidArgumentError(
                    f"{arg} holds texts: pass tokenizer= (a Hugging Face tokenizer), or a SentenceTransformer "
                    "model, which carries its own"
                )
            self.texts = items
        elif any(isinstance(x, str) for x in items):
            raise InvalidTypeError(f"{arg} mixes texts and other items; give only texts or only model inputs")
        else:
            self.inputs = items
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.wrap = wrap
        self.group_by_length = group_by_length
        self._lengths: list[int] | None = None
        # (seed, epoch, batches) of the last epoch drawn
        self._epoch: tuple[int, int, list[list[int]]] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.texts is not None:
            return -(-len(self.texts) // self.batch_size)
        assert self.inputs is not None
        return len(self.inputs)

    def tokenize(self, texts: list[str]) -> Any:
        """One batch of model inputs from ``texts``."""
        enc = dict(
            self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )
        return (enc,) if self.wrap else enc

    def in_order(self, limit: int | None = None) -> list[Any]:
        """The first ``limit`` batches (all by default) in the given order (for evaluation and calibration)."""
        n = len(self) if limit is None else min(limit, len(self))
        if self.texts is not None:
            b = self.batch_size
            return [self.tokenize(self.texts[i * b : (i + 1) * b]) for i in range(n)]
        assert self.inputs is not None
        return list(self.inputs[:n])

    def lengths(self) -> list[int]:
        """Token count of each text after truncation (computed once)."""
        assert self.texts is not None
        if self._lengths is None:
            ids = self.tokenizer(self.texts, truncation=True, max_length=self.max_length)["input_ids"]
            self._lengths = [len(x) for x in ids]
        return self._lengths

    def epoch_order(self, epoch: int, seed: int) -> list[list[int]]:
        """The text indices of each batch of ``epoch``, in training order: a pure function of ``(seed, epoch)``."""
        assert self.texts is not None
        if self._epoch is not None and self._epoch[:2] == (seed, epoch):
            return self._epoch[2]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.texts), generator=gen).tolist()
        b = self.batch_size
        if not self.group_by_length:
            batches = [order[i : i + b] for i in range(0, len(order), b)]
        else:
            lengths = self.lengths()
            chunk = GROUP_BATCHES * b  # a multiple of b: only the last chunk ends in a short batch
            batches = []
            for c in range(0, len(order), chunk):
                part = sorted(order[c : c + chunk], key=lengths.__getitem__, reverse=True)
                batches += [part[i : i + b] for i in range(0, len(part), b)]
            batches = [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]
        self._epoch = (seed, epoch, batches)
        return batches

    def typical_steps(self, seed: int, k: int) -> list[int]:
        """``k`` steps of the first epoch whose batches are of about the epoch's mean size, for timing.

        For texts, a batch's size is its texts times the token count it pads to, and the steps are
        those nearest the mean (grouped by length, batches range from a few tokens to ``max_length``:
        the first batches would time the run wrongly). For model inputs, the first ``k`` steps.
        """
        k = min(k, len(self))
        if self.texts is None:
            return list(range(k))
        lengths = self.lengths()
        sizes = [len(b) * max(lengths[j] for j in b) for b in self.epoch_order(0, seed)]
        mean = sum(sizes) / len(sizes)
        return sorted(range(len(sizes)), key=lambda i: (abs(sizes[i] - mean), i))[:k]

    def at(self, step: int, seed: int) -> Any:
        """The batch of training step ``step`` (0-based): a pure function of ``(seed, step)``."""
        n = len(self)
        epoch, i = divmod(step, n)
        if self.texts is not None:
            return self.tokenize([self.texts[j] for j in self.epoch_order(epoch, seed)[i]])
        assert self.inputs is not None
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return self.inputs[int(torch.randperm(n, generator=gen)[i])]
