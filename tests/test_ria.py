"""``method="ria"`` on pure-torch models (no transformers): hand-computed scores, and whole masks of an
MLP and a small conv net against RIA's formula computed here from the layers' raw inputs.

RIA (Zhang et al., ICLR 2024): for a weight viewed as ``R x F`` (outputs x input features) and the
calibration inputs ``X``, ``RIA_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** 0.5``;
the lowest scores are pruned.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse.ria import ria_blocks
from tests.conftest import mlp

# A 2 x 3 weight and input norms ||X_j|| = 4, 1, 9 (square roots 2, 1, 3). Row sums of |W|: 4 and 6;
# column sums: 4, 3 and 3. RIA_00 = (1/4 + 1/4) * 2 = 1, RIA_01 = (2/4 + 2/3) * 1 = 7/6,
# RIA_02 = (1/4 + 1/3) * 3 = 7/4, RIA_10 = (3/6 + 3/4) * 2 = 5/2, RIA_11 = (1/6 + 1/3) * 1 = 1/2,
# RIA_12 = (2/6 + 2/3) * 3 = 3.
W = [[1.0, 2.0, -1.0], [-3.0, 1.0, 2.0]]
NORMS = [4.0, 1.0, 9.0]
BY_HAND = [[1.0, 7 / 6, 7 / 4], [5 / 2, 1 / 2, 3.0]]


def test_scores_by_hand() -> None:
    got = ria_blocks(torch.tensor([W]), torch.tensor([NORMS]))
    torch.testing.assert_close(got, torch.tensor([BY_HAND]), rtol=1e-6, atol=0.0)


def test_a_zero_row_or_column_scores_zero() -> None:
    w = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])
    got = ria_blocks(w, torch.tensor([[4.0, 4.0]]))
    torch.testing.assert_close(got, torch.tensor([[[0.0, 0.0], [0.0, 4.0]]]))


def test_sparsify_prunes_the_lowest_hand_computed_scores() -> None:
    """One input row ``[4, 1, 9]`` gives the norms above; half of the 6 weights go: scores 1/2, 1, 7/6.
    Magnitude would prune |W| = 1, 1, 1 instead (it would keep the 2 that RIA prunes)."""
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(W))
    model = hs.sparsify(
        nn.Sequential(layer), 0.5, method="ria", scope="layer", calibration=[torch.tensor([NORMS])]
    )
    keep = hs.masks(model)["0.weight"]
    assert keep.tolist() == [[False, False, True], [True, False, True]]
    assert torch.equal(model[0].weight, torch.tensor(W) * keep)


# ------------------------------------------------------------------ whole models, reference from raw inputs


def _conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.Flatten(),
        nn.Linear(54, 6),
    )


MODELS = {
    "mlp": (mlp, lambda g: torch.randn(16, 8, generator=g)),
    "conv_net": (_conv_net, lambda g: torch.randn(4, 2, 7, 7, generator=g)),
}


def layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Each Linear's / Conv2d's input rows ``(rows, F)`` over ``batches`` (im2col columns for a conv,
    in the order of ``weight.reshape(out, -1)``), from the dense model, float64."""
    rows: dict[str, list[torch.Tensor]] = {}

    def hook(name: str, mod: nn.Module):  # type: ignore[no-untyped-def]
        def record(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double()
            if isinstance(mod, nn.Conv2d):
                cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
                x = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            rows.setdefault(name, []).append(x.reshape(-1, x.shape[-1]))

        return record

    handles = [
        m.register_forward_pre_hook(hook(n, m))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return {f"{n}.weight": torch.cat(r).numpy() for n, r in rows.items()}


def model_case(name: str) -> tuple[nn.Module, nn.Module, list[torch.Tensor], dict[str, np.ndarray]]:
    """The model ``MODELS[name]`` (seed 0), a dense copy, 3 calibration batches and each layer's inputs."""
    make, data = MODELS[name]
    torch.manual_seed(0)
    model = make()
    g = torch.Generator().manual_seed(1)
    batches = [data(g) for _ in range(3)]
    dense = copy.deepcopy(model)
    return model, dense, batches, layer_inputs(dense, batches)


def _ria(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """RIA from its formula: ``w`` ``(R, F)``, ``x`` ``(rows, F)``."""
    a = np.abs(w)
    rel = a / a.sum(axis=1, keepdims=True) + a / a.sum(axis=0, keepdims=True)
    return rel * np.sqrt(np.sqrt((x**2).sum(axis=0)))


def _keep_top(scores: np.ndarray, n_prune: int) -> np.ndarray:
    """Keep-mask pruning the ``n_prune`` lowest entries of ``scores`` (flattened)."""
    flat = scores.reshape(-1)
    keep = np.ones(flat.shape, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:n_prune]] = False
    return keep.reshape(scores.shape)


@pytest.mark.parametrize("scope", ["row", "layer"])
@pytest.mark.parametrize("name", list(MODELS))
def test_masks_equal_the_formula_on_raw_inputs(name: str, scope: str) -> None:
    model, dense, batches, inputs = model_case(name)
    hs.sparsify(model, 0.5, method="ria", scope=scope, calibration=batches)
    masks = hs.masks(model)
    assert set(masks) == set(inputs)
    for key, x in inputs.items():
        w = dense.get_parameter(key).detach().double()
        w2 = w.reshape(w.shape[0], -1).numpy()
        scores = _ria(w2, x)
        if scope == "row":
            ref = np.stack([_keep_top(s, s.size // 2) for s in scores])
        else:
            ref = _keep_top(scores, scores.size // 2)
        np.testing.assert_array_equal(masks[key].reshape(w2.shape).numpy(), ref, err_msg=key)
        magnitude = _keep_top(np.abs(w2), w2.size // 2)
        if scope == "layer":  # the activations matter: not magnitude's mask
            assert (ref != magnitude).any(), key
