"""The main job: ``python -m hadamard_sparse demo``."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("sklearn")


def test_demo_reaches_sparsity_and_keeps_accuracy() -> None:
    from hadamard_sparse.cli import demo

    out = demo(sparsity=0.8, epochs=4, finetune_epochs=2)
    assert out["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert out["dense_accuracy"] > 0.85
    assert out["sparse_accuracy"] > out["dense_accuracy"] - 0.05


def test_command_line_entry_point() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "hadamard_sparse", "demo", "--epochs", "1", "--finetune-epochs", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "sparse test accuracy" in r.stdout and "exactly zero" in r.stdout
    r = subprocess.run([sys.executable, "-m", "hadamard_sparse", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr
