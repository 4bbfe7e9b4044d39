"""The compiled CSR kernel alone against dense ``F.linear`` on all-MiniLM-L6-v2's Linear shapes.

Random 90%-sparse weights (unstructured, 10% of each shape's entries kept at random), inputs of
64 and 1024 tokens (1 x 64 and 16 x 64 in the MiniLM benchmark), ratios of interleaved medians
in one process. Without ``--clock cpu`` the wall clock is used (needed for 2+ threads).

Run::

    PYTHONPATH=$PWD python benchmarks/kernel_shapes.py --threads 1 --clock cpu
    PYTHONPATH=$PWD python benchmarks/kernel_shapes.py --threads 2 [--shapes 64x4096x4096 ...]

Prints a Markdown table (``--out`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import time_interleaved  # type: ignore[import-not-found]

from hadamard_sparse.export import kernels

#: (tokens, in_features, out_features): q/k/v/o, FFN up, FFN down at 1 x 64 and 16 x 64 tokens.
MINILM_SHAPES = [(m, k, n) for m in (64, 1024) for k, n in ((384, 384), (384, 1536), (1536, 384))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per shape")
    parser.add_argument("--shapes", nargs="*", default=None, help="MxKxN, e.g. 1024x384x1536")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: use it with --threads 1")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else MINILM_SHAPES
    ok, why = kernels.kernel_status()
    rows = [
        "Command: `"
        + " ".join(["PYTHONPATH=$PWD python benchmarks/kernel_shapes.py", *sys.argv[1:]])
        + "`\n",
        f"torch {torch.__version__}, {args.threads} thread(s), clock {args.clock}, density {args.density}; "
        f"kernel: {why if ok else 'unavailable: ' + why}\n",
        "| tokens | in -> out | dense ms | kernel ms | kernel vs dense | torch csr vs dense |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    g = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < args.density)
        b, x = torch.randn(n, generator=g), torch.randn(m, k, generator=g)
        p = kernels.pack_csr(w)
        with torch.inference_mode():
            t = time_interleaved(
                {
                    "dense": partial(F.linear, x, w, b),
                    "kernel": partial(kernels.csr_linear, x, p, b, backend="kernel"),
                    "torch": partial(kernels.csr_linear, x, p, b, backend="torch"),
                },
                budget_s=args.budget,
                clock=clock,
            )
        d = t["dense"]
        rows.append(
            f"| {m} | {k} -> {n} | {d * 1e3:.3f} | {t['kernel'] * 1e3:.3f} | {d / t['kernel']:.2f}x | "
            f"{d / t['torch']:.2f}x |"
        )
        print(rows[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
