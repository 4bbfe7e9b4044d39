# %% [markdown]
# # A sparse LSTM sequence classifier
#
# Recurrent layers are targeted like any other: `hs.sparsify` masks an LSTM's input-to-hidden
# and hidden-to-hidden matrices (`weight_ih_l*`, `weight_hh_l*`, and `weight_hr_l*` with
# projections) and leaves the biases dense. The `nn.LSTM` module is not replaced, so cuDNN/oneDNN
# kernels, `batch_first`, packing and `state_dict` keys all stay as they were.
#
# The task is built from real data: each 8×8 scikit-learn digit is read **row by row**, as a
# sequence of 8 steps with 8 features, and the class is predicted from the last hidden state.

# %%
import copy
import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt
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

digits = load_digits()
X = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (n, 8 rows, 8 pixels)
y = torch.tensor(digits.target)
Xtr, Xte, ytr, yte = (torch.as_tensor(a) for a in train_test_split(X, y, test_size=0.25, random_state=0, stratify=y))
print("sequences:", tuple(Xtr.shape), "= (samples, time steps, features)")

# %%
class RowLSTM(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def train(model: nn.Module, steps: int, lr: float = 1e-2) -> None:
    train_steps(model, Xtr, ytr, steps, lr=lr)


def accuracy(model: nn.Module) -> float:
    return evaluate(model, Xte, yte)


dense = RowLSTM()
train(dense, 200 if FAST else 600)
dense_acc = accuracy(dense)
print(f"dense LSTM: {sum(p.numel() for p in dense.parameters()):,} parameters, test accuracy {dense_acc:.2%}")

# %% [markdown]
# ## Sparsify the LSTM
#
# One global magnitude threshold over the three matrices: exactly 80% of all their entries become
# zero, and the small input matrix `weight_ih_l0` (whose weights are larger) keeps more than the
# others. The LSTM's `weight_hh_l0` stacks the four gates (input, forget, cell, output) as four
# 64×64 blocks.

# %%
model = copy.deepcopy(dense)
hs.sparsify(model, 0.8, scope="global")
print(hs.sparsity_report(model))
print(f"one-shot, no fine-tuning: {accuracy(model):.2%}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
plot.mask(model, ax=axes[0], name="lstm.weight_hh_l0", show="weight")
axes[0].set_ylabel("output (gates i, f, g, o stacked)")
for k in range(1, 4):
    axes[0].axhline(k * 64 - 0.5, color="k", lw=0.8)
plot.weight_histogram(model, ax=axes[1])
plt.show()

# %%
train(model, 100 if FAST else 300)
print(f"80% sparse LSTM after fine-tuning: {accuracy(model):.2%} (dense {dense_acc:.2%})")

# %% [markdown]
# ## Accuracy against sparsity
#
# For each sparsity, the dense model is pruned by global magnitude and fine-tuned with the same
# short budget (half the dense training). Read the numbers below: this LSTM is small (19k
# weights) and the fine-tuning short, so the very high sparsities cost accuracy; gradual pruning
# during training (notebook 02) does better there.

# %%
sparsities = [0.5, 0.9] if FAST else [0.5, 0.7, 0.8, 0.9, 0.95]
one_shot, tuned = [], []
for s in sparsities:
    m = hs.sparsify(copy.deepcopy(dense), s, scope="global")
    one_shot.append(accuracy(m))
    train(m, 100 if FAST else 300)
    tuned.append(accuracy(m))
    print(f"sparsity {s:.0%}: one-shot {one_shot[-1]:.2%} -> fine-tuned {tuned[-1]:.2%}")

fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
ax.axhline(dense_acc, color="k", ls="--", lw=1, label="dense")
ax.plot(sparsities, one_shot, "o-", label="magnitude, one-shot")
ax.plot(sparsities, tuned, "s-", label="magnitude + fine-tune")
ax.set_xlabel("sparsity (global, LSTM + head)")
ax.set_ylabel("test accuracy")
ax.legend()
ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## Bake
#
# After `hs.remove_parametrizations`, the LSTM is a plain `nn.LSTM` again whose weight matrices
# hold exact zeros, and it gives the same outputs.

# %%
x = Xte[:32]
with torch.no_grad():
    before = model(x)
baked = hs.remove_parametrizations(model)
with torch.no_grad():
    after = baked(x)
print(type(baked.lstm).__name__, "| max |difference|:", f"{(after - before).abs().max().item():.1e}")
print({name: f"{(w == 0).float().mean().item():.0%} zeros" for name, w in baked.lstm.named_parameters() if name.startswith("weight")})
