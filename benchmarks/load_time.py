"""Time of ``hs.load_sparse_state_dict`` on a fresh model with many masked layers, vs torch's own load.

A model of ``--blocks`` x 50 ``nn.Linear(2, 2)`` layers is sparsified (a random mask per weight), its
``state_dict`` taken, and a fresh, unmodified copy of the architecture loads it with
``hs.load_sparse_state_dict`` (registers every mask, checks every key, shape and dtype, then loads).
For scale, ``load_state_dict`` of the same entries into the now parametrized model is timed too.
Each size runs in the same process, one thread, median of ``--repeats`` runs.

Run::

    python benchmarks/load_time.py                      # 1,000 and 5,000 layers

Writes ``benchmarks/results/load_time.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import hadamard_sparse as hs

RESULTS = Path(__file__).parent / "results" / "load_time.md"


def _deep(blocks: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(*[nn.Linear(2, 2) for _ in range(50)]) for _ in range(blocks)])


def _one(blocks: int) -> tuple[float, float]:
    torch.manual_seed(0)
    src = _deep(blocks)
    for m in src.modules():
        if isinstance(m, nn.Linear):
            hs.register_mask(m, "weight", torch.rand(2, 2) > 0.5)
    sd = src.state_dict()
    fresh = _deep(blocks)
    t0 = time.perf_counter()
    hs.load_sparse_state_dict(fresh, sd)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    fresh.load_state_dict(sd)
    plain = time.perf_counter() - t0
    return ours, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[20, 100], help="blocks of 50 layers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for blocks in args.blocks:
        runs = [_one(blocks) for _ in range(args.repeats)]
        ours = statistics.median(r[0] for r in runs)
        plain = statistics.median(r[1] for r in runs)
        rows.append(f"| {50 * blocks:,} | {ours:.2f} | {plain:.2f} | {ours / plain:.1f}x |")
        print(rows[-1], flush=True)
    lines = [
        f"Command: `python benchmarks/load_time.py --blocks {' '.join(map(str, args.blocks))} "
        f"--repeats {args.repeats}` (torch {torch.__version__}, CPU, 1 thread, median of {args.repeats}).",
        "",
        "# Loading a sparse state_dict into a fresh model",
        "",
        "| layers | `hs.load_sparse_state_dict` (s) | torch `load_state_dict`, same entries (s) | ratio |",
        "| ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "The first release registered masks in time quadratic in the number of layers (5,000 layers: 58 s).",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
