"""Pruning during fine-tuning: magnitude vs movement vs oBERT scores, in a transfer setting.

LeNet-300-100 is pretrained on one half of the classes (digits 0-4 of the data set of
:func:`_common.load_data`: Fashion-MNIST when installed, else scikit-learn's 8x8 digits), then
fine-tuned on the other half (5-9) while ``hs.GradualPruning`` prunes it (cubic from 0 to the target
over the first 60% of the fine-tuning steps, ``--events`` pruning steps, Adam). Methods:

- ``magnitude``: global magnitude (the schedule's default);
- ``movement_layer`` / ``movement_global``: ``method="movement"`` with an ``hs.GradientScores``
  (``movement="run"``: summed over the whole fine-tuning, as Sanh et al.);
- ``movement_layer_since_prune``: the same with ``movement="since_prune"`` (reset at each pruning step);
- ``obs``: ``method="obs"`` (oBERT: block Fisher of the last ``--num-grads`` gradients, blocks of
  ``--block-size``, OBS update of the kept weights at each pruning step), global.

Test accuracy on the fine-tuning classes, mean ± std over ``--seeds``; the dense fine-tuned model is
the reference. Writes ``benchmarks/results/fine_tune_scores{_quick}.md`` and ``.json``.

Run: ``python benchmarks/fine_tune_scores.py`` (or ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import Data, evaluate, lenet_300_100, load_data, steps_per_epoch, train

import hadamard_sparse as hs

METHODS = ("dense", "magnitude", "movement_layer", "movement_global", "movement_layer_since_prune", "obs")


def _split(data: Data, classes: range) -> Data:
    tr = (data.ytr >= classes.start) & (data.ytr < classes.stop)
    te = (data.yte >= classes.start) & (data.yte < classes.stop)
    return Data(data.Xtr[tr], data.ytr[tr], data.Xte[te], data.yte[te], data.name)


def _run(
    method: str, pretrained: nn.Module, task: Data, sparsity: float, args: argparse.Namespace, seed: int
) -> float:
    model = copy.deepcopy(pretrained)
    total = round(args.ft_epochs * steps_per_epoch(task, args.batch_size))
    if method == "dense":
        train(model, task, epochs=args.ft_epochs, lr=args.lr, batch_size=args.batch_size, seed=seed)
        return evaluate(model, task.Xte, task.yte)
    hs.sparsify(model, 0.0)
    end = round(0.6 * total)
    every = max(1, end // args.events)
    kw: dict = {"method": "magnitude", "scope": "global"}
    tracker = None
    if method.startswith("movement"):
        tracker = hs.GradientScores(
            model, movement="since_prune" if method.endswith("since_prune") else "run"
        )
        kw = {"method": "movement", "scope": method.split("_")[1], "calibration": tracker}
    elif method == "obs":
        tracker = hs.GradientScores(
            model, num_grads=args.num_grads, block_size=args.block_size, damp=args.damp
        )
        kw = {"method": "obs", "scope": "global", "calibration": tracker}
    sched = hs.GradualPruning(model, sparsity, start_step=every, end_step=end, every=every, **kw)
    train(
        model,
        task,
        epochs=args.ft_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=seed,
        on_step=lambda s: sched.step(),
    )
    if tracker is not None:
        tracker.remove()
    report = hs.sparsity_report(model)
    assert abs(report.sparsity - sparsity) < 1e-3, report.sparsity
    return evaluate(model, task.Xte, task.yte)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.97, 0.99])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--pretrain-epochs", type=float, default=30)
    p.add_argument("--ft-epochs", type=float, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--events", type=int, default=6)
    p.add_argument("--num-grads", type=int, default=64)
    p.add_argument("--block-size", type=int, default=50)
    p.add_argument("--damp", type=float, default=1e-7)
    p.add_argument("--data", default="auto")
    p.add_argument("--quick", action="store_true", help="2 seeds, 2 sparsities")
    p.add_argument("--out", default=None, help="results file stem (default fine_tune_scores[_quick])")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.sparsities = 2, [0.9, 0.95]
    torch.set_num_threads(1)
    data = load_data(args.data)
    source, task = _split(data, range(0, 5)), _split(data, range(5, 10))
    results: dict[str, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        pretrained = lenet_300_100(data.in_features, 10)
        train(
            pretrained, source, epochs=args.pretrain_epochs, lr=args.lr, batch_size=args.batch_size, seed=seed
        )
        for s in args.sparsities:
            for method in METHODS:
                if method == "dense" and s != args.sparsities[0]:
                    continue
                acc = _run(method, pretrained, task, s, args, seed)
                key = "dense" if method == "dense" else f"{s:g}"
                results.setdefault(method, {}).setdefault(key, []).append(acc)
                print(f"seed {seed} sparsity {s:g} {method:16s} {acc:.4f}", flush=True)
    elapsed = time.perf_counter() - t0
    head = ["method", *[f"{s:g}" for s in args.sparsities]]
    lines = [
        f"# Pruning during fine-tuning ({data.name}: LeNet-300-100 pretrained on classes 0-4, fine-tuned on 5-9)",
        "",
        f"`python benchmarks/fine_tune_scores.py {' '.join(sys.argv[1:])}`; test accuracy on classes 5-9, "
        f"mean ± std over {args.seeds} seeds; fine-tuning {args.ft_epochs:g} epochs (batch {args.batch_size}, "
        f"Adam lr {args.lr:g}), GradualPruning cubic over the first 60% in {args.events} steps; obs: "
        f"num_grads={args.num_grads}, block_size={args.block_size}, damp={args.damp:g}. {elapsed:.0f} s.",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
    ]
    dense = results["dense"]["dense"]
    lines.append(f"| dense | {statistics.mean(dense):.4f} ± {statistics.pstdev(dense):.4f} (no pruning) |")
    for method in METHODS[1:]:
        cells = [
            f"{statistics.mean(results[method][f'{s:g}']):.4f} ± {statistics.pstdev(results[method][f'{s:g}']):.4f}"
            for s in args.sparsities
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    stem = args.out or f"fine_tune_scores{'_quick' if args.quick else ''}"
    out = Path(__file__).resolve().parent / "results" / stem
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
