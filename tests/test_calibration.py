"""Calibration, Wanda, SparseGPT and the per-row scope, against independent references."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse import layers
from hadamard_sparse._engine import compute_keep_masks
from hadamard_sparse.calibration import ActivationStats, calibrate
from hadamard_sparse.errors import InvalidArgumentError
from hadamard_sparse.sparsegpt import obs_prune
from tests.conftest import LAYER_CASES, Conv1D, LayerCase
from tests.hf_models import bert_config

# --------------------------------------------------------------------------- reference input norms


def _jacobian_sq_sum(fn, w: torch.Tensor, inputs: list) -> torch.Tensor:
    """sum over calls and outputs of (d out / d w)^2: the squared input that multiplies each weight entry."""
    total = torch.zeros_like(w, dtype=torch.float64)
    for x in inputs:
        j = torch.func.jacfwd(lambda ww, x=x: fn(x, ww))(w.double())
        total += j.reshape(-1, w.numel()).square().sum(0).reshape(w.shape)
    return total


_CASES = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 4, 6), lambda m, x, w: F.linear(x, w)),
    "hf_conv1d": (lambda: Conv1D(5, 6), lambda: torch.randn(2, 3, 6), lambda m, x, w: x @ w),
    "conv1d": (
        lambda: nn.Conv1d(4, 6, 3, padding=1, stride=2, groups=2),
        lambda: torch.randn(2, 4, 7),
        lambda m, x, w: F.conv1d(x, w, None, m.stride, m.padding, m.dilation, m.groups),
    ),
    "conv2d": (
        lambda: nn.Conv2d(3, 4, (2, 3), padding=1, dilation=(1, 2)),
        lambda: torch.randn(2, 3, 5, 6),
        lambda m, x, w: F.conv2d(x, w, None, m.stride, m.padding, m.dilation, m.groups),
    ),
    "conv2d_reflect": (
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        lambda: torch.randn(1, 2, 4, 4),
        lambda m, x, w: F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w),
    ),
    "conv3d": (
        lambda: nn.Conv3d(2, 2, 2),
        lambda: torch.randn(1, 2, 3, 3, 3),
        lambda m, x, w: F.conv3d(x, w),
    ),
    "convT2d": (
        lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, groups=1),
        lambda: torch.randn(2, 4, 3, 3),
        lambda m, x, w: F.conv_transpose2d(x, w, None, m.stride),
    ),
    "convT1d_groups": (
        lambda: nn.ConvTranspose1d(4, 6, 3, groups=2),
        lambda: torch.randn(2, 4, 5),
        lambda m, x, w: F.conv_transpose1d(x, w, None, groups=2),
    ),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_input_norms_match_jacobian_reference(case: str) -> None:
    torch.manual_seed(0)
    make, make_x, fn = _CASES[case]
    layer = make()
    xs = [make_x() for _ in range(3)]
    stats = calibrate(layer, xs)
    st = stats["weight"]
    w = layer.weight.detach()
    ref = _jacobian_sq_sum(lambda x, ww: fn(layer, x.double(), ww), w, xs)
    torch.testing.assert_close(st.norms_like_weight().double(), ref.sqrt(), rtol=1e-5, atol=1e-6)
    # and the wanda score is |W| times that
    keep = compute_keep_masks(layers.resolve_targets(layer), 0.5, method="wanda", scope="layer", stats=stats)[
        0
    ]
    score = (w.double().abs() * ref.sqrt()).reshape(-1).numpy()
    n = round(0.5 * score.size)
    ref_keep = np.ones(score.size, dtype=bool)
    ref_keep[np.argsort(score, kind="stable")[:n]] = False
    np.testing.assert_array_equal(keep.reshape(-1).numpy(), ref_keep)


def test_mha_in_proj_blocks_use_query_key_value() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 5, 4) * 3, torch.randn(2, 5, 4) * 0.5

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.mha(q, k, v, need_weights=False)[0]

    with pytest.warns(UserWarning, match="out_proj"):
        stats = calibrate(Wrap(), [(q, k, v)])
    assert "mha.out_proj.weight" in stats.skipped
    got = stats["mha.in_proj_weight"].norms_like_weight()
    for block, x in enumerate((q, k, v)):
        ref = x.reshape(-1, 4).norm(dim=0)
        torch.testing.assert_close(got[4 * block : 4 * block + 4], ref.expand(4, 4))


def test_input_moments_match_numpy_and_refuse_statistics_without_sums() -> None:
    torch.manual_seed(0)
    xs = [torch.randn(2, 3, 4) * 2 + 1, torch.randn(1, 5, 4) - 0.5]  # batches of different lengths
    stats = calibrate(nn.Sequential(nn.Linear(4, 3)), xs)["0.weight"]
    rows = np.concatenate([x.reshape(-1, 4).double().numpy() for x in xs])
    mean, var = stats.input_moments()
    # per-call sums are float32 (accumulated in float64): float32 rounding of E[x] and E[x^2]
    np.testing.assert_allclose(mean[0].numpy(), rows.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var[0].numpy(), rows.var(0), rtol=0, atol=1e-6 * (rows**2).mean(0).max())
    with pytest.raises(InvalidArgumentError, match="0.weight: these statistics have no per-feature sums"):
        dataclasses.replace(stats, x_sum=None).input_moments()
    with pytest.raises(InvalidArgumentError, match="0.weight: these statistics have no input rows"):
        dataclasses.replace(stats, n_rows=0).input_moments()


# --------------------------------------------------------------------------- calibrate behaviour


class _Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom")
        return self.fc(x)


def test_calibrate_removes_hooks_and_restores_mode_on_error() -> None:
    model = _Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        calibrate(model, [torch.randn(2, 4)] * 3)
    assert len(model.fc._forward_pre_hooks) == 0 and len(model._forward_pre_hooks) == 0
    assert model.training and model.fc.training
    stats = calibrate(nn.Sequential(nn.Linear(4, 4)).train(), [torch.randn(2, 4)])
    assert stats.n_batches == 1


def test_batches_as_tensor_tuple_and_dict_agree() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            out = self.a(x)
            return out if y is None else out + self.b(y)

    torch.manual_seed(0)
    model = Two()
    x, y = torch.randn(4, 3), torch.randn(4, 5)
    s_tuple = calibrate(model, [(x, y)], gram=True)
    s_dict = calibrate(model, [{"x": x, "y": y}], gram=True)
    s_tensor = calibrate(model, [x])
    for s in (s_tuple, s_dict, s_tensor):
        torch.testing.assert_close(s["a.weight"].sq_sum[0], x.double().square().sum(0))
    torch.testing.assert_close(s_dict["b.weight"].gram[0].double(), y.double().t() @ y.double())
    assert "b.weight" in s_tensor.skipped
    assert s_tuple["a.weight"].n_rows == 4


def test_calibrate_leaves_model_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    before = copy.deepcopy(model.state_dict())
    calibrate(model, [torch.randn(3, 4)], gram=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_calibrate_rejects_bad_batches() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(TypeError, match="batches"):
        calibrate(model, torch.randn(2, 4))
    with pytest.raises(TypeError, match="calibration batches"):
        calibrate(model, [3])


# --------------------------------------------------------------------------- sparsify integration


def _correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scale = torch.logspace(-1, 1, d)
    return (torch.randn(n, d, generator=g) @ mix) * scale + 0.05 * torch.randn(n, d, generator=g)


def test_sparsify_wanda_row_matches_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7))
    xs = [_correlated(10, 12, s) for s in range(3)]
    hs.sparsify(model, 0.4, method="wanda", calibration=xs)  # default scope for wanda: "row"
    w = model[0].parametrizations.weight.original.detach()
    norms = torch.cat(xs).norm(dim=0)
    score = (w.abs() * norms).numpy()
    k = round(0.4 * 12)
    for i in range(7):
        ref = np.ones(12, dtype=bool)
        ref[np.argsort(score[i], kind="stable")[:k]] = False
        np.testing.assert_array_equal(hs.masks(model)["0.weight"][i].numpy(), ref)


@pytest.mark.parametrize("case", LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def test_row_scope_exact_count_per_output_row(case: LayerCase) -> None:
    torch.manual_seed(0)
    model = case.make()
    hs.sparsify(model, 0.37, scope="row")
    for name, mask in hs.masks(model).items():
        mod_name, _, tname = name.rpartition(".")
        out_dim, _ = layers.weight_dims(model.get_submodule(mod_name) if mod_name else model, tname)
        rows = mask.movedim(out_dim, 0).reshape(mask.shape[out_dim], -1)
        assert ((~rows).sum(1) == round(0.37 * rows.shape[1])).all(), name


def test_data_aware_errors() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="needs calibration"):
        hs.sparsify(model, 0.5, method="wanda")
    with pytest.raises(ValueError, match="supports scope in"):
        hs.sparsify(model, 0.5, method="wanda", scope="global", calibration=[torch.randn(2, 4)])
    with pytest.raises(ValueError, match="supports scope in"):
        hs.sparsify(model, 0.5, method="sparsegpt", scope="global", calibration=[torch.randn(2, 4)])
    lstm = nn.Sequential(nn.Linear(4, 4))
    lstm.append(nn.LSTM(4, 3))
    with pytest.raises(ValueError, match=r"1\.weight_ih_l0"):
        hs.sparsify(lstm, 0.5, method="wanda", calibration=[torch.randn(2, 4)])
    assert not hs.masks(lstm) and not hs.masks(model)
    assert torch.equal(model[0].weight, before[0].weight)


def test_transformer_layer_out_proj_must_be_excluded() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    xs = [torch.randn(2, 5, 8) for _ in range(2)]
    with pytest.raises(ValueError, match="out_proj"):
        hs.sparsify(layer, 0.5, method="wanda", calibration=xs)
    assert not hs.masks(layer)
    for method in ("wanda", "sparsegpt"):
        m = copy.deepcopy(layer)
        hs.sparsify(m, 0.5, method=method, calibration=xs, exclude="self_attn.out_proj")
        assert sorted(hs.masks(m)) == ["linear1.weight", "linear2.weight", "self_attn.in_proj_weight"]
        for mask in hs.masks(m).values():
            assert int((~mask).sum()) == mask.numel() // 2


def test_calibration_stats_are_reusable_and_checked() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    xs = [torch.randn(6, 8) for _ in range(2)]
    stats = calibrate(model, xs)
    assert isinstance(stats, ActivationStats) and not stats.has_gram
    a = hs.sparsify(copy.deepcopy(model), 0.5, method="wanda", calibration=stats)
    b = hs.sparsify(copy.deepcopy(model), 0.5, method="wanda", calibration=xs)
    for k, v in hs.masks(a).items():
        assert torch.equal(v, hs.masks(b)[k])
    with pytest.raises(ValueError, match="Gram"):
        hs.sparsify(copy.deepcopy(model), 0.5, method="sparsegpt", calibration=stats)
    partial = calibrate(model, xs, include="0.*")
    with pytest.raises(ValueError, match=r"2\.weight"):
        hs.sparsify(copy.deepcopy(model), 0.5, method="wanda", calibration=partial)


# --------------------------------------------------------------------------- sparsegpt


def _recon_error(x: torch.Tensor, w: torch.Tensor, w_sparse: torch.Tensor) -> float:
    return float((x @ (w - w_sparse).t()).square().sum())


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_sparsegpt_beats_mask_only_on_correlated_inputs(scope: str) -> None:
    torch.manual_seed(0)
    d_in, d_out = 32, 12
    layer = nn.Linear(d_in, d_out, bias=False)
    xs = [_correlated(48, d_in, s) for s in range(3)]
    x_test = torch.cat(xs)
    w = layer.weight.detach().clone()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = copy.deepcopy(layer)
        sc = scope if method != "magnitude" or scope == "row" else "layer"
        hs.sparsify(m, 0.5, method=method, scope=sc, calibration=xs)
        mask = hs.masks(m)["weight"]
        if scope == "row":
            assert ((~mask).sum(1) == d_in // 2).all()
        assert int((~mask).sum()) == d_in * d_out // 2
        errors[method] = _recon_error(x_test, w, m.weight.detach())
        if method == "sparsegpt":  # pruned entries of original keep their dense values
            orig = m.parametrizations.weight.original.detach()
            assert torch.equal(orig[~mask], w[~mask]) and not torch.equal(orig[mask], w[mask])
            # the best possible reconstruction for that mask: least squares on the kept entries
            best = torch.zeros_like(w)
            for i in range(d_out):
                keep = mask[i]
                sol = torch.linalg.lstsq(x_test[:, keep].double(), (x_test @ w[i]).double()).solution
                best[i, keep] = sol.float()
            assert _recon_error(x_test, w, best) <= errors["sparsegpt"] * (1 + 1e-4)
    assert errors["sparsegpt"] < min(errors["wanda"], errors["magnitude"])
    assert errors["wanda"] < errors["magnitude"]


def test_obs_prune_zero_sparsity_and_exact_counts() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 150)  # two column blocks of 128 and 22
    x = _correlated(200, 150)
    h = x.double().t() @ x.double()
    new, keep = obs_prune(w, h, 0.0)
    assert keep.all() and torch.allclose(new, w)
    for sp in (0.1, 0.33, 0.9):
        new, keep = obs_prune(w, h, sp, scope="row")
        assert ((~keep).sum(1) == round(sp * 150)).all()
        assert (new[~keep] == 0).all()
        new, keep = obs_prune(w, h, sp, scope="layer")
        assert int((~keep).sum()) == round(sp * 600)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("layer_id", ["linear", "conv2d", "hf_conv1d"])
def test_two_four_with_data_aware_methods(method: str, layer_id: str) -> None:
    torch.manual_seed(0)
    make = {
        "linear": (lambda: nn.Linear(8, 6), lambda: torch.randn(5, 8)),
        "conv2d": (lambda: nn.Conv2d(8, 4, 3, padding=1), lambda: torch.randn(2, 8, 5, 5)),
        "hf_conv1d": (lambda: Conv1D(6, 8), lambda: torch.randn(2, 5, 8)),
    }[layer_id]
    layer = make[0]()
    xs = [make[1]() for _ in range(3)]
    hs.sparsify(layer, method=method, calibration=xs, structure="2:4")
    mask = hs.masks(layer)["weight"]
    _, in_dim = layers.weight_dims(layer, "weight")
    groups = mask.movedim(in_dim, -1).reshape(-1, 4)
    assert ((~groups).sum(1) == 2).all()
    if method == "wanda" and layer_id == "linear":  # N:M selection uses the wanda scores
        score = layer.parametrizations.weight.original.abs() * torch.cat(xs).norm(dim=0)
        ref = score.reshape(-1, 4).argsort(dim=1, stable=True)[:, :2]
        pruned = torch.zeros(score.numel() // 4, 4, dtype=torch.bool).scatter_(1, ref, True)
        assert torch.equal(~mask.reshape(-1, 4), pruned)


def test_sparsegpt_refuses_partial_nm_and_other_structures() -> None:
    layer = nn.Linear(8, 4)
    xs = [torch.randn(4, 8)]
    with pytest.raises(ValueError, match="N/M"):
        hs.sparsify(layer, 0.25, method="sparsegpt", calibration=xs, structure="2:4")
    with pytest.raises(ValueError, match="structure"):
        hs.sparsify(layer, 0.5, method="sparsegpt", calibration=xs, structure="row", scope="layer")
    assert not hs.masks(layer)


@pytest.mark.parametrize("structure", ["row", "column", hs.Block(2, 2)])
def test_default_row_scope_refusal_names_the_method_default_and_the_fix(structure: object) -> None:
    """A structure the method's default scope="row" cannot take: the message says where 'row' came from."""
    layer = nn.Linear(8, 4)
    before = copy.deepcopy(layer.state_dict())
    xs = [torch.randn(4, 8)]
    with pytest.raises(hs.InvalidArgumentError) as info:
        hs.sparsify(layer, 0.5, method="sparsegpt", calibration=xs, structure=structure)
    msg = str(info.value)
    assert "method 'sparsegpt' supports structure None or 'N:M'" in msg and "scope='row'" not in msg
    assert "method='wanda' with scope='layer'" in msg
    with pytest.raises(hs.InvalidArgumentError) as info:
        hs.sparsify(layer, 0.5, method="wanda", calibration=xs, structure=structure)
    msg = str(info.value)
    assert "method 'wanda' prunes with scope='row' (per output row) by default" in msg
    assert "pass scope='layer'" in msg
    # the suggested call works, and the refused calls left the layer as it was
    assert not hs.masks(layer) and all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    hs.sparsify(layer, 0.5, method="wanda", calibration=xs, structure=structure, scope="layer")
    assert hs.sparsity_report(layer).sparsity == pytest.approx(0.5)
    with pytest.raises(hs.InvalidArgumentError, match=r"scope='row' with a structure needs an 'N:M'.*scope="):
        hs.sparsify(nn.Linear(8, 4), 0.5, structure=structure, scope="row")


def test_wanda_mask_only_score_for_sparsegpt_stats() -> None:
    """compute_keep_masks(method='sparsegpt') is the mask-only OBS saliency w^2 / [H^-1]_jj^2."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    xs = [_correlated(20, 6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = calibrate(layer, xs, gram=True)
    keep = compute_keep_masks(
        layers.resolve_targets(layer), 0.5, method="sparsegpt", scope="row", stats=stats
    )[0]
    h = torch.cat(xs).double().t() @ torch.cat(xs).double()
    h += 0.1 * torch.diag(h.diagonal())  # the default dampening
    d = torch.linalg.cholesky(torch.linalg.inv(h), upper=True).diagonal()
    sal = layer.weight.detach().double().square() / d.square()
    ref = torch.ones(3, 6, dtype=torch.bool).scatter_(1, sal.argsort(dim=1)[:, :3], False)
    assert torch.equal(keep, ref)


class _Branchy(nn.Module):
    """Two projections of the same input (one sparsegpt wave), then a third layer on their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.a(x) + self.b(x)))


def test_sequential_sparsegpt_equals_layer_by_layer_reference() -> None:
    torch.manual_seed(0)
    model = _Branchy()
    xs = [_correlated(16, 8, s) for s in range(3)]
    ref = copy.deepcopy(model)
    hs.sparsify(model, 0.5, method="sparsegpt", calibration=xs)
    for name in ("a", "b", "c"):  # reference: re-calibrate before each layer, prune it alone
        stats = calibrate(ref, xs, include=f"{name}.weight", gram=True)
        hs.sparsify(ref, 0.5, method="sparsegpt", calibration=stats, include=f"{name}.weight")
    for name in ("a", "b", "c"):
        got = getattr(model, name).parametrizations.weight.original
        want = getattr(ref, name).parametrizations.weight.original
        torch.testing.assert_close(got, want)
        assert torch.equal(hs.masks(model)[f"{name}.weight"], hs.masks(ref)[f"{name}.weight"])


# --------------------------------------------------------------------------- refused calls change nothing


class _Overflow(nn.Module):
    """Scales its input past float32's range, so the next layer's Gram matrix holds inf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1e30


def _snapshot(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor], list[type]]:
    sd = model.state_dict()
    return list(sd), copy.deepcopy(dict(sd)), [type(m) for m in model.modules()]


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("given", ["batches", "stats"])
@pytest.mark.parametrize("masked_before", [False, True])
def test_sparsegpt_refused_midway_leaves_model_unchanged(given: str, masked_before: bool) -> None:
    """The last layer's Gram matrix is not positive definite: the earlier layers are put back too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), _Overflow(), nn.Linear(8, 4))
    if masked_before:
        hs.sparsify(model, 0.25)
    keys, before, classes = _snapshot(model)
    xs = [torch.randn(16, 8) for _ in range(3)]
    calibration = calibrate(model, xs, gram=True) if given == "stats" else xs
    with pytest.raises(hs.HadamardSparseError, match="not positive definite"):
        hs.sparsify(model, 0.5, method="sparsegpt", calibration=calibration)
    after = model.state_dict()
    assert list(after) == keys
    assert all(_same(before[k], after[k]) for k in keys)
    assert [type(m) for m in model.modules()] == classes
    n_masks = 3 if masked_before else 0
    assert len(hs.masks(model)) == n_masks
    # and the model still prunes normally once the bad layer is excluded
    hs.sparsify(model, 0.5, method="sparsegpt", calibration=xs, exclude="4")
    assert hs.masks(model)["0.weight"].float().mean().item() == pytest.approx(0.5)


def test_calibrate_include_exclude_and_deprecated_targets() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    xs = [torch.randn(3, 6)]
    assert list(calibrate(model, xs, include="0.*")) == ["0.weight"]
    assert list(calibrate(model, xs, exclude="0.*")) == ["2.weight"]
    with pytest.warns(DeprecationWarning, match="use include="):
        old = calibrate(model, xs, targets="0.*")
    assert list(old) == ["0.weight"]
    with pytest.raises(ValueError, match="pass only include"):
        calibrate(model, xs, targets="0.*", include="2.*")
    with pytest.raises(hs.InvalidArgumentError, match="include entry 'nothing' matches no targetable tensor"):
        calibrate(model, xs, include="nothing")


# --------------------------------------------------------------------------- batches the model cannot take


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "sparsegpt_block", None])
def test_wrong_width_batch_names_the_batch_the_call_and_chains_the_cause(method: str | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    before = _state(model)
    batches = [torch.randn(4, 8), torch.randn(4, 12)]  # the second one is too wide
    with pytest.raises(hs.CalibrationError) as info:
        if method is None:
            calibrate(model, batches)
        else:
            hs.sparsify(model, 0.5, method=method, calibration=batches)
    err = info.value
    assert isinstance(err, RuntimeError) and isinstance(
        err, hs.HadamardSparseError
    )  # the original category too
    assert isinstance(err.__cause__, RuntimeError) and not isinstance(err.__cause__, hs.HadamardSparseError)
    msg = str(err)
    assert "calibration batch 1 (0-based" in msg and "model(batch)" in msg and "Tensor(4, 12) float32" in msg
    assert str(err.__cause__) in msg
    # refused before anything changed: no mask, same weights, no hook left behind
    assert hs.masks(model) == {}
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_tuple_and_dict_batches_say_how_the_model_was_called() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(
        hs.CalibrationError, match=r"batch 0 .*model\(\*batch\) with batch = \(Tensor\(2, 4\) float32, Tensor"
    ):
        calibrate(model, [(torch.randn(2, 4), torch.randn(2, 4))])
    with pytest.raises(
        TypeError, match=r"model\(\*\*batch\) with batch = dict\(x=Tensor\(2, 4\) float32\)"
    ) as info:
        calibrate(model, [{"x": torch.randn(2, 4)}])
    assert isinstance(info.value, hs.CalibrationError) and isinstance(info.value.__cause__, TypeError)


def _tiny_sentence_transformer(tmp_path) -> nn.Module:  # type: ignore[no-untyped-def]
    """A SentenceTransformer around a 2-layer BERT from a tiny config (MiniLM's tokenizer; no download)."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from transformers import BertModel

    from tests.conftest import minilm_path

    with warnings.catch_warnings():  # sentence-transformers >= 6 moved the module classes
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers.models import Pooling, Transformer

    tok = minilm_path()
    torch.manual_seed(0)
    config = bert_config(vocab_size=30522, max_position_embeddings=512)

    BertModel(config).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = Transformer(str(tmp_path), tokenizer_name_or_path=tok)
        return SentenceTransformer(modules=[first, Pooling(32)], device="cpu").eval()


@pytest.mark.slow  # importing sentence-transformers alone takes seconds
def test_sentence_transformer_given_tokenizer_dicts_gets_the_hint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    st = _tiny_sentence_transformer(tmp_path)
    texts = ["A man is playing a guitar.", "A cat sits on the mat."]
    features = st.tokenize(texts)
    before = _state(st)
    with pytest.raises(hs.CalibrationError) as info:
        hs.sparsify(st, 0.5, method="wanda", calibration=[dict(features)])
    msg = str(info.value)
    assert isinstance(info.value, TypeError) and isinstance(info.value.__cause__, TypeError)
    assert "calibration batch 0 (0-based" in msg and "model(**batch)" in msg and "input_ids=Tensor" in msg
    assert "st[0].auto_model" in msg and "(st.tokenize(texts),)" in msg
    assert hs.masks(st) == {}
    after = st.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # what the hint says works: one dict of features per batch, as a 1-tuple
    with torch.no_grad():
        dense = st(dict(features))["sentence_embedding"]
    hs.sparsify(st, 0.5, method="wanda", calibration=[(features,)])
    assert len(hs.masks(st)) == 2 * 6 + 1  # q, k, v, out, ffn in, ffn out per layer, and the pooler
    with torch.no_grad():
        pruned = st(dict(features))["sentence_embedding"]
    assert pruned.shape == dense.shape and not torch.equal(pruned, dense)


def test_sentence_transformer_hint_by_class_name() -> None:
    """The fast stand-in of the test above: the hint is keyed on the class name, as no import is needed."""

    class SentenceTransformer(nn.Sequential):  # the real one's forward takes one dict of features
        def forward(self, input: dict) -> torch.Tensor:
            return super().forward(input["x"])

    st = SentenceTransformer(nn.Linear(4, 2))
    with pytest.raises(hs.CalibrationError, match=r"st\[0\]\.auto_model") as info:
        calibrate(st, [{"x": torch.randn(2, 4)}])
    assert "model(**batch)" in str(info.value) and isinstance(info.value, TypeError)
    assert list(calibrate(st, [({"x": torch.randn(2, 4)},)])) == ["0.weight"]  # the hinted form works
