"""The command line: ``hadamard-sparse demo`` or ``python -m hadamard_sparse demo``.

The demo runs the whole story on real data that ships with scikit-learn (the
8x8 digits images, no download): train a small CNN, sparsify it, fine-tune,
print the sparsity report and dense vs sparse accuracy, bake, and check that
the baked model gives the same predictions.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .api import remove_parametrizations, sparsify
from .report import sparsity_report

T = TypeVar("T")


def _progress(it: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """tqdm when installed and stderr is a terminal; a plain line per 25% otherwise."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and sys.stderr.isatty():
        yield from tqdm(it, total=total, desc=desc, leave=False)
        return
    marks = {max(1, round(total * q)) for q in (0.25, 0.5, 0.75, 1.0)}
    for i, x in enumerate(it, 1):
        yield x
        if i in marks:
            print(f"  {desc}: {i}/{total}", flush=True)


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(
            'the demo needs scikit-learn: pip install "hadamard-sparse[examples]" torch==2.13.0'
        ) from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n_test = 360
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, desc: str) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    batch = 64
    steps = epochs * ((len(y) + batch - 1) // batch)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), batch):
                idx = perm[i : i + batch]
                yield x[idx], y[idx]

    model.train()
    for xb, yb in _progress(batches(), steps, desc):
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def demo(sparsity: float = 0.9, epochs: int = 8, finetune_epochs: int = 4) -> dict[str, float]:
    """Run the demo and return its figures (accuracies, sparsity, seconds).

    Args:
        sparsity: global magnitude sparsity to reach.
        epochs: dense training epochs.
        finetune_epochs: fine-tuning epochs after sparsify.

    Returns:
        ``{"dense_accuracy", "oneshot_accuracy", "sparse_accuracy", "sparsity", "seconds"}``.
    """
    t0 = time.perf_counter()
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _digits()
    print(f"scikit-learn digits: {len(ytr)} training and {len(yte)} test images (8x8)")
    model = _cnn()
    _train(model, xtr, ytr, epochs, 3e-3, "dense training")
    dense_acc = _accuracy(model, xte, yte)
    print(f"dense test accuracy: {dense_acc:.2%}")

    sparsify(model, sparsity=sparsity)
    oneshot_acc = _accuracy(model, xte, yte)
    print(f"after sparsify(model, sparsity={sparsity}): {oneshot_acc:.2%} (no fine-tuning)")
    _train(model, xtr, ytr, finetune_epochs, 1e-3, "sparse fine-tuning")
    sparse_acc = _accuracy(model, xte, yte)
    report = sparsity_report(model)
    print(report)
    print(f"sparse test accuracy after fine-tuning: {sparse_acc:.2%} (dense {dense_acc:.2%})")

    preds = model(xte).argmax(1)
    remove_parametrizations(model)
    assert torch.equal(model(xte).argmax(1), preds)
    baked = sparsity_report(model)
    print(
        f"baked into plain modules ({type(model[0]).__name__}, ...): "
        f"{baked.zeros:,} of {baked.numel:,} weights are exactly zero ({baked.sparsity:.2%})"
    )
    seconds = time.perf_counter() - t0
    print(f"done in {seconds:.1f} s")
    return {
        "dense_accuracy": dense_acc,
        "oneshot_accuracy": oneshot_acc,
        "sparse_accuracy": sparse_acc,
        "sparsity": baked.sparsity,
        "seconds": seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hadamard_sparse`` and the ``hadamard-sparse`` script."""
    parser = argparse.ArgumentParser(prog="hadamard-sparse", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train, sparsify, fine-tune and bake a CNN on scikit-learn's digits")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--finetune-epochs", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    demo(args.sparsity, args.epochs, args.finetune_epochs)
    return 0
