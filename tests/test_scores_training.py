"""Scores for pruning during fine-tuning (issue 19): "movement" and "obs" (oBERT) from hs.GradientScores.

References: movement by hand (-sum w * g with the gradients computed in closed form); OBS against the
exact optimal-brain-surgeon solution in numpy float64 (full Fisher of the same gradients per block,
exact inverse, exact saliencies and the exact multi-weight update).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse.gradient_scores import GradientScores
from tests.hf_models import bert_config, transformers


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    sd = model.state_dict()
    return list(sd) == list(before) and all(torch.equal(before[k], v) for k, v in sd.items())


# --------------------------------------------------------------------------------------- movement


def test_movement_is_minus_w_times_g_summed_over_steps() -> None:
    """Linear y = W x, loss = sum(v * y): dL/dW = v^T x, so S = -sum_t W_t * (v_t^T x_t) by hand."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2, bias=False)
    tracker = hs.GradientScores(lin)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    expected = torch.zeros(2, 3)
    for _ in range(4):
        x, v = torch.randn(5, 3), torch.randn(5, 2)
        w = lin.weight.detach().clone()
        expected -= w * (v.T @ x)
        (lin(x) * v).sum().backward()
        opt.step()
        opt.zero_grad()
    assert tracker.steps == 4
    torch.testing.assert_close(tracker["weight"].movement, expected, rtol=1e-5, atol=1e-6)
    tracker.reset()
    assert tracker.steps == 0 and not tracker["weight"].movement.any()


def test_movement_keeps_the_weight_moving_away_from_zero() -> None:
    """Two weights of equal magnitude: the one SGD pushes toward zero scores lower and is pruned."""
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0]]))
    tracker = hs.GradientScores(lin)
    c = torch.tensor([[1.0, -1.0]])  # loss = sum(c * W): g = c; SGD lowers w0 (toward 0), raises w1
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    for _ in range(3):
        (lin.weight * c).sum().backward()
        opt.step()
        opt.zero_grad()
    s = tracker["weight"].movement
    assert s[0, 0] < 0 < s[0, 1]
    before = lin.weight.detach().clone()
    hs.sparsify(lin, 0.5, method="movement", calibration=tracker, scope="layer")
    assert hs.masks(lin)["weight"].tolist() == [[False, True]]
    assert torch.equal(lin.parametrizations.weight.original, before)  # mask only: weights untouched
    # magnitude would keep the other one (w0 = 0.7 < w1 = 1.3 here, so check the score, not |w|)
    assert s[0, 1] - s[0, 0] > 0


def test_movement_masked_entries_are_pruned_first_and_get_no_gradient() -> None:
    torch.manual_seed(1)
    lin = hs.sparsify(nn.Linear(4, 4), 0.5, scope="layer")
    mask = hs.masks(lin)["weight"].clone()
    tracker = hs.GradientScores(lin)
    for _ in range(2):
        lin(torch.randn(3, 4)).square().sum().backward()
    assert not tracker["weight"].movement[~mask].any()  # the original's gradient is mask * dL/dW_eff
    hs.sparsify(lin, 0.75, method="movement", calibration=tracker, scope="layer")
    new = hs.masks(lin)["weight"]
    assert not (new & ~mask).any() and int(new.sum()) == 4


def test_update_mode_matches_hooks() -> None:
    torch.manual_seed(2)
    a = nn.Linear(4, 3)
    b = nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    ta, tb = (
        hs.GradientScores(a, num_grads=3, block_size=5),
        hs.GradientScores(b, num_grads=3, block_size=5, hooks=False),
    )
    for _ in range(4):
        x = torch.randn(2, 4)
        a(x).square().sum().backward()
        b(x).square().sum().backward()
        tb.update()
        b.zero_grad()
    assert ta.steps == tb.steps == 4
    torch.testing.assert_close(ta["weight"].movement, tb["weight"].movement)
    torch.testing.assert_close(ta["weight"].grads, tb["weight"].grads)
    with pytest.raises(hs.InvalidArgumentError, match="hooks=False"):
        ta.update()


def test_hooks_are_removed() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with hs.GradientScores(model) as tracker:
        model(torch.randn(2, 4)).sum().backward()
        assert tracker.steps == 1
    model(torch.randn(2, 4)).sum().backward()
    assert tracker.steps == 1  # no longer recording
    for p in model.parameters():
        assert not getattr(p, "_backward_hooks", None)
    tracker.remove()  # idempotent


# --------------------------------------------------------------------------------------- OBS


def _train_grads(lin: nn.Linear, tracker: GradientScores, n: int, seed: int = 0) -> list[np.ndarray]:
    """n backward passes on random data; returns the flattened gradients (float64) in order."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(3, lin.in_features, generator=g, dtype=lin.weight.dtype)
        t = torch.randn(3, lin.out_features, generator=g, dtype=lin.weight.dtype)
        (lin(x) - t).square().sum().backward()
        leaf = lin.parametrizations.weight.original if hasattr(lin, "parametrizations") else lin.weight
        out.append(leaf.grad.detach().reshape(-1).double().numpy().copy())  # type: ignore[union-attr]
        lin.zero_grad()
    return out


def _exact_blocks(grads: list[np.ndarray], m: int, numel: int, block: int, damp: float) -> list[np.ndarray]:
    """Exact inverse of (mean of the last m g g^T + damp I) restricted to each block of indices."""
    last = np.stack(grads[-m:])
    invs = []
    for start in range(0, numel, block):
        idx = slice(start, min(start + block, numel))
        f = last[:, idx].T @ last[:, idx] / len(last) + damp * np.eye(idx.stop - idx.start)
        invs.append(np.linalg.inv(f))
    return invs


def _exact_obs(
    w: np.ndarray, invs: list[np.ndarray], block: int, sparsity: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(saliencies, keep, new weights): lowest w^2 / (2 Finv_ii) pruned, exact multi-weight OBS per block."""
    diag = np.concatenate([np.diag(f) for f in invs])
    rho = w**2 / (2 * diag)
    k = round(sparsity * w.size)
    pruned = np.argsort(rho, kind="stable")[:k]
    keep = np.ones(w.size, dtype=bool)
    keep[pruned] = False
    new = w.copy()
    for b, finv in enumerate(invs):
        idx = np.arange(b * block, b * block + finv.shape[0])
        q = idx[~keep[idx]] - b * block
        if q.size == 0:
            continue
        delta = -finv[:, q] @ np.linalg.solve(finv[np.ix_(q, q)], w[idx][q])
        new[idx] += delta
    new[~keep] = w[~keep]  # pruned entries keep their value under the mask
    return rho, keep, new


@pytest.mark.parametrize(
    ("out_f", "in_f", "block", "m"),
    [(1, 6, 6, 8), (3, 6, 6, 8), (3, 6, 18, 30), (3, 6, 4, 5)],  # one row; block = row; whole tensor; padded
)
@pytest.mark.parametrize("sparsity", [1 / 6, 0.5])
def test_obs_matches_exact_obs(out_f: int, in_f: int, block: int, m: int, sparsity: float) -> None:
    torch.manual_seed(4)
    lin = nn.Linear(in_f, out_f, bias=False).double()
    damp = 1e-3
    tracker = hs.GradientScores(lin, num_grads=m, block_size=block, damp=damp)
    grads = _train_grads(lin, tracker, m + 3)  # more passes than m: the ring buffer keeps the last m
    w = lin.weight.detach().reshape(-1).numpy().copy()
    invs = _exact_blocks(grads, m, w.size, block, damp)
    rho, keep, new = _exact_obs(w, invs, block, sparsity)
    got = tracker["weight"].obs_scores(lin.weight.detach()).reshape(-1).numpy()
    np.testing.assert_allclose(got, rho, rtol=1e-6)
    hs.sparsify(lin, sparsity, method="obs", calibration=tracker, scope="layer")
    assert np.array_equal(hs.masks(lin)["weight"].reshape(-1).numpy(), keep)
    orig = lin.parametrizations.weight.original.detach().reshape(-1).numpy()
    np.testing.assert_allclose(orig, new, rtol=1e-6, atol=1e-9)


def test_obs_single_weight_update_is_the_textbook_formula() -> None:
    """Pruning one weight q: dw = -F^-1 e_q w_q / [F^-1]_qq (and the loss model predicts rho_q)."""
    torch.manual_seed(5)
    lin = nn.Linear(5, 1, bias=False).double()
    tracker = hs.GradientScores(lin, num_grads=10, block_size=5, damp=1e-2)
    grads = _train_grads(lin, tracker, 10)
    w = lin.weight.detach().reshape(-1).numpy().copy()
    finv = _exact_blocks(grads, 10, 5, 5, 1e-2)[0]
    rho = w**2 / (2 * np.diag(finv))
    q = int(np.argmin(rho))
    dw = -finv[:, q] * w[q] / finv[q, q]
    hs.sparsify(lin, 0.2, method="obs", calibration=tracker)
    eff = lin.weight.detach().reshape(-1).numpy()
    np.testing.assert_allclose(eff, np.where(np.arange(5) == q, 0.0, w + dw), rtol=1e-6, atol=1e-12)
    f = np.linalg.inv(finv)
    np.testing.assert_allclose(0.5 * dw @ f @ dw, rho[q], rtol=1e-6)  # the saliency is the quadratic loss


def test_dampening_large_lambda_gives_magnitude() -> None:
    """F + lambda I with lambda >> F: F^-1 ~ I / lambda, so rho ~ lambda w^2 / 2 ranks like |w|."""
    torch.manual_seed(6)
    a = nn.Linear(8, 4)
    b = nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    tracker = hs.GradientScores(a, num_grads=4, block_size=8, damp=1e6)
    for _ in range(4):
        a(torch.randn(2, 8)).square().mean().backward()
    tg = tracker["0.weight" if "0.weight" in tracker else "weight"]
    torch.testing.assert_close(
        tg.obs_scores(a.weight.detach()), 1e6 * a.weight.detach().double().square() / 2, rtol=1e-6, atol=0
    )
    hs.sparsify(a, 0.5, method="obs", calibration=tracker, scope="layer", include="weight")
    hs.sparsify(b, 0.5, scope="layer", include="weight")
    assert torch.equal(hs.masks(a)["weight"], hs.masks(b)["weight"])
    # the update is tiny then (F ~ lambda I is nearly diagonal): kept weights barely move
    torch.testing.assert_close(
        a.parametrizations.weight.original, b.parametrizations.weight.original, atol=1e-5, rtol=0
    )


def test_obs_global_scope_counts_over_all_tensors() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    tracker = hs.GradientScores(model, num_grads=6, block_size=8)
    for _ in range(6):
        model(torch.randn(4, 6)).square().mean().backward()
    hs.sparsify(model, 0.6, method="obs", calibration=tracker, min_keep=1)
    r = hs.sparsity_report(model)
    assert r.zeros == round(0.6 * r.numel)
    assert all(m.any(dim=1).all() for m in hs.masks(model).values())  # the min_keep floor holds


# --------------------------------------------------------------------------------------- refusals


def test_refusals_leave_the_model_unchanged() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    other = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = _state(model)
    empty = hs.GradientScores(model, num_grads=2)
    movement_only = hs.GradientScores(model)
    foreign = hs.GradientScores(other)
    other(torch.randn(2, 4)).sum().backward()
    cases = [
        (dict(method="movement"), hs.InvalidArgumentError, "hs.GradientScores"),
        (dict(method="obs"), hs.InvalidArgumentError, "hs.GradientScores"),
        (dict(method="movement", calibration=[torch.randn(2, 4)]), hs.InvalidTypeError, "GradientScores"),
        (dict(method="movement", calibration=empty), hs.InvalidArgumentError, "no gradient recorded"),
        (dict(method="obs", calibration=movement_only), hs.InvalidArgumentError, "num_grads"),
        (dict(method="movement", calibration=foreign), hs.InvalidArgumentError, "does not track"),
        (
            dict(method="movement", calibration=empty, structure="row"),
            hs.InvalidArgumentError,
            "unstructured",
        ),
        (dict(method="obs", calibration=empty, scope="row"), hs.InvalidArgumentError, "scope"),
    ]
    for kw, err, msg in cases:
        with pytest.raises(err, match=msg):
            hs.sparsify(model, 0.5, **kw)
        assert _same(model, before) and not hs.masks(model)
    with pytest.raises(hs.InvalidArgumentError, match="num_grads"):
        hs.GradientScores(model, num_grads=-1)
    with pytest.raises(hs.InvalidArgumentError, match="damp"):
        hs.GradientScores(model, damp=0.0)


def test_schedule_refusals() -> None:
    torch.manual_seed(9)
    model = hs.sparsify(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), 0.0)
    tracker = hs.GradientScores(model)
    with pytest.raises(hs.InvalidArgumentError, match="calibration=None"):
        hs.GradualPruning(model, 0.5, method="movement")
    with pytest.raises(hs.InvalidArgumentError, match="IterativePruning does not take"):
        hs.IterativePruning(model, method="movement")
    with pytest.raises(hs.InvalidArgumentError, match="calibration is for"):
        hs.GradualPruning(model, 0.5, calibration=tracker)
    with pytest.raises(hs.InvalidArgumentError, match="num_grads"):
        hs.GradualPruning(model, 0.5, method="obs", calibration=tracker)
    # no gradient recorded when an update step asks for a positive sparsity: refused, masks unchanged
    sched = hs.GradualPruning(model, 0.5, start_step=1, end_step=1, method="movement", calibration=tracker)
    with pytest.raises(hs.InvalidArgumentError, match="no gradient recorded"):
        sched.step()
    assert all(m.all() for m in hs.masks(model).values())


# --------------------------------------------------------------------------------------- schedules


def test_gradual_obs_first_event_is_exact_obs() -> None:
    """One GradualPruning event with method='obs' on a dense-masked Linear: exact multi-weight OBS."""
    torch.manual_seed(10)
    lin = hs.sparsify(nn.Linear(6, 2, bias=False).double(), 0.0)
    tracker = hs.GradientScores(lin, num_grads=8, block_size=6, damp=1e-3)
    sched = hs.GradualPruning(
        lin, 0.5, start_step=1, end_step=1, method="obs", scope="layer", calibration=tracker, min_keep=0
    )
    grads = _train_grads(lin, tracker, 8)
    w = lin.parametrizations.weight.original.detach().reshape(-1).numpy().copy()
    _, keep, new = _exact_obs(w, _exact_blocks(grads, 8, 12, 6, 1e-3), 6, 0.5)
    sched.step()
    assert np.array_equal(hs.masks(lin)["weight"].reshape(-1).numpy(), keep)
    np.testing.assert_allclose(
        lin.parametrizations.weight.original.detach().reshape(-1).numpy(), new, rtol=1e-6
    )
    assert tracker["weight"].grad_steps == 0  # the kept gradients are dropped after the pruning step
    assert tracker.steps == 8  # the movement is not (movement="run")


def _tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = bert_config(num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def _batch(g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (4, 8), generator=g)
    return {"input_ids": ids, "labels": (ids[:, 0] % 2)}


@pytest.mark.parametrize("method", ["movement", "obs"])
def test_gradual_pruning_on_tiny_bert(method: str) -> None:
    model = hs.sparsify(_tiny_bert(), 0.0, exclude="classifier")
    tracker = hs.GradientScores(model, num_grads=4 if method == "obs" else 0, block_size=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = hs.GradualPruning(
        model, 0.8, start_step=2, end_step=6, every=2, method=method, calibration=tracker
    )
    g = torch.Generator().manual_seed(0)
    previous = {k: v.clone() for k, v in hs.masks(model).items()}
    for step in range(1, 9):
        loss = model(**_batch(g)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        now = hs.masks(model)
        assert all(not (now[k] & ~previous[k]).any() for k in now)  # nested
        previous = {k: v.clone() for k, v in now.items()}
        if step in (4, 6):  # kept gradients dropped after each pruning step (step 2 prunes to 0: no scores)
            assert all(tg.grad_steps == 0 for tg in tracker.values())
            assert tracker.steps == step  # movement="run": summed over the whole run
    assert torch.isfinite(loss)
    assert [round(t, 6) for _, t, _ in sched.history] == [round(sched.target_at(s), 6) for s in (2, 4, 6)]
    m = hs.masks(model)  # every mask is driven (the classifier has none)
    assert sum(int((~v).sum()) for v in m.values()) == round(0.8 * sum(v.numel() for v in m.values()))
    tracker.remove()


@pytest.mark.parametrize("method", ["movement", "obs"])
def test_sparsify_on_tiny_bert(method: str) -> None:
    model = _tiny_bert()
    tracker = hs.GradientScores(model, num_grads=4, block_size=32, exclude="classifier")
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        model(**_batch(g)).loss.backward()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    hs.sparsify(model, 0.7, method=method, calibration=tracker, exclude="classifier")
    m = {k: v for k, v in hs.masks(model).items() if not k.startswith("classifier")}
    if method == "movement":  # default scope "layer": each tensor on its own
        assert all(int((~v).sum()) == round(0.7 * v.numel()) for v in m.values())
    else:  # "obs": global by default
        assert sum(int((~v).sum()) for v in m.values()) == round(0.7 * sum(v.numel() for v in m.values()))
    name = "bert.encoder.layer.0.intermediate.dense"
    orig = model.get_submodule(name).parametrizations.weight.original
    keep = hs.masks(model)[name + ".weight"]
    changed = not torch.equal(orig[keep], dense[name + ".weight"][keep])
    assert changed == (method == "obs")  # only obs rewrites the kept weights
    assert torch.equal(orig[~keep], dense[name + ".weight"][~keep])  # pruned entries keep their value
    tracker.remove()


def test_state_dict_round_trip() -> None:
    torch.manual_seed(11)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    ta = hs.GradientScores(a, num_grads=3, block_size=4)
    tb = hs.GradientScores(b, num_grads=3, block_size=4)
    for _ in range(5):
        a(torch.randn(2, 4)).square().sum().backward()
    tb.load_state_dict(torch.load(_save(ta.state_dict()), weights_only=True))
    assert tb.steps == 5
    torch.testing.assert_close(tb["weight"].movement, ta["weight"].movement)
    torch.testing.assert_close(
        tb["weight"].obs_scores(b.weight.detach()), ta["weight"].obs_scores(a.weight.detach())
    )
    with pytest.raises(hs.InvalidArgumentError, match="same arguments"):
        hs.GradientScores(b, num_grads=2, block_size=4).load_state_dict(ta.state_dict())


def _save(obj: object) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_obs_refuses_a_fisher_the_dampening_cannot_make_positive_definite() -> None:
    torch.manual_seed(12)
    lin = nn.Linear(8, 4)
    tracker = hs.GradientScores(lin, num_grads=4, block_size=8, damp=1e-7)
    for _ in range(2):  # rank 2 < 8, gradients ~1e12: F + 1e-7 I is singular in float64
        (1e12 * lin(torch.randn(2, 8)).sum()).backward()
    before = _state(lin)
    with pytest.raises(hs.InvalidArgumentError, match="larger damp"):
        hs.sparsify(lin, 0.5, method="obs", calibration=tracker)
    assert _same(lin, before) and not hs.masks(lin)


@pytest.mark.parametrize("window", ["run", "since_prune"])
def test_movement_window_in_a_schedule(window: str) -> None:
    """movement="run" sums -w*g over every step; "since_prune" restarts after each pruning step."""
    torch.manual_seed(13)
    lin = hs.sparsify(nn.Linear(4, 3, bias=False), 0.0)
    tracker = hs.GradientScores(lin, movement=window)
    sched = hs.GradualPruning(
        lin, 0.5, initial_sparsity=0.25, start_step=2, end_step=4, every=2, method="movement",
        calibration=tracker, scope="layer",
    )  # fmt: skip
    orig = lin.parametrizations.weight.original
    opt = torch.optim.SGD([orig], lr=0.05)
    total, since = torch.zeros(3, 4), torch.zeros(3, 4)
    for step in range(1, 4):  # the pruning step at step 2 prunes to 0.25
        x, v = torch.randn(5, 4), torch.randn(5, 3)
        term = -orig.detach() * ((v.T @ x) * hs.masks(lin)["weight"])  # the original's gradient: mask * dL/dW
        total, since = total + term, since + term
        (lin(x) * v).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if step == 2:
            since = torch.zeros(3, 4)
            assert not hs.masks(lin)["weight"].all()
    if window == "since_prune":
        torch.testing.assert_close(tracker["weight"].movement, since, rtol=1e-5, atol=1e-6)
        assert tracker.steps == 1
    else:
        torch.testing.assert_close(tracker["weight"].movement, total, rtol=1e-5, atol=1e-6)
        assert tracker.steps == 3
    with pytest.raises(hs.InvalidArgumentError, match="movement must be one of"):
        hs.GradientScores(lin, movement="all")


def test_synchronize_without_a_process_group_changes_nothing() -> None:
    """One process (no torch.distributed group): the movement stays what the hooks recorded."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    tracker = hs.GradientScores(lin)
    lin(torch.randn(5, 4)).square().sum().backward()
    before = {k: tg.movement.clone() for k, tg in tracker.items()}
    assert any(v.any() for v in before.values())
    tracker.synchronize()
    assert all(torch.equal(tracker[k].movement, v) for k, v in before.items())
