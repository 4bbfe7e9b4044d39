"""The model zoo: Hugging Face models from tiny configs (and the real all-MiniLM-L6-v2) end to end.

sparsify -> forward -> save_pretrained -> plain from_pretrained (hadamard_sparse not involved) gives
the same outputs -> load_sparse_state_dict on a fresh model restores the masks bitwise -> a training
step keeps pruned entries at zero -> bake -> save/reload gives the same outputs -> generate.

Tied weights (GPT-2's, T5's and Whisper's output projection shares the embedding) are skipped by
target resolution, which warns; ``lm_head`` is excluded where it exists, as in the issue.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hadamard_sparse as hs
from tests.conftest import minilm_path
from tests.hf_models import bert_config

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")


@dataclass
class Family:
    id: str
    make: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    exclude: str | None = None
    generates: bool = False
    output: str = "logits"


def _ids(vocab: int = 64, shape: tuple[int, int] = (2, 6)) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(1))


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=1, eos_token_id=2
    )
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    cfg = bert_config(hidden_size=16, intermediate_size=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def _t5() -> nn.Module:
    cfg = transformers.T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(cfg)


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(cfg)


def _whisper() -> nn.Module:
    cfg = transformers.WhisperConfig(
        vocab_size=64,
        num_mel_bins=8,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        d_model=16,
        max_source_positions=8,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    return transformers.WhisperForConditionalGeneration(cfg)


def _wav2vec2() -> nn.Module:
    cfg = transformers.Wav2Vec2Config(
        vocab_size=12,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    return transformers.Wav2Vec2ForCTC(cfg)


def _audio() -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(2, 800, generator=torch.Generator().manual_seed(1))}


FAMILIES = [
    Family("gpt2", _gpt2, lambda: {"input_ids": _ids()}, exclude="lm_head", generates=True),
    Family(
        "bert", _bert, lambda: {"input_ids": _ids(), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    ),
    Family(
        "t5",
        _t5,
        lambda: {"input_ids": _ids(), "decoder_input_ids": _ids(shape=(2, 3))},
        exclude="lm_head",
        generates=True,
    ),
    Family("llama", _llama, lambda: {"input_ids": _ids()}, exclude="lm_head", generates=True),
    Family(
        "vit",
        _vit,
        lambda: {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))},
    ),
    Family(
        "whisper",
        _whisper,
        lambda: {
            "input_features": torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1)),
            "decoder_input_ids": _ids(shape=(2, 3)),
        },
        exclude="proj_out",
        generates=True,
    ),
    Family("wav2vec2", _wav2vec2, _audio),
]


def _out(model: nn.Module, inputs: dict[str, torch.Tensor], field: str = "logits") -> torch.Tensor:
    with torch.no_grad():
        return getattr(model(**inputs), field)


def _fresh(family: Family) -> nn.Module:
    torch.manual_seed(123)  # other random weights than the source model
    return family.make().eval()


def _load_plain(cls: type, path: Path) -> nn.Module:
    return cls.from_pretrained(path).eval()


def _train_step(model: nn.Module, inputs: dict[str, torch.Tensor], field: str) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(2):
        out = getattr(model(**inputs), field)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("family", FAMILIES, ids=[f.id for f in FAMILIES])
def test_zoo_end_to_end(family: Family, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = family.make().eval()
    cls = type(model)
    inputs = family.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tied weights are skipped, with a warning
        hs.sparsify(model, 0.5, scope="layer", exclude=family.exclude)
    masks = {k: v.clone() for k, v in hs.masks(model, compact=True).items()}
    assert masks
    ref = _out(model, inputs, family.output)

    # save_pretrained -> plain from_pretrained: the sparse model's outputs
    model.save_pretrained(tmp_path / "sparse")
    plain = _load_plain(cls, tmp_path / "sparse")
    torch.testing.assert_close(_out(plain, inputs, family.output), ref, rtol=1e-5, atol=1e-6)
    file = safetensors_torch.load_file(tmp_path / "sparse" / "model.safetensors")
    assert sum(k.endswith("_mask") for k in file) == len(masks)  # (ViT's file keys use its original format)

    # masks restored bitwise on a fresh, unmodified model
    fresh = hs.load_sparse_state_dict(_fresh(family), file)
    got = hs.masks(fresh, compact=True)
    assert got.keys() == masks.keys() and all(torch.equal(got[k], masks[k]) for k in masks)
    torch.testing.assert_close(_out(fresh, inputs, family.output), ref, rtol=1e-5, atol=1e-6)

    # a training step keeps pruned entries at zero
    _train_step(fresh, inputs, family.output)
    for name, m in hs.masks(fresh).items():
        module, _, tname = name.rpartition(".")
        w = getattr(fresh.get_submodule(module), tname)
        assert torch.all(w.detach()[~m] == 0), name
    trained = _out(fresh, inputs, family.output)
    assert not torch.equal(trained, ref)

    # bake -> save -> reload
    baked = hs.remove_parametrizations(fresh)
    torch.testing.assert_close(_out(baked, inputs, family.output), trained, rtol=1e-5, atol=1e-6)
    baked.save_pretrained(tmp_path / "baked")
    again = _load_plain(cls, tmp_path / "baked")
    out = _out(again, inputs, family.output)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, trained, rtol=1e-5, atol=1e-6)

    if family.generates:
        gen_inputs = {k: v for k, v in inputs.items() if not k.startswith("decoder_")}
        kw: dict[str, Any] = {"max_new_tokens": 4, "do_sample": False}
        with torch.no_grad():
            a = model.generate(**gen_inputs, **kw)
            b = plain.generate(**gen_inputs, **kw)
        assert torch.equal(a, b)


@pytest.mark.slow  # the real 22M-parameter model, loaded three times
def test_real_minilm_save_pretrained_and_restore(tmp_path: Path) -> None:
    path = minilm_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(["a sparse sentence encoder", "hello world"], padding=True, return_tensors="pt")
    hs.sparsify(model, 0.5, scope="layer")
    ref = _out(model, dict(batch), "last_hidden_state")
    model.save_pretrained(tmp_path)
    plain = transformers.AutoModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_out(plain, dict(batch), "last_hidden_state"), ref, rtol=1e-5, atol=1e-5)
    fresh = transformers.AutoModel.from_pretrained(path).eval()
    hs.load_sparse_state_dict(fresh, safetensors_torch.load_file(tmp_path / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(hs.masks(model).values(), hs.masks(fresh).values()))
    assert torch.equal(_out(fresh, dict(batch), "last_hidden_state"), ref)


@pytest.mark.slow  # the real 22M-parameter model, loaded three times
def test_real_minilm_sentence_transformers_save_and_load(tmp_path: Path) -> None:
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    path = minilm_path()
    model = st.SentenceTransformer(path, device="cpu")
    hs.sparsify(model, 0.5, scope="layer")
    sentences = ["a sparse sentence encoder", "the weights travel with their masks"]
    ref = model.encode(sentences, convert_to_tensor=True)
    model.save(str(tmp_path))
    plain = st.SentenceTransformer(str(tmp_path), device="cpu")  # no hadamard_sparse involved
    torch.testing.assert_close(plain.encode(sentences, convert_to_tensor=True), ref, rtol=1e-5, atol=1e-5)
    fresh = st.SentenceTransformer(path, device="cpu")
    hs.load_sparse_state_dict(
        fresh[0].auto_model, safetensors_torch.load_file(tmp_path / "model.safetensors")
    )
    assert torch.equal(fresh.encode(sentences, convert_to_tensor=True), ref)
    a, b = hs.masks(model[0].auto_model), hs.masks(fresh[0].auto_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tied_lm_head_is_skipped_and_stays_tied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _gpt2().eval()
    with pytest.warns(UserWarning, match="tied"):
        hs.sparsify(model, 0.5, include=[nn.Embedding, "transformer.h.*"])
    assert "transformer.wte.weight" not in hs.masks(model) and "lm_head.weight" not in hs.masks(model)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert again.lm_head.weight is again.transformer.wte.weight
    x = {"input_ids": _ids()}
    torch.testing.assert_close(_out(again, x), _out(model, x), rtol=1e-5, atol=1e-6)
    copy.deepcopy(model)  # still copyable


class _LMData(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        self.ids = torch.randint(3, 64, (n, 8), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model: nn.Module, out: Path) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=6,
        save_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_LMData())


def test_trainer_checkpoints_and_resumes_identically(tmp_path: Path) -> None:
    pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate ('examples' extra)")
    torch.manual_seed(0)
    model = hs.sparsify(_gpt2(), 0.5, scope="layer", exclude="lm_head")
    masks = {k: v.clone() for k, v in hs.masks(model).items()}
    init = copy.deepcopy(model.state_dict())
    _trainer(model, tmp_path / "a").train()  # uninterrupted, checkpoints at steps 3 and 6
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert {f"{k}_mask" for k in masks} <= set(safetensors_torch.load_file(ckpt / "model.safetensors"))
    assert all(torch.equal(v, masks[k]) for k, v in hs.masks(model).items())  # masks are not trained
    # a second process: the same architecture with other masks and weights, resumed from step 3
    torch.manual_seed(1)
    other = hs.sparsify(_gpt2(), 0.5, method="random", scope="layer", exclude="lm_head", seed=1)
    assert not all(torch.equal(v, masks[k]) for k, v in hs.masks(other).items())
    _trainer(other, tmp_path / "b").train(resume_from_checkpoint=str(ckpt))
    got = hs.masks(other)
    assert got.keys() == masks.keys() and all(torch.equal(got[k], masks[k]) for k in masks)
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)  # effective weights
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"], init["transformer.h.0.mlp.c_fc.weight"])
