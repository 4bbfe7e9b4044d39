# %% [markdown]
# # Dynamic sparse training: static vs SET vs RigL at 90%
#
# Pruning starts from a dense model. **Dynamic sparse training** never trains one: the network is
# sparse from the first step, and every few steps a fraction of the connections is moved:
#
# - **static**: a random mask, fixed for the whole run (a baseline);
# - **SET** (Mocanu et al. 2018): drop the smallest-magnitude active weights, regrow as many at
#   random positions;
# - **RigL** (Evci et al. 2020, arXiv 1911.11134): drop the smallest, regrow where the gradient of
#   the dense weight is largest.
#
# All three use the ERK per-layer densities (wider layers sparser), keep each layer's number of
# nonzeros constant, and start regrown weights at exactly 0. `hs.SET` and `hs.RigL` drive the
# mask buffers in place, anneal the fraction they move with a cosine to 0 at `end_step`, and reset
# the optimizer's moments at regrown positions.
#
# Model: LeNet-300-100 on Fashion-MNIST (Debian's `dataset-fashion-mnist`; scikit-learn's digits
# when absent), 90% sparse, trained from scratch with the same budget for each method.

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
    torch.manual_seed(0)  # the same initial weights for every method
    return nn.Sequential(nn.Flatten(), nn.Linear(Xtr[0].numel(), 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


BATCH, EPOCHS = 128, 2 if FAST else 6
STEPS = EPOCHS * len(Xtr) // BATCH
EVERY = max(1, STEPS // 40)          # mask updates every EVERY steps ...
END = 3 * STEPS // 4                 # ... until 3/4 of training
SPARSITY = 0.9
print(f"{STEPS} steps, mask update every {EVERY} steps until step {END}")


def run(method: str) -> tuple[nn.Module, list[tuple[int, float]], dict[str, torch.Tensor]]:
    model = lenet_300_100()
    if method == "static":
        hs.sparsify(model, SPARSITY, method="random", distribution="erk")
    elif method != "dense":
        hs.sparsify(model, 0.0)  # all-ones masks for the schedule to drive
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = None
    if method == "SET":
        schedule = hs.SET(model, SPARSITY, every=EVERY, drop_fraction=0.3, end_step=END, distribution="erk", optimizer=opt)
    elif method == "RigL":
        schedule = hs.RigL(model, opt, SPARSITY, every=EVERY, drop_fraction=0.3, end_step=END, distribution="erk")
    initial_masks = {k: m.clone() for k, m in hs.masks(model).items()}
    log = train_steps(model, Xtr, ytr, STEPS, lr=1e-3, batch_size=BATCH, optimizer=opt, schedule=schedule, log_every=max(1, STEPS // 10), X_eval=Xte, y_eval=yte)
    return model, log, initial_masks  # log: (step, test accuracy) about 10 times during training


results = {}
for method in ["dense", "static", "SET", "RigL"]:
    results[method] = run(method)
    model = results[method][0]
    print(f"{method:7s} sparsity {hs.sparsity_report(model).sparsity:6.2%}   test accuracy {results[method][1][-1][1]:.2%}")

# %%
fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
for method, (_, log, _) in results.items():  # plot what was logged, at the epoch it was logged
    epochs = [EPOCHS * step / STEPS for step, _ in log]
    ax.plot(epochs, [acc for _, acc in log], "o-" if method != "dense" else "k--", label=method, ms=4)
ax.axvline(EPOCHS * END / STEPS, color="grey", lw=0.8, ls=":")
ax.text(EPOCHS * END / STEPS, ax.get_ylim()[0], " last mask update", color="grey", va="bottom", fontsize=8)
ax.set_xlabel("epoch")
ax.set_ylabel("test accuracy")
ax.set_title(f"LeNet-300-100 on {data_name}, 90% sparse from the first step")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## What moved
#
# ERK gives the wide input layer the lowest density and the small output layer the highest
# (`hs.layer_densities`). SET and RigL keep each layer's count of nonzeros fixed while changing
# *which* connections exist. Below, per layer: the count of nonzeros at the end and at the start
# (equal), and the share of the final connections that were not in the initial random mask:

# %%
print({k: round(v, 3) for k, v in hs.layer_densities(lenet_300_100(), SPARSITY, distribution="erk").items()})
for method in ["SET", "RigL"]:
    model, _, initial_masks = results[method]
    for name, m in hs.masks(model).items():
        m0 = initial_masks[name]
        moved = int((m & ~m0).sum()) / int(m.sum())
        print(f"{method:5s} {name}: {int(m.sum()):6d} nonzeros (initially {int(m0.sum()):6d}); {moved:6.1%} of them are new connections")

# %% [markdown]
# The first layer's mask (rows are hidden units, columns the input pixels): the static mask is
# uniform noise; after RigL, the connections have left the blank border pixels and gathered on the
# ones that carry information, as the per-pixel count on the right shows.

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), layout="constrained", gridspec_kw={"width_ratios": [2, 2, 1]})
plot.mask(results["static"][0][1], ax=axes[0])
axes[0].set_title("static random mask (ERK), layer 1")
plot.mask(results["RigL"][0][1], ax=axes[1])
axes[1].set_title("RigL mask after training, layer 1")
pixel_use = hs.masks(results["RigL"][0])["1.weight"].sum(0).float().reshape(Xtr.shape[-2:])
im = axes[2].imshow(pixel_use.numpy(), cmap="viridis")
axes[2].set_title("RigL: connections per input pixel")
axes[2].axis("off")
fig.colorbar(im, ax=axes[2], fraction=0.046)
plt.show()

# %% [markdown]
# The full comparison, with several seeds and sparsities on the whole data set, is in
# `benchmarks/accuracy.py` (results in the README). Dynamic methods need training time to move
# their connections to where they help; on short budgets like this one the ranking can change
# between runs, so read the numbers above for what they are — one seed, a few epochs.
