"""torch's own transformer (nn.MultiheadAttention): heads removed by ``shrink``, sparse projections by ``to_sparse``.

Model: ``nn.TransformerEncoder`` of 2 ``nn.TransformerEncoderLayer`` (d_model 512, 8 heads,
feed-forward 2048, batch_first; the base Transformer's layer), eval mode.

- heads: 25/50/75% of every layer's heads pruned (``structure="head"``, ``scope="layer"``), then
  ``hs.shrink`` (each ``nn.MultiheadAttention`` becomes a ``ProjectedMultiheadAttention`` with
  fewer heads);
- to_sparse: every Linear and attention projection at 90% (``scope="layer"``), baked, then
  ``hs.to_sparse(example_inputs=x)``; and the same with the attention projections kept dense
  (``exclude="*self_attn*"``: what ``to_sparse`` did before it converted ``nn.MultiheadAttention``).

Each variant is checked against its reference (the masked model for shrink, the dense baked
model for to_sparse; max abs difference reported) and timed against the dense model in
interleaved rounds (medians). Ratios from one run on a shared machine are provisional.

Run::

    PYTHONPATH=$PWD python benchmarks/mha_speed.py --threads 1

Writes ``benchmarks/results/mha_speed.md`` (the command is its first line).
"""

from __future__ import annotations

import argparse
import copy
import platform
from pathlib import Path

import torch
from _common import time_interleaved  # type: ignore[import-not-found]
from torch import nn

import hadamard_sparse as hs

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = "PYTHONPATH=$PWD python benchmarks/mha_speed.py --threads {threads}"


def encoder(d: int = 512, heads: int = 8, ff: int = 2048, layers: int = 2) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(threads: int, shapes: list[tuple[int, int]], budget: float) -> str:
    torch.set_num_threads(threads)
    lines = [
        "`" + COMMAND.format(threads=threads) + "`",
        "",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {threads} thread(s). "
        "nn.TransformerEncoder, 2 layers, d_model 512, 8 heads, FFN 2048. Ratios: dense time / variant "
        "time, median of interleaved rounds in one run (provisional).",
        "",
        "| variant | params vs dense | "
        + " | ".join(f"{b}x{t} tokens" for b, t in shapes)
        + " | max abs diff |",
        "| --- | --- | " + " | ".join("---" for _ in shapes) + " | --- |",
    ]
    dense = encoder()
    n0 = n_params(dense)
    variants: dict[str, tuple[nn.Module, float, float]] = {}
    x0 = torch.randn(shapes[-1][0], shapes[-1][1], 512)
    for frac in (0.25, 0.5, 0.75):
        masked = encoder()
        hs.sparsify(masked, frac, structure="head", scope="layer")
        with torch.no_grad():
            ref = masked(x0)
        shrunk = hs.shrink(copy.deepcopy(masked), x0)
        with torch.no_grad():
            diff = float((shrunk(x0) - ref).abs().max())
        variants[f"shrink, {int(frac * 100)}% heads removed"] = (shrunk, n_params(shrunk) / n0, diff)
    baked = hs.remove_parametrizations(hs.sparsify(encoder(), 0.9, scope="layer"))
    with torch.no_grad():
        ref = baked(x0)
    for label, exclude in (
        ("to_sparse 90%, attention projections too", None),
        ("to_sparse 90%, attention kept dense", "*self_attn*"),
    ):
        xs = torch.randn(shapes[0][0], shapes[0][1], 512)
        sparse = hs.to_sparse(copy.deepcopy(baked), example_inputs=xs, exclude=exclude)
        with torch.inference_mode():
            diff = float((sparse(x0) - ref).abs().max())
        variants[label + f" (timed on {shapes[0][0]}x{shapes[0][1]})"] = (sparse, float("nan"), diff)
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    for b, t in shapes:
        x = torch.randn(b, t, 512)
        fns = {"dense": lambda x=x: dense(x)}
        fns.update({k: (lambda m=m, x=x: m(x)) for k, (m, _, _) in variants.items()})
        with torch.inference_mode():
            secs = time_interleaved(fns, budget_s=budget)
        for k in variants:
            ratios[k].append(secs["dense"] / secs[k])
    for k, (_, p, diff) in variants.items():
        pr = "" if p != p else f"{p:.2f}x"
        lines.append(f"| {k} | {pr} | " + " | ".join(f"{r:.2f}x" for r in ratios[k]) + f" | {diff:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per input shape")
    args = ap.parse_args()
    text = run(args.threads, [(1, 64), (16, 64)], args.budget)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mha_speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
