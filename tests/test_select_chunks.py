"""The chunked global selection: chunk boundaries, the candidate budget, one tensor's scores at a time."""

from __future__ import annotations

import weakref
from unittest import mock

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hadamard_sparse import _select
from tests.test_select import _reference

_values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 3.0, 1e-30, -1e30, 7.25])
_tensor = st.lists(st.one_of(_values, st.floats(-1e6, 1e6, width=32)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(
    tensors=st.lists(_tensor, min_size=1, max_size=4),
    frac=st.floats(0.0, 1.0),
    chunk=st.sampled_from([1, 2, 3, 7, 16]),
)
def test_small_chunks_equal_reference(tensors: list[list[float]], frac: float, chunk: int) -> None:
    """Chunk boundaries inside tensors, negative scores, ties across chunks and tensors."""
    arrays = [np.asarray(t, dtype=np.float32) for t in tensors]
    n_prune = _select.n_to_prune(frac, sum(a.size for a in arrays))
    with mock.patch.object(_select, "_CHUNK", chunk):
        ours = _select.keep_masks([lambda a=a: torch.from_numpy(a) for a in arrays], n_prune)
    for o, r in zip(ours, _reference(arrays, n_prune)):
        np.testing.assert_array_equal(o.numpy(), r)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 200), min_size=1, max_size=4),
    levels=st.integers(1, 3),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    chunk=st.sampled_from([5, 64, 1 << 21]),
)
def test_many_equal_scores_over_the_candidate_budget(
    sizes: list[int], levels: int, frac: float, seed: int, chunk: int
) -> None:
    """Few distinct scores put most entries in the k-th key's bucket: tensors are scored a third time."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, levels, n).astype(np.float32) for n in sizes]
    n_prune = _select.n_to_prune(frac, sum(sizes))
    calls = [0] * len(arrays)

    def thunk(i: int) -> torch.Tensor:
        calls[i] += 1
        return torch.from_numpy(arrays[i])

    with mock.patch.object(_select, "_CHUNK", chunk):
        ours = _select.keep_masks([lambda i=i: thunk(i) for i in range(len(arrays))], n_prune)
    for o, r in zip(ours, _reference(arrays, n_prune)):
        np.testing.assert_array_equal(o.numpy(), r)
    assert all(c <= 3 for c in calls)


def test_one_tensors_scores_alive_at_a_time() -> None:
    """When a thunk runs, the scores returned by the previous call are already freed."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(300, 200, generator=g) for _ in range(4)]
    alive: list[weakref.ref] = []
    overlaps = []

    def thunk(w: torch.Tensor) -> torch.Tensor:
        overlaps.append(sum(r() is not None for r in alive))
        s = w.abs()
        alive.append(weakref.ref(s))
        return s

    with mock.patch.object(_select, "_CHUNK", 1000):
        keeps = _select.keep_masks([lambda w=w: thunk(w) for w in weights], 48_000)
    assert max(overlaps) == 0
    flat = torch.cat([w.abs().reshape(-1) for w in weights])
    assert int(sum((~k).sum() for k in keeps)) == 48_000
    pruned = torch.cat([~k for k in keeps])
    assert flat[pruned].max() <= flat[~pruned].min()
