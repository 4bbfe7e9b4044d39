"""The exact, memory-bounded selection against a brute-force numpy reference."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hadamard_sparse import _select


def _reference(scores: list[np.ndarray], n_prune: int) -> list[np.ndarray]:
    """Sort by (score, tensor index, flat index) and prune the first n_prune."""
    flat = np.concatenate([s.reshape(-1) for s in scores]).astype(np.float32)
    tensor_id = np.concatenate([np.full(s.size, i) for i, s in enumerate(scores)])
    flat_idx = np.concatenate([np.arange(s.size) for s in scores])
    order = np.lexsort((flat_idx, tensor_id, flat))
    keep = np.ones(flat.size, dtype=bool)
    keep[order[:n_prune]] = False
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.size])
        start += s.size
    return out


_values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 3.0, 1e-30, -1e30, 7.25])
_tensor = st.lists(st.one_of(_values, st.floats(-1e6, 1e6, width=32)), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(tensors=st.lists(_tensor, min_size=1, max_size=4), frac=st.floats(0.0, 1.0))
def test_keep_masks_equals_reference(tensors: list[list[float]], frac: float) -> None:
    arrays = [np.asarray(t, dtype=np.float32) for t in tensors]
    total = sum(a.size for a in arrays)
    n_prune = _select.n_to_prune(frac, total)
    ours = _select.keep_masks([lambda a=a: torch.from_numpy(a) for a in arrays], n_prune)
    ref = _reference(arrays, n_prune)
    assert int(sum((~o).sum() for o in ours)) == n_prune
    for o, r in zip(ours, ref):
        np.testing.assert_array_equal(o.numpy(), r)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 3)),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_layer_keep_mask_exact_count(shape: tuple[int, int, int], sparsity: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, shape, generator=g).float()  # many ties
    keep = _select.layer_keep_mask(scores, sparsity)
    n = scores.numel()
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    assert int((~keep).sum()) == round(sparsity * n)
    if 0 < (~keep).sum() < n:  # every pruned score <= every kept score
        assert scores[~keep].max() <= scores[keep].min()


def test_double_scores_and_extremes() -> None:
    scores = torch.tensor([float("inf"), -float("inf"), 0.0, 1.0], dtype=torch.float64)
    keep = _select.layer_keep_mask(scores, 0.5)
    assert keep.tolist() == [True, False, False, True]
    assert _select.layer_keep_mask(scores, 0.0).all()
    assert not _select.layer_keep_mask(scores, 1.0).any()
