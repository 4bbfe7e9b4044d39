"""Peak memory and time of global magnitude pruning: ``hs.sparsify(model, 0.7)`` vs naive concatenation.

Each measurement runs in a fresh subprocess that builds a model of random weights
(``--layers`` x ``Linear(--width, --width)``, float32, no bias), records its peak RSS
(``resource.getrusage(...).ru_maxrss``) as the baseline, runs one method and reports the
increase of the peak RSS (the *peak extra memory*) and the wall time of the call:

- ``sparsify``: ``hs.sparsify(model, 0.7)``: scope ``"global"``, exact count, exact ties, through
  the radix select of ``hadamard_sparse._select`` (one tensor's scores at a time); includes
  registering the masks (1 byte per weight, reported separately).
- ``select``: the selection alone, ``hadamard_sparse._select.keep_masks`` over ``|w|`` thunks (the
  flat masks it returns are counted; nothing is registered).
- ``naive``: concatenate every ``|w|``, ``torch.kthvalue`` for the threshold, then one bool mask per
  tensor (masks kept, not registered).

Run::

    nice python benchmarks/sparsify_memory.py            # 12 x Linear(4096, 4096) = 805 MB of weights

Writes ``benchmarks/results/sparsify_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "sparsify_memory.md"
SPARSITY = 0.7


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _build(layers: int, width: int) -> torch.nn.Module:  # noqa: F821
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False, device="meta") for _ in range(layers)])
    for lin in model:  # materialise in place: no transient copies before the baseline
        lin.weight = nn.Parameter(torch.empty(width, width).uniform_(-1, 1))
    return model


def _naive(model: torch.nn.Module) -> list:  # noqa: F821
    import torch

    with torch.no_grad():
        scores = torch.cat([m.weight.detach().abs().reshape(-1) for m in model])
        k = int(round(SPARSITY * scores.numel()))
        thr = scores.kthvalue(k).values
        del scores
        return [m.weight.detach().abs() > thr for m in model]


def child(method: str, layers: int, width: int) -> None:
    import torch

    torch.set_num_threads(1)
    model = _build(layers, width)
    base = _peak_mb()
    t = time.perf_counter()
    if method == "sparsify":
        import hadamard_sparse as hs

        hs.sparsify(model, SPARSITY)
        n_zero = sum(int((~m).sum()) for m in hs.masks(model).values())
    elif method == "select":
        from hadamard_sparse import _select

        n = sum(m.weight.numel() for m in model)
        thunks = [lambda m=m: m.weight.detach().abs() for m in model]
        keeps = _select.keep_masks(thunks, _select.n_to_prune(SPARSITY, n))
        n_zero = sum(int((~k).sum()) for k in keeps)
    else:
        masks = _naive(model)
        n_zero = sum(int((~m).sum()) for m in masks)
    dt = time.perf_counter() - t
    numel = layers * width * width
    print(
        json.dumps(
            {
                "method": method,
                "base_mb": base,
                "extra_mb": _peak_mb() - base,
                "time_s": dt,
                "zeros": n_zero,
                "numel": numel,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--child", choices=["sparsify", "naive", "select"])
    args = ap.parse_args()
    if args.child:
        child(args.child, args.layers, args.width)
        return
    rows = {}
    for method in ("naive", "sparsify", "select"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                method,
                "--layers",
                str(args.layers),
                "--width",
                str(args.width),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows[method] = json.loads(out.strip().splitlines()[-1])
        print(rows[method], flush=True)
    numel = rows["naive"]["numel"]
    weights_mb = numel * 4 / 2**20
    masks_mb = numel / 2**20
    largest_mb = args.width * args.width * 4 / 2**20
    naive, ours = rows["naive"], rows["sparsify"]
    ratio_mem = (ours["extra_mb"] - masks_mb) / max(1e-9, naive["extra_mb"] - masks_mb)
    ratio_time = ours["time_s"] / naive["time_s"]
    import torch

    lines = [
        f"Command: `nice python benchmarks/sparsify_memory.py --layers {args.layers} --width {args.width}` "
        f"(torch {torch.__version__}, CPU, 1 thread per child process).",
        "",
        "# Peak memory of global magnitude pruning",
        "",
        f"Model: {args.layers} x `Linear({args.width}, {args.width})`, {numel / 1e6:.0f}M float32 weights "
        f"({weights_mb:.0f} MiB; largest tensor {largest_mb:.0f} MiB). Sparsity {SPARSITY}, scope global. "
        "Peak extra = increase of the process's peak RSS during the call, each method in a fresh process. "
        f"All produce bool masks ({masks_mb:.0f} MiB), subtracted in the last column; select = "
        "`_select.keep_masks` alone (no registration), sparsify = the whole `hs.sparsify` call.",
        "",
        "| method | zeros | time (s) | peak extra (MiB) | peak extra beyond masks (MiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['zeros']} | {r['time_s']:.2f} | {r['extra_mb']:.0f} | {r['extra_mb'] - masks_mb:.0f} |"
        )
    lines += [
        "",
        f"sparsify / naive: peak extra beyond masks {ratio_mem:.2f}x (target <= 0.25), time {ratio_time:.2f}x "
        f"(target <= 1). Largest tensor {largest_mb:.0f} MiB: select peaks at masks + "
        f"{(rows['select']['extra_mb'] - masks_mb) / largest_mb:.1f}x it, sparsify at masks + "
        f"{(ours['extra_mb'] - masks_mb) / largest_mb:.1f}x it. Exact count: sparsify prunes exactly round(0.7 * N) "
        f"= {round(SPARSITY * numel)}; the naive threshold `abs(w) > kth value` also prunes every entry "
        "tied with the k-th one.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
