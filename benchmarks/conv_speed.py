"""``to_sparse`` on convolutions: ``SparseConv`` (the direct CSR conv kernel, or im2col) vs the dense convolution.

Called by ``benchmarks/inference_speed.py --only conv`` (its clock and timer); see that script.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from hadamard_sparse.api import remove_parametrizations, sparsify
from hadamard_sparse.export import SparseConv, to_sparse

#: (name, conv, input shape): realistic shapes from published networks.
CONV_CASES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    (
        "ResNet 3x3 64->64, 56x56, batch 1",
        lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False),
        (1, 64, 56, 56),
    ),
    ("ResNet 1x1 256->64, 56x56, batch 1", lambda: nn.Conv2d(256, 64, 1, bias=False), (1, 256, 56, 56)),
    (
        "CREPE (64,1) 256->32, 128 samples, 8 frames",
        lambda: nn.Conv2d(256, 32, (64, 1), padding="same"),
        (8, 256, 128, 1),
    ),
    (
        "wav2vec2 Conv1d 512->512 k3 s2, 1 s audio",
        lambda: nn.Conv1d(512, 512, 3, stride=2, bias=False),
        (1, 512, 3199),
    ),
    ("wav2vec2 Conv1d 1->512 k10 s5, 1 s audio", lambda: nn.Conv1d(1, 512, 10, stride=5), (1, 1, 16000)),
]
CONV_SPARSITIES = (0.8, 0.9, 0.95)


def _random_sparse(make: Callable[[], nn.Module], sparsity: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    conv = make().eval()
    with torch.no_grad():
        w = conv.weight
        k = int(round(w.numel() * (1 - sparsity)))
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        keep[w.abs().flatten().topk(k).indices] = True
        w.mul_(keep.view_as(w))
    return conv


def bench_conv(
    rows: list[str],
    budget: float,
    time_interleaved: Callable[..., dict[str, float]],
    timed_choice: Callable[[str, dict[str, Callable[[], object]]], dict[str, float]],
) -> None:
    """Each conv case at 80/90/95% (magnitude, per layer): dense, SparseConv forced, to_sparse timed."""
    rows.append("## Convolutions: SparseConv (direct CSR conv kernel) vs dense\n")
    rows.append(
        "Each conv pruned by magnitude to the sparsity, baked. `csr_kernel` = `SparseConv(conv, 'csr_kernel')` "
        "(the direct kernel `kernels.csr_conv2d`: patch tiles built from the channels-first input, channels-first "
        "output); `im2col` = the same layout with `direct = False` (channels-last im2col + `csr_linear`, the path "
        "before the direct kernel); `csr` = `SparseConv(conv, 'csr')` (channels-first "
        "patches, `torch.sparse.mm(W, patches)` per sample, MKL); "
        "`to_sparse` = `to_sparse(nn.Sequential(conv), example_inputs=x)` (dense vs csr_kernel vs csr timed "
        "on `x`, fastest kept; never slower than dense up to timing noise). Ratio = dense time / variant time.\n"
    )
    rows.append(
        "| conv | sparsity | dense ms | csr_kernel | im2col | csr | to_sparse (kept) | max abs diff |"
    )
    rows.append("|---|---|---|---|---|---|---|---|")
    for name, make, shape in CONV_CASES:
        x = torch.randn(*shape)
        for sp in CONV_SPARSITIES:
            conv = _random_sparse(make, sp, seed=0)
            forced = SparseConv(conv, "csr_kernel").eval()
            mkl = SparseConv(conv, "csr").eval()
            im2col = SparseConv(conv, "csr_kernel").eval()
            im2col.direct = False
            exported, report = to_sparse(
                nn.Sequential(copy.deepcopy(conv)), example_inputs=x, timer=timed_choice, return_report=True
            )
            with torch.inference_mode():
                ref = conv(x)
                diff = max(float((forced(x) - ref).abs().max()), float((mkl(x) - ref).abs().max()))
                fns = {
                    "dense": partial(conv, x),
                    "forced": partial(forced, x),
                    "im2col": partial(im2col, x),
                    "mkl": partial(mkl, x),
                }
                t = time_interleaved({**fns, "exported": partial(exported, x)}, budget_s=budget)
            d = t["dense"]
            rows.append(
                f"| {name} | {sp} | {d * 1e3:.3f} | {d / t['forced']:.2f}x | {d / t['im2col']:.2f}x | {d / t['mkl']:.2f}x | "
                f"{d / t['exported']:.2f}x ({report[0].layout}) | {diff:.1e} |"
            )
            print(rows[-1], flush=True)
    rows.append("")
    bench_wav2vec2_encoder(rows, budget, time_interleaved, timed_choice)


def bench_wav2vec2_encoder(
    rows: list[str],
    budget: float,
    time_interleaved: Callable[..., dict[str, float]],
    timed_choice: Callable[[str, dict[str, Callable[[], object]]], dict[str, float]],
) -> None:
    """Hugging Face wav2vec2-base's feature encoder (7 Conv1d, 512 channels) end to end, 1 s of audio."""
    try:
        from transformers import Wav2Vec2Config
        from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2FeatureEncoder
    except Exception as exc:  # transformers is optional
        rows.append(f"## wav2vec2 feature encoder\n\nskipped: {type(exc).__name__}: {exc}\n")
        return
    rows.append(
        "## wav2vec2-base feature encoder end to end (Hugging Face, random weights, 1 x 16000 samples)\n"
    )
    rows.append(
        "Every Conv1d pruned by magnitude per layer, baked; `to_sparse(encoder, example_inputs=wave)` times each "
        "conv and keeps the fastest (GroupNorm and GELU stay as they are).\n"
    )
    rows.append("| sparsity | dense ms | to_sparse | convs kept sparse | max abs diff |")
    rows.append("|---|---|---|---|---|")
    wave = torch.randn(1, 16000)
    for sp in (0.9, 0.95):
        torch.manual_seed(0)
        dense = Wav2Vec2FeatureEncoder(Wav2Vec2Config()).eval()
        remove_parametrizations(sparsify(dense, sp, scope="layer"))
        exported, report = to_sparse(
            copy.deepcopy(dense), example_inputs=wave, timer=timed_choice, return_report=True
        )
        kept = [c.layout for c in report if c.kind == "Conv1d"]
        with torch.inference_mode():
            ref = dense(wave)
            diff = float((exported(wave) - ref).abs().max())
            t = time_interleaved(
                {"dense": partial(dense, wave), "exported": partial(exported, wave)}, budget_s=budget
            )
        d = t["dense"]
        n_sparse = sum(k != "dense" for k in kept)
        rows.append(
            f"| {sp} | {d * 1e3:.2f} | {d / t['exported']:.2f}x | {n_sparse}/{len(kept)} ({', '.join(kept)}) | "
            f"{diff:.1e} |"
        )
        print(rows[-1], flush=True)
    rows.append("")
