"""The training-time cost of masks: a training step with hadamard_sparse masks vs dense.

For an MLP and a CNN at batch 32 and 256, one SGD step (forward, cross-entropy,
backward, ``optimizer.step()``) is timed for: the dense model, the model with
``hs.sparsify(model, 0.9)`` masks, ``torch.nn.utils.prune.l1_unstructured`` (a forward
pre-hook recomputing ``weight = weight_orig * weight_mask``) and
``torch.ao.pruning.WeightNormSparsifier`` (its ``FakeSparsity`` parametrization). Then
inference (no_grad) of the masked model, plain and inside one ``torch.nn.utils.parametrize.cached()``
context (entered once around the timing loop, as for evaluating many batches).
All ratios are to the dense model timed in the same interleaved rounds.

Run::

    nice -n -5 python benchmarks/training_overhead.py --threads 1 2

Writes ``benchmarks/results/training_overhead.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import time_interleaved as _time_interleaved  # type: ignore[import-not-found]
from torch import nn
from torch.nn.utils import parametrize, prune

from hadamard_sparse.api import sparsify
from hadamard_sparse.parametrizations import HadamardMask

warnings.filterwarnings("ignore", category=UserWarning)

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITY = 0.9


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


class _UncachedMask(HadamardMask):
    """The forward before the cached mask: bool -> uint8 view -> weight dtype at every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.view(torch.uint8).to(x.dtype)


def uncached(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if type(m) is HadamardMask:
            m.__class__ = _UncachedMask  # benchmark only: same buffers, the old forward
    return model


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def _weighted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def with_torch_prune(model: nn.Module) -> nn.Module:
    for _, m in _weighted(model):
        prune.l1_unstructured(m, "weight", amount=SPARSITY)
    return model


def with_ao_sparsifier(model: nn.Module) -> nn.Module:
    from torch.ao.pruning import WeightNormSparsifier

    sparsifier = WeightNormSparsifier(sparsity_level=SPARSITY, sparse_block_shape=(1, 4), zeros_per_block=4)
    # WeightNormSparsifier builds masks for 2-D weights only: Linear layers.
    linears = [n for n, m in _weighted(model) if isinstance(m, nn.Linear)]
    sparsifier.prepare(model, config=[{"tensor_fqn": f"{n}.weight"} for n in linears])
    sparsifier.step()
    return model


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, budget_s: float, clock: str = "wall"
) -> dict[str, float]:
    """``_common.time_interleaved`` on the chosen clock: ``"cpu"`` is ``time.process_time`` (CPU seconds
    of this process, all threads), which on an overloaded machine leaves out the time spent waiting for a core."""
    return _time_interleaved(fns, budget_s=budget_s, sample_s=0.05, clock=CLOCKS[clock])


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def mask_products(pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """The two elementwise products a step with masks cannot avoid, alone: ``w * m`` (forward) and
    ``g * m`` (backward, the gradient of the product), per masked weight. Its time added to the
    dense step is the floor of any mask-multiplying design (hs, prune, ao) on this machine."""
    for w, m, g in pairs:
        w * m
        g * m


def product_operands(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = []
    for m in model.modules():
        if isinstance(m, HadamardMask):
            w = torch.randn(m.mask.shape)
            out.append((w, m.mask.to(w.dtype), torch.randn_like(w)))
    return out


def plain_inference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to run")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per configuration")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="wall time or process CPU time")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--out", type=Path, default=RESULTS / "training_overhead.md")
    args = parser.parse_args()
    command = "nice -n -5 python benchmarks/training_overhead.py " + " ".join(
        [
            f"--threads {' '.join(map(str, args.threads))}",
            f"--budget {args.budget:g}",
            f"--clock {args.clock}",
        ]
        + ([f"--models {' '.join(args.models)}"] if args.models != ["mlp", "cnn"] else [])
        + ([f"--batches {' '.join(map(str, args.batches))}"] if args.batches != [32, 256] else [])
        + ([f"--out {args.out}"] if args.out != RESULTS / "training_overhead.md" else [])
    )
    rows = [
        f"Command: `{command}`\n",
        "# Training-time cost of masks\n",
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at start; sparsity {SPARSITY}; SGD step (forward + cross-entropy + backward "
        f"+ step); clock: {args.clock}; ratios = time / dense time in the same interleaved rounds (median), lower is better. "
        "hs = `HadamardMask` (mask cached in the weight's dtype); hs uncached = the previous forward "
        "(bool -> uint8 view -> dtype at every call), same buffers. floor = (dense step + the two "
        "elementwise products per masked weight, w * m and g * m, timed alone in the same rounds) / dense: "
        "what any design that multiplies by the mask at every step costs at least.\n",
        "| model | threads | batch | dense step ms | floor | hs masks | hs uncached | torch.nn.utils.prune "
        "| ao WeightNormSparsifier (Linear only) | inference no_grad (hs / dense) "
        "| inference inside parametrize.cached() (hs / dense) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print(rows[2], flush=True)
    inputs: dict[str, Callable[[int], torch.Tensor]] = {
        "MLP 1024-1024-1024-10": lambda b: torch.randn(b, 1, 32, 32),
        "CNN 32x32 (2 conv + 2 fc)": lambda b: torch.randn(b, 3, 32, 32),
    }
    makers = {"mlp": ("MLP 1024-1024-1024-10", mlp), "cnn": ("CNN 32x32 (2 conv + 2 fc)", cnn)}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for key in args.models:
            name, make = makers[key]
            for batch in args.batches:
                torch.manual_seed(0)
                base = make()
                variants = {
                    "dense": copy.deepcopy(base),
                    "hs": sparsify(copy.deepcopy(base), SPARSITY),
                    "hs_uncached": uncached(sparsify(copy.deepcopy(base), SPARSITY)),
                    "prune": with_torch_prune(copy.deepcopy(base)),
                    "ao": with_ao_sparsifier(copy.deepcopy(base)),
                }
                x = inputs[name](batch)
                y = torch.randint(0, 10, (batch,))
                opts = {
                    k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in variants.items()
                }
                t = time_interleaved(
                    {k: partial(train_step, m, opts[k], x, y) for k, m in variants.items()}
                    | {"products": partial(mask_products, product_operands(variants["hs"]))},
                    budget_s=args.budget,
                    clock=args.clock,
                )
                ti = time_interleaved(
                    {
                        "dense": partial(plain_inference, variants["dense"], x),
                        "hs": partial(plain_inference, variants["hs"], x),
                    },
                    budget_s=args.budget / 2,
                    clock=args.clock,
                )
                with parametrize.cached():  # entered once: w * mask is computed on the first call only
                    tc = time_interleaved(
                        {
                            "dense": partial(plain_inference, variants["dense"], x),
                            "hs": partial(plain_inference, variants["hs"], x),
                        },
                        budget_s=args.budget / 2,
                        clock=args.clock,
                    )
                d = t["dense"]
                rows.append(
                    f"| {name} | {threads} | {batch} | {d * 1e3:.2f} | {(d + t['products']) / d:.3f}x | "
                    f"{t['hs'] / d:.3f}x | "
                    f"{t['hs_uncached'] / d:.3f}x | {t['prune'] / d:.3f}x | "
                    f"{t['ao'] / d:.3f}x | {ti['hs'] / ti['dense']:.3f}x | {tc['hs'] / tc['dense']:.3f}x |"
                )
                print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
