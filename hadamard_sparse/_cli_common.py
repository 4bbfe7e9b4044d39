"""The command line's shared pieces: a parser whose errors are one line, the MODEL_DIR / OUT_DIR rule,
and model loading whose failures are one line (status 2), for every sub-command of :mod:`.cli`.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

from torch import nn

from .hf import load_pretrained

__all__ = ["OneLineParser", "check_out_dir", "load_errors", "load_model", "safetensors_errors"]


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block), with a ``--help`` hint.

    Its sub-parsers are of the same class (``add_subparsers`` builds them with ``type(self)``).
    """

    def error(self, message: str) -> Any:  # argparse's signature says NoReturn; typeshed's says Never
        """Print ``PROG: error: MESSAGE (see 'PROG --help')`` as one line on stderr and exit with status 2."""
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        self.exit(2, f"{self.prog}: error: {text} (see '{self.prog} --help')\n")


def check_out_dir(
    parser: argparse.ArgumentParser, model_dir: str, out_dir: str, *, out_name: str = "OUT_DIR"
) -> None:
    """Refuse an output directory that could overwrite or swallow the model directory. Exits with 2 on error.

    Symlinks and relative paths are resolved first. Refused, in this order: the same directory; one
    inside the other (an OUT_DIR inside MODEL_DIR would be copied into every later output, a MODEL_DIR
    inside OUT_DIR would be written over); an OUT_DIR that exists and is not an empty directory.

    Args:
        parser: the (sub-)parser whose ``error`` reports the problem.
        model_dir: the source model directory (MODEL_DIR).
        out_dir: the directory to be written.
        out_name: how the command line names ``out_dir`` in messages.
    """
    src, out = Path(model_dir), Path(out_dir)
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r:
        parser.error(f"{out_name} must differ from MODEL_DIR: both are {str(src_r)!r}")
    if out_r.is_relative_to(src_r) or src_r.is_relative_to(out_r):
        inner, outer = (out_name, "MODEL_DIR") if out_r.is_relative_to(src_r) else ("MODEL_DIR", out_name)
        parser.error(
            f"{inner} must not be inside {outer}: {out_name} {str(out)!r} resolves to {str(out_r)!r}, "
            f"MODEL_DIR {str(src)!r} to {str(src_r)!r}"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"{out_name} {str(out)!r} exists and is not an empty directory; choose a new one")


def safetensors_errors() -> tuple[type[BaseException], ...]:
    """safetensors' own error type (a corrupt file), when safetensors is installed."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return ()
    return (SafetensorError,)


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a model directory raises on a missing, unreadable, truncated or corrupt file."""
    return (
        OSError,
        ValueError,
        KeyError,
        EOFError,
        RuntimeError,
        pickle.UnpicklingError,
        *safetensors_errors(),
    )


def _unreadable_safetensors(model_dir: Path) -> list[str]:
    """The names of the ``*.safetensors`` files of ``model_dir`` whose header safetensors cannot read."""
    from safetensors import safe_open

    bad = []
    for f in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (OSError, *safetensors_errors()):
            bad.append(f.name)
    return bad


def load_model(parser: argparse.ArgumentParser, model_dir: str | Path) -> nn.Module:
    """``load_pretrained(model_dir)``; a directory it cannot load (a truncated weights file, ...) exits with 2."""
    try:
        return load_pretrained(model_dir)
    except load_errors() as e:
        hint = ""
        if isinstance(e, safetensors_errors()):
            bad = _unreadable_safetensors(Path(model_dir))
            hint = f" ({', '.join(bad)} truncated or corrupt)" if bad else ""
        parser.error(f"cannot load {str(model_dir)!r}{hint}: {type(e).__name__}: {e}")
