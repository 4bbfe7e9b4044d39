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
import gzip
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse import plot

FAST = os.environ.get("FAST") == "1"  # CI runs the notebooks with FAST=1 (less data, shorter training)
torch.manual_seed(0)
plt.rcParams["figure.dpi"] = 80

FASHION = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_data(n_train: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Fashion-MNIST (Debian's dataset-fashion-mnist) or, when absent, scikit-learn's 8x8 digits."""
    if (FASHION / "train-images-idx3-ubyte.gz").exists():
        xtr, ytr = read_idx(FASHION / "train-images-idx3-ubyte.gz"), read_idx(FASHION / "train-labels-idx1-ubyte.gz")
        xte, yte = read_idx(FASHION / "t10k-images-idx3-ubyte.gz"), read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
        name = "Fashion-MNIST"
    else:
        d = load_digits()
        perm = np.random.default_rng(0).permutation(len(d.target))
        x, t = d.images[perm], d.target[perm]
        xtr, ytr, xte, yte = x[:1347], t[:1347], x[1347:], t[1347:]
        name = "digits (dataset-fashion-mnist not installed)"
    xtr, ytr, xte, yte = xtr[:n_train], ytr[:n_train], xte[:n_test], yte[:n_test]
    xtr = torch.tensor(np.asarray(xtr), dtype=torch.float32).unsqueeze(1)
    xte = torch.tensor(np.asarray(xte), dtype=torch.float32).unsqueeze(1)
    mean, std = xtr.mean(), xtr.std()
    return (xtr - mean) / std, torch.tensor(np.asarray(ytr), dtype=torch.long), (xte - mean) / std, torch.tensor(np.asarray(yte), dtype=torch.long), name


Xtr, ytr, Xte, yte, data_name = load_data(4000 if FAST else 20000, 2000 if FAST else 10000)
print(f"{data_name}: train {tuple(Xtr.shape)}, test {tuple(Xte.shape)}")

# %%
def lenet_300_100() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights for every method
    return nn.Sequential(nn.Flatten(), nn.Linear(Xtr[0].numel(), 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


@torch.no_grad()
def accuracy(model: nn.Module) -> float:
    model.eval()
    return (model(Xte).argmax(1) == yte).float().mean().item()


BATCH, EPOCHS = 128, 2 if FAST else 6
STEPS = EPOCHS * len(Xtr) // BATCH
EVERY = max(1, STEPS // 40)          # mask updates every EVERY steps ...
END = 3 * STEPS // 4                 # ... until 3/4 of training
SPARSITY = 0.9
print(f"{STEPS} steps, mask update every {EVERY} steps until step {END}")


def run(method: str) -> tuple[nn.Module, list[float], dict[str, torch.Tensor]]:
    model = lenet_300_100()
    if method == "static":
        hs.sparsify(model, SPARSITY, method="random", distribution="erk")
    elif method != "dense":
        hs.sparsify(model, 0.0)  # all-ones masks for the schedule to drive
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    schedule = None
    if method == "SET":
        schedule = hs.SET(model, SPARSITY, every=EVERY, drop_fraction=0.3, end_step=END, distribution="erk", optimizer=opt)
    elif method == "RigL":
        schedule = hs.RigL(model, opt, SPARSITY, every=EVERY, drop_fraction=0.3, end_step=END, distribution="erk")
    initial_masks = {k: m.clone() for k, m in hs.masks(model).items()}
    gen = torch.Generator().manual_seed(1)
    curve = []
    for t in range(1, STEPS + 1):
        model.train()
        idx = torch.randint(len(Xtr), (BATCH,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
        opt.step()
        lr_sched.step()
        if schedule is not None:
            schedule.step()
        if t % (STEPS // 10) == 0:
            curve.append(accuracy(model))
    return model, curve, initial_masks


results = {}
for method in ["dense", "static", "SET", "RigL"]:
    results[method] = run(method)
    model = results[method][0]
    print(f"{method:7s} sparsity {hs.sparsity_report(model).sparsity:6.2%}   test accuracy {results[method][1][-1]:.2%}")

# %%
fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
xs = np.linspace(EPOCHS / 10, EPOCHS, 10)
for method, (_, curve, _) in results.items():
    ax.plot(xs, curve, "o-" if method != "dense" else "k--", label=method, ms=4)
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
