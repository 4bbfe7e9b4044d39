# %% [markdown]
# # Sparse and quantized: composing parametrizations
#
# Parametrizations chain: `torch.nn.utils.parametrize` applies them in registration order. A mask
# followed by symmetric fake quantization gives
#
# $$\text{weight} = q(w \odot m), \qquad q(x) = s \cdot \operatorname{round}(x / s),\quad s = \max|x| / (2^{b-1}-1)$$
#
# per output channel. Zero is one of the quantization levels, so every pruned weight stays exactly
# zero, and the scale is read from the weights that are kept. Gradients pass through the rounding
# unchanged (straight-through estimator), so the chain trains like any model
# (quantization-aware training). `hs.remove_parametrizations` bakes the whole chain into plain
# weights that take at most `2^b − 1` distinct values per output channel.
#
# Data: Fashion-MNIST from Debian's `dataset-fashion-mnist` package (scikit-learn's digits when it
# is not installed); model: LeNet-300-100.

# %%
import copy
import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse import plot

FAST = os.environ.get("FAST") == "1"  # CI runs the notebooks with FAST=1 (less data, shorter training)
torch.manual_seed(0)
plt.rcParams["figure.dpi"] = 80
sys.path.insert(0, str(Path.cwd().parent / "benchmarks"))  # benchmarks/_common.py: data and training loops
from _common import evaluate, load_data, train_steps

data = load_data(train_subset=4000 if FAST else 20000, test_subset=2000 if FAST else 10000)
Xtr, ytr, Xte, yte, data_name = data.Xtr, data.ytr, data.Xte, data.yte, data.name
print(f"{data_name}: train {tuple(Xtr.shape)}, test {tuple(Xte.shape)}")

# %%
def lenet_300_100() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(Xtr[0].numel(), 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def train(model: nn.Module, epochs: float, lr: float = 1e-3, batch: int = 128) -> None:
    train_steps(model, Xtr, ytr, int(epochs * len(Xtr) / batch), lr=lr, batch_size=batch)


def accuracy(model: nn.Module) -> float:
    return evaluate(model, Xte, yte)


dense = lenet_300_100()
train(dense, 2 if FAST else 4)
results = {"dense, float32": accuracy(dense)}
print(f"dense: {results['dense, float32']:.2%}")

# %% [markdown]
# ## 1. Prune to 90% and fine-tune

# %%
sparse = hs.sparsify(copy.deepcopy(dense), 0.9)
train(sparse, 1 if FAST else 2)
results["90% sparse, float32"] = accuracy(sparse)
print(f"90% sparse: {results['90% sparse, float32']:.2%}")

# %% [markdown]
# ## 2. Append fake quantization to the chain
#
# `hs.fake_quantize(model, bits)` registers `hs.register_fake_quant` on every targeted weight
# (`register_fake_quant(module, "weight", bits=..., per_channel=True)` does it for one tensor).
# Registered after `sparsify`, the chain is mask → quantize:

# %%
q8 = hs.fake_quantize(copy.deepcopy(sparse), bits=8)
print(q8[1].parametrizations.weight)
w = q8[1].weight.detach()
kept = hs.masks(q8)["1.weight"]
print("pruned entries still exactly zero:", bool((w[~kept] == 0).all()))
print("distinct values in the first rows:", [int(r.unique().numel()) for r in w[:5]], "(at most 2**8 - 1 = 255)")

# %% [markdown]
# Post-training quantization (no training after adding the quantizer) at 8, 4 and 2 bits, and
# quantization-aware fine-tuning at 4 and 2 bits, where the rounding is in the loop and the
# straight-through gradient lets the weights adapt to it:

# %%
for bits in (8, 4, 2):
    results[f"90% sparse, int{bits} post-training"] = accuracy(hs.fake_quantize(copy.deepcopy(sparse), bits=bits))
for bits in (4, 2):
    qat = hs.fake_quantize(copy.deepcopy(sparse), bits=bits)
    train(qat, 0.5 if FAST else 1, lr=5e-4)
    results[f"90% sparse, int{bits} quantization-aware"] = accuracy(qat)
    if bits == 4:
        q4 = qat

width = max(map(len, results))
for k, v in results.items():
    print(f"{k:{width}s}  {v:.2%}")

# %% [markdown]
# ## 3. Bake and inspect
#
# Baking removes both parametrizations at once. The baked weights are plain `nn.Linear` weights
# with the mask's zeros and at most 15 levels per row (4 bits: −7…7 times the row's scale); the
# histogram shows the discrete levels and the mass at zero.

# %%
masks_before = {k: v.clone() for k, v in hs.masks(q4).items()}
baked = hs.remove_parametrizations(copy.deepcopy(q4))
print(f"baked accuracy {accuracy(baked):.2%} (same as before baking: {accuracy(q4):.2%})")
for name, keep in masks_before.items():
    w = baked.get_submodule(name.rpartition(".")[0]).weight.detach()
    levels = max(int(r.unique().numel()) for r in w)
    print(f"{name}: zeros where masked: {bool((w[~keep] == 0).all())}, max distinct values per row: {levels}")

fig, axes = plt.subplots(1, 2, figsize=(12, 3.5), layout="constrained")
plot.weight_histogram(baked[3].weight, ax=axes[0], bins=301)
axes[0].set_title("layer 300→100 after 90% pruning + 4-bit quantization")
plot.mask(baked, ax=axes[1], name="3.weight", show="weight")
plt.show()

# %% [markdown]
# ## 4. What it saves
#
# A rough storage count for the three weight matrices: dense float32; sparse as float32 values
# plus one bit per position (a bitmap); sparse 4-bit values plus the bitmap plus one float32
# scale per row.

# %%
n = sum(m.weight.numel() for m in baked if isinstance(m, nn.Linear))
nnz = sum(int((m.weight != 0).sum()) for m in baked if isinstance(m, nn.Linear))
rows = sum(m.weight.shape[0] for m in baked if isinstance(m, nn.Linear))
sizes = {
    "dense float32": 32 * n,
    "90% sparse float32 + bitmap": 32 * nnz + n,
    "90% sparse int4 + bitmap + scales": 4 * nnz + n + 32 * rows,
}
for k, bits_total in sizes.items():
    print(f"{k:36s} {bits_total / 8 / 1024:8.1f} KiB  ({sizes['dense float32'] / bits_total:5.1f}x smaller)")

# %% [markdown]
# ## 5. Checkpoints keep the chain
#
# The checkpoint holds only tensors: the effective (masked, quantized) weight under its plain name,
# the mask as `<name>_mask` and the quantizer's configuration as a small int64 tensor
# `<name>_fake_quant` (`[bits, channel_dim, position in the chain]`), so
# `hs.load_sparse_state_dict` rebuilds mask + quantizer on a fresh dense model.

# %%
sd = q4.state_dict()
print([k for k in sd if k.startswith("1.")])
fresh = hs.load_sparse_state_dict(lenet_300_100(), sd)
print(fresh[1].parametrizations.weight)
print("identical outputs:", torch.equal(fresh(Xte[:256]), q4(Xte[:256])))
