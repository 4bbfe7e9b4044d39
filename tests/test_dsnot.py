"""``method="dsnot"`` on pure-torch models (no transformers): DSnoT's swap rule by hand on a 6-weight
row, and whole masks of an MLP and a small conv net against a row-by-row reference of the paper's
loop, run on statistics computed here from the layers' raw inputs.

DSnoT (Zhang et al., ICLR 2024), per output row ``i``, starting from Wanda's mask: the expected error
``e = sum_{j pruned} W_ij mu_j``; grow the pruned weight with the largest ``sign(e) W_ij mu_j / var_j``,
prune the kept weight of opposite sign with the lowest Wanda score ``|W_ij| ||X_j||`` (with ``N:M``:
the kept weight of the grown one's group with the lowest Wanda score); stop when a swap would flip the
sign of ``e`` or not shrink ``|e|``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse import dsnot
from hadamard_sparse.dsnot import dsnot_rows, expected_error
from tests.conftest import mlp
from tests.test_ria import MODELS, model_case


def dsnot_row_reference(
    w: np.ndarray,
    keep: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    sq_norm: np.ndarray,
    nm: tuple[int, int] | None,
    max_cycles: int,
    threshold: float,
) -> np.ndarray:
    """DSnoT on one row, written as the paper's loop over one row at a time (numpy, float64)."""
    metric, wanda = w * mean, np.abs(w) * np.sqrt(sq_norm)
    grow_key = metric / np.maximum(var, 1e-12)
    keep, kept0 = keep.copy(), keep.copy()
    e = float((metric * ~keep).sum())
    s = np.sign(e)
    if abs(e) <= threshold:
        return keep
    pruned = [j for j in range(len(w)) if not kept0[j]]
    grow = sorted(pruned, key=lambda j: -s * grow_key[j])  # stable: ties in column order
    prune = sorted((j for j in range(len(w)) if kept0[j] and metric[j] * s < 0), key=lambda j: wanda[j])
    for c in range(max_cycles):
        if c >= len(grow) or (nm is None and c >= len(prune)):
            break
        g = grow[c]
        if nm is None:
            p = prune[c]
        else:  # the kept (from the start) weight of g's group with the lowest Wanda score
            group = [j for j in range(g - g % nm[1], g - g % nm[1] + nm[1]) if keep[j] and kept0[j]]
            if not group:
                break
            p = min(group, key=lambda j: wanda[j])
        after = e + metric[p] - metric[g]
        if np.sign(after) != s or abs(after) >= abs(e):
            break
        keep[g], keep[p], e = True, False, after
        if abs(e) <= threshold:
            break
    return keep


# ------------------------------------------------------------------ the swap rule by hand

# One row of 6 weights, ||X_j|| = 1: Wanda's 50% mask prunes |W| = 1, 2, 3 (columns 3, 4, 5).
ROW = [6.0, -5.0, 4.0, 1.0, 2.0, -3.0]
MEAN = [1.0, 0.1, -0.05, 1.0, 1.0, 0.1]  # W_j mu_j = 6, -0.5, -0.2, 1, 2, -0.3
START = [True, True, True, False, False, False]  # e = 1 + 2 - 0.3 = 2.7


@pytest.mark.parametrize(
    "var4, expect, e_after",
    [
        # var = 1: grow column 4 (W mu / var = 2 beats 1 and -0.3); prune column 2 (kept, W mu < 0,
        # Wanda 4 < 5): e = 2.7 - 0.2 - 2 = 0.5. Next: grow 3, prune 1: 0.5 - 0.5 - 1 = -1 flips the sign: stop.
        (1.0, [True, True, False, False, True, False], 0.5),
        # var_4 = 4: column 4's key drops to 0.5, so column 3 (key 1) grows first: e = 2.7 - 0.2 - 1 = 1.5.
        # Next: grow 4, prune 1: 1.5 - 0.5 - 2 = -1 flips the sign: stop.
        (4.0, [True, True, False, True, False, False], 1.5),
    ],
)
def test_swaps_by_hand(var4: float, expect: list[bool], e_after: float) -> None:
    w = torch.tensor([ROW])
    mean = torch.tensor(MEAN, dtype=torch.float64)
    var = torch.tensor([1.0, 1.0, 1.0, 1.0, var4, 1.0], dtype=torch.float64)
    start = torch.tensor([START])
    assert expected_error(w, start, mean).item() == pytest.approx(2.7)
    keep = dsnot_rows(w, start, mean, var, torch.ones(6, dtype=torch.float64), update_threshold=0.0)
    assert keep.tolist() == [expect]
    assert expected_error(w, keep, mean).item() == pytest.approx(e_after)


def test_a_row_within_the_threshold_is_left_alone() -> None:
    w, start = torch.tensor([ROW]), torch.tensor([START])
    mean, ones = torch.tensor(MEAN, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    keep = dsnot_rows(w, start, mean, ones, ones, update_threshold=2.7)
    assert torch.equal(keep, start)


# ------------------------------------------------------------------ whole models, reference from raw inputs


def _wanda_start(w: np.ndarray, x: np.ndarray, nm: tuple[int, int] | None) -> np.ndarray:
    """Wanda's 50% keep-mask: the lowest half of ``|W_ij| ||X_j||`` of each row (of each ``M``-group)."""
    score = np.abs(w) * np.sqrt((x**2).sum(axis=0))
    m = w.shape[1] if nm is None else nm[1]
    groups = score.reshape(-1, m)
    keep = np.ones(groups.shape, dtype=bool)
    np.put_along_axis(keep, np.argsort(groups, axis=1, kind="stable")[:, : m // 2], False, axis=1)
    return keep.reshape(w.shape)


@pytest.mark.parametrize(
    "name, nm", [("mlp", None), ("mlp", (2, 4)), ("conv_net", None)], ids=["mlp", "mlp_2:4", "conv_net"]
)
def test_masks_equal_a_row_by_row_reference_on_raw_inputs(name: str, nm: tuple[int, int] | None) -> None:
    model, dense, batches, inputs = model_case(name)
    structure = None if nm is None else f"{nm[0]}:{nm[1]}"
    hs.sparsify(model, 0.5, method="dsnot", scope="row", structure=structure, calibration=batches)
    masks = hs.masks(model)
    assert set(masks) == set(inputs)
    swaps = 0
    for key, x in inputs.items():
        w = dense.get_parameter(key).detach().double()
        w2 = w.reshape(w.shape[0], -1).numpy()
        mean = x.mean(axis=0)
        var = (x**2).mean(axis=0) - mean**2
        start = _wanda_start(w2, x, nm)
        ref = np.stack(
            [
                dsnot_row_reference(
                    row, k, mean, var, (x**2).sum(axis=0), nm, dsnot.MAX_CYCLES, dsnot.UPDATE_THRESHOLD
                )
                for row, k in zip(w2, start)
            ]
        )
        np.testing.assert_array_equal(masks[key].reshape(w2.shape).numpy(), ref, err_msg=key)
        swaps += int((ref != start).sum())
        # the weights are untouched: DSnoT changes the mask only
        torch.testing.assert_close(
            model.get_submodule(key[: -len(".weight")]).parametrizations.weight.original, w.float()
        )
    assert swaps > 0  # the reference does swap on these models


def test_sparsify_zero_restores_the_dense_model() -> None:
    torch.manual_seed(0)
    model = mlp()
    dense = copy.deepcopy(model)
    batches = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    hs.sparsify(model, 0.5, method="dsnot", calibration=batches)
    assert hs.masks(model)
    hs.sparsify(model, 0.0)
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x))


def test_every_row_keeps_its_count_on_a_conv_net() -> None:
    make, data = MODELS["conv_net"]
    torch.manual_seed(0)
    model = make()
    batches = [data(torch.Generator().manual_seed(i)) for i in range(2)]
    for key, keep in hs.masks(
        hs.sparsify(model, 0.5, method="dsnot", scope="row", calibration=batches)
    ).items():
        counts = keep.reshape(keep.shape[0], -1).sum(1)
        assert (counts == keep[0].numel() // 2).all(), key
    assert isinstance(model[0], nn.Conv2d)  # the module is the user's, parametrized in place
