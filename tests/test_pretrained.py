"""The full pretrained-model path on transformers models: calibrate -> sparsify -> bake -> save/load."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import hadamard_sparse as hs
from hadamard_sparse.calibration import calibrate
from tests.conftest import minilm_path
from tests.hf_models import bert_config

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def _tiny_bert() -> torch.nn.Module:
    cfg = bert_config(
        hidden_size=16, intermediate_size=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (2, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _roundtrip(model: torch.nn.Module, fresh: torch.nn.Module) -> list[torch.nn.Module]:
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh_pt = copy.deepcopy(fresh)
    fresh_pt.load_state_dict(torch.load(buf, weights_only=True))
    out = [fresh_pt]
    try:
        from safetensors.torch import load, save
    except ImportError:
        return out
    fresh_st = copy.deepcopy(fresh)
    fresh_st.load_state_dict(load(save(sd)))
    out.append(fresh_st)
    return out


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_tiny_bert_full_path(method: str) -> None:
    model = _tiny_bert()
    fresh = copy.deepcopy(model)
    calib, evaluation = _batches(4, 0), _batches(1, 1)[0]
    dense = _embed(model, evaluation)
    stats = calibrate(model, calib, gram=method == "sparsegpt")
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(stats) == n_linear and not stats.skipped
    assert model.training is False
    hs.sparsify(model, 0.5, method=method, calibration=stats if method == "wanda" else calib)
    masks = hs.masks(model)
    assert len(masks) == n_linear
    for name, m in masks.items():
        assert ((~m).sum(1) == m.shape[1] // 2).all(), name  # per output row
    sparse = _embed(model, evaluation)
    cos = torch.nn.functional.cosine_similarity(sparse.flatten(1), dense.flatten(1)).mean()
    assert 0.5 < float(cos) < 1.0
    baked = hs.remove_parametrizations(model)
    assert type(baked.encoder.layer[0].attention.self.query) is torch.nn.Linear
    torch.testing.assert_close(_embed(baked, evaluation), sparse)
    for reloaded in _roundtrip(baked, fresh):
        assert torch.equal(_embed(reloaded, evaluation), _embed(baked, evaluation))
        w = reloaded.encoder.layer[1].output.dense.weight
        assert int((w == 0).sum()) == w.numel() // 2


def test_wanda_not_worse_than_magnitude_on_tiny_bert() -> None:
    model = _tiny_bert()
    calib, evaluation = _batches(6, 0), _batches(2, 1)
    dense = [_embed(model, b) for b in evaluation]

    def err(m: torch.nn.Module) -> float:
        return sum(float((_embed(m, b) - d).square().sum()) for b, d in zip(evaluation, dense))

    mag = hs.sparsify(copy.deepcopy(model), 0.5, method="magnitude", scope="row")
    wanda = hs.sparsify(copy.deepcopy(model), 0.5, method="wanda", calibration=calib)
    sgpt = hs.sparsify(copy.deepcopy(model), 0.5, method="sparsegpt", calibration=calib)
    assert err(sgpt) < err(mag)
    assert err(wanda) < err(mag) * 1.2  # tiny random model: wanda is not much worse than magnitude


def _minilm() -> tuple[torch.nn.Module, object]:
    path = minilm_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, tok


def test_minilm_wanda_keeps_embeddings_and_reloads() -> None:
    model, tok = _minilm()
    calib = [
        dict(tok([s], return_tensors="pt"))
        for s in [
            "The committee postponed its decision until the next meeting.",
            "Fresh basil and ripe tomatoes make a simple summer salad.",
            "The spacecraft entered orbit after a seven-month journey.",
            "Interest rates were left unchanged by the central bank.",
            "Volunteers planted three hundred trees along the river bank.",
            "The software update fixed a critical security flaw.",
        ]
    ]
    sentences = ["How do I reset my password?", "Share prices fell after the news.", "A dog chased a ball."]
    batch = dict(tok(sentences, padding=True, return_tensors="pt"))

    def embed(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    fresh = copy.deepcopy(model)
    dense = embed(model)
    mag = embed(hs.sparsify(copy.deepcopy(model), 0.3, method="magnitude", scope="row"))
    hs.sparsify(model, 0.3, method="wanda", calibration=calib)
    sparse = embed(model)
    cos_wanda = float((sparse * dense).sum(-1).mean())
    cos_mag = float((mag * dense).sum(-1).mean())
    assert cos_wanda > 0.95 and cos_wanda >= cos_mag
    baked = hs.remove_parametrizations(model)
    for reloaded in _roundtrip(baked, fresh):
        assert torch.equal(embed(reloaded), embed(baked))
