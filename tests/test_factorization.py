"""Learned Hadamard factorization: exact init, gradients, checkpoints, and the convex optima it reaches.

The optimization tests compare against independent solvers on real data bundled with
scikit-learn: ``sklearn.linear_model.Lasso`` (diabetes) and a proximal-gradient group-lasso
solver written here in numpy (wine).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes, load_wine
from sklearn.linear_model import Lasso
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn.utils import parametrize

import hadamard_sparse as hs
from hadamard_sparse.factorization import (
    HadamardFactorization,
    factor_param_groups,
    factorize,
    l1_penalty,
    register_factorization,
)
from tests.conftest import LAYER_CASES, LayerCase, mlp, small_cnn


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny full-batch problems run fastest (and most reproducibly) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _factors(module: nn.Module, name: str = "weight") -> list[torch.Tensor]:
    plist = module.parametrizations[name]
    return [getattr(plist, f"original{i}") for i in range(plist.ntensors)]


# ---------------------------------------------------------------------------------------------
# initialization keeps every layer's output
# ---------------------------------------------------------------------------------------------

INIT_CASES = [
    (2, None, "unbalanced"),
    (3, None, "balanced"),
    (2, "row", "unbalanced"),
    (3, "out_channel", "balanced"),
    (2, "column", "balanced"),
    (4, "in_channel", "unbalanced"),
]


@pytest.mark.parametrize(
    ("depth", "group", "init"), INIT_CASES, ids=[f"d{d}-{g}-{i}" for d, g, i in INIT_CASES]
)
def test_factorize_keeps_output(layer_case: LayerCase, depth: int, group: str | None, init: str) -> None:
    model = layer_case.make()
    model.eval()
    x = layer_case.input()
    ref = model(x).detach()
    dense = {t.qualified: t.value().detach().clone() for t in hs.layers.resolve_targets(model)}
    factorize(model, depth=depth, group=group, init=init)
    targets = hs.layers.resolve_targets(model)
    assert len(targets) == layer_case.n_targets
    for t in targets:
        plist = t.module.parametrizations[t.tensor_name]
        assert isinstance(plist[0], HadamardFactorization)
        assert [n for n, _ in plist.named_parameters()] == [f"original{i}" for i in range(depth)]
        if init == "unbalanced":
            assert torch.equal(t.value(), dense[t.qualified])  # w * 1 * 1 is exact
        else:
            torch.testing.assert_close(t.value(), dense[t.qualified], rtol=1e-6, atol=1e-7)
    out = model(x).detach()
    if init == "unbalanced":
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("make", "group", "gate_shape"),
    [
        (lambda: nn.Linear(6, 5), "row", (5, 1)),
        (lambda: nn.Linear(6, 5), "column", (1, 6)),
        (lambda: nn.Conv2d(3, 4, 3), "out_channel", (4, 1, 1, 1)),
        (lambda: nn.Conv2d(3, 4, 3), "in_channel", (1, 3, 1, 1)),
        (lambda: nn.ConvTranspose2d(3, 4, 3), "out_channel", (1, 4, 1, 1)),  # weight is (in, out, kh, kw)
        (lambda: nn.ConvTranspose2d(3, 4, 3), "in_channel", (3, 1, 1, 1)),
    ],
)
def test_group_gates_follow_output_and_input_dims(make, group: str, gate_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    m = make()
    register_factorization(m, depth=3, group=group)
    v, g1, g2 = _factors(m)
    assert v.shape == m.weight.shape
    assert g1.shape == g2.shape == gate_shape
    # Zeroing one gate entry zeroes exactly the matching slice of the weight.
    with torch.no_grad():
        g1.view(-1)[1] = 0.0
    w = m.weight
    dim = next(i for i, n in enumerate(gate_shape) if n > 1)
    assert torch.all(w.select(dim, 1) == 0)
    assert torch.count_nonzero(w) == w.numel() - w.select(dim, 1).numel()


def test_hf_conv1d_row_is_dim1() -> None:
    from tests.conftest import Conv1D

    m = Conv1D(5, 6)  # weight (in=6, out=5)
    register_factorization(m, group="row")
    assert _factors(m)[1].shape == (1, 5)


def test_callable_group_index_map() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    w0 = lin.weight.detach().clone()
    calls = []

    def heads(module: nn.Module, name: str) -> torch.Tensor:
        calls.append(name)
        return (torch.arange(4) // 2).unsqueeze(1)  # two groups of two output rows

    f = register_factorization(lin, depth=2, group=heads)
    assert calls == ["weight"]
    assert f.group == "index" and f.num_groups == 2
    assert torch.equal(lin.weight, w0)
    _, gate = _factors(lin)
    assert gate.shape == (2,)
    with torch.no_grad():
        gate[1] = 0.0
    assert torch.all(lin.weight[2:] == 0) and torch.equal(lin.weight[:2], w0[:2])


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------

GRAD_GROUPS = [None, "row", "column", "index"]


@pytest.mark.parametrize("depth", [2, 3, 4])
@pytest.mark.parametrize("group", GRAD_GROUPS)
def test_gradcheck(depth: int, group: str | None) -> None:
    torch.manual_seed(0)
    shape = (3, 4, 2)
    if group == "index":
        f = HadamardFactorization(
            depth, group=torch.tensor([[0], [2], [0]]).unsqueeze(-1).expand(3, 1, 2).clone()
        )
    elif group is None:
        f = HadamardFactorization(depth)
    else:
        f = HadamardFactorization(depth, group=group, group_dim=0 if group == "row" else 1)
    w = torch.randn(shape, dtype=torch.float64)
    factors = tuple(t + 0.1 * torch.randn_like(t) for t in f.right_inverse(w))
    factors = tuple(t.requires_grad_() for t in factors)
    assert torch.autograd.gradcheck(f, factors)
    assert torch.autograd.gradgradcheck(f, factors)


def test_zero_weights_keep_gradients() -> None:
    # All factors 0 would be a stationary point; both splits keep the w-factor's gradient alive.
    for init in ("unbalanced", "balanced"):
        for group in (None, "row"):
            lin = nn.Linear(4, 3)
            with torch.no_grad():
                lin.weight.zero_()
                lin.weight[0, 0] = -2.0
            register_factorization(lin, depth=3, group=group, init=init)
            assert torch.all(lin.weight[1:] == 0) and abs(float(lin.weight[0, 0].detach()) + 2.0) < 1e-6
            lin(torch.randn(5, 4)).sum().backward()
            g0 = _factors(lin)[0].grad
            assert torch.all(g0[1:] != 0), (init, group)


def test_balanced_split_penalty_is_the_equivalent_penalty() -> None:
    # At the balanced split, weight decay's penalty (1/2)·Σ‖factor‖² equals l1_penalty: this pins the
    # constant (lasso: λ‖w‖₁ for weight_decay=λ) independently of any optimizer.
    torch.manual_seed(0)
    for depth in (2, 3, 4):
        for group in (None, "row", "column"):
            model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)).double()
            w = [m.weight.detach().clone() for m in model]
            factorize(model, depth=depth, group=group, init="balanced")
            half_sq = sum(
                0.5 * p.pow(2).sum() for g in factor_param_groups(model, 1.0)[:1] for p in g["params"]
            )
            if group is None:
                ref = sum((depth / 2) * x.abs().pow(2 / depth).sum() for x in w)
            else:
                d = 1 if group == "row" else 0  # norms over the other dim
                ref = sum((depth / 2) * x.norm(dim=d).pow(2 / depth).sum() for x in w)
            torch.testing.assert_close(half_sq, ref)
            torch.testing.assert_close(l1_penalty(model), ref)
            if depth == 2:
                direct = sum(x.abs().sum() if group is None else x.norm(dim=d).sum() for x in w)
                torch.testing.assert_close(l1_penalty(model), direct)


# ---------------------------------------------------------------------------------------------
# proofs against convex solvers
# ---------------------------------------------------------------------------------------------


def _train(
    model: nn.Module, X: torch.Tensor, Y: torch.Tensor, lam: float, steps: int, lr: float = 1e-2
) -> None:
    """Full-batch 0.5·(squared error summed over outputs, averaged over samples) with Adam + cosine lr."""
    opt = torch.optim.Adam(factor_param_groups(model, weight_decay=lam), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * (model(X) - Y).pow(2).sum(1).mean()
        loss.backward()
        opt.step()
        sched.step()


def _diabetes() -> tuple[np.ndarray, np.ndarray]:
    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    return X, (y - y.mean()) / y.std()


@pytest.mark.parametrize("alpha", [0.005, 0.02, 0.1])
def test_lasso_matches_sklearn(alpha: float, one_thread: None) -> None:
    X, y = _diabetes()
    sk = Lasso(alpha=alpha, tol=1e-12, max_iter=100_000).fit(X, y)

    def objective(w: np.ndarray, b: float) -> float:  # sklearn's: (1/2n)‖y - Xw - b‖² + α‖w‖₁
        return 0.5 * np.mean((y - X @ w - b) ** 2) + alpha * np.abs(w).sum()

    torch.manual_seed(0)
    model = nn.Linear(10, 1).double()
    factorize(model, depth=2)
    # 0.5·MSE + weight decay α on the factors  ==  sklearn's Lasso(alpha=α): the mapping is the identity.
    _train(model, torch.from_numpy(X), torch.from_numpy(y).unsqueeze(1), alpha, steps=2000, lr=1.5e-2)
    with torch.no_grad():
        w, b = model.weight[0].numpy().copy(), float(model.bias)
        np.testing.assert_allclose(float(l1_penalty(model)), np.abs(w).sum(), rtol=1e-12)
    ref = objective(sk.coef_, sk.intercept_)
    assert abs(objective(w, b) - ref) / ref < 1e-3
    hs.remove_parametrizations(model, threshold=1e-4)
    assert type(model) is nn.Linear
    assert set(np.flatnonzero(model.weight.detach().numpy()[0])) == set(np.flatnonzero(sk.coef_))
    assert 0 < np.count_nonzero(sk.coef_) < 10  # the α values give nontrivial supports


def _group_lasso_fista(X: np.ndarray, Y: np.ndarray, lam: float, groups: np.ndarray, iters: int = 5000):
    """min (1/2n)‖Y - X Wᵀ - b‖²_F + lam·Σ_g ‖W_g‖₂ by accelerated proximal gradient (FISTA).

    ``groups`` has W's shape and holds each entry's group id. The intercept is unpenalized, so it
    is eliminated by centering.
    """
    n = X.shape[0]
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    G = int(groups.max()) + 1
    step = n / np.linalg.norm(Xc, 2) ** 2
    W = np.zeros((Y.shape[1], X.shape[1]))
    Z, t = W.copy(), 1.0
    for _ in range(iters):
        V = Z + step * (Yc - Xc @ Z.T).T @ Xc / n
        norms = np.sqrt(np.bincount(groups.ravel(), (V**2).ravel(), minlength=G))
        W_new = V * np.maximum(0.0, 1.0 - step * lam / np.maximum(norms, 1e-300))[groups]
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        Z, W, t = W_new + (t - 1) / t_new * (W_new - W), W_new, t_new
    return W, Y.mean(0) - W @ X.mean(0)


@pytest.mark.parametrize(("kind", "lam"), [("column", 0.02), ("column", 0.1), ("callable", 0.05)])
def test_group_lasso_matches_proximal_solver(kind: str, lam: float, one_thread: None) -> None:
    X, c = load_wine(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    Y = np.eye(3)[c]
    col_group = np.arange(13) if kind == "column" else np.arange(13) // 2  # features, or pairs of them
    groups = np.broadcast_to(col_group, (3, 13)).copy()
    W_ref, b_ref = _group_lasso_fista(X, Y, lam, groups)

    def objective(W: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
        norms = np.sqrt(np.bincount(groups.ravel(), (W**2).ravel()))
        return 0.5 * ((Y - X @ W.T - b) ** 2).sum(1).mean() + lam * norms.sum(), norms

    torch.manual_seed(0)
    model = nn.Linear(13, 3).double()
    group = "column" if kind == "column" else (lambda module, name: torch.from_numpy(col_group).unsqueeze(0))
    factorize(model, depth=2, group=group)
    _train(model, torch.from_numpy(X), torch.from_numpy(Y), lam, steps=2000)
    with torch.no_grad():
        f, norms = objective(model.weight.numpy().copy(), model.bias.numpy().copy())
        np.testing.assert_allclose(float(l1_penalty(model)), norms.sum(), rtol=1e-10)
    f_ref, norms_ref = objective(W_ref, b_ref)
    assert abs(f - f_ref) / f_ref < 1e-3
    hs.remove_parametrizations(model, threshold=1e-4)
    W = model.weight.detach().numpy()
    zero_groups = {g for g in range(groups.max() + 1) if np.all(W[groups == g] == 0)}
    assert zero_groups == set(np.flatnonzero(norms_ref < 1e-10))
    assert 0 < len(zero_groups) < groups.max() + 1
    # Entries of surviving groups are not thresholded away group-wise (no partial groups).
    assert all(np.all(W[groups == g] != 0) for g in set(range(groups.max() + 1)) - zero_groups)


def test_depth3_is_at_least_as_sparse_as_depth2(one_thread: None) -> None:
    X, y = _diabetes()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y).unsqueeze(1)

    def fit(depth: int, lam: float) -> tuple[np.ndarray, float]:
        torch.manual_seed(0)
        model = nn.Linear(10, 1).double()
        factorize(model, depth=depth)
        _train(model, Xt, yt, lam, steps=2000, lr=1.5e-2)
        hs.remove_parametrizations(model, threshold=1e-4)
        with torch.no_grad():
            return model.weight[0].numpy().copy(), float(0.5 * (model(Xt) - yt).pow(2).mean())

    alpha = 0.05
    w2, fit2 = fit(2, alpha)
    # Equal effective penalty: depth 3's penalty λ3·(3/2)Σ|w|^(2/3) equals depth 2's α‖w‖₁ at w2.
    lam3 = alpha * np.abs(w2).sum() / (1.5 * (np.abs(w2) ** (2 / 3)).sum())
    w3, fit3 = fit(3, lam3)
    assert np.count_nonzero(w3) <= np.count_nonzero(w2)
    assert np.count_nonzero(w3) > 0
    assert fit3 <= fit2 * 1.05  # not sparser merely by fitting much worse


# ---------------------------------------------------------------------------------------------
# optimizer groups and warnings
# ---------------------------------------------------------------------------------------------


def test_factor_param_groups() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    factorize(model, depth=3, include="0")
    groups = factor_param_groups(model, 1e-3, lr=0.5)
    facs = {id(p) for p in _factors(model[0])}
    assert {id(p) for p in groups[0]["params"]} == facs
    assert groups[0]["weight_decay"] == 1e-3 and groups[0]["lr"] == 0.5
    assert groups[1]["weight_decay"] == 0.0 and "lr" not in groups[1]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.parameters()} - facs
    opt = torch.optim.SGD(groups, lr=0.1)
    # Weight decay only on factors: with zero loss, one step shrinks factors by (1 - lr·λ), nothing else moves.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        expect = before[n] * (1 - 0.5 * 1e-3) if "original" in n else before[n]
        torch.testing.assert_close(p.detach(), expect)
    with pytest.raises(hs.NoTargetsError, match="factorize first"):
        factor_param_groups(nn.Linear(2, 2), 1e-3)
    with pytest.raises(ValueError, match="weight_decay"):
        factor_param_groups(model, -1.0)
    assert float(l1_penalty(nn.Linear(2, 2))) == 0.0


def test_warns_when_weights_already_have_gradients() -> None:
    model = mlp()
    model(torch.randn(2, 8)).sum().backward()
    with pytest.warns(UserWarning, match="optimizer"):
        factorize(model)
    fresh = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factorize(fresh)


# ---------------------------------------------------------------------------------------------
# refused calls leave the model unchanged
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"depth": 1}, ValueError, "depth must be an int >= 2, got 1"),
        ({"depth": 2.0}, ValueError, "depth"),
        ({"group": "rows"}, ValueError, "group must be"),
        ({"init": "random"}, ValueError, "init must be one of"),
        ({"group": lambda m, n: torch.zeros(7, dtype=torch.long)}, ValueError, "does not broadcast"),
        ({"group": lambda m, n: torch.zeros(1, 1)}, TypeError, "integer dtype"),
        ({"include": "nothing*"}, hs.InvalidArgumentError, "include entry 'nothing.' matches no"),
        ({"exclude": "*"}, hs.NoTargetsError, "no tensor"),
    ],
)
def test_refused_calls_leave_model_unchanged(kwargs, err, match) -> None:
    model = mlp()
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(err, match=match):
        factorize(model, **kwargs)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert model.state_dict().keys() == sd.keys()


def test_factorize_validates_all_targets_first() -> None:
    model = mlp()
    hs.register_mask(model[4])  # last layer already parametrized
    with pytest.raises(ValueError, match="4.weight is already parametrized"):
        factorize(model)
    assert not parametrize.is_parametrized(model[0]) and not parametrize.is_parametrized(model[2])
    with pytest.raises(ValueError, match="already parametrized"):
        register_factorization(model[4])


# ---------------------------------------------------------------------------------------------
# checkpoints and baking
# ---------------------------------------------------------------------------------------------

STATE_GROUPS = [None, "row", "column", "callable"]


def _group_arg(kind: str | None):
    if kind == "callable":

        def rows_mod_3(module: nn.Module, name: str) -> torch.Tensor:
            w = getattr(module, name)
            return torch.arange(w.shape[0]).remainder(3).view(-1, *([1] * (w.dim() - 1)))

        return rows_mod_3
    return kind


@pytest.mark.parametrize("kind", STATE_GROUPS)
def test_sparse_state_dict_round_trip(kind: str | None) -> None:
    torch.manual_seed(0)
    model = small_cnn()
    factorize(model, depth=3, group=_group_arg(kind), init="balanced")
    hs.sparsify(model, 0.3)  # a mask on top of the factorization
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(2, 1, 8, 8)
    ref = model(x)
    sd = model.state_dict()
    fresh = hs.load_sparse_state_dict(small_cnn(), sd)
    assert torch.equal(fresh(x), ref)
    for a, b in zip(model.modules(), fresh.modules()):
        if parametrize.is_parametrized(a):
            pa, pb = a.parametrizations.weight, b.parametrizations.weight
            assert [type(p) for p in pa] == [type(p) for p in pb] == [HadamardFactorization, hs.HadamardMask]
            ra, rb = pa[0].record(0), pb[0].record(0)
            assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
    assert fresh.state_dict().keys() == sd.keys()


@pytest.mark.parametrize("kind", STATE_GROUPS)
@pytest.mark.parametrize("init", ["unbalanced", "balanced"])
def test_dense_checkpoint_loads_strict(kind: str | None, init: str) -> None:
    torch.manual_seed(0)
    dense = small_cnn()
    model = factorize(small_cnn(), depth=2, group=_group_arg(kind), init=init)
    hs.register_mask(model[6], mask=torch.rand(10, 32) > 0.5)
    mask = model[6].parametrizations.weight[1].mask.clone()
    model.load_state_dict(dense.state_dict(), strict=True)
    x = torch.randn(2, 1, 8, 8)
    for i in (0, 2):
        torch.testing.assert_close(model[i].weight, dense[i].weight, rtol=1e-6, atol=1e-7)
    assert torch.equal(model[6].parametrizations.weight[1].mask, mask)  # the mask is kept
    torch.testing.assert_close(model[6].weight, dense[6].weight * mask, rtol=1e-6, atol=1e-7)
    if init == "unbalanced":  # the same split as factorize: w-factor = w, the others 1
        f = _factors(model[0])
        assert torch.equal(f[0], dense[0].weight) and torch.all(f[1] == 1)
    hs.remove_parametrizations(model)
    dense_masked = copy.deepcopy(dense)
    with torch.no_grad():
        dense_masked[6].weight.mul_(mask)
    torch.testing.assert_close(model(x), dense_masked(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", LAYER_CASES[:9] + LAYER_CASES[11:12], ids=lambda c: c.id)
def test_bake_gives_plain_modules_and_same_outputs(case: LayerCase) -> None:
    torch.manual_seed(0)
    model = case.make()
    classes = {n: type(m) for n, m in model.named_modules()}
    factorize(model, depth=2, group="row", init="balanced")
    with torch.no_grad():
        for _, plist, _ in hs.factorization._iter_factorizations(model):
            plist.original1.view(-1)[0] = 0.0  # switch the first row group off
            plist.original0.mul_(1.5)
    model.eval()
    x = case.input()
    ref = model(x).detach()
    hs.remove_parametrizations(model, threshold=1e-12)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any("original" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(x).detach(), ref, rtol=1e-5, atol=1e-6)
    for t in hs.layers.resolve_targets(model):
        out_dim, _ = hs.layers.weight_dims(t.module, t.tensor_name)
        assert torch.all(t.value().select(out_dim, 0) == 0)


# ---------------------------------------------------------------------------------------------
# composition with masks and schedules
# ---------------------------------------------------------------------------------------------


def test_sparsify_puts_a_mask_on_top_and_scores_the_product() -> None:
    torch.manual_seed(0)
    model = mlp()
    factorize(model, depth=2, init="balanced")
    with torch.no_grad():  # make the product differ from each factor's own ranking
        for _, plist, _ in hs.factorization._iter_factorizations(model):
            plist.original1.copy_(torch.rand_like(plist.original1) * 2)
    products = {
        name: plist[0](plist.original0, plist.original1).detach()
        for name, plist, _ in hs.factorization._iter_factorizations(model)
    }
    hs.sparsify(model, 0.5, scope="layer")
    for name, mask in hs.masks(model).items():
        chain = model.get_submodule(name.rpartition(".")[0]).parametrizations.weight
        assert [type(p) for p in chain] == [HadamardFactorization, hs.HadamardMask]
        w = products[name]
        k = round(0.5 * w.numel())
        kth = w.abs().flatten().kthvalue(k).values
        assert torch.equal(mask, w.abs() > kth)  # ties have probability 0 with random floats
    hs.sparsify(model, 0.0)
    assert all(bool(m.all()) for m in hs.masks(model).values())
    # register_mask on top of a factorized weight, updated in place.
    lin = nn.Linear(5, 3)
    register_factorization(lin, depth=3, group="column")
    pm = hs.register_mask(lin, mask=torch.ones(3, 5, dtype=torch.bool))
    with torch.no_grad():
        pm.mask[:, 0] = False
    assert torch.all(lin.weight[:, 0] == 0)
    lin(torch.randn(2, 5)).sum().backward()
    assert all(f.grad is not None for f in _factors(lin))


def test_gradual_pruning_drives_a_mask_on_a_factorized_model() -> None:
    schedules = pytest.importorskip("hadamard_sparse.schedules")
    torch.manual_seed(0)
    model = factorize(mlp(), depth=2)
    hs.sparsify(model, 0.0)
    sched = schedules.GradualPruning(model, 0.8, start_step=0, end_step=6, every=2)
    opt = torch.optim.SGD(factor_param_groups(model, 1e-4), lr=0.01)
    for _ in range(6):
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        sched.step()
    assert abs(hs.sparsity_report(model).sparsity - 0.8) < 1e-3
    assert all(
        isinstance(t.module.parametrizations.weight[0], HadamardFactorization)
        for t in hs.layers.resolve_targets(model)
    )


def test_assigning_weight_uses_the_split() -> None:
    lin = nn.Linear(3, 2)
    register_factorization(lin, depth=3)
    w = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 3.0]])
    lin.weight = w
    assert torch.equal(lin.weight, w)
    f = _factors(lin)
    assert torch.equal(f[0], w) and torch.all(f[1] == 1) and torch.all(f[2] == 1)
