"""Fake quantization chained after masks: exact levels, zeros kept, straight-through gradient, checkpoints."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from hadamard_sparse.api import masks, register_mask, remove_parametrizations, sparsify
from hadamard_sparse.checkpoint import load_sparse_state_dict
from hadamard_sparse.factorization import register_factorization
from hadamard_sparse.layers import resolve_targets, weight_dims
from hadamard_sparse.quantization import FakeQuant, fake_quantize, register_fake_quant
from tests.conftest import LAYER_CASES, LayerCase, mlp, small_cnn


def _np_fake_quant(x: np.ndarray, bits: int, channel_dim: int | None) -> np.ndarray:
    """Reference symmetric quantizer, one channel at a time in numpy."""
    qmax = 2 ** (bits - 1) - 1
    x = x.astype(np.float32)
    if channel_dim is None or x.ndim < 2:
        slices = [x]
    else:
        slices = [np.take(x, i, axis=channel_dim) for i in range(x.shape[channel_dim])]
    out = []
    for s in slices:
        amax = np.float32(np.abs(s).max()) if s.size else np.float32(0)
        scale = np.float32(amax / np.float32(qmax)) if amax > 0 else np.float32(1)
        out.append(np.clip(np.round(s / scale), -qmax, qmax).astype(np.float32) * scale)
    if channel_dim is None or x.ndim < 2:
        return out[0]
    return np.stack(out, axis=channel_dim)


def _channels(w: torch.Tensor, dim: int) -> list[torch.Tensor]:
    return [w.select(dim, i) for i in range(w.shape[dim])]


@pytest.mark.parametrize("bits", [3, 8])
def test_baked_levels_match_reference_and_keep_zeros(layer_case: LayerCase, bits: int) -> None:
    model = layer_case.make()
    sparsify(model, 0.6, seed=0)
    kept = {k: v.clone() for k, v in masks(model).items()}
    fake_quantize(model, bits)
    x = layer_case.input()
    with torch.no_grad():
        before = {t.qualified: t.value().clone() for t in resolve_targets(model)}
        dense_masked = {}
        for t in resolve_targets(model):
            plist = t.module.parametrizations[t.tensor_name]
            dense_masked[t.qualified] = (plist.original * plist[0].mask).clone()
        y = model(x)
    remove_parametrizations(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    targets = resolve_targets(model)
    assert len(targets) == layer_case.n_targets
    for t in targets:
        w = t.value().detach()
        assert not parametrize.is_parametrized(t.module, t.tensor_name)
        assert torch.equal(w, before[t.qualified])
        # Every pruned entry is exactly zero after quantization.
        assert torch.all(w[~kept[t.qualified]] == 0)
        out_dim = weight_dims(t.module, t.tensor_name)[0]
        ref = _np_fake_quant(dense_masked[t.qualified].numpy(), bits, out_dim)
        np.testing.assert_allclose(w.numpy(), ref, rtol=1e-6, atol=0)
        for ch in _channels(w, out_dim):
            assert ch.unique().numel() <= 2**bits - 1


def test_per_tensor_levels_and_channel_dim_of_transposed_conv() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(40, 30)
    register_mask(lin, "weight", torch.rand(30, 40) > 0.3)
    fq = register_fake_quant(lin, bits=3, per_channel=False)
    assert fq.channel_dim is None
    assert lin.weight.unique().numel() <= 2**3 - 1
    convt = nn.ConvTranspose2d(3, 5, 3)
    assert register_fake_quant(convt, bits=4).channel_dim == 1
    w = convt.weight.detach()
    ref = _np_fake_quant(convt.parametrizations.weight.original.detach().numpy(), 4, 1)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-6, atol=0)


def test_all_zero_channel_stays_zero_without_nan() -> None:
    lin = nn.Linear(5, 3)
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1] = False
    register_mask(lin, "weight", keep)
    register_fake_quant(lin, bits=4)
    w = lin.weight.detach()
    assert torch.isfinite(w).all()
    assert torch.all(w[1] == 0)


@pytest.mark.parametrize("case", LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def test_straight_through_gradient_is_mask_times_dense_gradient(case: LayerCase) -> None:
    torch.manual_seed(1)
    model = case.make()
    sparsify(model, 0.5, seed=1)
    fake_quantize(model, 4)
    baked = remove_parametrizations(copy.deepcopy(model))
    x = case.input()
    model(x).square().sum().backward()
    baked(x).square().sum().backward()
    ref = {t.qualified: t.value().grad for t in resolve_targets(baked)}
    kept = masks(model)
    for t in resolve_targets(model):
        g = t.module.parametrizations[t.tensor_name].original.grad
        expected = ref[t.qualified] * kept[t.qualified]
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)


def test_fake_quant_gradient_is_identity() -> None:
    fq = FakeQuant(bits=3, channel_dim=0)
    x = torch.randn(4, 6, requires_grad=True)
    g = torch.randn(4, 6)
    fq(x).backward(g)
    assert torch.equal(x.grad, g)


def _digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:512], dtype=torch.float32) / 16.0
    y = torch.tensor(d.target[:512])
    return x, y


def test_training_through_the_chain_reduces_loss_and_keeps_levels() -> None:
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    x, y = _digits_batch()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    sparsify(model, 0.7, seed=0)
    fake_quantize(model, 4)
    kept = {k: v.clone() for k, v in masks(model).items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    remove_parametrizations(model)
    acc = float((model(x).argmax(1) == y).float().mean())
    assert acc > 0.8
    for name, keep in kept.items():
        w = model.get_submodule(name.rpartition(".")[0]).weight.detach()
        assert torch.all(w[~keep] == 0)
        for row in w:
            assert row.unique().numel() <= 15


@pytest.mark.parametrize("make", [mlp, small_cnn], ids=["mlp", "cnn"])
def test_state_dict_round_trip_and_rebuild(make: type[nn.Module]) -> None:
    torch.manual_seed(2)
    model = make()
    sparsify(model, 0.8, seed=0)
    fake_quantize(model, 5, per_channel=True)
    x = torch.randn(3, 8) if make is mlp else torch.randn(2, 1, 8, 8)
    y = model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)

    torch.manual_seed(99)
    fresh = load_sparse_state_dict(make(), sd)
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    chains = [
        list(pl)
        for m in fresh.modules()
        if parametrize.is_parametrized(m)
        for pl in m.parametrizations.values()
    ]
    assert chains and all(isinstance(c[-1], FakeQuant) and c[-1].bits == 5 for c in chains)

    # Loading into an already parametrized model (same chain) with strict=True.
    torch.manual_seed(98)
    other = fake_quantize(sparsify(make(), 0.5), 5)
    other.load_state_dict(sd, strict=True)
    torch.testing.assert_close(other(x), y, rtol=0, atol=0)


def test_dense_checkpoint_loads_into_quantized_model() -> None:
    torch.manual_seed(3)
    dense = mlp()
    model = fake_quantize(sparsify(mlp(), 0.5), 8)
    model.load_state_dict(dense.state_dict(), strict=True)
    for (name, keep), lin in zip(
        masks(model).items(), [m for m in dense.modules() if isinstance(m, nn.Linear)]
    ):
        module = model.get_submodule(name.rpartition(".")[0])
        assert torch.equal(module.parametrizations.weight.original, lin.weight)
        ref = _np_fake_quant((lin.weight * keep).detach().numpy(), 8, 0)
        np.testing.assert_allclose(module.weight.detach().numpy(), ref, rtol=1e-6, atol=0)


def test_composes_with_factorization() -> None:
    torch.manual_seed(4)
    lin = nn.Linear(6, 4)
    register_factorization(lin, depth=2)
    register_mask(lin, "weight", torch.rand(4, 6) > 0.5)
    register_fake_quant(lin, bits=4)
    plist = lin.parametrizations.weight
    u, v = plist.original0, plist.original1
    dense = (u * v * plist[1].mask).detach().numpy()
    np.testing.assert_allclose(lin.weight.detach().numpy(), _np_fake_quant(dense, 4, 0), rtol=1e-6, atol=0)
    lin(torch.randn(2, 6)).sum().backward()
    assert u.grad is not None and v.grad is not None
    assert torch.all(u.grad[~plist[1].mask] == 0)
    remove_parametrizations(lin)
    assert type(lin) is nn.Linear


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"bits": 1}, ValueError, "bits"),
        ({"bits": 17}, ValueError, "bits"),
        ({"bits": 8.0}, TypeError, "bits"),
        ({"bits": True}, TypeError, "bits"),
        ({"per_channel": "yes"}, TypeError, "per_channel"),
        ({"name": "nope"}, ValueError, "name"),
        ({"name": "bias", "bits": 0}, ValueError, "bits"),
    ],
)
def test_bad_arguments_leave_module_unchanged(kwargs: dict, exc: type[Exception], words: str) -> None:
    lin = nn.Linear(4, 3)
    sd = copy.deepcopy(lin.state_dict())
    with pytest.raises(exc, match=words):
        register_fake_quant(lin, **kwargs)
    assert not parametrize.is_parametrized(lin)
    assert all(torch.equal(v, sd[k]) for k, v in lin.state_dict().items())


def test_refuses_second_fake_quant_and_buffers() -> None:
    lin = nn.Linear(4, 3)
    register_fake_quant(lin)
    with pytest.raises(ValueError, match="already has a FakeQuant"):
        register_fake_quant(lin)
    bn = nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="Parameter"):
        register_fake_quant(bn, "running_mean")
    model = mlp()
    register_fake_quant(model[2])
    with pytest.raises(ValueError, match="already has a FakeQuant"):
        fake_quantize(model)
    assert not parametrize.is_parametrized(model[0])
