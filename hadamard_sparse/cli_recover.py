"""The ``recover`` command: prune a Hugging Face / sentence-transformers directory and distil it back.

::

    hadamard-sparse recover MODEL_DIR OUT_DIR --data TEXTS.txt [--sparsity 0.9] [--eval EVAL.txt]
                    [--max-minutes N] [--structure 2:4] [--method sparsegpt] [--ramp-method magnitude]
                    [--exclude PATTERN ...] [--steps N] [--lr 1e-4] [--batch-size 32] [--seed 0] [--resume]

TEXTS.txt and EVAL.txt hold one text per line. A directory with ``modules.json`` is loaded as a
``SentenceTransformer`` (when sentence-transformers is installed), so the distilled embedding is
the model's own (its pooling and normalisation); otherwise the model class its config names.
While training, a checkpoint is written to ``OUT_DIR/recover-checkpoint/`` (``--resume`` continues
from it, bitwise as if uninterrupted); at the end OUT_DIR holds the other files of MODEL_DIR and
the recovered weights (effective weights under their usual names, masks beside them as
``<name>_mask``), which plain ``from_pretrained`` / ``SentenceTransformer`` load and
``hs.load_pretrained`` restores with masks, as ``sparsify``'s output. Every check that needs no
model runs before anything is written; a refused argument is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, NoReturn

from torch import nn

from ._cli_common import check_out_dir, load_errors, load_model
from .errors import HadamardSparseError
from .hf import save_model_dir
from .recover import CHECKPOINT_FILE, read_texts, recover
from .scores import available_scores

__all__ = ["CHECKPOINT_DIR", "add_recover_parser", "run_recover"]

#: The checkpoint folder inside OUT_DIR while a run is under way.
CHECKPOINT_DIR = "recover-checkpoint"


def _fail(parser: argparse.ArgumentParser, msg: str) -> NoReturn:
    parser.error(msg)  # one line on stderr, status 2 (the parser is a OneLineParser)
    raise SystemExit(2)  # for parsers that return


def _float_arg(low: float, high: float | None) -> Any:
    def parse(value: str) -> float:
        try:
            v = float(value)
        except ValueError:
            v = float("nan")
        if not (v > low and (high is None or v < high)):
            where = f"in ({low:g}, {high:g})" if high is not None else f"> {low:g}"
            raise argparse.ArgumentTypeError(f"must be a number {where}, got {value!r}")
        return v

    return parse


def _int_arg(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return v


def add_recover_parser(sub: Any) -> None:
    """Add the ``recover`` subcommand to the subparsers ``sub``."""
    p = sub.add_parser(
        "recover",
        help="prune a model directory to a high sparsity and distil it back (one-shot + ramp + distillation)",
        description="Prune MODEL_DIR to --sparsity with the recovery recipe (one-shot init, cubic ramp, "
        "distillation from the dense model with learning-rate restarts) on the texts of --data, report quality "
        "against the dense model on --eval, and write OUT_DIR (loadable with plain from_pretrained or "
        "SentenceTransformer).",
    )
    p.add_argument(
        "model_dir", metavar="MODEL_DIR", help="a Hugging Face or sentence-transformers model directory"
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write the result (new or empty directory)")
    p.add_argument("--data", required=True, metavar="TEXTS.txt", help="training texts, one per line")
    p.add_argument("--sparsity", default=None, help="target sparsity in (0, 1) (default 0.9)")
    p.add_argument("--eval", metavar="EVAL.txt", help="held-out texts, one per line, for the quality report")
    p.add_argument("--max-minutes", type=_float_arg(0.0, None), default=None, help="wall-clock budget")
    p.add_argument("--structure", default=None, help="N:M structure such as 2:4 (masks fixed after one shot)")
    p.add_argument(
        "--method",
        choices=available_scores(),
        default="sparsegpt",
        help="one-shot method (default sparsegpt)",
    )
    p.add_argument("--ramp-method", default="magnitude", help="score of the gradual ramp (default magnitude)")
    p.add_argument("--exclude", nargs="+", metavar="PATTERN", help="glob patterns of names to leave dense")
    p.add_argument(
        "--steps", type=_int_arg, default=None, help="training steps (default: grows with sparsity)"
    )
    p.add_argument("--lr", type=_float_arg(0.0, None), default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--batch-size", type=_int_arg, default=32, help="texts per step (default 32)")
    p.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        help="batch texts in random order (default: texts of similar length together, less padding)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in OUT_DIR")
    p.set_defaults(run=run_recover, parser=p)


def _is_inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    """Every check that needs no model; returns the training and evaluation texts."""
    if importlib.util.find_spec("transformers") is None:
        _fail(parser, 'recover needs transformers: pip install "hadamard-sparse[examples]"')
    if args.sparsity is not None:
        try:
            args.sparsity = _float_arg(0.0, 1.0)(args.sparsity)
        except argparse.ArgumentTypeError as e:
            _fail(parser, f"--sparsity {e}")
    src, out = Path(args.model_dir), Path(args.out_dir)
    if not (src / "config.json").is_file():
        _fail(parser, f"MODEL_DIR {str(src)!r} is not a Hugging Face model directory (no config.json)")
    ckpt = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    if not args.resume:
        check_out_dir(parser, args.model_dir, args.out_dir)  # same dir, nested dirs, non-empty OUT_DIR
    elif _is_inside(out, src) or _is_inside(src, out):
        _fail(parser, f"OUT_DIR {str(out)!r} must not be inside MODEL_DIR {str(src)!r} (nor around it)")
    elif not ckpt.is_file():
        _fail(parser, f"--resume: no checkpoint at {str(ckpt)!r}; run once without --resume to start")
    try:
        texts = read_texts(args.data)
        held = None if args.eval is None else read_texts(args.eval)
    except HadamardSparseError as e:
        _fail(parser, f"--data/--eval: {e}")
    return texts, held


def _load(parser: argparse.ArgumentParser, src: Path) -> tuple[nn.Module, nn.Module, Any, str]:
    """``(model to recover, HF model to save, tokenizer, subfolder of its weights)``."""
    modules = src / "modules.json"
    if modules.is_file() and importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(src), device="cpu")
        entries = json.loads(modules.read_text())
        sub = next((e.get("path", "") for e in entries if e.get("type", "").endswith("Transformer")), "")
        return st, st[0].auto_model, None, sub
    import transformers

    model = load_model(parser, src)
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    return model, model, tok, ""


def run_recover(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the ``recover`` command; returns the exit status."""
    texts, held = _check(parser, args)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    src, out = Path(args.model_dir), Path(args.out_dir)
    t0 = time.perf_counter()
    try:
        model, hf_model, tok, sub = _load(parser, src)
    except load_errors() as e:
        _fail(
            parser,
            f"cannot load MODEL_DIR {str(src)!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
        )
    print(f"loaded {type(model).__name__} from {src}")
    created = not out.exists()
    try:
        report = recover(
            model,
            texts,
            args.sparsity,
            tokenizer=tok,
            eval_data=held,
            method=args.method,
            ramp_method=args.ramp_method,
            structure=args.structure,
            exclude=args.exclude,
            steps=args.steps,
            max_minutes=args.max_minutes,
            lr=args.lr,
            batch_size=args.batch_size,
            group_by_length=args.group_by_length,
            seed=args.seed,
            checkpoint_dir=out / CHECKPOINT_DIR,
            resume=args.resume,
        )
    except HadamardSparseError as e:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        _fail(parser, str(e).splitlines()[0])
    save_model_dir(hf_model, src, out, weights_under=sub)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    print(report)
    print(f"wrote {out} in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0
