"""layer_densities (uniform / ER / ERK) against a brute-force bisection reference, and sparsify(distribution=)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hadamard_sparse.api import masks, sparsify
from hadamard_sparse.densities import layer_densities
from hadamard_sparse.errors import NoTargetsError


def _reference(shapes: dict[str, tuple[int, ...]], sparsity: float, distribution: str) -> dict[str, float]:
    """Brute force: solve sum(min(1, eps * raw) * n) = (1 - s) N for eps by bisection (numpy, float64)."""
    names = list(shapes)
    n = np.array([math.prod(shapes[k]) for k in names], dtype=np.float64)
    if distribution == "uniform":
        return {k: 1.0 - sparsity for k in names}
    if distribution == "erk":
        raw = np.array([sum(shapes[k]) / math.prod(shapes[k]) for k in names])
    else:
        raw = np.array([(shapes[k][0] + shapes[k][1]) / (shapes[k][0] * shapes[k][1]) for k in names])
    target = (1.0 - sparsity) * n.sum()
    lo, hi = 0.0, 1.0 / raw.min() + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if (np.minimum(1.0, mid * raw) * n).sum() < target:
            lo = mid
        else:
            hi = mid
    eps = (lo + hi) / 2
    return {k: float(min(1.0, eps * r)) for k, r in zip(names, raw)}


def _lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(800, 500),
        nn.ReLU(),
        nn.Linear(500, 10),
    )


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        f"{n}.weight": tuple(m.weight.shape)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9, 0.98, 1.0])
def test_matches_bisection_reference_on_lenet5(distribution: str, sparsity: float) -> None:
    model = _lenet5()
    got = layer_densities(model, sparsity, distribution)
    ref = _reference(_shapes(model), sparsity, distribution)
    assert list(got) == list(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k
    numel = {k: math.prod(s) for k, s in _shapes(model).items()}
    kept = sum(got[k] * numel[k] for k in got)
    assert kept == pytest.approx((1 - sparsity) * sum(numel.values()), rel=1e-12, abs=1e-6)
    assert all(0.0 <= d <= 1.0 for d in got.values())


def test_erk_caps_small_layers_and_redistributes() -> None:
    # The tiny last layer would get a density > 1 at 50% sparsity: it is capped and the rest absorbs it.
    shapes = {"big": (400, 300), "small": (3, 2)}
    got = layer_densities(shapes, 0.5, "erk")
    assert got["small"] == 1.0
    assert got["big"] * 120000 + 6 == pytest.approx(0.5 * 120006)


@settings(max_examples=40, deadline=None)
@given(
    dims=st.lists(st.lists(st.integers(1, 40), min_size=2, max_size=4), min_size=1, max_size=5),
    sparsity=st.floats(0.0, 1.0),
    distribution=st.sampled_from(["uniform", "er", "erk"]),
)
def test_random_shapes_hit_the_budget(dims: list[list[int]], sparsity: float, distribution: str) -> None:
    shapes = {f"t{i}": tuple(d) for i, d in enumerate(dims)}
    got = layer_densities(shapes, sparsity, distribution)
    ref = _reference(shapes, sparsity, distribution)
    numel = {k: math.prod(s) for k, s in shapes.items()}
    assert sum(got[k] * numel[k] for k in got) == pytest.approx(
        (1 - sparsity) * sum(numel.values()), abs=1e-6
    )
    for k in shapes:
        assert got[k] == pytest.approx(ref[k], abs=1e-7)


def test_accepts_masks_mapping_and_model_with_include() -> None:
    model = _lenet5()
    sparsify(model, 0.0)
    a = layer_densities({k: v.shape for k, v in masks(model).items()}, 0.9, "erk")
    b = layer_densities(model, 0.9, "erk")
    assert a == b
    only_linear = layer_densities(model, 0.9, "erk", include=nn.Linear)
    assert sorted(only_linear) == ["7.weight", "9.weight"]


@pytest.mark.parametrize("distribution", ["er", "erk", "uniform"])
def test_sparsify_distribution_uses_layer_counts(distribution: str) -> None:
    torch.manual_seed(0)
    model = _lenet5()
    dens = layer_densities(model, 0.9, distribution)
    sparsify(model, 0.9, distribution=distribution)
    for name, m in masks(model).items():
        n = m.numel()
        assert int((~m).sum()) == round((1 - dens[name]) * n), name
        # within each tensor the kept entries are the largest magnitudes
        w = (
            dict(model.named_modules())[name[: -len(".weight")]]
            .parametrizations.weight.original.detach()
            .abs()
        )
        if 0 < int(m.sum()) < n:
            assert w[m].min() >= w[~m].max()


def test_bad_inputs() -> None:
    model = _lenet5()
    with pytest.raises(ValueError, match="distribution"):
        layer_densities(model, 0.5, "erdos")
    with pytest.raises(ValueError, match="sparsity"):
        layer_densities(model, 1.5, "erk")
    with pytest.raises(TypeError, match="model"):
        layer_densities([1, 2], 0.5)  # type: ignore[arg-type]
    with pytest.raises(NoTargetsError):
        layer_densities(nn.ReLU(), 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="distribution"):
        sparsify(model, 0.5, distribution="nope")
    assert not hasattr(model[0], "parametrizations")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
