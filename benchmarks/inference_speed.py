"""Inference speed of exported models: ``to_sparse`` (CSR) for Linear layers, ``shrink`` for CNNs.

Everything is a ratio to the dense model measured in the same run: each variant is
timed in interleaved rounds (dense, then each variant, repeated) and the median is
kept, so load from other processes on a shared machine hits every variant alike.

Run::

    nice -n -5 python benchmarks/inference_speed.py --threads 1

Writes ``benchmarks/results/inference_speed.md``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import time_interleaved  # type: ignore[import-not-found]
from structured_speed import bench_structured  # type: ignore[import-not-found]
from torch import nn

from hadamard_sparse.api import register_mask, remove_parametrizations, sparsify
from hadamard_sparse.export import DEFAULT_MAX_DENSITY, SparseLinear, shrink, to_sparse

warnings.filterwarnings("ignore", message="Sparse (CSR|BSR).*beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks")
warnings.filterwarnings("ignore", message="TF32 acceleration")

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = (0.5, 0.7, 0.9, 0.95, 0.98)
LINEAR_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)  # 0.8 locates the break-even (density threshold)


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


def bench_linear(rows: list[str], budget: float) -> None:
    rows.append("## Linear layers: dense vs CSR\n")
    rows.append(
        "Speed-up = dense time / variant time (higher is better). `csr int32` is `SparseLinear` "
        "(int32 indices, `torch.mv` at batch 1, `torch.sparse.mm` otherwise), forced for every density; "
        "`to_sparse` is what `to_sparse(model, 'csr')` exports with the default threshold "
        f"(max density {DEFAULT_MAX_DENSITY['csr']}: denser layers stay dense); `csr int64` is plain "
        "`w.to_sparse_csr()` with `torch.sparse.mm`.\n"
    )
    rows.append("| layer | batch | sparsity | dense ms | csr int32 | csr int64 | to_sparse |")
    rows.append("|---|---|---|---|---|---|---|")
    for n in (2048, 4096):
        for batch in (1, 64):
            for sp in LINEAR_SPARSITIES:
                lin = random_sparse_linear(n, n, sp, seed=0)
                x = torch.randn(batch, n)
                csr32 = SparseLinear(lin, "csr")
                csr64 = csr64_forward(lin)
                exported = to_sparse(nn.Sequential(copy.deepcopy(lin)), "csr")
                with torch.inference_mode():
                    torch.testing.assert_close(
                        csr32(x), F.linear(x, lin.weight, lin.bias), atol=1e-3, rtol=1e-3
                    )
                    t = time_interleaved(
                        {
                            "dense": partial(F.linear, x, lin.weight, lin.bias),
                            "csr32": partial(csr32, x),
                            "csr64": partial(csr64, x),
                            "exported": partial(exported, x),
                        },
                        budget_s=budget,
                    )
                d = t["dense"]
                rows.append(
                    f"| {n}x{n} | {batch} | {sp} | {d * 1e3:.3f} | {d / t['csr32']:.2f}x | "
                    f"{d / t['csr64']:.2f}x | {d / t['exported']:.2f}x |"
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
    rows.append("## MLP 1024-2048-2048-2048-10: dense vs baked + to_sparse('csr')\n")
    rows.append(
        "Global magnitude pruning (`hs.sparsify`) at each sparsity, baked, exported with the default threshold.\n"
    )
    rows.append("| batch | sparsity | dense ms | to_sparse | forced csr (max_density=1) | layers converted |")
    rows.append("|---|---|---|---|---|---|")
    for batch in (1, 64):
        for sp in SPARSITIES:
            torch.manual_seed(0)
            dense = remove_parametrizations(sparsify(mlp(), sp))
            exported = to_sparse(copy.deepcopy(dense), "csr")
            forced = to_sparse(copy.deepcopy(dense), "csr", max_density=1.0)
            n_sparse = sum(isinstance(m, SparseLinear) for m in exported.modules())
            x = torch.randn(batch, 1024)
            with torch.inference_mode():
                torch.testing.assert_close(exported(x), dense(x), atol=1e-3, rtol=1e-3)
                t = time_interleaved(
                    {
                        "dense": partial(dense, x),
                        "exported": partial(exported, x),
                        "forced": partial(forced, x),
                    },
                    budget_s=budget,
                )
            d = t["dense"]
            rows.append(
                f"| {batch} | {sp} | {d * 1e3:.3f} | {d / t['exported']:.2f}x | {d / t['forced']:.2f}x | {n_sparse}/4 |"
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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timing per configuration")
    parser.add_argument("--only", choices=("linear", "mlp", "cnn", "structured"), default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "inference_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        "# Inference speed: exported sparse models vs dense\n",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"torch.set_num_threads({torch.get_num_threads()}), MKL {torch.backends.mkl.is_available()}; "
        "median of interleaved rounds; run under `torch.inference_mode()`.\n",
        f"Command: `nice -n -5 python benchmarks/inference_speed.py --threads {args.threads}`\n",
    ]
    print(rows[1], flush=True)
    if args.only in (None, "linear"):
        bench_linear(rows, args.budget)
    if args.only in (None, "mlp"):
        bench_mlp(rows, args.budget)
    if args.only in (None, "cnn"):
        bench_cnn(rows, args.budget, batch=32)
    if args.only in (None, "structured"):  # issue 13: CREPE-style CNN, BERT neurons and heads
        bench_structured(rows, args.budget)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
