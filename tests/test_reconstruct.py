"""Reconstruction methods: "wanda_refit" (support-restricted least squares) and "sparsegpt_block"."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse import reconstruct
from hadamard_sparse.calibration import calibrate
from hadamard_sparse.layers import resolve_targets
from tests.conftest import Conv1D, minilm_path
from tests.hf_models import bert_config, gpt2_config, llama_config, transformers


def _reference_refit(w: np.ndarray, keep: np.ndarray, x: np.ndarray, damp: float) -> np.ndarray:
    """Row by row: lstsq of [X_S; sqrt(damp D_S)] v = [X w; sqrt(damp D_S) w_S] (independent of refit_rows)."""
    h_diag = (x * x).sum(0)
    out = np.zeros_like(w)
    for i in range(w.shape[0]):
        s = np.flatnonzero(keep[i])
        if s.size == 0:
            continue
        reg = np.sqrt(damp * h_diag[s])
        a = np.vstack([x[:, s], np.diag(reg)])
        b = np.concatenate([x @ w[i], reg * w[i, s]])
        out[i, s] = np.linalg.lstsq(a, b, rcond=None)[0]
    return out


@pytest.mark.parametrize("damp", [0.0, 0.1])
@pytest.mark.parametrize("n_rows", [7, 40])  # 7 < F: rank-deficient Gram matrix, only damp > 0 is unique
def test_refit_rows_equals_lstsq_on_the_support(damp: float, n_rows: int) -> None:
    if damp == 0.0 and n_rows < 12:
        pytest.skip("no unique least-squares solution without dampening")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_rows, 12, generator=g, dtype=torch.float64) * torch.linspace(
        0.1, 3, 12, dtype=torch.float64
    )
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    keep = torch.rand(5, 12, generator=g) > 0.5
    keep[0] = False  # an empty row
    keep[1] = True  # a full row: the refit gives w back
    got = reconstruct.refit_rows(w, keep, x.t() @ x, damp=damp)
    ref = _reference_refit(w.numpy(), keep.numpy(), x.numpy(), damp)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-8, atol=1e-8)
    assert torch.equal(got != 0, keep & (got != 0)) and not got[~keep].any()
    torch.testing.assert_close(got[1], w[1])


class _Gpt2Mlp(nn.Module):
    """GPT-2's MLP with HF-style Conv1D weights (stored (in, out))."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(32, 8)
        self.c_proj = Conv1D(8, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.nn.functional.gelu(self.c_fc(x)))


def _cases() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    cnn = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2))
    return [
        ("linear", mlp, torch.randn(16, 3, 8)),
        ("conv2d", cnn, torch.randn(6, 4, 6, 6)),
        ("hf_conv1d", _Gpt2Mlp(), torch.randn(16, 3, 8)),
    ]


@pytest.mark.parametrize("structure", [None, "2:4"])
@pytest.mark.parametrize("case", range(3), ids=["linear", "conv2d", "hf_conv1d"])
def test_wanda_refit_masks_are_wandas_and_weights_are_the_refit(case: int, structure: str | None) -> None:
    _, model, x = _cases()[case]
    batches = list(x.split(4))
    stats = calibrate(model, batches, gram=True)
    wanda = hs.sparsify(copy.deepcopy(model), 0.5, method="wanda", calibration=stats, structure=structure)
    refit = hs.sparsify(
        copy.deepcopy(model), 0.5, method="wanda_refit", calibration=stats, structure=structure
    )
    m_wanda, m_refit = hs.masks(wanda), hs.masks(refit)
    assert list(m_wanda) == list(m_refit)
    dense = dict(model.named_modules())
    for name, keep in m_refit.items():
        assert torch.equal(keep, m_wanda[name])
        mod_name, _, tname = name.rpartition(".")
        mod = refit.get_submodule(mod_name)
        original = mod.parametrizations[tname].original.detach()
        w0 = getattr(dense[mod_name], tname).detach()
        assert torch.equal(original[~keep], w0[~keep])  # pruned entries keep their dense values
        st = stats[name]
        expect = torch.stack(
            [
                torch.from_numpy(
                    _reference_refit(
                        st.to_blocks(w0)[b].double().numpy(),
                        st.to_blocks(keep)[b].numpy(),
                        _features(model, mod_name, batches, st, b),
                        reconstruct._DAMP,
                    )
                )
                for b in range(st.to_blocks(w0).shape[0])
            ]
        )
        got = st.to_blocks(mod.weight.detach()).double()
        torch.testing.assert_close(got, expect, rtol=1e-3, atol=1e-5)


def _features(model: nn.Module, mod_name: str, batches: list, st: object, block: int) -> np.ndarray:
    """The calibration input features of a module (rows x F), gathered with F.unfold for convs."""
    mod = model.get_submodule(mod_name)
    rows = []
    h = mod.register_forward_pre_hook(lambda m, a: rows.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    x = torch.cat(rows)
    if isinstance(mod, nn.Conv2d):
        cols = torch.nn.functional.unfold(x, mod.kernel_size, padding=mod.padding)  # (N, C*K, L)
        c, k, g = x.shape[1], mod.kernel_size[0] * mod.kernel_size[1], mod.groups
        cols = cols.view(x.shape[0], g, c // g, k, -1).permute(1, 0, 4, 3, 2).reshape(g, -1, k * (c // g))
        return cols[block].double().numpy()
    return x.reshape(-1, x.shape[-1]).double().numpy()


def test_wanda_refit_lowers_layer_error_vs_wanda() -> None:
    _, model, x = _cases()[0]
    batches = list(x.split(4))
    wanda = hs.sparsify(copy.deepcopy(model), 0.6, method="wanda", calibration=batches)
    refit = hs.sparsify(copy.deepcopy(model), 0.6, method="wanda_refit", calibration=batches)
    with torch.no_grad():
        xin = x.reshape(-1, 8)
        e_w = (wanda[0](xin) - model[0](xin)).square().sum()
        e_r = (refit[0](xin) - model[0](xin)).square().sum()
    assert e_r < e_w


def _tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "bert":
        cfg = bert_config()
        return transformers.BertModel(cfg).eval()
    if family == "gpt2":
        cfg = gpt2_config(n_positions=32)
        return transformers.GPT2Model(cfg).eval()
    cfg = llama_config(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaModel(cfg).eval()


def _ids(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 64, (2, 12), generator=g)} for _ in range(n)]


def _err(a: nn.Module, b: nn.Module, batches: list) -> float:
    with torch.no_grad():
        return sum(
            float((a(**x).last_hidden_state - b(**x).last_hidden_state).square().mean()) for x in batches
        )


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_sparsegpt_block_beats_sparsegpt_on_held_out_data(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconstruct, "_STEPS", 60)
    monkeypatch.setattr(reconstruct, "_LR", 1e-3)
    model = _tiny(family)
    calib, held_out = _ids(12, 0), _ids(6, 1)
    blocks = reconstruct.find_blocks(model, resolve_targets(model, None, None))
    assert len(blocks) == 2
    sgpt = hs.sparsify(copy.deepcopy(model), 0.5, method="sparsegpt", calibration=calib)
    block = hs.sparsify(copy.deepcopy(model), 0.5, method="sparsegpt_block", calibration=calib)
    for name, keep in hs.masks(block).items():  # exact per-row counts, as for every "row" method
        rows = keep.reshape(keep.shape[0], -1) if "c_" not in name else keep.t()
        assert bool((rows.sum(1) == rows.shape[1] // 2).all()), name
    assert _err(model, block, held_out) < _err(model, sgpt, held_out)


def test_reconstruct_block_lowers_block_error_and_touches_only_kept_weights() -> None:
    model = _tiny("bert")
    calib = _ids(8, 0)
    targets = resolve_targets(model, None, None)
    layer = model.encoder.layer[0]
    dense_out = reconstruct._dense_outputs(model, [layer], calib)[0]
    seg = [t for t in targets if t.module_name.startswith("encoder.layer.0.")]
    hs.sparsify(model, 0.5, method="magnitude", scope="row", include="encoder.layer.0.*")
    replay = reconstruct._Replay(layer, reconstruct._block_inputs(model, layer, calib))
    before_w = {t.qualified: reconstruct._original(t).detach().clone() for t in seg}
    others = {n: p.detach().clone() for n, p in layer.named_parameters() if "original" not in n}
    with torch.no_grad():  # independent error: the block on its inputs vs the recorded dense outputs
        e0 = sum(float((layer(*a, **k) - y).square().mean()) for (a, k), y in zip(replay.inputs, dense_out))
    before, after = reconstruct.reconstruct_block(replay, seg, dense_out, steps=40, lr=1e-3)
    assert before == pytest.approx(e0 / len(calib))
    assert after < 0.9 * before
    for t in seg:
        keep = t.module.parametrizations[t.tensor_name][0].mask
        w = reconstruct._original(t).detach()
        assert torch.equal(w[~keep], before_w[t.qualified][~keep])
        assert not torch.equal(w[keep], before_w[t.qualified][keep])
    for n, p in layer.named_parameters():
        if "original" not in n:
            assert torch.equal(p, others[n]) and p.grad is None


def test_find_blocks_without_a_stack_is_empty_and_falls_back_to_sparsegpt() -> None:
    _, model, x = _cases()[0]
    targets = resolve_targets(model, None, None)
    assert reconstruct.find_blocks(model, targets) == []
    batches = list(x.split(4))
    a = hs.sparsify(copy.deepcopy(model), 0.5, method="sparsegpt_block", calibration=batches)
    b = hs.sparsify(copy.deepcopy(model), 0.5, method="sparsegpt", calibration=batches)
    for (na, ma), (nb, mb) in zip(hs.masks(a).items(), hs.masks(b).items()):
        assert na == nb and torch.equal(ma, mb)
    torch.testing.assert_close(a[0].weight, b[0].weight)


@pytest.mark.parametrize(
    ("method", "kwargs", "error"),
    [
        ("sparsegpt_block", {"calibration": "stats"}, ValueError),
        ("sparsegpt_block", {"calibration": []}, ValueError),
        ("sparsegpt_block", {"calibration": "batches", "structure": "row"}, ValueError),
        ("wanda_refit", {"calibration": None}, ValueError),
        ("wanda_refit", {"calibration": "batches", "scope": "global"}, ValueError),
        ("wanda_refit", {"calibration": "batches", "structure": "2:4", "sparsity": 0.3}, ValueError),
        ("sparsegpt_block", {"calibration": torch.zeros(3)}, TypeError),
    ],
)
def test_refused_calls_leave_the_model_unchanged(method: str, kwargs: dict, error: type) -> None:
    model = _tiny("bert")
    calib = _ids(3, 0)
    kwargs = dict(kwargs)
    if kwargs.get("calibration") == "stats":
        kwargs["calibration"] = calibrate(model, calib, gram=True)
    elif kwargs.get("calibration") == "batches":
        kwargs["calibration"] = calib
    sparsity = kwargs.pop("sparsity", 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error):
        hs.sparsify(model, sparsity, method=method, **kwargs)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not hs.masks(model)


def test_methods_are_registered() -> None:
    names = hs.available_scores()
    assert "wanda_refit" in names and "sparsegpt_block" in names


def test_minilm_wanda_refit_beats_wanda_on_held_out_sentences() -> None:
    path = minilm_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    calib = [
        dict(tok([s], return_tensors="pt"))
        for s in [
            "The committee postponed its decision until the next meeting.",
            "Fresh basil and ripe tomatoes make a simple summer salad.",
            "The spacecraft entered orbit after a seven-month journey.",
            "Interest rates were left unchanged by the central bank.",
            "Volunteers planted three hundred trees along the river bank.",
            "The software update fixed a critical security flaw.",
            "Where can I find the nearest pharmacy that is open late?",
            "My phone battery drains faster since the last update.",
            "The customer service line was busy all afternoon.",
            "Oil prices climbed after the pipeline was damaged.",
            "The old dog limps but still loves his morning walk.",
            "Thunderstorms are forecast for the afternoon.",
            "Stir the sauce gently until it thickens.",
            "The tram runs every ten minutes during rush hour.",
            "The hospital opened a new wing for children.",
            "Scientists found water ice in a crater on the moon.",
        ]
    ]
    batch = dict(
        tok(
            ["How do I reset my password?", "Share prices fell.", "A dog chased a ball."],
            padding=True,
            return_tensors="pt",
        )
    )

    def embed(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    dense = embed(model)
    include = "encoder.layer.[45].attention.*"  # keeps the test short; the benchmark prunes all
    cos = {}
    for method in ("wanda", "wanda_refit"):
        m = hs.sparsify(copy.deepcopy(model), 0.5, method=method, calibration=calib, include=include)
        masks = hs.masks(m)
        assert len(masks) == 8 and all(
            float((~k).float().mean()) == pytest.approx(0.5, abs=1e-3) for k in masks.values()
        )
        cos[method] = float((embed(m) * dense).sum(-1).mean())
    assert cos["wanda_refit"] > cos["wanda"]
