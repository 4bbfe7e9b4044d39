"""RIA and DSnoT: the training-free one-shot methods ``"ria"`` and ``"dsnot"`` (issue 14, part 2)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse import _select
from hadamard_sparse.calibration import calibrate
from hadamard_sparse.cli import build_parser
from hadamard_sparse.dsnot import dsnot_rows, expected_error
from hadamard_sparse.errors import InvalidArgumentError
from hadamard_sparse.layers import resolve_targets, weight_dims
from hadamard_sparse.ria import channel_permutation, permuted_nm_keep
from hadamard_sparse.scores import ScoreContext, get_score
from tests.conftest import LAYER_CASES, LayerCase, minilm_path
from tests.hf_models import bert_config, transformers
from tests.test_dsnot import dsnot_row_reference


def _numpy_ria(w: np.ndarray, x: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RIA of the paper, straight from its formula: ``w`` is ``(out, in)``, ``x`` the ``(rows, in)`` inputs."""
    a = np.abs(w)
    rel = a / a.sum(axis=1, keepdims=True) + a / a.sum(axis=0, keepdims=True)
    return rel * np.sqrt((x**2).sum(axis=0)) ** alpha


class _HFConv1DNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = transformers.pytorch_utils.Conv1D(12, 8)  # weight stored (in, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x)


def _ria_case(case: int) -> tuple[nn.Module, str]:
    """The model and the name of its layer: 0 a Linear, 1 Hugging Face's Conv1D (needs transformers)."""
    return (nn.Sequential(nn.Linear(8, 12)), "0") if case == 0 else (_HFConv1DNet(), "c")


@pytest.mark.parametrize("case", range(2), ids=["linear", "hf_conv1d"])
def test_ria_score_equals_numpy_formula(case: int) -> None:
    torch.manual_seed(case)
    model, mod_name = _ria_case(case)
    x = [torch.randn(5, 8) * torch.linspace(0.1, 3.0, 8) for _ in range(3)]
    stats = calibrate(model, x)
    mod = model.get_submodule(mod_name)
    w = mod.weight.detach().double().numpy()
    w_oi = w.T if case == 1 else w  # (out, in)
    expect = _numpy_ria(w_oi, torch.cat(x).double().numpy())
    expect = expect.T if case == 1 else expect
    name = resolve_targets(model)[0].qualified
    ctx = ScoreContext(name, mod, "weight", mod.weight.detach(), 0, stats[name])
    np.testing.assert_allclose(get_score("ria").fn(ctx).double().numpy(), expect, rtol=1e-5)


def test_ria_score_on_mha_in_proj_treats_q_k_v_as_separate_matrices() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    q, k, v = (torch.randn(2, 5, 8) * s for s in (1.0, 2.0, 0.5))
    stats = calibrate(mha, [(q, k, v)], exclude="out_proj")
    w = mha.in_proj_weight.detach().double().numpy()
    ctx = ScoreContext(
        "in_proj_weight", mha, "in_proj_weight", mha.in_proj_weight.detach(), 0, stats["in_proj_weight"]
    )
    got = get_score("ria").fn(ctx).double().numpy()
    for i, x in enumerate((q, k, v)):
        ref = _numpy_ria(w[8 * i : 8 * (i + 1)], x.reshape(-1, 8).double().numpy())
        np.testing.assert_allclose(got[8 * i : 8 * (i + 1)], ref, rtol=1e-5)


def _tiny_bert() -> nn.Module:
    cfg = bert_config(hidden_size=16, intermediate_size=32, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _ids(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 64, (2, 9), generator=g)} for _ in range(n)]


def _is_nm(keep: torch.Tensor, n: int, m: int) -> bool:
    groups = keep.reshape(keep.shape[0], -1, m)
    return bool(((~groups).sum(-1) == n).all())


@pytest.mark.parametrize("method", ["ria", "dsnot"])
def test_nm_results_are_valid_nm_masks_in_original_column_order(method: str) -> None:
    model = _tiny_bert()
    hs.sparsify(model, method=method, structure="2:4", calibration=_ids(4, 0))
    ms = hs.masks(model)
    assert len(ms) == 13
    for name, keep in ms.items():
        assert _is_nm(keep, 2, 4), name


def test_channel_permutation_is_a_balanced_permutation_and_permuted_nm_counts_hold() -> None:
    torch.manual_seed(0)
    scores = torch.rand(6, 16) * torch.linspace(0.1, 4.0, 16)  # later columns more important
    perm = channel_permutation(scores, 4)
    assert sorted(perm.tolist()) == list(range(16))
    order = scores.sum(0).argsort(descending=True)
    for band in range(4):  # every group holds exactly one column of each importance band
        members = set(order[4 * band : 4 * (band + 1)].tolist())
        assert all(len(members & set(perm[4 * g : 4 * (g + 1)].tolist())) == 1 for g in range(4))
    keep = permuted_nm_keep(scores, 2, 4, perm)
    assert _is_nm(keep[:, perm], 2, 4)  # N:M in the permuted order, mapped back to the original columns
    for r in range(6):  # and in each permuted group the kept ones are the 2 best
        for g in range(4):
            cols = perm[4 * g : 4 * (g + 1)]
            best = set(cols[scores[r, cols].argsort(descending=True)[:2]].tolist())
            assert set(cols[keep[r, cols]].tolist()) == best


def test_permutation_functions_refuse_bad_arguments_naming_them() -> None:
    scores = torch.rand(3, 8)
    bad = [
        ((scores, 5, 4), "n must be an int in \\[0, m=4\\], got n=5"),  # used to give an all-pruned mask
        ((scores, -1, 4), "got n=-1"),
        ((scores, 2, 3), "m must be a positive int dividing the number of columns 8, got m=3"),
        ((scores[0], 2, 4), "scores must be a 2-D"),
        ((scores, 2, 4, torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])), "perm must be a permutation of the 8"),
        ((scores, 2, 4, torch.arange(4)), "perm must be a permutation"),
    ]
    for args, message in bad:
        with pytest.raises(InvalidArgumentError, match=message):
            permuted_nm_keep(*args)
    with pytest.raises(InvalidArgumentError, match="got m=True"):
        channel_permutation(scores, True)  # type: ignore[arg-type]
    # the identity permutation is plain N:M over consecutive groups (an independent reference)
    keep = permuted_nm_keep(scores, 2, 4, torch.arange(8))
    ref = scores.view(3, 2, 4) >= scores.view(3, 2, 4).sort(dim=2).values[:, :, 2:3]
    assert torch.equal(keep, ref.view(3, 8))


@pytest.fixture(scope="module")
def minilm_layer() -> tuple[torch.Tensor, object]:
    """An FFN output layer of the real all-MiniLM-L6-v2 and its statistics on real sentences."""
    path = minilm_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = [
        "The committee postponed its decision until the next meeting.",
        "Fresh basil and ripe tomatoes make a simple summer salad.",
        "Where can I find the nearest pharmacy that is open late?",
        "Oil prices climbed after the pipeline was damaged.",
        "The old dog limps but still loves his morning walk.",
        "Thunderstorms are forecast for the afternoon.",
        "Scientists found water ice in a crater on the moon.",
        "My phone battery drains faster since the last update.",
    ]
    name = "encoder.layer.3.output.dense.weight"
    stats = calibrate(
        model, [dict(tok([s], return_tensors="pt")) for s in sentences], include=name, gram=True
    )
    return model.get_submodule(name[: -len(".weight")]).weight.detach().clone(), stats[name]


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_dsnot_keeps_counts_and_never_raises_the_expected_error_on_real_data(minilm_layer, nm) -> None:
    w, st = minilm_layer
    mean, var = (t[0] for t in st.input_moments())
    # independent moments: from the sums calibrate keeps, compared with numpy on them
    np.testing.assert_allclose(mean.numpy(), st.x_sum[0].numpy() / st.n_rows)
    wanda = w.abs() * st.sq_sum[0].sqrt().float()
    start = _select.row_keep_mask(wanda if nm is None else wanda.reshape(-1, 4), 0.5, 0).reshape(w.shape)
    keep = dsnot_rows(w, start, mean, var, st.sq_sum[0], nm=nm, update_threshold=0.0)
    assert torch.equal(keep.sum(1), start.sum(1))
    if nm is not None:
        assert _is_nm(keep, *nm)
    assert int((keep != start).sum()) > 0  # it does swap on real data
    # reference expected error, in numpy: sum over pruned entries of W_ij * mean_j
    wn, mn = w.double().numpy(), mean.numpy()
    e0 = (wn * mn * ~start.numpy()).sum(1)
    e1 = (wn * mn * ~keep.numpy()).sum(1)
    assert (np.abs(e1) <= np.abs(e0) + 1e-12).all()
    assert np.abs(e1).mean() < 0.75 * np.abs(e0).mean()
    # and the full squared error on the calibration inputs, ||X (w - w * keep)||^2 from X^T X, falls too
    g = st.gram[0].double().numpy()
    d0, d1 = wn * ~start.numpy(), wn * ~keep.numpy()
    assert np.einsum("ij,jk,ik->", d1, g, d1) < np.einsum("ij,jk,ik->", d0, g, d0)
    torch.testing.assert_close(expected_error(w, keep, mean), torch.from_numpy(e1))


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("threshold", [0.0, 0.01])
def test_dsnot_rows_equal_a_row_by_row_reference_on_real_data(
    minilm_layer: tuple[torch.Tensor, object], nm: tuple[int, int] | None, threshold: float
) -> None:
    w, st = minilm_layer
    w = w[::8]  # 48 rows keep the Python loop short
    mean, var = (t[0] for t in st.input_moments())
    wanda = w.abs() * st.sq_sum[0].sqrt().float()
    start = _select.row_keep_mask(wanda if nm is None else wanda.reshape(-1, 4), 0.5, 0).reshape(w.shape)
    got = dsnot_rows(w, start, mean, var, st.sq_sum[0], nm=nm, max_cycles=20, update_threshold=threshold)
    args = (w.double().numpy(), start.numpy(), mean.numpy(), var.numpy(), st.sq_sum[0].numpy())
    ref = np.stack([dsnot_row_reference(a, k, *args[2:], nm, 20, threshold) for a, k in zip(*args[:2])])
    assert int((ref != args[1]).sum()) > 0  # the reference does swap
    np.testing.assert_array_equal(got.numpy(), ref)


def test_dsnot_through_sparsify_on_a_tiny_bert_keeps_weights_and_counts() -> None:
    model = _tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = _ids(6, 1)
    wanda = hs.sparsify(copy.deepcopy(model), 0.5, method="wanda", calibration=calib)
    hs.sparsify(model, 0.5, method="dsnot", calibration=calib)
    ms, mw = hs.masks(model), hs.masks(wanda)
    assert list(ms) == list(mw)
    for name, keep in ms.items():
        assert torch.equal(keep.sum(1), mw[name].sum(1)), name  # same count in every row
    for name, p in model.named_parameters():  # the weights are untouched: mask-only method
        key = name.replace(".parametrizations.weight.original", ".weight")
        assert torch.equal(p, before[key]), name
    hs.sparsify(model, 0.0)
    with torch.no_grad():
        x = _ids(1, 9)[0]
        fresh = _tiny_bert()
        torch.testing.assert_close(model(**x).last_hidden_state, fresh(**x).last_hidden_state)


@pytest.mark.parametrize("method", ["ria", "dsnot"])
def test_refused_without_calibration_with_the_error_of_other_data_aware_methods(method: str) -> None:
    model = _tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as ref:
        hs.sparsify(model, 0.5, method="wanda")
    with pytest.raises(ValueError) as got:
        hs.sparsify(model, 0.5, method=method)
    assert str(got.value) == str(ref.value).replace("'wanda'", repr(method))
    assert type(got.value) is type(ref.value)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_dsnot_refuses_other_structures_before_any_change() -> None:
    model = _tiny_bert()
    with pytest.raises(ValueError, match="dsnot"):
        hs.sparsify(model, 0.25, method="dsnot", structure="2:4", calibration=_ids(2, 0))
    assert not hs.masks(model)


def test_methods_are_registered_and_on_the_command_line() -> None:
    assert {"ria", "dsnot"} <= set(hs.available_scores())
    choices = next(a.choices for a in build_parser()._actions if a.dest == "command")
    sub = choices["sparsify"]
    method = next(a for a in sub._actions if a.dest == "method")
    assert {"ria", "dsnot"} <= set(method.choices)


@pytest.mark.parametrize("case", LAYER_CASES, ids=[c.id for c in LAYER_CASES])
@pytest.mark.parametrize("method", ["ria", "dsnot"])
def test_every_layer_type_prunes_or_refuses_as_wanda_does(case: LayerCase, method: str) -> None:
    """Reference: Wanda on the same layer and data (same statistics, same counts or the same refusal)."""
    torch.manual_seed(0)
    model = case.make()
    calib = [case.input() for _ in range(3)]
    ref_model, got_model = copy.deepcopy(model), copy.deepcopy(model)
    try:
        hs.sparsify(ref_model, 0.5, method="wanda", calibration=calib, exclude="*out_proj")
    except ValueError as e:
        with pytest.raises(type(e)):
            hs.sparsify(got_model, 0.5, method=method, calibration=calib, exclude="*out_proj")
        assert not hs.masks(got_model)
        return
    hs.sparsify(got_model, 0.5, method=method, calibration=calib, exclude="*out_proj")
    ref, got = hs.masks(ref_model), hs.masks(got_model)
    assert list(got) == list(ref)
    for name, keep in got.items():
        mod = got_model.get_submodule(name.rpartition(".")[0])
        out_dim = weight_dims(mod, name.rpartition(".")[2])[0]
        dims = [d for d in range(keep.dim()) if d != out_dim]
        assert torch.equal(keep.sum(dims), ref[name].sum(dims)), name  # same count per output row
    with torch.no_grad():
        x = case.input()
        assert torch.isfinite(got_model(x)).all()


@pytest.mark.slow  # the real model loaded twice and saved once; registration is checked above
def test_command_line_dsnot_2_4_on_minilm_matches_python(tmp_path, capsys) -> None:
    from hadamard_sparse import cli

    src = minilm_path()
    lines = ["The cat sat on the mat.", "Interest rates were left unchanged.", "A storm hit the valley."]
    (tmp_path / "calib.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    include = "encoder.layer.5.*"  # keeps the test short
    argv = [
        "sparsify",
        src,
        str(out),
        "--method",
        "dsnot",
        "--structure",
        "2:4",
        "--bake",
        "--include",
        include,
    ]
    assert cli.main([*argv, "--calibration", str(tmp_path / "calib.txt")]) == 0, capsys.readouterr().err
    tok = transformers.AutoTokenizer.from_pretrained(src)
    ref = transformers.AutoModel.from_pretrained(src).eval()
    samples = [dict(tok(x, return_tensors="pt")) for x in lines]
    hs.sparsify(ref, method="dsnot", structure="2:4", calibration=samples, include=include)
    loaded = transformers.AutoModel.from_pretrained(out).eval()
    batch = tok(["A sentence about the weather."], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**batch).last_hidden_state, ref(**batch).last_hidden_state, rtol=0, atol=0
        )
    w = loaded.encoder.layer[5].output.dense.weight
    assert _is_nm(w != 0, 2, 4)
