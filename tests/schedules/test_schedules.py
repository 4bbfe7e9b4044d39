"""Pruning schedules: exact counts along the curve, in-place masks, compile, resume, SET/RigL rules, errors."""

from __future__ import annotations

import copy
import importlib.util
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from hadamard_sparse.api import masks, register_mask, sparsify
from hadamard_sparse.errors import NoTargetsError
from hadamard_sparse.report import sparsity_report
from hadamard_sparse.schedules import SET, GradualPruning, IterativePruning, RigL, cubic, linear
from tests.conftest import LAYER_CASES, LayerCase, mlp, small_cnn


def _zeros(model: nn.Module) -> dict[str, int]:
    return {k: int((~m).sum()) for k, m in masks(model).items()}


def _originals(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "parametrizations"):
            for t, pl in mod.parametrizations.items():
                out[f"{name}.{t}" if name else t] = pl.original
    return out


# ----------------------------------------------------------------------------------------------
# curves
# ----------------------------------------------------------------------------------------------


def test_curves_against_the_formula() -> None:
    for t in range(0, 121, 7):
        # Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 on [t0, t0 + n dt]
        tt = min(max(t, 10), 110)
        ref = 0.9 + (0.1 - 0.9) * (1 - (tt - 10) / 100) ** 3
        assert cubic(t, initial=0.1, final=0.9, start=10, end=110) == pytest.approx(ref)
        assert linear(t, initial=0.1, final=0.9, start=10, end=110) == pytest.approx(
            0.1 + 0.8 * (tt - 10) / 100
        )
    assert cubic(5, initial=0.0, final=0.5, start=5, end=5) == 0.5


# ----------------------------------------------------------------------------------------------
# 1. exact counts per step, global and layer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("curve", ["cubic", "linear", "callable"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("make", [mlp, small_cnn], ids=["mlp", "cnn"])
def test_gradual_exact_counts_follow_the_curve(curve: str, scope: str, make) -> None:
    torch.manual_seed(0)
    model = sparsify(make(), 0.0)
    start, end, every, si, sf = 2, 13, 3, 0.1, 0.85
    fn = (lambda p: si + (sf - si) * math.sqrt(p)) if curve == "callable" else curve
    sched = GradualPruning(
        model, sf, initial_sparsity=si, start_step=start, end_step=end, every=every, curve=fn, scope=scope
    )
    numel = {k: m.numel() for k, m in masks(model).items()}
    prev = {k: m.clone() for k, m in masks(model).items()}
    for t in range(1, end + 4):
        sched.step()
        if t < start:
            assert sum(_zeros(model).values()) == 0
            continue
        last = start + (min(t, end) - start) // every * every if t < end else end
        p = (last - start) / (end - start)
        ref = {
            "cubic": sf + (si - sf) * (1 - p) ** 3,
            "linear": si + (sf - si) * p,
            "callable": si + (sf - si) * math.sqrt(p),
        }[curve]
        assert sched.sparsity == pytest.approx(ref)
        zeros = _zeros(model)
        if scope == "global":
            assert sum(zeros.values()) == round(ref * sum(numel.values()))
        else:
            assert zeros == {k: round(ref * n) for k, n in numel.items()}
        for k, m in masks(model).items():  # nested: once pruned, stays pruned
            assert not (m & ~prev[k]).any()
            prev[k] = m.clone()
    assert [h[0] for h in sched.history] == [2, 5, 8, 11, 13]
    assert sched.history[-1][1] == pytest.approx(sf)
    assert sched.history[-1][2] == pytest.approx(sum(_zeros(model).values()) / sum(numel.values()))


@pytest.mark.parametrize("case", LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def test_gradual_keeps_the_largest_magnitudes_on_every_layer_type(case: LayerCase) -> None:
    torch.manual_seed(0)
    model = sparsify(case.make(), 0.0)
    sched = GradualPruning(model, 0.6, start_step=0, end_step=2, every=1, scope="global", min_keep=0)
    sched.step()
    sched.step()
    w = torch.cat([o.detach().abs().flatten() for o in _originals(model).values()])
    m = torch.cat([mm.flatten() for mm in masks(model).values()])
    n_prune = round(0.6 * w.numel())
    assert int((~m).sum()) == n_prune
    # reference: the n_prune smallest |w| over all tensors (weights do not change between steps)
    ref = torch.ones_like(m)
    ref[torch.argsort(w, stable=True)[:n_prune]] = False
    assert torch.equal(m, ref)
    out = model(case.input())
    assert torch.isfinite(out).all()


def test_gradual_never_zeroes_original_and_structure_passthrough() -> None:
    torch.manual_seed(0)
    model = sparsify(mlp(), 0.0)
    before = {k: v.detach().clone() for k, v in _originals(model).items()}
    sched = GradualPruning(model, 0.9, end_step=1, every=1)
    sched.step()
    assert all(torch.equal(before[k], v) for k, v in _originals(model).items())
    rows = sparsify(mlp(), 0.0, structure="row")
    g = GradualPruning(rows, 0.5, end_step=2, every=1, structure="row", scope="layer")
    g.step()
    g.step()
    for m in masks(rows, compact=True).values():
        assert m.shape[1] == 1 and int((~m).sum()) == round(0.5 * m.shape[0])


# ----------------------------------------------------------------------------------------------
# 2. masks updated in place; compiled model follows without recompiling
# ----------------------------------------------------------------------------------------------


def _make_set(model: nn.Module) -> SET:
    return SET(model, 0.7, every=1, drop_fraction=0.5, distribution="uniform")


def _make_gradual(model: nn.Module) -> GradualPruning:
    return GradualPruning(model, 0.8, end_step=4, every=1)


@pytest.mark.parametrize("factory", [_make_gradual, _make_set], ids=["gradual", "set"])
def test_masks_in_place_and_compiled_model_follows_without_recompiling(factory) -> None:
    torch.manual_seed(0)
    model = sparsify(mlp(), 0.0)
    ptrs = {k: (m.data_ptr(), id(m)) for k, m in masks(model).items()}
    x = torch.randn(5, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x)
    sched = factory(compiled)  # a compiled wrapper is accepted: the inner model's masks are driven
    seen = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            sched.step()
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
            seen.append(torch.cat([m.flatten() for m in masks(model).values()]).clone())
    assert len({tuple(s.tolist()) for s in seen}) > 1  # the masks did change
    assert {k: (m.data_ptr(), id(m)) for k, m in masks(model).items()} == ptrs


# ----------------------------------------------------------------------------------------------
# 3. resume in a new process: bitwise identical
# ----------------------------------------------------------------------------------------------

_RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from hadamard_sparse.api import sparsify
    from hadamard_sparse.schedules import SET, GradualPruning, IterativePruning, RigL

    N, K = 14, 7

    def build(kind):
        torch.manual_seed(0)
        model = sparsify(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)), 0.0)
        opt = torch.optim.Adam(model.parameters(), lr=0.05) if kind != "set" else torch.optim.SGD(
            model.parameters(), lr=0.1, momentum=0.9)
        if kind == "gradual":
            s = GradualPruning(model, 0.8, end_step=12, every=2, method="random")
        elif kind == "set":
            s = SET(model, 0.6, every=2, drop_fraction=0.4, end_step=12, optimizer=opt)
        elif kind == "rigl":
            s = RigL(model, opt, 0.6, every=2, drop_fraction=0.4, end_step=12)
        else:
            s = IterativePruning(model, rounds=3, final_sparsity=0.8, rewind_to=1, every=3, optimizer=opt)
        return model, opt, s

    def train(model, opt, sched, steps):
        for _ in range(steps):
            g = torch.Generator().manual_seed(1000 + sched.last_step)
            x = torch.randn(16, 6, generator=g)
            y = torch.randint(0, 3, (16,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()

    def uninterrupted(kind, ckpt):
        model, opt, s = build(kind)
        train(model, opt, s, K)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": s.state_dict()}, ckpt)
        train(model, opt, s, N - K)
        return model.state_dict(), s.history

    def resume(kind, ckpt, out):
        model, opt, s = build(kind)
        torch.manual_seed(12345)  # the global RNG differs from the first run
        torch.rand(100)
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        s.load_state_dict(state["sched"])
        train(model, opt, s, N - K)
        torch.save({"model": model.state_dict(), "history": s.history}, out)

    if __name__ == "__main__":
        d = sys.argv[1]
        for kind in sys.argv[2:]:
            resume(kind, f"{d}/{kind}.pt", f"{d}/{kind}_out.pt")
    """
)


def test_resume_in_a_new_process_is_bitwise_identical(tmp_path: Path) -> None:
    script = tmp_path / "resume_script.py"
    script.write_text(_RESUME_SCRIPT)
    spec = importlib.util.spec_from_file_location("resume_script", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kinds = ["gradual", "set", "rigl", "iterative"]
    expected = {k: mod.uninterrupted(k, str(tmp_path / f"{k}.pt")) for k in kinds}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *kinds], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for k in kinds:
        got = torch.load(tmp_path / f"{k}_out.pt", weights_only=True)
        sd, history = expected[k]
        assert got["history"] == history, k
        assert sd.keys() == got["model"].keys()
        for name, v in sd.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, got["model"][name]), (k, name)
            else:
                assert v == got["model"][name], (k, name)
        assert any(not bool(v.all()) for n, v in sd.items() if n.endswith("_mask")), k


def test_generator_is_owned_by_the_schedule() -> None:
    def run(global_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = sparsify(mlp(), 0.0)
        sched = SET(model, 0.5, every=1, drop_fraction=0.5, seed=3)
        torch.manual_seed(global_seed)
        out = []
        for _ in range(3):
            sched.step()
            out.append(torch.cat([m.flatten() for m in masks(model).values()]).clone())
        return out

    a, b = run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------
# 5. SET / RigL: constant counts, regrown start at 0, optimizer state reset, growth rules
# ----------------------------------------------------------------------------------------------


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, sched, steps: int, check) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 8, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        before = {k: m.clone() for k, m in masks(model).items()}
        sched.step()
        check(before)


@pytest.mark.parametrize("kind", ["set", "rigl"])
@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_dst_constant_counts_zero_regrown_and_optimizer_state(kind: str, opt_kind: str) -> None:
    torch.manual_seed(0)
    model = sparsify(mlp(), 0.0)
    params = list(model.parameters())
    opt = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9)
        if opt_kind == "sgd"
        else torch.optim.Adam(params, lr=0.01)
    )
    if kind == "set":
        sched = SET(model, 0.7, every=2, drop_fraction=0.5, end_step=20, optimizer=opt, distribution="erk")
    else:
        sched = RigL(model, opt, 0.7, every=2, drop_fraction=0.5, end_step=20, distribution="erk")
    dens = sched.densities()
    counts = {k: int(m.sum()) for k, m in masks(model).items()}
    assert counts == {k: round(dens[k] * m.numel()) for k, m in masks(model).items()}
    originals = _originals(model)
    n_regrown = 0

    def check(before: dict[str, torch.Tensor]) -> None:
        nonlocal n_regrown
        for k, m in masks(model).items():
            assert int(m.sum()) == counts[k]
            regrown = m & ~before[k]
            n_regrown += int(regrown.sum())
            assert torch.all(originals[k][regrown] == 0)
            for v in opt.state[originals[k]].values():
                if isinstance(v, torch.Tensor) and v.shape == m.shape:
                    assert torch.all(v[regrown] == 0)

    _train_steps(model, opt, sched, 12, check)
    assert n_regrown > 0
    assert [h[0] for h in sched.history] == [0, 2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize("kind", ["gradual", "iterative", "set", "rigl"])
def test_history_achieved_agrees_with_sparsity_report(kind: str) -> None:
    """history's achieved and sparsity_report count the same zeros at the same step (issue 15)."""
    torch.manual_seed(0)
    model = sparsify(mlp(), 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = {
        "gradual": lambda: GradualPruning(model, 0.9, end_step=8, every=2),
        "iterative": lambda: IterativePruning(model, rounds=3, final_sparsity=0.9, every=2),
        "set": lambda: SET(model, 0.9, every=2, drop_fraction=0.5, optimizer=opt),
        "rigl": lambda: RigL(model, opt, 0.9, every=2, drop_fraction=0.5),
    }[kind]()
    numel = sum(m.numel() for m in masks(model).values())
    above_target = 0
    g = torch.Generator().manual_seed(0)
    for step in range(1, 9):
        opt.zero_grad()
        model(torch.randn(8, 8, generator=g)).pow(2).mean().backward()
        opt.step()
        sched.step()
        if step % 2 == 0 and sched.history[-1][0] == step:  # an update at this step
            _, target, achieved = sched.history[-1]
            assert achieved == pytest.approx(sparsity_report(model).sparsity)  # the same count
            assert sum(_zeros(model).values()) == round(target * numel) or kind == "iterative"
            above_target += round(achieved * numel) > round(target * numel)
    # SET and RigL regrow at exactly 0, so right after their updates the weights hold more zeros
    assert (above_target > 0) == (kind in ("set", "rigl"))


def test_drop_fraction_anneals_with_cosine() -> None:
    model = sparsify(mlp(), 0.0)
    sched = SET(model, 0.5, every=10, drop_fraction=0.4, end_step=100)
    for t in (0, 10, 50, 90, 100, 150):
        ref = 0.0 if t >= 100 else 0.2 * (1 + math.cos(math.pi * t / 100))
        assert sched.current_drop_fraction(t) == pytest.approx(ref)


def test_rigl_grows_largest_dense_gradient_and_drops_smallest() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(10, 6)
    model = nn.Sequential(lin)
    sparsify(model, 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: weights stay put, so references are exact
    sched = RigL(model, opt, 0.5, every=1, drop_fraction=0.25, distribution="uniform")
    assert sched.armed  # step 1 is an update step
    mask = masks(model)["0.weight"]
    old = mask.clone()
    w = lin.parametrizations.weight.original.detach().clone()
    x = torch.randn(4, 10)
    # reference dense gradient of the effective weight, computed functionally
    w_eff = (w * old).requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(nn.functional.linear(x, w_eff, lin.bias).pow(2).sum(), w_eff)
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()
    sched.step()
    k = round(0.25 * int(old.sum()))
    dropped = old & ~mask
    grown = mask & ~old
    assert int(dropped.sum()) == int(grown.sum()) == k
    active_mag = w.abs()[old]
    assert w.abs()[dropped].max() <= active_mag.sort().values[k - 1]
    inactive_grad = ref_grad.abs()[~old]
    assert ref_grad.abs()[grown].min() >= inactive_grad.sort(descending=True).values[k - 1]
    assert torch.all(lin.parametrizations.weight.original[grown] == 0)


def test_rigl_hooks_only_on_update_steps_and_error_without_gradients() -> None:
    model = sparsify(mlp(), 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = RigL(model, opt, 0.5, every=3)
    armed = []
    for _ in range(5):
        armed.append(sched.armed)
        model(torch.randn(2, 8)).sum().backward()
        sched.step()
    # armed before the backward of steps 3 and 6 only (the state after steps 2 and 5)
    assert armed == [False, False, True, False, False]
    assert sched.armed
    with torch.no_grad():
        model(torch.randn(2, 8))  # no graph: nothing captured
    before = {k: m.clone() for k, m in masks(model).items()}
    with pytest.raises(ValueError, match=r"no gradient was captured.*loss.backward"):
        sched.step()
    assert all(torch.equal(before[k], m) for k, m in masks(model).items())


# ----------------------------------------------------------------------------------------------
# IterativePruning
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_positional", [1, 2, 3])
def test_iterative_positional_options_are_deprecated_and_equal_keywords(n_positional: int) -> None:
    values = {"rounds": 2, "final_sparsity": 0.75, "rewind_to": 1}
    names = list(values)[:n_positional]
    torch.manual_seed(0)
    a, b = mlp(), mlp()
    b.load_state_dict(a.state_dict())
    sparsify(a, 0.0)
    sparsify(b, 0.0)
    ref = IterativePruning(a, **values, every=3)
    with pytest.warns(DeprecationWarning, match="positionally is deprecated"):
        old = IterativePruning(
            b, *[values[n] for n in names], **{k: v for k, v in values.items() if k not in names}, every=3
        )
    for _ in range(7):
        ref.step()
        old.step()
    assert ref.state_dict()["config"] == old.state_dict()["config"]
    assert all(torch.equal(masks(a)[k], masks(b)[k]) for k in masks(a))


def test_iterative_positional_and_keyword_conflict_is_refused() -> None:
    model = sparsify(mlp(), 0.0)
    before = copy.deepcopy(model.state_dict())
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(TypeError, match="multiple values for argument 'rounds'"),
    ):
        IterativePruning(model, 3, rounds=4)
    with pytest.raises(TypeError, match="at most 3"):
        IterativePruning(model, 3, 0.5, 0, 10)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before if isinstance(before[k], torch.Tensor))


@pytest.mark.parametrize("rewind", ["step0", "state_dict"])
def test_iterative_rounds_and_rewinding(rewind: str) -> None:
    torch.manual_seed(0)
    model = mlp()
    init = copy.deepcopy(model.state_dict())  # dense keys: rewinding accepts them
    sparsify(model, 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = IterativePruning(
        model,
        rounds=3,
        final_sparsity=0.875,
        rewind_to=0 if rewind == "step0" else init,
        every=4,
        optimizer=opt,
    )
    numel = sum(m.numel() for m in masks(model).values())
    g = torch.Generator().manual_seed(0)
    for t in range(1, 17):
        opt.zero_grad()
        model(torch.randn(8, 8, generator=g)).pow(2).mean().backward()
        opt.step()
        trained = {k: v.detach().clone() for k, v in _originals(model).items()}
        sched.step()
        if t % 4 == 0 and t <= 12:
            r = t // 4
            target = 1 - (1 - 0.875) ** (r / 3)
            assert sched.sparsity == pytest.approx(target)
            assert sum(_zeros(model).values()) == round(target * numel)
            for k, o in _originals(model).items():
                m = masks(model)[k]
                init_w = init[k]
                assert torch.equal(o[m], init_w[m])  # kept weights rewound
                assert torch.equal(o[~m], trained[k][~m])  # pruned positions keep their value
            assert all(torch.all(v == 0) for s in opt.state.values() for v in s.values())
            assert torch.equal(model[0].bias, init["0.bias"])
    assert sched.round == 3 and sched.sparsity == pytest.approx(0.875)


# ----------------------------------------------------------------------------------------------
# 6. bad input
# ----------------------------------------------------------------------------------------------


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    sd = model.state_dict()
    same = [
        torch.equal(before[k], v) if isinstance(v, torch.Tensor) else before[k] == v for k, v in sd.items()
    ]
    return sd.keys() == before.keys() and all(same)


@pytest.mark.parametrize(
    ("build", "exc", "match"),
    [
        (lambda m: GradualPruning(m, 0.2, initial_sparsity=0.5), ValueError, "final_sparsity"),
        (lambda m: GradualPruning(m, 0.5, start_step=10, end_step=5), ValueError, "end_step"),
        (lambda m: GradualPruning(m, 0.5, every=0), ValueError, "every"),
        (lambda m: GradualPruning(m, 0.5, every=1.5), TypeError, "every"),
        (lambda m: GradualPruning(m, 1.5), ValueError, "final_sparsity"),
        (lambda m: GradualPruning(m, 0.5, curve="quartic"), ValueError, "curve"),
        (lambda m: GradualPruning(m, 0.5, method="nope"), ValueError, "method"),
        (lambda m: GradualPruning(m, 0.5, scope="row"), ValueError, "scope"),
        (lambda m: IterativePruning(m, rounds=0), ValueError, "rounds"),
        (lambda m: IterativePruning(m, rewind_to=5000, every=10), ValueError, "rewind_to"),
        (lambda m: IterativePruning(m, rewind_to="x"), TypeError, "rewind_to"),
        (lambda m: IterativePruning(m, rewind_to={"zzz": torch.ones(1)}), ValueError, "rewind_to"),
        (lambda m: SET(m, 1.0), ValueError, "sparsity"),
        (lambda m: SET(m, 0.5, drop_fraction=-0.1), ValueError, "drop_fraction"),
        (lambda m: SET(m, 0.5, every=0), ValueError, "every"),
        (lambda m: SET(m, 0.5, distribution="gauss"), ValueError, "distribution"),
        (lambda m: SET(m, 0.5, optimizer="sgd"), TypeError, "optimizer"),
        (lambda m: RigL(m, None, 0.5), TypeError, "optimizer"),
        (lambda m: SET(masks(m), 0.5), TypeError, "model"),
    ],
)
def test_bad_arguments_raise_before_touching_the_model(build, exc, match) -> None:
    model = sparsify(mlp(), 0.0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=match):
        build(model)
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    "build",
    [
        lambda m: GradualPruning(m, 0.5),
        lambda m: IterativePruning(m),
        lambda m: SET(m, 0.5),
        lambda m: RigL(m, torch.optim.SGD(m.parameters(), lr=0.1), 0.5),
    ],
)
def test_model_without_masks_is_refused(build) -> None:
    model = mlp()
    with pytest.raises(NoTargetsError, match=r"has no masks.*sparsify"):
        build(model)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_structured_masks_refused_by_unstructured_schedules() -> None:
    model = sparsify(mlp(), 0.0, structure="row")
    with pytest.raises(ValueError, match="structured"):
        SET(model, 0.5)
    with pytest.raises(ValueError, match="structured"):
        GradualPruning(model, 0.5)


def test_load_state_dict_checks() -> None:
    model = sparsify(mlp(), 0.0)
    g = GradualPruning(model, 0.5)
    s = SET(model, 0.5)
    with pytest.raises(ValueError, match="GradualPruning"):
        s.load_state_dict(g.state_dict())
    with pytest.raises(ValueError, match="missing"):
        s.load_state_dict({"type": "SET"})
    with pytest.raises(TypeError, match="state_dict"):
        s.load_state_dict([1])  # type: ignore[arg-type]


def test_register_mask_on_a_single_tensor_is_enough() -> None:
    model = mlp()
    register_mask(model[2], "weight")
    sched = GradualPruning(model, 0.5, end_step=0)
    assert list(masks(model)) == ["2.weight"]
    assert _zeros(model) == {"2.weight": 128}
    assert sched.history == [(0, 0.5, 0.5)]
