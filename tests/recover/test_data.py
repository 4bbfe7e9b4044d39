"""recover.data.Batches: each step's batch is a pure function of (seed, step), every text is seen once
per epoch, and grouping by length pads less than random batches of the same texts (measured against
the tokenizer's own padded shapes)."""

from __future__ import annotations

import pytest
import torch

from hadamard_sparse.errors import InvalidTypeError
from hadamard_sparse.recover.data import GROUP_BATCHES, Batches
from tests.hf_models import transformers

WORDS = "the a cat dog sat on mat ran fast slow red blue big small house tree river sun moon star".split()


def _texts(n: int, seed: int) -> list[str]:
    """Sentences of 1 to 40 words, lengths drawn at random (as real sentences vary)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 41, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)))
    return out


@pytest.fixture(scope="module")
def tok() -> object:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    return transformers.BertTokenizerFast(vocab=vocab)


TEXTS = _texts(8 * GROUP_BATCHES + 37, 0)  # more than one length-sorted chunk, a short last batch


def _decoded(tok: object, batch: dict[str, torch.Tensor]) -> list[str]:
    return tok.batch_decode(batch["input_ids"], skip_special_tokens=True)  # type: ignore[attr-defined]


@pytest.mark.parametrize("group", [True, False])
def test_an_epoch_sees_every_text_once_and_batches_are_pure_in_seed_step(tok: object, group: bool) -> None:
    b = Batches(TEXTS, "data", tokenizer=tok, batch_size=8, group_by_length=group)
    n = len(b)
    assert n == -(-len(TEXTS) // 8)
    seen = [t for step in range(n) for t in _decoded(tok, b.at(step, seed=5))]
    assert sorted(seen) == sorted(TEXTS)
    fresh = Batches(TEXTS, "data", tokenizer=tok, batch_size=8, group_by_length=group)
    for step in (n + 3, 2, 2 * n - 1, 0):  # any order, across epochs, a fresh object: the same batch
        assert torch.equal(fresh.at(step, seed=5)["input_ids"], b.at(step, seed=5)["input_ids"])
    # a new epoch, a new order
    assert not torch.equal(b.at(n, seed=5)["input_ids"], b.at(0, seed=5)["input_ids"])
    other = [t for step in range(n) for t in _decoded(tok, b.at(step, seed=6))]
    assert other != seen and sorted(other) == sorted(TEXTS)


def test_grouping_pads_less_and_keeps_random_batch_order(tok: object) -> None:
    grouped = Batches(TEXTS, "data", tokenizer=tok, batch_size=8)
    plain = Batches(TEXTS, "data", tokenizer=tok, batch_size=8, group_by_length=False)
    n = len(grouped)

    def padded(b: Batches) -> int:
        return sum(b.at(s, seed=0)["input_ids"].numel() for s in range(n))

    per_text = [len(x) for x in tok(TEXTS)["input_ids"]]  # type: ignore[operator]
    assert grouped.lengths() == per_text
    real = sum(per_text)
    assert padded(grouped) < real * 1.15 < padded(plain)
    # the batches of a grouped epoch do not come longest first (they are shuffled after sorting)
    widths = [grouped.at(s, seed=0)["input_ids"].shape[1] for s in range(n)]
    assert widths != sorted(widths, reverse=True) and widths != sorted(widths)


def test_group_by_length_must_be_a_bool(tok: object) -> None:
    with pytest.raises(InvalidTypeError, match="group_by_length must be a bool, got 1"):
        Batches(TEXTS, "data", tokenizer=tok, group_by_length=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("group", [True, False])
def test_typical_steps_are_the_batches_nearest_the_mean_size(tok: object, group: bool) -> None:
    b = Batches(TEXTS, "data", tokenizer=tok, batch_size=8, group_by_length=group)
    sizes = [b.at(s, seed=2)["input_ids"].numel() for s in range(len(b))]  # what the tokenizer pads to
    mean = sum(sizes) / len(sizes)
    picked = b.typical_steps(seed=2, k=3)
    assert len(set(picked)) == 3
    worst_picked = max(abs(sizes[i] - mean) for i in picked)
    assert sum(abs(x - mean) < worst_picked for x in sizes) < 3  # no 3 batches are nearer the mean
    assert Batches([{"x": 1}, {"x": 2}], "data").typical_steps(seed=0, k=5) == [0, 1]
