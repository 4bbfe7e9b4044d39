"""Layer allocation on all-MiniLM-L6-v2: ``allocation="uniform"`` vs ``"owl"`` (SparseGPT, one-shot).

Same model, sentences and metrics as ``benchmarks/pretrained_minilm.py`` (166 calibration
sentences, 30 held-out evaluation sentences); every Linear weight pruned per output row.

Run::

    HF_HUB_OFFLINE=1 nice python benchmarks/minilm_allocation.py

Writes ``benchmarks/results/minilm_allocation.md``.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

import hadamard_sparse as hs
from hadamard_sparse.calibration import calibrate

sys.path.insert(0, str(Path(__file__).parent))
import pretrained_minilm as pm

RESULTS = Path(__file__).parent / "results" / "minilm_allocation.md"


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t0 = time.perf_counter()
    model, tok = pm.load()
    dense = pm.embed(model, tok, pm.EVALUATION)
    batches = pm.calibration_batches(tok, pm.CALIBRATION + pm.CALIBRATION_MORE)
    stats = calibrate(model, batches, gram=True)
    lines = [
        "# Layer allocation on all-MiniLM-L6-v2: uniform vs OWL",
        "",
        f"Command: `HF_HUB_OFFLINE=1 nice python benchmarks/minilm_allocation.py` (torch {torch.__version__}, "
        f'CPU, {torch.get_num_threads()} threads). SparseGPT one-shot, `scope="row"`, 166 calibration '
        "sentences, 30 held-out evaluation sentences (as in pretrained_minilm.md).",
        "",
        "| sparsity | allocation | mean cosine | top-1 agreement | per-layer sparsities (encoder layers 0-5) |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for sparsity in (0.5, 0.7):
        for allocation in ("uniform", "owl"):
            m = copy.deepcopy(model)
            hs.sparsify(m, sparsity, method="sparsegpt", calibration=stats, allocation=allocation)
            cos, agree = pm.metrics(dense, pm.embed(m, tok, pm.EVALUATION))
            masks = hs.masks(m)
            per_layer = [
                1
                - float(sum(k.sum() for n, k in masks.items() if n.startswith(f"encoder.layer.{i}.")))
                / sum(k.numel() for n, k in masks.items() if n.startswith(f"encoder.layer.{i}."))
                for i in range(6)
            ]
            lines.append(
                f"| {sparsity:.0%} | {allocation} | {cos:.4f} | {agree:.3f} | "
                + ", ".join(f"{x:.3f}" for x in per_layer)
                + " |"
            )
            print(lines[-1], flush=True)
    lines += ["", f"Total {time.perf_counter() - t0:.0f} s.", ""]
    RESULTS.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
