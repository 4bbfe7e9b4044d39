"""More convolution shapes at 90% sparsity: the direct kernel (``SparseConv`` ``csr_kernel``) vs dense.

The shapes behind ``CONV_MAX_DENSITY["csr_kernel"] = 0.1`` beyond ``conv_speed.py``'s (ResNet stem
and later stages, a CIFAR first layer, a speech Conv1d). 1 thread, this thread's CPU time,
interleaved rounds, medians; prints one markdown row per shape::

    PYTHONPATH=$PWD python benchmarks/conv_rule_shapes.py [--sparsity 0.9]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from conv_speed import _random_sparse  # type: ignore[import-not-found]
from torch import nn

from hadamard_sparse.export import SparseConv

CASES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    (
        "ResNet stem 7x7 s2 3->64",
        lambda: nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
        (1, 3, 224, 224),
    ),
    ("ResNet 3x3 128->128", lambda: nn.Conv2d(128, 128, 3, padding=1, bias=False), (1, 128, 28, 28)),
    ("ResNet 3x3 512->512", lambda: nn.Conv2d(512, 512, 3, padding=1, bias=False), (1, 512, 7, 7)),
    (
        "ResNet 3x3 s2 64->128",
        lambda: nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False),
        (1, 64, 56, 56),
    ),
    ("CIFAR first 3x3 3->32", lambda: nn.Conv2d(3, 32, 3, padding=1), (8, 3, 32, 32)),
    ("speech Conv1d 80->256 k3", lambda: nn.Conv1d(80, 256, 3, padding=1), (1, 80, 400)),
]


def _cpu_time(fn: Callable[[], object], reps: int) -> float:
    start = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| conv | input | sparsity | dense ms | csr_kernel (direct) |\n|---|---|---|---|---|")
    for name, make, shape in CASES:
        x = torch.randn(*shape)
        conv = _random_sparse(make, args.sparsity, 0)
        sc = SparseConv(conv).eval()
        run_dense, run_direct = partial(conv, x), partial(sc, x)
        with torch.inference_mode():
            run_dense(), run_direct()
            reps = max(3, int(0.03 / max(_cpu_time(run_dense, 3), 1e-6)))
            dense, direct = [], []
            for _ in range(7):
                dense.append(_cpu_time(run_dense, reps))
                direct.append(_cpu_time(run_direct, reps))
        d, s = statistics.median(dense), statistics.median(direct)
        print(f"| {name} | {tuple(shape)} | {args.sparsity} | {d * 1e3:.3f} | {d / s:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
