# %% [markdown]
# # Gradual pruning during training
#
# One-shot pruning removes 90% of the weights at once and leaves fine-tuning to repair the
# damage. **Gradual magnitude pruning** (Zhu & Gupta 2017, arXiv 1710.01878) instead raises the
# sparsity along a cubic curve while training continues,
#
# $$s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{n\,\Delta t}\right)^3,$$
#
# pruning fast at first, when many weights are redundant, and slowly near the end.
# `hs.GradualPruning` drives the mask buffers registered by `hs.sparsify`: it writes into them in
# place at every `every`-th `step()`, so the optimizer and the model never see a new tensor.
#
# Below: a LeNet-5-style CNN on Fashion-MNIST (Debian's `dataset-fashion-mnist`; scikit-learn's
# digits when it is not installed), the schedule's sparsity curve, and accuracy against
# sparsity next to PyTorch's own `torch.nn.utils.prune` (global L1, one shot) with the same
# fine-tuning budget.

# %%
import copy
import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.utils.prune as tprune
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse import plot

FAST = os.environ.get("FAST") == "1"  # CI runs the notebooks with FAST=1 (less data, shorter training)
torch.manual_seed(0)
plt.rcParams["figure.dpi"] = 80

sys.path.insert(0, str(Path.cwd().parent / "benchmarks"))  # benchmarks/_common.py: data and training loops
from _common import evaluate, load_data, train_steps

data = load_data(train_subset=3000 if FAST else 12000, test_subset=2000 if FAST else 5000)
Xtr, ytr, Xte, yte, data_name = data.Xtr, data.ytr, data.Xte, data.yte, data.name
print(f"{data_name}: train {tuple(Xtr.shape)}, test {tuple(Xte.shape)}")

# %%
def lenet5() -> nn.Module:
    pad2 = 0 if Xtr.shape[-1] == 28 else 2  # 28x28 Fashion-MNIST, or 8x8 digits
    features = [nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
    flat = nn.Sequential(*features)(Xtr[:1]).shape[1]
    return nn.Sequential(*features, nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


BATCH = 128
STEPS_PER_EPOCH = len(Xtr) // BATCH


def train(model: nn.Module, steps: int, lr: float = 2e-3, schedule=None, log_every: int = 0) -> list[tuple[int, float]]:
    """Adam with cosine learning rate; calls schedule.step() after every optimizer step."""
    return train_steps(model, Xtr, ytr, steps, lr=lr, batch_size=BATCH, schedule=schedule, log_every=log_every, X_eval=Xte, y_eval=yte)


def accuracy(model: nn.Module) -> float:
    return evaluate(model, Xte, yte)


dense = lenet5()
train(dense, (1 if FAST else 5) * STEPS_PER_EPOCH, lr=3e-3)
dense_acc = accuracy(dense)
print(f"dense LeNet-5: {sum(p.numel() for p in dense.parameters()):,} parameters, test accuracy {dense_acc:.2%}")

# %% [markdown]
# ## A schedule to 90%
#
# Start from the trained dense model: `hs.sparsify(model, 0.0)` registers all-ones masks, then the
# schedule prunes from 0% to 90% over the first half of the fine-tuning budget, updating every
# few steps (one global magnitude threshold over all conv and linear weights), and the second half
# trains at constant sparsity.

# %%
FINETUNE = (1 if FAST else 2) * STEPS_PER_EPOCH
END = FINETUNE // 2
EVERY = max(1, END // 10)

model = hs.sparsify(copy.deepcopy(dense), 0.0)
sched = hs.GradualPruning(model, final_sparsity=0.9, start_step=0, end_step=END, every=EVERY, curve="cubic")
log = train(model, FINETUNE, lr=1e-3, schedule=sched, log_every=max(1, FINETUNE // 15))
print(f"after {FINETUNE} steps: sparsity {hs.sparsity_report(model).sparsity:.2%}, test accuracy {accuracy(model):.2%} (dense {dense_acc:.2%})")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
plot.sparsity_curve(sched, ax=axes[0])
twin = axes[0].twinx()
twin.plot([t for t, _ in log], [a for _, a in log], "-", color="#2e8b57", label="test accuracy")
twin.set_ylabel("test accuracy", color="#2e8b57")
handles = axes[0].get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
axes[0].legend(handles=handles, loc="center right")  # one legend for both axes
plot.layer_sparsity(model, ax=axes[1])
plt.show()

# %% [markdown]
# The masks stay the same tensors throughout (the schedule copies into them), and the history the
# plot reads is a list of `(step, target, achieved)` tuples that is also part of
# `sched.state_dict()` for resuming:

# %%
print(sched.history[:4], "...", sched.history[-1])
print("state_dict keys:", sorted(sched.state_dict()))
fig, ax = plt.subplots(figsize=(6, 8), layout="constrained")
plot.mask(model, name="3.weight", ax=ax)  # the second conv: 16 filters x 6 input channels of 5x5 kernels
plt.show()

# %% [markdown]
# ## Accuracy against sparsity, next to `torch.nn.utils.prune`
#
# Same dense starting point and the same number of fine-tuning steps for both:
#
# - **GradualPruning**: cubic schedule to the target over the first half of the steps (the 90% run
#   is the one above);
# - **`torch.nn.utils.prune`**: `global_unstructured` with `L1Unstructured` (one global magnitude
#   cut at the target), then fine-tuning through its masks.

# %%
def torch_prune(model: nn.Module, sparsity: float) -> nn.Module:
    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=sparsity)
    return model


def zeros(model: nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


sparsities = [0.9] if FAST else [0.5, 0.8, 0.9, 0.95]
rows = []
for s in sparsities:
    if s == 0.9:
        ours = model
    else:
        ours = hs.sparsify(copy.deepcopy(dense), 0.0)
        gp = hs.GradualPruning(ours, final_sparsity=s, start_step=0, end_step=END, every=EVERY)
        train(ours, FINETUNE, lr=1e-3, schedule=gp)
    ref = torch_prune(copy.deepcopy(dense), s)
    train(ref, FINETUNE, lr=1e-3)
    rows.append((s, accuracy(ours), zeros(ours), accuracy(ref), zeros(ref)))

print(f"dense: {dense_acc:.2%}\n")
print("target   GradualPruning (achieved)   torch.nn.utils.prune (achieved)")
for s, a, za, b, zb in rows:
    print(f"{s:6.0%}   {a:8.2%} ({za:6.2%})          {b:8.2%} ({zb:6.2%})")

fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
ax.axhline(dense_acc, color="k", ls="--", lw=1, label="dense")
ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="hs.GradualPruning")
ax.plot([r[0] for r in rows], [r[3] for r in rows], "s-", label="torch.nn.utils.prune, one-shot L1")
ax.set_xlabel("sparsity")
ax.set_ylabel("test accuracy")
ax.set_title(f"LeNet-5 on {data_name}, {FINETUNE} fine-tuning steps each")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# Both run the same optimizer, data order and budget, so the difference is only how the weights
# are removed. Read the table rather than expecting a winner: with a fine-tuning budget this short
# the gradual schedule spends half of it below the target sparsity, while the one-shot cut trains
# at the target from the first step; gradual pruning pays off when pruning is spread over a
# longer training run. The full benchmark
# (`benchmarks/accuracy.py`, several seeds, LeNet-300-100 and LeNet-5 on the whole training set,
# also IterativePruning, SET and RigL) is summarised in the README.
#
# Finally, bake: the result is a plain `nn.Sequential` of `Conv2d`/`Linear` with exact zeros.

# %%
baked = hs.remove_parametrizations(model)
print(type(baked[0]).__name__, type(baked[-1]).__name__, f"| sparsity {hs.sparsity_report(baked).sparsity:.2%} | accuracy {accuracy(baked):.2%}")
