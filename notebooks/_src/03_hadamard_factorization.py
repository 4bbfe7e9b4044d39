# %% [markdown]
# # Sparsity from weight decay: the Hadamard factorization `w = u ⊙ v`
#
# Write a weight as the elementwise product of two factors, `w = u ⊙ v`, and put ordinary weight
# decay λ on `u` and `v`. Because
#
# $$\min_{u \odot v = w} \tfrac{\lambda}{2}\left(\|u\|^2 + \|v\|^2\right) = \lambda \|w\|_1,$$
#
# minimizing `loss + (λ/2)(‖u‖² + ‖v‖²)` over the factors has the same minima as the **lasso**
# `loss + λ‖w‖₁` over `w` (Hoff 2017, arXiv 1611.00040). Plain SGD or Adam with weight decay then
# drives weights to zero — no mask, no schedule, no threshold during training. Sharing one
# factor per output row gives the group lasso, which switches whole neurons off.
#
# `hs.factorize(model)` registers this as a parametrization (`HadamardFactorization`); the model's
# output is unchanged until training, and `hs.factor_param_groups(model, weight_decay=λ)` builds
# optimizer groups with decay on the factors only.
#
# Part 1 checks the claim against scikit-learn's `Lasso` on the diabetes data; part 2 switches off
# hidden neurons of an MLP and removes them with `hs.shrink`.

# %%
import copy
import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_diabetes, load_digits
from sklearn.linear_model import lasso_path
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse import plot

sys.path.insert(0, str(Path.cwd().parent / "benchmarks"))  # benchmarks/_common.py: data and training loops
from _common import evaluate

FAST = os.environ.get("FAST") == "1"  # CI runs the notebooks with FAST=1 (fewer steps)
torch.manual_seed(0)
plt.rcParams["figure.dpi"] = 80

# %% [markdown]
# ## 1. The lasso path, with `nn.Linear` and weight decay
#
# Diabetes progression from 10 standardized features (442 patients). For each α, a
# factorized `nn.Linear(10, 1)` is trained full-batch on `0.5·MSE` with Adam and
# `factor_param_groups(model, weight_decay=α)` — exactly scikit-learn's lasso objective
# `(1/2n)‖y − Xw‖² + α‖w‖₁`. After training, `hs.remove_parametrizations(model, threshold=1e-3)`
# bakes `u ⊙ v` into a plain weight and sets the entries that collapsed to |w| ≤ 1e-3 to exact zeros
# (the coefficients are of order 0.1). A threshold is needed because a weight heading to zero gets
# there slowly: near 0 both factors are small and the gradient on each is proportional to the other.

# %%
data = load_diabetes()
X = StandardScaler().fit_transform(data.data)
y = (data.target - data.target.mean()) / data.target.std()
Xt, yt = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
alphas = np.geomspace(0.3, 3e-3, 4 if FAST else 8)
_, sk_coefs, _ = lasso_path(X, y, alphas=alphas, tol=1e-10, max_iter=200_000)
STEPS = 600 if FAST else 4000


def objective(w: np.ndarray, b: float, alpha: float) -> float:
    return 0.5 * np.mean((X @ w + b - y) ** 2) + alpha * np.abs(w).sum()


ours = []
print(" alpha    objective (ours / sklearn)   rel. gap   support equal")
for j, alpha in enumerate(alphas):
    torch.manual_seed(0)
    lin = hs.factorize(nn.Linear(10, 1))
    opt = torch.optim.Adam(hs.factor_param_groups(lin, weight_decay=float(alpha)), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    for _ in range(STEPS):
        opt.zero_grad()
        (0.5 * (lin(Xt).squeeze(1) - yt).pow(2).mean()).backward()
        opt.step()
        sched.step()
    hs.remove_parametrizations(lin, threshold=1e-3)
    w, b = lin.weight.detach().double().numpy()[0], lin.bias.item()
    ours.append(w)
    f_ours, f_sk = objective(w, b, alpha), objective(sk_coefs[:, j], 0.0, alpha)
    same = np.array_equal(w != 0, sk_coefs[:, j] != 0)
    print(f"{alpha:6.4f}   {f_ours:.6f} / {f_sk:.6f}         {(f_ours - f_sk) / f_sk:+.1e}   {same}")
    if not same:
        diff = np.flatnonzero((w != 0) != (sk_coefs[:, j] != 0))
        print(f"         support differs at {diff.tolist()}: ours {w[diff].round(5).tolist()}, sklearn {sk_coefs[diff, j].round(5).tolist()}")
ours = np.array(ours).T

# %%
fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
colors = plt.cm.tab10(np.arange(10))
for i in range(10):
    ax.plot(alphas, sk_coefs[i], "-", color=colors[i], lw=1.5)
    ax.plot(alphas, ours[i], "o", color=colors[i], ms=5)
ax.set_xscale("log")
ax.invert_xaxis()
ax.set_xlabel("α (weight decay on u and v = lasso penalty)")
ax.set_ylabel("coefficient")
ax.set_title("lasso path: sklearn (lines) vs u ⊙ v with weight decay (dots)")
plt.show()

# %% [markdown]
# The dots sit on scikit-learn's coordinate-descent path, zeros included: as α grows, coefficients
# leave the model at the same α as in the convex solver, and the objectives agree to the printed
# relative gap. Where a support differs, the table prints the coefficient: one of order 1e-3, at the
# scale of the threshold, where a fixed threshold and a finite number of steps decide between "tiny"
# and "zero" (the library's own tests run 5,000 steps per α and require the exact support).
#
# ## 2. An MLP whose hidden neurons switch off
#
# With `group="row"`, one factor is shared by each output row (a neuron's whole fan-in), so the
# penalty becomes λ·Σ‖w_row‖₂: the group lasso. Rows either stay or collapse to zero together.
# We factorize the two hidden layers of an MLP on the digits and train with weight decay.

# %%
digits = load_digits()
Xd = torch.tensor(digits.data, dtype=torch.float32) / 16.0
yd = torch.tensor(digits.target)
Xtr, Xte, ytr, yte = (torch.as_tensor(a) for a in train_test_split(Xd, yd, test_size=0.25, random_state=0, stratify=yd))


def accuracy(model: nn.Module) -> float:
    return evaluate(model, Xte, yte)


torch.manual_seed(0)
mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
initial = copy.deepcopy(mlp)
hs.factorize(mlp, group="row", include=["0", "2"])  # the output layer stays a plain Linear
print(mlp[0].parametrizations.weight)

LAMBDA, MLP_STEPS = 1e-2, 400 if FAST else 1500
opt = torch.optim.Adam(hs.factor_param_groups(mlp, weight_decay=LAMBDA), lr=3e-3)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, MLP_STEPS)
gen = torch.Generator().manual_seed(0)
for step in range(1, MLP_STEPS + 1):
    mlp.train()
    idx = torch.randint(len(Xtr), (128,), generator=gen)
    opt.zero_grad()
    nn.functional.cross_entropy(mlp(Xtr[idx]), ytr[idx]).backward()
    opt.step()
    sched.step()
    if step % (MLP_STEPS // 4) == 0:
        print(f"step {step:5d}: group-lasso penalty {hs.l1_penalty(mlp).item():8.2f}, test accuracy {accuracy(mlp):.2%}")

# %% [markdown]
# The effective weights collapse: most of the mass moves to (nearly) zero during training, and
# baking with a small threshold turns it into exact zeros.

# %%
trained = copy.deepcopy(mlp)
baked = hs.remove_parametrizations(mlp, threshold=1e-3)
fig, axes = plt.subplots(1, 3, figsize=(15, 3.5), layout="constrained")
plot.weight_histogram(initial, ax=axes[0])
axes[0].set_title("before training (dense init)")
plot.weight_histogram(trained, ax=axes[1])
axes[1].set_title("after training, u ⊙ v (not yet thresholded)")
plot.weight_histogram(baked, ax=axes[2])
axes[2].set_title(f"baked, |w| ≤ 1e-3 → 0: {hs.sparsity_report(baked).sparsity:.1%} zeros")
plt.show()
print(f"accuracy: factorized {accuracy(trained):.2%}, baked {accuracy(baked):.2%}")

# %% [markdown]
# Whole rows are zero — hidden neurons that no longer compute anything. The mask plot of the first
# layer shows them as empty rows:

# %%
for i in (0, 2):
    rows_off = int((baked[i].weight.abs().sum(1) == 0).sum())
    print(f"layer {i}: {rows_off} of {baked[i].out_features} neurons switched off")
fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
plot.mask(baked, name="0.weight", ax=ax)
plt.show()

# %% [markdown]
# ## 3. Shrink: remove the dead neurons for real
#
# `hs.shrink(model, example_inputs)` traces the model, removes the all-zero output rows, and
# removes the matching input columns of the layers that read them (a neuron whose weights are zero
# outputs `relu(bias)`, a constant that is folded into the next layer's bias). The shrunk model is
# smaller, faster, and computes the same function.

# %%
n_before = sum(p.numel() for p in baked.parameters())
with torch.no_grad():
    out_before = baked(Xte)
small = hs.shrink(copy.deepcopy(baked), Xte[:4])
with torch.no_grad():
    out_after = small(Xte)
print(small)
print(f"parameters: {n_before:,} -> {sum(p.numel() for p in small.parameters()):,}")
print(f"max |output difference|: {(out_after - out_before).abs().max().item():.1e}, accuracy {accuracy(small):.2%}")
