# %% [markdown]
# # From masks to speed: channels, 2:4, `shrink` and `to_sparse`
#
# A mask alone saves nothing: `w ⊙ m` is still a dense matrix multiply, the same work as before.
# Speed comes after **baking**, in one of two ways:
#
# - **structured** sparsity (whole output channels / neurons) + `hs.shrink(model, example_inputs)`:
#   the layers are rebuilt smaller, so every dense kernel simply does less work;
# - **unstructured** sparsity (or N:M) + `hs.to_sparse(model, layout)`: the baked weights are stored
#   as sparse tensors (CSR/BSR on CPU, 2:4 semi-structured on recent NVIDIA GPUs) and multiplied
#   with sparse kernels, which beat dense ones only at high sparsity.
#
# The timings measured live in this notebook are quick and noisy (one run, whatever else the
# machine is doing); the reference numbers come from `benchmarks/inference_speed.py`, which
# interleaves many rounds and reports medians, and are shown at the end when its results file is
# present.

# %%
import copy
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse import plot

FAST = os.environ.get("FAST") == "1"  # CI runs the notebooks with FAST=1 (fewer timing repeats)
torch.manual_seed(0)
plt.rcParams["figure.dpi"] = 80
print("torch threads:", torch.get_num_threads())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def median_ms(model: nn.Module, x: torch.Tensor, repeats: int = 5 if FAST else 20) -> float:
    model.eval()
    model(x)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]

# %% [markdown]
# ## 1. Channel sparsity and `shrink`
#
# `structure="out_channel"` prunes whole conv filters (scored by their L2 norm); the mask is stored
# compactly as one bool per filter, shape `(out, 1, 1, 1)`. Half of the filters of each conv
# (`scope="layer"`), the classifier left dense:

# %%
def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 128, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


x = torch.randn(16, 3, 32, 32)
dense_cnn = cnn()
masked = hs.sparsify(copy.deepcopy(dense_cnn), 0.5, structure="out_channel", scope="layer", include=nn.Conv2d)
print({k: tuple(v.shape) for k, v in hs.masks(masked, compact=True).items()})
fig, ax = plt.subplots(figsize=(9, 3.5), layout="constrained")
plot.mask(masked, name="2.weight", ax=ax)  # whole filters (rows of kernels) are off
plt.show()

# %% [markdown]
# Bake, then shrink. `shrink` runs the model once on the example inputs (`torch.export`), finds the
# consumers of each pruned channel (the next conv's input channels here; also BatchNorm, residual
# additions, concatenation, `F.pad` and permute/reshape→Linear in other models) and rebuilds the
# layers without them. The shrunk model computes the same outputs. (With BatchNorm or biases, use
# `structure="channel_group"` with `example_inputs=`: it masks each channel's bias, BatchNorm entries
# and the next layer's inputs with its filter, so nothing is left that keeps the channel alive.)

# %%
baked = hs.remove_parametrizations(masked)
with torch.no_grad():
    y_masked = baked(x)
shrunk = hs.shrink(copy.deepcopy(baked), x[:2])
with torch.no_grad():
    y_shrunk = shrunk(x)
print(shrunk)
print(f"parameters {n_params(dense_cnn):,} -> {n_params(shrunk):,}; max |output difference| {(y_shrunk - y_masked).abs().max().item():.1e}")
t_dense, t_shrunk = median_ms(baked, x), median_ms(shrunk, x)
print(f"live, batch 16: dense {t_dense:.1f} ms, shrunk {t_shrunk:.1f} ms ({t_dense / t_shrunk:.1f}x)")

# %% [markdown]
# Half the filters of each conv means a quarter of the multiply-adds of the convs that follow
# another pruned conv (both their inputs and outputs are halved), hence a speed-up near the ideal
# FLOP ratio, with any dense kernel.
#
# ## 2. N:M sparsity: 2:4
#
# `structure="2:4"` zeroes exactly 2 of every 4 consecutive weights along the input dimension:
# 50% sparsity in the pattern that NVIDIA's sparse tensor cores run at up to twice the dense
# speed (`hs.to_sparse(model, "semi_structured")`, CUDA with fp16/bf16 only).

# %%
lin = hs.sparsify(nn.Linear(64, 32), structure="2:4")
w = lin.weight.detach()
zeros_per_group = (w.reshape(32, 16, 4) == 0).sum(-1)
print("zeros in every group of 4:", zeros_per_group.unique().tolist())
fig, ax = plt.subplots(figsize=(8, 2.6), layout="constrained")
plot.mask(hs.masks(lin)["weight"][:8, :32], ax=ax)
ax.set_title("2:4 mask, first 8 rows x 32 inputs")
plt.show()
if torch.cuda.is_available():
    gpu = hs.to_sparse(hs.remove_parametrizations(copy.deepcopy(lin)).half().cuda(), "semi_structured")
    print(gpu)
else:
    print("no CUDA device here: to_sparse(model, 'semi_structured') needs one; on CPU, 2:4 is 50% sparsity, too dense for CSR to pay off")

# %% [markdown]
# ## 3. Unstructured sparsity and `to_sparse("csr")`
#
# A wide MLP pruned to 95% in every layer (`scope="layer"`: a global threshold on this untrained
# model would empty the layers whose initial weights are smaller), baked, and exported.
# `to_sparse` converts only layers sparse enough to profit (density ≤ 20% for CSR by default,
# a threshold measured by the benchmark); the others stay dense `nn.Linear`. Each converted layer
# is a `SparseLinear` holding a CSR weight with int32 indices; `state_dict` stays loadable into the
# dense model.

# %%
mlp = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
hs.remove_parametrizations(hs.sparsify(mlp, 0.95, scope="layer"))
print(hs.sparsity_report(mlp))
sparse_mlp = hs.to_sparse(copy.deepcopy(mlp), "csr")
print(sparse_mlp)
x1 = torch.randn(1, 1024)
with torch.inference_mode():
    print(f"max |output difference|: {(sparse_mlp(x1) - mlp(x1)).abs().max().item():.1e}")
t_dense, t_sparse = median_ms(mlp, x1), median_ms(sparse_mlp, x1)
print(f"live, batch 1: dense {t_dense:.2f} ms, CSR {t_sparse:.2f} ms ({t_dense / t_sparse:.1f}x)")

# %% [markdown]
# ## 3b. The compiled kernel, and `to_sparse` choosing per layer by measurement
#
# `layout="auto"` (the default) adds `csr_kernel`: CSR with 16-bit column indices, run by a small
# C kernel that hadamard_sparse compiles with the system C compiler the first time it is needed
# (a weight-stationary loop over token tiles, after XNNPACK's sparse kernels; `torch.sparse` is the
# fallback, with a warning, where no compiler exists). Given `example_inputs`, `to_sparse` runs the
# model once, times every layer dense and in each sparse layout on the input it really receives,
# keeps the fastest, and reports why. Without them, a density rule decides (≤ 30% nonzeros for the
# kernel).

# %%
from hadamard_sparse.export import kernels

print("kernel:", kernels.kernel_status())
for n_tokens in (1, 64):
    xb = torch.randn(n_tokens, 1024)
    auto, report = hs.to_sparse(copy.deepcopy(mlp), example_inputs=xb, return_report=True)
    print(f"\nbatch {n_tokens}:")
    for choice in report:
        print(" ", choice)
    with torch.inference_mode():
        assert torch.allclose(auto(xb), mlp(xb), atol=1e-4)
    t_dense, t_auto = median_ms(mlp, xb), median_ms(auto, xb)
    print(f"  live: dense {t_dense:.2f} ms, to_sparse(example_inputs) {t_auto:.2f} ms ({t_dense / t_auto:.1f}x)")

# %% [markdown]
# The benchmark's figures for the kernels (Linear 4096², the never-slower sweep, the real
# all-MiniLM-L6-v2 end to end, convolutions through `SparseConv` and Hugging Face's wav2vec2
# feature encoder; 2 threads, quiet machine), when its results file is present:

# %%
kernel_results = Path("..") / "benchmarks" / "results" / "inference_speed_t2.md"
if kernel_results.exists():
    text = kernel_results.read_text()
    parts = text.split("\n## ")
    keep = [line for line in parts[0].splitlines() if line.startswith(("Command", "torch"))]
    keep += ["### " + sec.strip() for sec in parts[1:] if sec.startswith(("Linear", "Sweep", "all-MiniLM", "Convolutions", "wav2vec2"))]
    display(Markdown("\n\n".join(keep)))
else:
    print("benchmarks/results/inference_speed_t2.md not found: run `python benchmarks/inference_speed.py --threads 2`")

# %% [markdown]
# ## 4. A transformer: attention heads and FFN neurons
#
# `structure="neuron"` prunes FFN neurons (a row of the intermediate Linear, its bias and the
# matching column of the output Linear, found by running the model on `example_inputs`);
# `structure="head"` prunes attention heads (q/k/v rows and biases of a head and the output
# projection's columns; with grouped-query attention a key/value head goes with all its query
# heads). `shrink` then rebuilds the Linear layers smaller and updates `num_attention_heads`.
# Here a small BERT (random weights, built from a config): 75% of the FFN neurons and half of the
# heads of every layer.

# %%
from transformers import BertConfig, BertModel

cfg = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                 intermediate_size=1024, attn_implementation="eager")
bert = BertModel(cfg).eval()
batch = {"input_ids": torch.randint(0, 1000, (8, 128)), "attention_mask": torch.ones(8, 128, dtype=torch.long)}
masked_bert = copy.deepcopy(bert)
hs.sparsify(masked_bert, 0.75, structure="neuron", example_inputs=batch, scope="layer")
hs.sparsify(masked_bert, 0.5, structure="head", scope="layer")
with torch.no_grad():
    h_masked = masked_bert(**batch).last_hidden_state
small_bert = hs.shrink(copy.deepcopy(masked_bert), batch)
layer = small_bert.encoder.layer[0]
print("FFN:", layer.intermediate.dense, "| heads:", layer.attention.self.num_attention_heads,
      "| query:", layer.attention.self.query)
with torch.no_grad():
    diff = (small_bert(**batch).last_hidden_state - h_masked).abs().max().item()
print(f"parameters {n_params(bert):,} -> {n_params(small_bert):,}; max |output difference| {diff:.1e}")


@torch.inference_mode()
def median_ms_kw(model: nn.Module, kw: dict, repeats: int = 3 if FAST else 10) -> float:
    model(**kw)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**kw)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


t_dense, t_small = median_ms_kw(bert, batch), median_ms_kw(small_bert, batch)
print(f"live, 8 x 128 tokens: dense {t_dense:.0f} ms, shrunk {t_small:.0f} ms ({t_dense / t_small:.1f}x)")

# %% [markdown]
# ## 5. Reference numbers from the benchmark
#
# `benchmarks/inference_speed.py` measures these cases with interleaved repetitions on one
# machine, as ratios to the dense model (higher is faster). Its tables, when the results file is
# present:

# %%
results = Path("..") / "benchmarks" / "results" / "inference_speed.md"
if results.exists():
    text = results.read_text()
    keep, sections = [], text.split("\n## ")
    head = sections[0].strip().splitlines()
    keep.append("\n".join(line for line in head if line.startswith(("torch", "Command"))))
    for sec in sections[1:]:
        if sec.startswith(("MLP", "CNN")):
            keep.append("### " + sec.strip())
    structured = Path("..") / "benchmarks" / "results" / "structured_speed_t2.md"
    if structured.exists():
        keep += ["### " + sec.strip() for sec in structured.read_text().split("\n## ")[1:]]
    display(Markdown("\n\n".join(keep)))
else:
    print("benchmarks/results/inference_speed.md not found: run `python benchmarks/inference_speed.py`")
