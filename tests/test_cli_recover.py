"""``hadamard-sparse recover`` on tiny BERT and SentenceTransformer directories made from configs (no
download): OUT_DIR loads with plain from_pretrained / SentenceTransformer and hs.load_pretrained restores
the masks; refused arguments are one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import hadamard_sparse as hs
from hadamard_sparse import cli
from tests.hf_models import bert_config

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

WORDS = "the a cat dog sat on mat ran fast slow red blue big small house tree river sun moon star".split()


def _lines(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return "\n".join(
        " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (8,), generator=g)) for _ in range(n)
    )


def _model_dir(path: Path) -> Path:
    tok = transformers.BertTokenizerFast(
        vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    )
    torch.manual_seed(0)
    cfg = bert_config(vocab_size=tok.vocab_size, initializer_range=0.2)
    transformers.BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--method", "wanda", "--steps", "12", "--batch-size", "8", "--lr", "1e-3"]


def test_recover_bert_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _model_dir(tmp_path / "src")
    (tmp_path / "train.txt").write_text(_lines(48, 0))
    (tmp_path / "eval.txt").write_text(_lines(12, 1))
    out = tmp_path / "out"
    argv = ["recover", str(src), str(out), "--data", str(tmp_path / "train.txt"), "--sparsity", "0.8"]
    code, stdout, err = _run([*argv, "--eval", str(tmp_path / "eval.txt"), *FAST], capsys)
    assert code == 0, err
    assert "recovered vs dense: cosine" in stdout and "sparsity 0.8" in stdout
    assert not (out / "recover-checkpoint").exists() and (out / "tokenizer_config.json").is_file()
    plain = transformers.BertModel.from_pretrained(out).eval()
    masked = hs.load_pretrained(out).eval()
    rep = hs.sparsity_report(masked)
    pruned = [t for t in rep.tensors if "encoder" in t.name]
    assert len(pruned) == 12 and "pooler.dense.weight" not in hs.masks(masked)
    assert sum(t.zeros for t in pruned) / sum(t.numel for t in pruned) == pytest.approx(0.8, abs=2e-3)
    ids = torch.randint(5, len(WORDS) + 5, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            plain(ids).last_hidden_state, masked(ids).last_hidden_state, rtol=0, atol=0
        )
    # OUT_DIR is not empty now: refused, nothing changed
    before = sorted(p.name for p in out.iterdir())
    code, _, err = _run([*argv, *FAST], capsys)
    assert code == 2 and "OUT_DIR" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == before


def test_recover_sentence_transformer_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    st = pytest.importorskip("sentence_transformers")
    dense = st.SentenceTransformer(str(_model_dir(tmp_path / "hf")), device="cpu")
    dense.save(str(tmp_path / "src"))
    (tmp_path / "train.txt").write_text(_lines(48, 0))
    out = tmp_path / "out"
    code, stdout, err = _run(
        [
            "recover",
            str(tmp_path / "src"),
            str(out),
            "--data",
            str(tmp_path / "train.txt"),
            "--sparsity",
            "0.7",
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    assert "SentenceTransformer" in stdout
    loaded = st.SentenceTransformer(str(out), device="cpu")
    texts = _lines(6, 2).splitlines()
    a = torch.as_tensor(loaded.encode(texts, convert_to_tensor=True))
    b = torch.as_tensor(dense.encode(texts, convert_to_tensor=True))
    assert not torch.allclose(a, b)  # pruned
    inner = loaded[0].auto_model
    zeros = sum(
        int((m.weight == 0).sum())
        for n, m in inner.named_modules()
        if "encoder" in n and hasattr(m, "weight") and m.weight.dim() == 2
    )
    numel = sum(
        m.weight.numel()
        for n, m in inner.named_modules()
        if "encoder" in n and hasattr(m, "weight") and m.weight.dim() == 2
    )
    assert zeros / numel == pytest.approx(0.7, abs=1e-2)  # one-shot only (0.7 = initial): per-row rounding


@pytest.mark.parametrize(("flag", "grouped"), [([], True), (["--no-group-by-length"], False)])
def test_group_by_length_flag_reaches_recover(
    flag: list[str],
    grouped: bool,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = _model_dir(tmp_path / "src")
    (tmp_path / "train.txt").write_text(_lines(48, 0))
    seen: dict[str, object] = {}

    def fake(*args: object, **kwargs: object) -> object:
        seen.update(kwargs)
        raise hs.errors.InvalidArgumentError("stop here")

    monkeypatch.setattr("hadamard_sparse.cli_recover.recover", fake)
    argv = ["recover", str(src), str(tmp_path / "out"), "--data", str(tmp_path / "train.txt"), *flag]
    code, _, err = _run(argv, capsys)
    assert code == 2 and "stop here" in err
    assert seen["group_by_length"] is grouped
    assert not (tmp_path / "out").exists()  # the refused run wrote nothing


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"--data": "missing.txt"}, "cannot read"),
        ({"--data": "empty.txt"}, "no non-empty line"),
        ({"--sparsity": "1.0"}, "--sparsity must be a number in (0, 1)"),
        ({"--sparsity": "0"}, "--sparsity must be a number in (0, 1)"),
        ({"out": "src/inside"}, "inside MODEL_DIR"),
        ({"out": "full"}, "not an empty directory"),
        ({"--resume": None}, "no checkpoint"),
        ({"--exclude": "encoder.layr.*"}, "encoder.layr"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    change: dict[str, str | None], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _model_dir(tmp_path / "src")
    (tmp_path / "train.txt").write_text(_lines(16, 0))
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    opts: dict[str, str | None] = {"--data": str(tmp_path / "train.txt"), "--sparsity": "0.8", **FAST_OPTS}
    out = tmp_path / "out"
    for k, v in change.items():
        if k == "out":
            out = tmp_path / str(v)
        elif k == "--data":
            opts[k] = str(tmp_path / str(v))
        else:
            opts[k] = v
    argv = ["recover", str(src), str(out)]
    for k, v in opts.items():
        argv += [k] if v is None else [k, v]
    src_files = sorted(p.name for p in src.rglob("*"))
    capsys.readouterr()  # what making the model directory printed
    code, stdout, err = _run(argv, capsys)
    assert code == 2, (stdout, err)
    assert len(err.strip().splitlines()) == 1 and match in err, err
    assert not (tmp_path / "out").exists() and not (src / "inside").exists()
    assert sorted(p.name for p in src.rglob("*")) == src_files
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]


FAST_OPTS: dict[str, str | None] = dict(zip(FAST[::2], FAST[1::2]))
