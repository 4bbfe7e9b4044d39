"""The command line: sparsify / report on Hugging Face directories (a tiny GPT-2, the real MiniLM), the demo's
argument checks, --version and help text. Run in-process through ``main(argv)``, plus one subprocess."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hadamard_sparse as hs
from hadamard_sparse import cli
from hadamard_sparse._cli_common import check_out_dir
from tests.conftest import minilm_path
from tests.hf_models import gpt2_config, transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = gpt2_config()
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    (d / "notes.txt").write_text("copied along\n")
    return d


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def test_sparsify_gpt2_bake_loads_with_plain_from_pretrained(
    gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, err = _run(["sparsify", str(gpt2_dir), str(out), "--sparsity", "0.5", "--bake"], capsys)
    assert code == 0, err
    assert "total" in stdout and "50.00%" in stdout
    assert {"config.json", "model.safetensors", "notes.txt"} <= {p.name for p in out.iterdir()}
    ref = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    with pytest.warns(UserWarning, match="tied"):
        hs.sparsify(ref, 0.5)  # what the command does, in-process (lm_head is tied to wte: skipped)
    hs.remove_parametrizations(ref)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()  # hadamard_sparse plays no part
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, ref(_ids()).logits, rtol=0, atol=0)
    rep = hs.sparsity_report(loaded)
    assert rep.zeros == round(0.5 * rep.numel)


def test_sparsify_without_bake_keeps_masks_in_the_safetensors(
    gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    out = tmp_path / "out"
    argv = [
        "sparsify",
        str(gpt2_dir),
        str(out),
        "--sparsity",
        "0.5",
        "--scope",
        "layer",
        "--exclude",
        "lm_head",
    ]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert "<name>_mask" in stdout
    ref = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    hs.sparsify(ref, 0.5, scope="layer", exclude="lm_head")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()  # plain: the effective weights
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, ref(_ids()).logits, rtol=0, atol=0)
    fresh = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    hs.load_sparse_state_dict(fresh, safetensors.load_file(str(out / "model.safetensors")))
    ours, theirs = hs.masks(fresh), hs.masks(ref)
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    code, stdout, _ = _run(["report", str(out)], capsys)
    assert code == 0 and "masks (" in stdout and "h.0.mlp.c_fc.weight_mask" in stdout


def test_sparsify_minilm_wanda_with_calibration_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = Path(minilm_path())
    lines = ["The cat sat on the mat.", "", "Interest rates were left unchanged.", "A storm hit the valley."]
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = ["sparsify", str(src), str(out), "--sparsity", "0.5", "--method", "wanda", "--bake"]
    code, stdout, err = _run([*argv, "--calibration", str(calib), "--exclude", "pooler*"], capsys)
    assert code == 0, err
    assert "calibration: 3/3" in stdout  # the progress lines (tqdm when stderr is a terminal)
    tok = transformers.AutoTokenizer.from_pretrained(out)  # tokenizer files travel
    batch = tok(["A sentence about the weather."], return_tensors="pt")
    ref = transformers.BertModel.from_pretrained(src).eval()
    samples = [dict(tok(x, return_tensors="pt")) for x in lines if x]
    hs.remove_parametrizations(hs.sparsify(ref, 0.5, method="wanda", calibration=samples, exclude="pooler*"))
    loaded = transformers.AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**batch).last_hidden_state, ref(**batch).last_hidden_state, rtol=0, atol=0
        )
    rep = hs.sparsity_report(loaded)
    assert rep["pooler.dense.weight"].zeros == 0
    for t in rep.tensors[:-1]:
        assert t.zeros == t.numel // 2, t.name  # scope row: exactly half of every row
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    code, stdout, _ = _run(["report", str(out)], capsys)
    assert code == 0 and "pooler.dense.weight" in stdout and "total" in stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsity", "1.5"], "argument --sparsity: must be a number in [0, 1], got '1.5'"),
        (["--method", "nope"], "argument --method: invalid choice: 'nope'"),
        (["--method", "wanda"], "--method wanda needs --calibration FILE"),
        (["--method", "wanda", "--calibration", "/nonexistent.txt"], "--calibration: cannot read"),
        (["--calibration", "CALIB"], "--method magnitude takes no --calibration"),
        (["--method", "wanda", "--scope", "global", "--calibration", "CALIB"], "supports --scope row"),
        (["--structure", "3:2"], "needs 1 <= N < M, got N=3, M=2"),
        (["--structure", "2:4", "--sparsity", "0.7"], "above what --structure 2:4 allows (0.5)"),
        (["--exclude", "classifier*"], "exclude entry 'classifier*' matches no targetable tensor"),
        (["--sparsity", "1.0"], "min_keep=1 keeps the best 1 of every output unit"),
        (["--min-keep", "-1"], "argument --min-keep: must be an integer >= 0"),
    ],
)
def test_sparsify_refuses_bad_arguments_without_writing(
    gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text("hello\n")
    out = tmp_path / "out"
    argv = [
        "sparsify",
        str(gpt2_dir),
        str(out),
        "--bake",
        *[str(calib) if a == "CALIB" else a for a in extra],
    ]
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_sparsify_refuses_bad_directories(
    gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["sparsify", str(tmp_path / "missing"), str(tmp_path / "o"), "--bake"], capsys)
    assert code == 2 and "not a Hugging Face model directory" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    code, _, err = _run(["sparsify", str(gpt2_dir), str(busy), "--bake"], capsys)
    assert code == 2 and "not an empty directory" in err
    code, _, err = _run(["sparsify", str(gpt2_dir), str(gpt2_dir), "--bake"], capsys)
    assert code == 2 and "OUT_DIR must differ from MODEL_DIR" in err  # not "not an empty directory"


def _listing(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*"))}


def test_sparsify_refuses_out_dir_inside_or_around_model_dir(
    gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "models" / "gpt2"
    shutil.copytree(gpt2_dir, src)
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    before = _listing(tmp_path)
    monkeypatch.chdir(tmp_path)
    for model_dir, out_dir, message in [
        ("models/gpt2", "models/gpt2/out", "OUT_DIR must not be inside MODEL_DIR"),  # relative, new
        ("link", "models/gpt2/a/b", "OUT_DIR must not be inside MODEL_DIR"),  # through a symlink
        (str(src), "link/out", "OUT_DIR must not be inside MODEL_DIR"),
        ("models/gpt2", "models/../link/.", "OUT_DIR must differ from MODEL_DIR"),
        ("link", str(src), "OUT_DIR must differ from MODEL_DIR"),
        ("models/gpt2", "models", "MODEL_DIR must not be inside OUT_DIR"),  # not "not an empty directory"
        ("link", ".", "MODEL_DIR must not be inside OUT_DIR"),
    ]:
        code, _, err = _run(["sparsify", model_dir, out_dir, "--sparsity", "0.5", "--bake"], capsys)
        assert code == 2 and message in err, (model_dir, out_dir, err)
        assert "Traceback" not in err and _listing(tmp_path) == before  # nothing written
    parser = cli.build_parser()  # the rule is a helper that other sub-commands call with their own names
    with pytest.raises(SystemExit):
        check_out_dir(parser, str(src), str(src / "x"), out_name="--out")
    assert "--out must not be inside MODEL_DIR" in capsys.readouterr().err
    check_out_dir(parser, str(src), str(tmp_path / "elsewhere"))  # accepted: returns


def _truncated_copy(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    data = (dst / name).read_bytes()
    (dst / name).write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize("compress", [False, True], ids=["safetensors", "compressed"])
def test_corrupt_weights_file_is_one_line_and_status_2(
    gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], compress: bool
) -> None:
    pytest.importorskip("safetensors")
    src = gpt2_dir
    name = "model.safetensors"
    if compress:  # a directory written by sparsify --compress, then truncated
        src, name = tmp_path / "compressed", "model.compressed.safetensors"
        code, _, err = _run(["sparsify", str(gpt2_dir), str(src), "--sparsity", "0.5", "--compress"], capsys)
        assert code == 0, err
    bad = _truncated_copy(src, tmp_path / "bad", name)
    out = tmp_path / "out"
    for argv in (["sparsify", str(bad), str(out), "--sparsity", "0.5"], ["report", str(bad)]):
        code, stdout, err = _run(argv, capsys)
        assert code == 2, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"cannot load {str(bad)!r} ({name} truncated or corrupt)" in err
        assert "loaded" not in stdout and not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["sparsify", "SRC", "OUT", "--bogus"],
            "hadamard-sparse sparsify: error: unrecognized arguments: --bogus",
        ),
        (["sparsify", "SRC", "OUT", "--sparsity", "x"], "argument --sparsity: must be a number in [0, 1]"),
        (["sparsify", "SRC", "OUT", "--seed", "-3"], "argument --seed: must be an integer >= 0, got '-3'"),
        (["sparsify", "SRC", "OUT", "--method", "nope"], "argument --method: invalid choice: 'nope'"),
        (["sparsify", "SRC"], "the following arguments are required: OUT_DIR"),
        (["report"], "the following arguments are required: MODEL_DIR_OR_FILE"),
        (["demo", "--epochs", "many"], "argument --epochs: must be an integer >= 1, got 'many'"),
        (["frobnicate"], "hadamard-sparse: error: argument {sparsify,recover,report,demo}: invalid choice"),
        ([], "the following arguments are required: {sparsify,recover,report,demo}"),
        (["--bogus"], "hadamard-sparse: error:"),
        (["sparsify", "SRC", "SRC"], "OUT_DIR must differ from MODEL_DIR"),  # a check after parsing
    ],
)
def test_refused_arguments_are_one_line_on_stderr(
    gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    argv = [{"SRC": str(gpt2_dir), "OUT": str(tmp_path / "out")}.get(a, a) for a in argv]
    code, stdout, err = _run(argv, capsys)
    assert code == 2 and stdout == ""
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err  # no usage block
    assert message in err and "usage:" not in err
    prog = (
        " ".join(["hadamard-sparse", *argv[:1]])
        if argv[:1] in (["sparsify"], ["report"], ["demo"])
        else "hadamard-sparse"
    )
    assert err.startswith(f"{prog}: error: ") and err.rstrip().endswith(f"(see '{prog} --help')"), err


def test_multi_line_error_messages_are_joined() -> None:
    parser = cli.build_parser()
    with pytest.raises(SystemExit) as e, pytest.MonkeyPatch.context() as mp:
        err = io.StringIO()
        mp.setattr(sys, "stderr", err)
        parser.error("first line\n  second line\n")
    assert e.value.code == 2
    assert err.getvalue() == "hadamard-sparse: error: first line second line (see 'hadamard-sparse --help')\n"


def test_report_of_a_safetensors_file_with_zeros_and_masks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    w = torch.ones(4, 6)
    w[:2] = 0
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, :3] = False
    path = tmp_path / "w.safetensors"
    safetensors.save_file({"fc.weight": w, "fc.bias": torch.zeros(4), "fc.weight_mask": mask}, str(path))
    code, out, _ = _run(["report", str(path)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert any(line.split()[:5] == ["fc.weight", "4x6", "24", "12", "50.00%"] for line in lines)
    assert any(line.split()[:5] == ["fc.weight_mask", "4x6", "24", "3", "12.50%"] for line in lines)
    assert "1 other tensors not shown" in out
    code, _, err = _run(["report", str(tmp_path / "nope.txt")], capsys)
    assert code == 2 and "neither a weights file nor" in err
    torch.save({"fc.weight": w, "step": 3}, tmp_path / "ckpt.pt")  # a torch file with a non-tensor entry
    code, out, _ = _run(["report", str(tmp_path / "ckpt.pt")], capsys)
    assert code == 0 and "50.00%" in out and "1 other tensors not shown" in out
    (tmp_path / "bad.bin").write_bytes(b"not a checkpoint")
    code, _, err = _run(["report", str(tmp_path / "bad.bin")], capsys)
    assert code == 2 and "cannot read" in err and "Traceback" not in err


def test_demo_arguments_checked_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in [
        (["demo", "--sparsity", "1.5"], "argument --sparsity: must be a number in [0, 1], got '1.5'"),
        (["demo", "--sparsity", "1.0"], "at most"),
        (["demo", "--epochs", "0"], "argument --epochs: must be an integer >= 1"),
    ]:
        t0 = time.perf_counter()
        code, _, err = _run(argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err
        assert time.perf_counter() - t0 < 5  # no training happened


def test_version_help_and_method_choices(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and out.strip() == f"hadamard-sparse {hs.__version__}"
    parser = cli.build_parser()
    subs = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for text in [parser.format_help(), *(p.format_help() for p in subs.values())]:
        assert "``" not in text and ":func:" not in text and ":class:" not in text
    method = next(a for a in subs["sparsify"]._actions if a.dest == "method")
    assert list(method.choices) == hs.available_scores()

    @hs.register_score("h9_cli_test_score")
    def _score(ctx: hs.ScoreContext) -> torch.Tensor:
        return ctx.weight.abs()

    try:
        subs = cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        method = next(a for a in subs["sparsify"]._actions if a.dest == "method")
        assert "h9_cli_test_score" in method.choices  # read from the registry, not a fixed list
    finally:
        from hadamard_sparse import scores

        del scores._SCORES["h9_cli_test_score"]


def test_subprocess_smoke(gpt2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = ["sparsify", str(gpt2_dir), str(out), "--sparsity", "0.6", "--scope", "layer", "--bake"]
    r = subprocess.run(
        [sys.executable, "-m", "hadamard_sparse", *argv], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    assert "h.0.mlp.c_fc.weight" in r.stdout and "wrote" in r.stdout
    bad = _truncated_copy(gpt2_dir, tmp_path / "bad", "model.safetensors")  # the whole process's stderr
    r = subprocess.run(
        [sys.executable, "-m", "hadamard_sparse", "report", str(bad)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert "model.safetensors truncated or corrupt" in r.stderr
