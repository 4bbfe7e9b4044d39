"""Compiled end to end: ``torch.compile(to_sparse(model))`` against ``torch.compile(dense)`` on all-MiniLM-L6-v2.

The sparse layers run the ``hadamard_sparse::csr_linear`` operator, which ``torch.compile`` sees
as one node (no graph break, ``fullgraph=True``), so Inductor fuses everything around it
(attention, softmax, LayerNorm, GELU, bias adds) as it does for the dense model. The real
all-MiniLM-L6-v2 (packaged weights, offline), every encoder Linear pruned by magnitude per
layer to the sparsity, baked; sparse = ``to_sparse(model, "csr_kernel")`` (every Linear at 90%
through the compiled kernel). Four variants timed in interleaved rounds (eager dense, eager
sparse, compiled dense, compiled sparse; medians), so load from other processes hits each alike.

Run::

    PYTHONPATH=$PWD python benchmarks/compile_speed.py --threads 2 [--budget 3] [--sparsity 0.9]

Writes ``benchmarks/results/compile_speed.md`` (``--out`` to change), the command and the
machine's load (``os.getloadavg``) on its first lines.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from _common import time_interleaved  # type: ignore[import-not-found]
from inference_speed import load_minilm  # type: ignore[import-not-found]

from hadamard_sparse.api import remove_parametrizations, sparsify
from hadamard_sparse.export import SparseLinear, kernels, to_sparse

warnings.filterwarnings("ignore", message="Sparse (CSR|BSR).*beta")

RESULTS = Path(__file__).resolve().parent / "results"


def _load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def bench(
    rows: list[str], sparsity: float, shapes: list[tuple[int, int]], budget: float, clock: str = "wall"
) -> None:
    base = load_minilm()
    dense = remove_parametrizations(sparsify(copy.deepcopy(base), sparsity, scope="layer"))
    sparse = to_sparse(copy.deepcopy(dense), "csr_kernel")
    n_sparse = sum(isinstance(m, SparseLinear) for m in sparse.modules())
    rows.append(
        f"all-MiniLM-L6-v2 at {sparsity:.0%} (per-layer magnitude, baked); sparse = "
        f'`to_sparse(model, "csr_kernel")`: {n_sparse} SparseLinear. `compiled` = '
        "`torch.compile(model)` (sparse with `fullgraph=True`: no graph break), compile time "
        "excluded (warm-up calls first). Speed-ups are over the dense model in the same mode, and "
        "`compiled sparse / eager dense` against plain eager dense.\n"
    )
    rows.append(
        "| tokens | eager dense ms | eager sparse | compiled dense ms | compiled sparse | "
        "compiled sparse vs compiled dense | compiled sparse vs eager dense | compile s (dense/sparse) | "
        "max abs diff |"
    )
    rows.append("|---|---|---|---|---|---|---|---|---|")
    for batch, seq in shapes:
        g = torch.Generator().manual_seed(0)
        inputs = {
            "input_ids": torch.randint(1000, 30000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        }
        torch._dynamo.reset()
        c_dense = torch.compile(dense, dynamic=False)
        c_sparse = torch.compile(sparse, fullgraph=True, dynamic=False)
        with torch.inference_mode():
            ref = dense(**inputs).last_hidden_state
            t0 = time.perf_counter()
            c_dense(**inputs)
            compile_dense = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = c_sparse(**inputs).last_hidden_state
            compile_sparse = time.perf_counter() - t0
            diff = float((got - ref).abs().max())
            t = time_interleaved(
                {
                    "dense": partial(dense, **inputs),
                    "sparse": partial(sparse, **inputs),
                    "c_dense": partial(c_dense, **inputs),
                    "c_sparse": partial(c_sparse, **inputs),
                },
                budget_s=budget,
                min_rounds=9,
                max_rounds=200,
                clock=time.thread_time if clock == "cpu" else time.perf_counter,
            )
        rows.append(
            f"| {batch}x{seq} | {t['dense'] * 1e3:.2f} | {t['dense'] / t['sparse']:.2f}x | "
            f"{t['c_dense'] * 1e3:.2f} | {t['c_dense'] / t['c_sparse']:.2f}x (ms {t['c_sparse'] * 1e3:.2f}) | "
            f"**{t['c_dense'] / t['c_sparse']:.2f}x** | {t['dense'] / t['c_sparse']:.2f}x | "
            f"{compile_dense:.0f}/{compile_sparse:.0f} | {diff:.1e} |"
        )
        print(rows[-1], flush=True)
    rows.append("")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per shape")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--tokens", nargs="+", default=["1x64", "16x64"], help="batch x sequence shapes")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this thread's CPU time (robust on a busy machine; with --threads 1 only)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "compile_speed.md")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: use --threads 1")
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.tokens]
    ok, why = kernels.kernel_status()
    rows = [
        f"`PYTHONPATH=$PWD python {' '.join(['benchmarks/compile_speed.py', *sys.argv[1:]])}`\n",
        f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"kernel: {why if ok else 'unavailable: ' + why}; clock: {args.clock}; run under "
        f"`torch.inference_mode()`; load average before: {_load()}\n",
        "# torch.compile end to end\n",
    ]
    bench(rows, args.sparsity, shapes, args.budget, args.clock)  # type: ignore[arg-type]
    rows.append(f"load average after: {_load()}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
