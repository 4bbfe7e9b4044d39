# %% [markdown]
# # Quickstart: a sparse model in five verbs
#
# `hadamard_sparse` makes an **unmodified** PyTorch model sparse by rewriting each targeted weight
# as a Hadamard (elementwise) product with a boolean mask, `weight = w ⊙ m`, through
# `torch.nn.utils.parametrize`. The model keeps its class, its `forward` and its Parameter
# objects, so optimizers, `state_dict`s and your training loop keep working.
#
# This notebook walks through the whole life cycle on real data (scikit-learn's bundled 8×8
# handwritten digits):
#
# 1. train a small dense classifier,
# 2. `hs.sparsify` it and look at the masks (`hs.masks`) and the report (`hs.sparsity_report`),
# 3. fine-tune through the masks,
# 4. save and load (`state_dict` + `hs.load_sparse_state_dict`),
# 5. bake the masks into plain weights (`hs.remove_parametrizations`).

# %%
import os
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse import plot

sys.path.insert(0, str(Path.cwd().parent / "benchmarks"))  # benchmarks/_common.py: data and training loops
from _common import evaluate, train_steps

FAST = os.environ.get("FAST") == "1"  # CI runs the notebooks with FAST=1 (shorter training)
torch.manual_seed(0)
plt.rcParams["figure.dpi"] = 80
print("hadamard_sparse", hs.__version__, "| torch", torch.__version__)

# %% [markdown]
# ## 1. Data and a dense model
#
# 1,797 digit images, 64 pixels each, split 75/25 into train and test.

# %%
digits = load_digits()
X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
Xtr, Xte, ytr, yte = (torch.as_tensor(a) for a in train_test_split(X, y, test_size=0.25, random_state=0, stratify=y))
print("train", tuple(Xtr.shape), "test", tuple(Xte.shape))


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def train(model: nn.Module, steps: int, lr: float = 3e-3) -> None:
    train_steps(model, Xtr, ytr, steps, lr=lr, seed=0, cosine=False)


def accuracy(model: nn.Module) -> float:
    return evaluate(model, Xte, yte)


model = make_model()
train(model, 300 if FAST else 1500)
dense_acc = accuracy(model)
print(f"dense test accuracy: {dense_acc:.2%}")

# %% [markdown]
# ## 2. Sparsify: one call, masks as buffers
#
# `hs.sparsify(model, sparsity)` targets the weights of every `Linear`, `ConvNd`, RNN and
# attention layer, scores them (here by magnitude, one global threshold) and registers a
# `HadamardMask` on each. Exactly `round(0.9 × N)` of the `N` targeted weights become zero.

# %%
hs.sparsify(model, sparsity=0.9, method="magnitude", scope="global")
print(model)

# %% [markdown]
# The layers are now `ParametrizedLinear` (parametrize's subclass of `nn.Linear`, so
# `isinstance(layer, nn.Linear)` still holds). `layer.weight` is computed on access as
# `original * mask`; the dense values stay in `parametrizations.weight.original` (the same
# Parameter object as before) and the mask is a persistent `torch.bool` buffer.

# %%
layer = model[0]
print("isinstance Linear:", isinstance(layer, nn.Linear))
print("original:", type(layer.parametrizations.weight.original).__name__, tuple(layer.parametrizations.weight.original.shape))
for name, m in hs.masks(model).items():
    print(f"{name:10s} mask {str(m.dtype):10s} {tuple(m.shape)}  kept {int(m.sum()):5d} of {m.numel()}")

# %%
print(hs.sparsity_report(model))

# %% [markdown]
# One global threshold does not prune every layer equally: layers whose weights are small in
# magnitude lose more, and the small output layer keeps more of its weights. The plots below show
# the first layer's mask (dark = kept) and the per-layer sparsity.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
plot.mask(model, name="0.weight", ax=axes[0])
plot.layer_sparsity(model, ax=axes[1])
plt.show()

# %% [markdown]
# ## 3. Fine-tune through the masks
#
# Pruned positions get a zero gradient (`∂(w ⊙ m)/∂w = m`), so an ordinary optimizer and training
# loop keep them at zero. The accuracy lost by the one-shot cut mostly comes back.

# %%
pruned_acc = accuracy(model)
train(model, 200 if FAST else 800, lr=1e-3)
finetuned_acc = accuracy(model)
print(f"dense {dense_acc:.2%} | pruned 90% {pruned_acc:.2%} | pruned + fine-tuned {finetuned_acc:.2%}")
print(f"sparsity after fine-tuning: {hs.sparsity_report(model).sparsity:.2%}")

# %% [markdown]
# `sparsify` scores the dense values (the masks never zero `original`), so calling it again
# recomputes the masks in place, at any sparsity. `sparsify(model, 0.0)` would undo the pruning.

# %%
mask_buffer = hs.masks(model)["0.weight"]
hs.sparsify(model, 0.8)
print("same buffer object:", hs.masks(model)["0.weight"] is mask_buffer)
print(f"now {hs.sparsity_report(model).sparsity:.2%} sparse, accuracy {accuracy(model):.2%}")
hs.sparsify(model, 0.9)
train(model, 100 if FAST else 400, lr=1e-3)
print(f"back to {hs.sparsity_report(model).sparsity:.2%}, accuracy {accuracy(model):.2%}")

# %% [markdown]
# ## 4. Save and load
#
# `model.state_dict()` holds only tensors: each weight under its plain name holds the *effective*
# (masked) values, and `<name>_mask` holds the boolean mask (the name `torch.nn.utils.prune` uses).
# A plain model loads it as is (the masks are merely unexpected keys); `hs.load_sparse_state_dict`
# also rebuilds the masks on a freshly constructed (dense) model, bitwise. The dense values at
# pruned positions are not saved (see `docs/pretrained.md`).

# %%
sd = model.state_dict()
for k in list(sd)[:4]:
    print(k)
print("...", len(sd), "entries")

path = Path(tempfile.mkdtemp()) / "sparse.pt"
torch.save(sd, path)
fresh = hs.load_sparse_state_dict(make_model(), torch.load(path, weights_only=True))
print("same outputs:", torch.equal(fresh(Xte), model(Xte)), "| accuracy", f"{accuracy(fresh):.2%}")

# %% [markdown]
# A *dense* checkpoint (e.g. a pretrained model) also loads into the sparsified model with
# `strict=True`: its weights go to `original` and the current masks are kept.

# %%
dense_ckpt = make_model().state_dict()
fresh.load_state_dict(dense_ckpt, strict=True)
print(f"masks kept: {hs.sparsity_report(fresh).sparsity:.2%} sparse")

# %% [markdown]
# ## 5. Bake
#
# `hs.remove_parametrizations` replaces every parametrized weight with its current value
# `original ⊙ mask`, as a plain Parameter, and gives the modules their original classes back. The
# result has no dependency on `hadamard_sparse`: it pickles, scripts and exports like any model.

# %%
before = model(Xte)
baked = hs.remove_parametrizations(model)
print(baked)
print("plain nn.Linear:", type(baked[0]) is nn.Linear, "| same outputs:", torch.allclose(baked(Xte), before, atol=1e-6))
print(f"baked sparsity {hs.sparsity_report(baked).sparsity:.2%} (counted from exact zeros)")

# %% [markdown]
# ## 6. A Hugging Face model, saved while sparse
#
# A sparsified transformers model saves with `save_pretrained` as usual. The file holds the effective
# (sparse) weights under their plain names, so plain `from_pretrained` loads the sparse model without
# hadamard_sparse (transformers lists the mask keys as unexpected and ignores them), plus one bool
# `<name>_mask` tensor per pruned weight, which `hs.load_sparse_state_dict` turns back into masks on a
# fresh model. (A tiny GPT-2 built from a config: nothing is downloaded.)

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)
torch.manual_seed(0)
gpt = GPT2LMHeadModel(cfg).eval()
hs.sparsify(gpt, 0.5, exclude="lm_head")
out_dir = Path(tempfile.mkdtemp()) / "gpt2-sparse"
gpt.save_pretrained(out_dir)
ids = torch.randint(0, 256, (1, 16))

plain = GPT2LMHeadModel.from_pretrained(out_dir).eval()  # no hadamard_sparse involved
print("plain from_pretrained, same logits:", torch.allclose(plain(ids).logits, gpt(ids).logits, atol=1e-5))
restored = hs.load_sparse_state_dict(GPT2LMHeadModel(cfg).eval(), load_file(out_dir / "model.safetensors"))
same_masks = all(torch.equal(a, b) for a, b in zip(hs.masks(restored).values(), hs.masks(gpt).values()))
print("masks restored:", len(hs.masks(restored)), "| identical:", same_masks)
print(f"sparsity of the targeted weights: {hs.sparsity_report(restored).sparsity:.2%}")

# %% [markdown]
# Baked weights are dense tensors that happen to contain zeros. To turn the zeros into speed,
# prune whole channels and `hs.shrink` the model, or store the weights as sparse tensors with
# `hs.to_sparse` (see `05_structured_speed.ipynb`). The other notebooks cover gradual pruning
# during training (02), learned sparsity from weight decay with `w = u ⊙ v` (03), dynamic sparse
# training (04), sparse LSTMs (06) and sparsity combined with quantization (07).
