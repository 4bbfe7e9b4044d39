"""Test accuracy of pruning schedules vs torch.nn.utils.prune on Fashion-MNIST (digits fallback).

For each network (LeNet-300-100, LeNet-5) and seed:

- ``dense``: train ``--dense-epochs`` epochs (the pretrained model), then ``--ft-epochs`` more
  (the dense reference gets the same total budget as every pruned model).
- From the pretrained dense model, with a fine-tuning budget of ``--ft-epochs`` epochs each:
  ``oneshot`` (``hs.sparsify`` global magnitude, then fine-tune), ``torch_prune``
  (``torch.nn.utils.prune.global_unstructured`` L1, then fine-tune: the reference),
  ``gradual`` (``hs.GradualPruning``, cubic from 0 over the first 60% of the budget, 10 updates),
  ``iterative`` (``hs.IterativePruning``, 3 rounds in the budget, rewinding kept weights to the
  pretrained dense weights, the optimizer reset at each rewind).
- From scratch with the total budget ``--dense-epochs + --ft-epochs``: ``set`` and ``rigl``
  (ERK, drop fraction 0.3 annealed to 0 at 75% of training, ~30 updates).

Every sparsity in ``--sparsities`` (default 0.5 0.8 0.9 0.95 0.98), mean ± std over ``--seeds``.
Writes ``benchmarks/results/accuracy{_quick}.md`` / ``.json`` / ``.png``.

Run: ``python benchmarks/accuracy.py`` (full) or ``python benchmarks/accuracy.py --quick``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import Data, evaluate, lenet5, lenet_300_100, load_data, steps_per_epoch, train

import hadamard_sparse as hs
from hadamard_sparse.schedules import SET, GradualPruning, IterativePruning, RigL

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["oneshot", "torch_prune", "gradual", "iterative", "set", "rigl"]
OURS = ["oneshot", "gradual", "iterative", "set", "rigl"]


def _nets(data: Data) -> dict[str, Callable[[], nn.Module]]:
    return {
        "lenet_300_100": lambda: lenet_300_100(data.in_features, data.n_classes),
        "lenet5": lambda: lenet5(data.in_channels, data.n_classes, data.image_size),
    }


def _prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _run_method(
    method: str,
    sparsity: float,
    make: Callable[[], nn.Module],
    pretrained: dict[str, torch.Tensor],
    data: Data,
    args: argparse.Namespace,
    seed: int,
) -> float:
    bs, lr = args.batch_size, args.lr
    spe = steps_per_epoch(data, bs)
    ft_steps = max(1, round(args.ft_epochs * spe))
    torch.manual_seed(seed)
    model = make()
    if method in ("set", "rigl"):
        total = max(1, round((args.dense_epochs + args.ft_epochs) * spe))
        hs.sparsify(model, 0.0)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        every = max(1, total // 30)
        kw = {
            "every": every,
            "drop_fraction": 0.3,
            "end_step": max(every + 1, int(0.75 * total)),
            "seed": seed,
        }
        if method == "set":
            sched: SET | RigL = SET(model, sparsity, optimizer=opt, distribution="erk", **kw)
        else:
            sched = RigL(model, opt, sparsity, distribution="erk", **kw)
        train(
            model,
            data,
            epochs=args.dense_epochs + args.ft_epochs,
            lr=lr,
            batch_size=bs,
            seed=seed,
            optimizer=opt,
            on_step=lambda _s: sched.step(),
        )
        return evaluate(model, data.Xte, data.yte)
    model.load_state_dict(pretrained)
    on_step = None
    opt = None
    if method == "torch_prune":
        prune.global_unstructured(_prunable(model), pruning_method=prune.L1Unstructured, amount=sparsity)
    elif method == "oneshot":
        hs.sparsify(model, sparsity)
    elif method == "gradual":
        hs.sparsify(model, 0.0)
        end = max(1, int(args.gradual_end * ft_steps))
        g = GradualPruning(model, sparsity, start_step=0, end_step=end, every=max(1, end // 10), seed=seed)
        on_step = lambda _s: g.step()  # noqa: E731
    elif method == "iterative":
        hs.sparsify(model, 0.0)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        rounds = 3
        it = IterativePruning(
            model,
            rounds=rounds,
            final_sparsity=sparsity,
            rewind_to=0,
            every=max(1, ft_steps // (rounds + 1)),
            optimizer=opt,
            seed=seed,
        )
        on_step = lambda _s: it.step()  # noqa: E731
    else:
        raise ValueError(method)
    train(
        model,
        data,
        epochs=args.ft_epochs,
        lr=lr,
        batch_size=bs,
        seed=seed + 1000,
        optimizer=opt if opt is not None else "adam",
        on_step=on_step,
    )
    achieved = _sparsity_of(model)
    if abs(achieved - sparsity) > 1e-3:
        raise RuntimeError(f"{method} reached sparsity {achieved:.4f}, expected {sparsity}")
    return evaluate(model, data.Xte, data.yte)


def _sparsity_of(model: nn.Module) -> float:
    zeros = total = 0
    for m, name in _prunable(model):
        w = getattr(m, name)
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / max(1, len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke test: small subset, 2 sparsities, 2 seeds (~1-2 min)"
    )
    p.add_argument("--data", default="auto", choices=["auto", "fashion-mnist", "digits"])
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dense-epochs", type=float, default=2.0)
    p.add_argument("--ft-epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.98])
    p.add_argument("--nets", nargs="+", default=["lenet_300_100", "lenet5"])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument(
        "--gradual-end",
        type=float,
        default=0.6,
        help="GradualPruning ramp end, as a fraction of the fine-tuning budget",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--out", default=None, help="output stem under benchmarks/results (default accuracy / accuracy_quick)"
    )
    p.add_argument(
        "--replot", default=None, help="rewrite the table and plot from a results JSON, no training"
    )
    args = p.parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        saved = json.loads(path.read_text())
        vars(args).update({k: v for k, v in saved["args"].items() if k != "replot"})
        data = load_data(saved["data"], train_subset=args.train_subset, test_subset=args.test_subset)
        _write(saved["results"], args, data, saved["elapsed_s"], path.stem)
        return
    if args.quick:
        args.train_subset, args.test_subset, args.seeds = 2000, 2000, 2
        args.dense_epochs, args.ft_epochs = 1.0, 1.0
        args.sparsities = [0.5, 0.9]
    torch.set_num_threads(args.threads)
    stem = args.out or ("accuracy_quick" if args.quick else "accuracy")
    data = load_data(args.data, train_subset=args.train_subset, test_subset=args.test_subset)
    print(f"data: {data.name} (train {len(data.ytr)}, test {len(data.yte)})", flush=True)
    t0 = time.time()
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for net_name in args.nets:
        make = _nets(data)[net_name]
        res: dict[str, dict[str, list[float]]] = {"dense": {"-": []}, **{m: {} for m in args.methods}}
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = make()
            train(model, data, epochs=args.dense_epochs, lr=args.lr, batch_size=args.batch_size, seed=seed)
            pretrained = copy.deepcopy(model.state_dict())
            train(
                model, data, epochs=args.ft_epochs, lr=args.lr, batch_size=args.batch_size, seed=seed + 1000
            )
            res["dense"]["-"].append(evaluate(model, data.Xte, data.yte))
            print(
                f"[{time.time() - t0:6.0f}s] {net_name} seed {seed} dense {res['dense']['-'][-1]:.4f}",
                flush=True,
            )
            for s in args.sparsities:
                for method in args.methods:
                    acc = _run_method(method, s, make, pretrained, data, args, seed)
                    res[method].setdefault(str(s), []).append(acc)
                    print(
                        f"[{time.time() - t0:6.0f}s] {net_name} seed {seed} {method:11s} s={s:<5} {acc:.4f}",
                        flush=True,
                    )
        results[net_name] = res
    elapsed = time.time() - t0
    _write(results, args, data, elapsed, stem)


def _command(args: argparse.Namespace) -> str:
    if args.quick:
        return "python benchmarks/accuracy.py --quick"
    parts = ["python benchmarks/accuracy.py", f"--data {args.data}"]
    if args.train_subset is not None:
        parts.append(f"--train-subset {args.train_subset}")
    if args.test_subset is not None:
        parts.append(f"--test-subset {args.test_subset}")
    parts += [
        f"--dense-epochs {args.dense_epochs:g}",
        f"--ft-epochs {args.ft_epochs:g}",
        f"--seeds {args.seeds}",
        f"--threads {args.threads}",
    ]
    if getattr(args, "gradual_end", 0.6) != 0.6:
        parts.append(f"--gradual-end {args.gradual_end:g}")
    if list(getattr(args, "methods", METHODS)) != METHODS:
        parts.append("--methods " + " ".join(args.methods))
    if list(args.nets) != ["lenet_300_100", "lenet5"]:
        parts.append("--nets " + " ".join(args.nets))
    if args.out:
        parts.append(f"--out {args.out}")
    return " ".join(parts)


def _write(
    results: dict, args: argparse.Namespace, data: Data, elapsed: float, stem: str, cmd: str | None = None
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = cmd or _command(args)
    lines = [
        f"# Accuracy of pruning schedules ({data.name})",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Data: {data.name}, train {len(data.ytr)} / test {len(data.yte)} images; seeds {args.seeds}; "
        f"dense {args.dense_epochs} epochs (+{args.ft_epochs} for the dense reference), fine-tune {args.ft_epochs} epochs, "
        f"SET/RigL {args.dense_epochs + args.ft_epochs} epochs from scratch; Adam lr {args.lr}, batch {args.batch_size}; "
        f"torch {torch.__version__}, {args.threads} thread(s); wall {elapsed / 60:.1f} min.",
        "",
        "Test accuracy (%), mean ± std over seeds.",
        "",
    ]
    checks = []
    for net, res in results.items():
        dense = res["dense"]["-"]
        lines += [f"## {net}", "", f"dense: {_fmt(dense)}", ""]
        sps = [str(s) for s in args.sparsities]
        lines.append("| method | " + " | ".join(sps) + " |")
        lines.append("|---|" + "---|" * len(sps))
        for m in [m for m in METHODS if m in res]:
            lines.append(f"| {m} | " + " | ".join(_fmt(res[m].get(s, [])) for s in sps) + " |")
        lines.append("")
        if "0.9" in res.get("gradual", {}):
            gap = 100 * (_mean(dense) - _mean(res["gradual"]["0.9"]))
            checks.append(
                f"- {net}: dense minus gradual at 0.9 = {gap:.2f} points (target <= 1): {'met' if gap <= 1 else 'NOT met'}"
            )
        for s in sps:
            ours = [m for m in OURS if m in res]
            if "torch_prune" not in res or not ours:
                continue
            best = max(ours, key=lambda m: _mean(res[m][s]))
            diff = 100 * (_mean(res[best][s]) - _mean(res["torch_prune"][s]))
            checks.append(
                f"- {net} s={s}: best ours = {best} ({diff:+.2f} points vs torch_prune): {'met' if diff >= 0 else 'NOT met'}"
            )
    lines += ["## Targets", "", *checks, "", f"![accuracy vs sparsity]({stem}.png)", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    (RESULTS / f"{stem}.json").write_text(
        json.dumps(
            {"data": data.name, "command": cmd, "args": vars(args), "elapsed_s": elapsed, "results": results},
            indent=1,
        )
    )
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (net, res) in zip(axes[0], results.items()):
        xs = args.sparsities
        dense = res["dense"]["-"]
        ax.axhline(100 * _mean(dense), color="k", ls="--", lw=1, label="dense")
        for m in [m for m in METHODS if m in res]:
            ys = [res[m][str(s)] for s in xs]
            means = [100 * _mean(y) for y in ys]
            stds = [
                100
                * (math.sqrt(sum((v - _mean(y)) ** 2 for v in y) / max(1, len(y) - 1)) if len(y) > 1 else 0.0)
                for y in ys
            ]
            ax.errorbar(
                list(range(len(xs))),
                means,
                yerr=stds,
                marker="o",
                ms=3,
                capsize=2,
                label=m,
                ls=":" if m == "torch_prune" else "-",
            )
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_title(f"{net} ({data.name})")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=110)
    print(f"wrote {RESULTS / (stem + '.md')}, .json, .png")


if __name__ == "__main__":
    main()
