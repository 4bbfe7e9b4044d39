"""Hugging Face directories through hs.save_pretrained / hs.load_pretrained (plain, sparse, compressed) on tiny
GPT-2 and BERT from configs, and the command line's --compress on them and on the real MiniLM."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse import cli
from hadamard_sparse.hf import COMPRESSED_WEIGHTS
from tests.conftest import minilm_path
from tests.hf_models import bert_config, gpt2_config, vit_config

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("safetensors", reason="safetensors is not installed")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _gpt2() -> nn.Module:
    cfg = gpt2_config(n_embd=128)
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    cfg = bert_config(hidden_size=128, intermediate_size=512, max_position_embeddings=16)
    return transformers.BertForMaskedLM(cfg)


FAMILIES: dict[str, Callable[[], nn.Module]] = {"gpt2": _gpt2, "bert": _bert}


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


def _sparse(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    # the output projection is tied to the input embedding in both families: leave it out
    return hs.sparsify(model, 0.9, scope="layer", exclude="lm_head" if family == "gpt2" else "cls.*")


def _same_masks(a: nn.Module, b: nn.Module) -> bool:
    ma, mb = hs.masks(a), hs.masks(b)
    return list(ma) == list(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compressed_directory_round_trip(family: str, tmp_path: Path) -> None:
    model = _sparse(family)
    hs.save_pretrained(model, tmp_path / "plain")
    hs.save_pretrained(model, tmp_path / "comp", compress=True)
    files = {p.name for p in (tmp_path / "comp").iterdir()}
    assert COMPRESSED_WEIGHTS in files and "model.safetensors" not in files and "config.json" in files
    loaded = hs.load_pretrained(tmp_path / "comp")
    assert type(loaded) is type(model) and not loaded.training
    assert _same_masks(loaded, model) and len(hs.masks(loaded)) > 0
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    ratio = (tmp_path / "comp" / COMPRESSED_WEIGHTS).stat().st_size / (
        tmp_path / "plain" / "model.safetensors"
    ).stat().st_size
    assert ratio < 0.25, ratio
    with pytest.raises(OSError, match="model.safetensors"):  # loudly, never random weights
        type(model).from_pretrained(tmp_path / "comp")
    # baked: no masks, the same outputs
    hs.remove_parametrizations(model)
    hs.save_pretrained(model, tmp_path / "baked", compress=True)
    baked = hs.load_pretrained(tmp_path / "baked")
    assert hs.masks(baked) == {}
    torch.testing.assert_close(_logits(baked), _logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plain_sparse_and_dense_directories(family: str, tmp_path: Path) -> None:
    model = _sparse(family)
    hs.save_pretrained(model, tmp_path / "sparse")
    loaded = hs.load_pretrained(tmp_path / "sparse")  # from_pretrained, then the masks from the file
    assert _same_masks(loaded, model)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    torch.manual_seed(0)
    dense = FAMILIES[family]().eval()
    dense.save_pretrained(tmp_path / "dense")
    plain = hs.load_pretrained(tmp_path / "dense")
    assert hs.masks(plain) == {}
    torch.testing.assert_close(
        _logits(plain), _logits(type(dense).from_pretrained(tmp_path / "dense").eval())
    )


def test_half_precision_and_model_class(tmp_path: Path) -> None:
    model = _sparse("bert").to(torch.bfloat16)
    hs.save_pretrained(model, tmp_path / "comp", compress=True)
    loaded = hs.load_pretrained(tmp_path / "comp")
    assert loaded.dtype == torch.bfloat16 and _same_masks(loaded, model)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    model = _sparse("gpt2")
    hs.save_pretrained(model, tmp_path / "gpt2", compress=True)
    base = hs.load_pretrained(tmp_path / "gpt2", model_class=transformers.GPT2Model)  # the head left out
    assert type(base) is transformers.GPT2Model and _same_masks(base, model.transformer)
    with torch.no_grad():
        torch.testing.assert_close(
            base(_ids()).last_hidden_state, model.transformer(_ids()).last_hidden_state, rtol=0, atol=0
        )


def test_errors_leave_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(hs.InvalidArgumentError, match="is not a directory"):
        hs.load_pretrained(tmp_path / "missing")
    with pytest.raises(hs.InvalidArgumentError, match="no config.json"):
        hs.load_pretrained(tmp_path)
    with pytest.raises(hs.InvalidTypeError, match="model_class must be"):
        hs.load_pretrained(tmp_path, model_class="BertModel")
    with pytest.raises(hs.InvalidTypeError, match="PreTrainedModel"):
        hs.save_pretrained(nn.Linear(2, 2), tmp_path / "x")
    model = _sparse("gpt2")
    with pytest.raises(hs.InvalidTypeError, match="compress must be a bool"):
        hs.save_pretrained(model, tmp_path / "x", compress=1)  # type: ignore[arg-type]
    (tmp_path / "file").write_text("")
    with pytest.raises(hs.InvalidArgumentError, match="not a directory"):
        hs.save_pretrained(model, tmp_path / "file")
    assert not (tmp_path / "x").exists()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    model.state_dict = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="disk full"):
        hs.save_pretrained(model, tmp_path / "x", compress=True)
    assert not (tmp_path / "x").exists()  # the directory it created is removed


# ---------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_compress_gpt2_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    src = tmp_path / "src"
    _gpt2().save_pretrained(src)
    out = tmp_path / "out"
    argv = ["sparsify", str(src), str(out), "--sparsity", "0.9", "--scope", "layer", "--exclude", "lm_head"]
    code, stdout, err = _run([*argv, "--compress"], capsys)
    assert code == 0, err
    assert "hs.load_pretrained" in stdout
    assert (out / COMPRESSED_WEIGHTS).is_file() and not (out / "model.safetensors").exists()
    ref = hs.sparsify(
        transformers.GPT2LMHeadModel.from_pretrained(src).eval(), 0.9, scope="layer", exclude="lm_head"
    )
    loaded = hs.load_pretrained(out)
    assert _same_masks(loaded, ref)
    torch.testing.assert_close(_logits(loaded), _logits(ref), rtol=0, atol=0)
    code, stdout, _ = _run(["report", str(out)], capsys)
    assert code == 0 and "h.0.mlp.c_fc.weight" in stdout and "masks (" in stdout
    assert "h.0.mlp.c_fc.weight_mask" in stdout
    code, stdout, _ = _run(["report", str(out / COMPRESSED_WEIGHTS)], capsys)  # the file alone
    assert code == 0 and "transformer.h.0.mlp.c_fc.weight " in stdout and "masks (" in stdout
    code, _, err = _run([*argv, "--compress"], capsys)  # OUT_DIR exists now: refused before work
    assert code == 2 and "OUT_DIR" in err
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    code, _, err = _run(["report", str(tmp_path / "bad.safetensors")], capsys)
    assert code == 2 and "cannot read" in err


def test_tied_weights_written_once(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors")
    model = _sparse("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    hs.save_pretrained(model, tmp_path / "comp", compress=True)
    with safetensors.safe_open(str(tmp_path / "comp" / COMPRESSED_WEIGHTS), framework="pt") as h:
        keys = list(h.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # as save_pretrained does
    loaded = hs.load_pretrained(tmp_path / "comp")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied again
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def _mean_pool(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def test_cli_compress_minilm_bake(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = Path(minilm_path())
    out = tmp_path / "out"
    argv = ["sparsify", str(src), str(out), "--sparsity", "0.9", "--scope", "layer", "--embeddings"]
    code, stdout, err = _run([*argv, "--bake", "--compress"], capsys)
    assert code == 0, err
    ratio = (out / COMPRESSED_WEIGHTS).stat().st_size / (src / "model.safetensors").stat().st_size
    assert ratio <= 0.20, ratio
    ref = transformers.BertModel.from_pretrained(src).eval()
    hs.sparsify(ref, 0.9, scope="layer", include=["*", nn.Embedding])
    hs.remove_parametrizations(ref)
    loaded = hs.load_pretrained(out)
    assert hs.masks(loaded) == {}
    tok = transformers.AutoTokenizer.from_pretrained(out)  # tokenizer files travel
    batch = dict(
        tok(
            ["A sentence about the weather.", "Rates were left unchanged."], padding=True, return_tensors="pt"
        )
    )
    torch.testing.assert_close(_mean_pool(loaded, batch), _mean_pool(ref, batch), rtol=0, atol=0)
    code, stdout, _ = _run(["report", str(out)], capsys)
    assert code == 0 and "encoder.layer.0.attention.self.query.weight" in stdout


@pytest.mark.parametrize("compress", [False, True])
def test_vit_saved_under_renamed_keys(compress: bool, tmp_path: Path) -> None:
    # transformers 5 writes ViT in its original key format and renames on load
    cfg = vit_config(hidden_size=64, intermediate_size=128, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    model = hs.sparsify(transformers.ViTForImageClassification(cfg).eval(), 0.9, scope="layer")
    hs.save_pretrained(model, tmp_path / "vit", compress=compress)
    loaded = hs.load_pretrained(tmp_path / "vit")
    assert _same_masks(loaded, model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_int8_compressed_directory_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """save_pretrained(compress=True, quantize="int8") and the CLI's --compress --quantize int8: load_pretrained
    restores the masks exactly and every quantized weight within scale / 2 (the file's scales); bad options
    are refused before anything is written."""
    from safetensors.torch import load_file

    model = _sparse("bert")
    out = tmp_path / "q"
    hs.save_pretrained(model, out, compress=True, quantize="int8")
    hs.save_pretrained(model, tmp_path / "exact", compress=True)
    stored = load_file(str(out / COMPRESSED_WEIGHTS))
    loaded = hs.load_pretrained(out)
    assert _same_masks(loaded, model) and len(hs.masks(loaded)) > 0
    sd, back = model.state_dict(), loaded.state_dict()
    scaled = [k.removesuffix(".__scale__") for k in stored if k.endswith(".__scale__")]
    assert (
        "bert.embeddings.word_embeddings.weight" in scaled
        and "bert.encoder.layer.0.output.dense.weight" in scaled
    )
    for k in sd:
        if k in scaled:
            rows = sd[k].shape[0]
            err = (back[k].double() - sd[k].double()).reshape(rows, -1).abs()
            assert bool((err <= stored[f"{k}.__scale__"].double().unsqueeze(1) / 2).all()), k
        elif k in stored:  # not quantized: bitwise (the tied decoder weight is the embeddings')
            assert torch.equal(back[k], sd[k]), k
    size = (out / COMPRESSED_WEIGHTS).stat().st_size
    assert size < 0.5 * (tmp_path / "exact" / COMPRESSED_WEIGHTS).stat().st_size
    for kwargs, match in (
        ({"quantize": "int8"}, "needs compress=True"),
        ({"compress": True, "quantize": "int4"}, "'int8'"),
    ):
        with pytest.raises(hs.InvalidArgumentError, match=match):
            hs.save_pretrained(model, tmp_path / "refused", **kwargs)
        assert not (tmp_path / "refused").exists()
    # the command line
    src = tmp_path / "src"
    _bert().save_pretrained(src)
    argv = ["sparsify", str(src), str(tmp_path / "cli"), "--sparsity", "0.9", "--scope", "layer", "--bake"]
    code, _, err = _run([*argv, "--quantize", "int8"], capsys)
    assert code == 2 and "--quantize int8 applies to compressed weights: add --compress" in err
    code, _, err = _run([*argv, "--compress", "--quantize", "int4"], capsys)
    assert code == 2 and "invalid choice: 'int4'" in err and "'int8'" in err
    assert not (tmp_path / "cli").exists()
    code, _, err = _run([*argv, "--compress", "--quantize", "int8"], capsys)
    assert code == 0, err
    stored = load_file(str(tmp_path / "cli" / COMPRESSED_WEIGHTS))
    assert stored["bert.encoder.layer.1.intermediate.dense.weight.__values__"].dtype == torch.int8
    assert hs.masks(hs.load_pretrained(tmp_path / "cli")) == {}  # baked


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_zlib_codec_directory_and_cli(
    quantize: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """save_pretrained(compress=True, codec="zlib") and the CLI's --compress --codec zlib: a smaller weights file
    that is_compressed_file recognises and load_pretrained reads back bitwise as the codec=None directory
    (masks included); a codec without compress, or another codec, is refused before anything is written."""
    from hadamard_sparse.compress import CODEC_KEY
    from hadamard_sparse.hf import is_compressed_file

    safetensors = pytest.importorskip("safetensors")
    model = _sparse("bert")
    plain, packed = tmp_path / "plain", tmp_path / "zlib"
    hs.save_pretrained(model, plain, compress=True, quantize=quantize)
    hs.save_pretrained(model, packed, compress=True, quantize=quantize, codec="zlib")
    size = (packed / COMPRESSED_WEIGHTS).stat().st_size
    assert size < (plain / COMPRESSED_WEIGHTS).stat().st_size
    assert is_compressed_file(packed / COMPRESSED_WEIGHTS)
    with safetensors.safe_open(str(packed / COMPRESSED_WEIGHTS), framework="pt") as h:
        assert CODEC_KEY in (h.metadata() or {})
    ref, loaded = hs.load_pretrained(plain), hs.load_pretrained(packed)
    assert _same_masks(loaded, ref) and len(hs.masks(loaded)) > 0
    a, b = ref.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    for kwargs, match in (
        ({"codec": "zlib"}, "codec='zlib' needs compress=True"),
        ({"compress": True, "codec": "lzma"}, "codec must be None or one of 'zlib', got 'lzma'"),
    ):
        with pytest.raises(hs.InvalidArgumentError, match=match):
            hs.save_pretrained(model, tmp_path / "refused", **kwargs)
        assert not (tmp_path / "refused").exists()
    # the command line
    src = tmp_path / "src"
    _bert().save_pretrained(src)
    argv = ["sparsify", str(src), str(tmp_path / "cli"), "--sparsity", "0.9", "--scope", "layer"]
    code, _, err = _run([*argv, "--codec", "zlib"], capsys)
    assert code == 2 and "--codec zlib applies to compressed weights: add --compress" in err
    argv += ["--quantize", quantize] if quantize else []
    code, _, err = _run([*argv, "--compress", "--codec", "lzma"], capsys)
    assert code == 2 and "invalid choice: 'lzma'" in err and "'zlib'" in err
    assert not (tmp_path / "cli").exists()
    code, _, err = _run([*argv, "--compress", "--codec", "zlib"], capsys)
    assert code == 0, err
    code, _, err = _run([*argv[:2], str(tmp_path / "cli-plain"), *argv[3:], "--compress"], capsys)
    assert code == 0, err
    assert (tmp_path / "cli" / COMPRESSED_WEIGHTS).stat().st_size < (
        tmp_path / "cli-plain" / COMPRESSED_WEIGHTS
    ).stat().st_size
    ref, loaded = hs.load_pretrained(tmp_path / "cli-plain"), hs.load_pretrained(tmp_path / "cli")
    assert _same_masks(loaded, ref) and len(hs.masks(loaded)) > 0
    a, b = ref.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    code, stdout, _ = _run(["report", str(tmp_path / "cli" / COMPRESSED_WEIGHTS)], capsys)
    assert code == 0 and "bert.encoder.layer.0.output.dense.weight " in stdout
