"""Safe defaults: the global min_keep floor, selectors that match nothing, non-finite and meta weights,
register_mask refusals, schedule state from another configuration."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import hadamard_sparse as hs
from tests.conftest import Conv1D, MHAWrap, RNNWrap, mlp
from tests.hf_models import gpt2_config, transformers

# ----------------------------------------------------------------------------------------------
# An independent reference for the floor: concatenate every score, protect each unit's best,
# prune the k lowest of the rest with a stable sort (ties: earlier tensor, lower flat index).
# ----------------------------------------------------------------------------------------------

# which dimension of each targeted weight indexes outputs (written out here, not read from hs.layers)
_OUT_DIM = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 1, nn.ConvTranspose3d: 1, Conv1D: 1}


def _weights(model: nn.Module) -> list[tuple[str, torch.Tensor, int]]:
    """(qualified name, dense weight, out dim) of every targeted weight, by hand."""
    out = []
    for name, mod in model.named_modules():
        params = dict(mod.named_parameters(recurse=False))
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, Conv1D)):
            keys = ["weight"]
        elif isinstance(mod, nn.RNNBase):
            keys = [k for k in params if k.startswith("weight_")]
        elif isinstance(mod, nn.MultiheadAttention):
            keys = [k for k in params if k.endswith("proj_weight")]
        else:
            continue
        for k in keys:
            out.append((f"{name}.{k}" if name else k, params[k].detach(), _OUT_DIM.get(type(mod), 0)))
    return out


def _reference_keep(model: nn.Module, sparsity: float, min_keep: int) -> dict[str, torch.Tensor]:
    ws = _weights(model)
    flat, protect, sizes = [], [], []
    for _, w, od in ws:
        rows = w.abs().movedim(od, 0).reshape(w.shape[od], -1)
        p = torch.zeros(rows.shape, dtype=torch.bool)
        if rows.shape[1] == 1:  # one entry per unit: the tensor is the unit
            p.view(-1)[rows.reshape(-1).topk(min(min_keep, rows.numel())).indices] = True
        else:
            p.scatter_(1, rows.topk(min(min_keep, rows.shape[1]), dim=1).indices, True)
        flat.append(w.abs().reshape(-1))
        protect.append(p.reshape(w.movedim(od, 0).shape).movedim(0, od).reshape(-1))
        sizes.append(w.numel())
    scores = torch.cat(flat).double()
    scores[torch.cat(protect)] = float("inf")
    k = round(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.sort(scores, stable=True).indices[:k]] = False
    return {name: part.view(w.shape) for (name, w, _), part in zip(ws, keep.split(sizes))}


def _units_empty(mask: torch.Tensor, out_dim: int) -> int:
    return int((mask.movedim(out_dim, 0).reshape(mask.shape[out_dim], -1).sum(1) == 0).sum())


class _Mixed(nn.Module):
    """Every unstructured layer kind at once, one of them scaled down so that a global threshold
    would empty it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.convt = nn.ConvTranspose2d(4, 5, 3)
        self.rnn = RNNWrap(nn.GRU(4, 5))
        self.mha = MHAWrap(True)
        self.hf = Conv1D(5, 6)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            self.head.weight.mul_(1e-3)
            self.hf.weight.mul_(1e-2)


@pytest.mark.parametrize(("sparsity", "min_keep"), [(0.5, 3), (0.6, 2), (0.75, 1), (0.85, 1)])
def test_floor_matches_reference_on_every_layer_kind(sparsity: float, min_keep: int) -> None:
    torch.manual_seed(0)
    model = _Mixed()
    ws = _weights(copy.deepcopy(model))
    ref = _reference_keep(copy.deepcopy(model), sparsity, min_keep)
    hs.sparsify(model, sparsity, min_keep=min_keep)
    ours = hs.masks(model)
    assert list(ours) == list(ref)
    for name, w, od in ws:
        assert torch.equal(ours[name], ref[name]), name
        kept = ours[name].movedim(od, 0).reshape(w.shape[od], -1).sum(1)
        assert int(kept.min()) >= min(min_keep, ours[name].numel() // w.shape[od]), name
    rep = hs.sparsity_report(model)
    assert rep.zeros == round(sparsity * rep.numel)


def test_issue_example_output_layer_keeps_depending_on_input() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    twin = copy.deepcopy(model)
    hs.sparsify(model, 0.9)
    m = hs.masks(model)
    assert _units_empty(m["0.weight"], 0) == 0 and _units_empty(m["2.weight"], 0) == 0
    assert hs.sparsity_report(model).zeros == round(0.9 * (256 * 512 + 512 * 10))
    x = torch.randn(4, 256)
    assert not torch.allclose(model(x)[0], model(x)[1])  # still depends on the input
    hs.sparsify(twin, 0.9, min_keep=0)  # the opt-out: plain global threshold
    assert not bool(hs.masks(twin)["2.weight"].any())


def test_floor_on_hf_gpt2_conv1d() -> None:
    cfg = gpt2_config()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.mul_(1e-3)  # a global threshold would empty it
    hs.sparsify(model, 0.9)
    for name, mask in hs.masks(model).items():
        assert _units_empty(mask, 1) == 0, name  # Conv1D: (in, out)
    rep = hs.sparsity_report(model)
    assert rep.zeros == round(0.9 * rep.numel)


def test_unreachable_sparsity_refused_and_model_unchanged() -> None:
    model = mlp()
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(hs.InvalidArgumentError, match="at most 397 can be pruned.*min_keep=0"):
        hs.sparsify(model, 1.0)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    hs.sparsify(model, 1.0, min_keep=0)
    assert hs.sparsity_report(model).sparsity == 1.0
    hs.sparsify(model, 0.9, scope="layer")  # per-tensor counts are what was asked: no floor
    assert hs.sparsity_report(model).zeros == sum(round(0.9 * n) for n in (128, 256, 48))


@pytest.mark.parametrize(
    ("structure", "unit"),
    [("row", "tensor"), ("column", "tensor"), (hs.Block(2, 4), "block_row"), ("2:4", None)],
)
def test_structured_global_floor(structure: object, unit: str | None) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[4].weight.mul_(1e-3)
    sparsity = 0.4 if structure == "2:4" else 0.5
    plain = copy.deepcopy(model)
    hs.sparsify(model, sparsity, structure=structure)
    hs.sparsify(plain, sparsity, structure=structure, min_keep=0)
    full, full_plain = hs.masks(model), hs.masks(plain)
    pruned = [sum(_pruned_groups(m, structure) for m in ms.values()) for ms in (full, full_plain)]
    assert pruned[0] == pruned[1]  # the same exact number of groups
    for name, m in full.items():
        assert bool(m.any()), name
        if unit == "block_row":
            rows = m.reshape(m.shape[0] // 2, 2, m.shape[1] // 4, 4).any(3).any(1)
            assert bool(rows.any(1).all()), name
    if unit is not None:  # without the floor, the small output layer is gone
        assert not bool(full_plain["4.weight"].any())
    else:
        assert all(torch.equal(full[k], full_plain[k]) for k in full)  # N:M never empties a unit


def _pruned_groups(m: torch.Tensor, structure: object) -> int:
    if structure == "row":
        return int((~m.any(1)).sum())
    if structure == "column":
        return int((~m.any(0)).sum())
    if isinstance(structure, hs.Block):
        return int((~m.reshape(m.shape[0] // 2, 2, m.shape[1] // 4, 4).any(3).any(1)).sum())
    return int((~m).sum())


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    cols=st.integers(1, 6),
    sparsity=st.floats(0.0, 1.0),
    min_keep=st.integers(0, 3),
    seed=st.integers(0, 100),
)
def test_floor_counts_hypothesis(
    rows: list[int], cols: int, sparsity: float, min_keep: int, seed: int
) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(cols, r, bias=False) for r in rows])  # not chained: only weights
    total = sum(r * cols for r in rows)
    protected = sum(r * min(min_keep, cols) if cols > 1 else min(min_keep, r) for r in rows)
    k = round(sparsity * total)
    if k > total - protected:
        with pytest.raises(hs.InvalidArgumentError, match="min_keep"):
            hs.sparsify(model, sparsity, min_keep=min_keep)
        assert not hs.masks(model)
        return
    hs.sparsify(model, sparsity, min_keep=min_keep)
    m = hs.masks(model)
    assert sum(int((~v).sum()) for v in m.values()) == k
    for v in m.values():
        if cols > 1:
            assert int(v.sum(1).min()) >= min(min_keep, cols)
        else:
            assert int(v.sum()) >= min(min_keep, v.numel())


@pytest.mark.parametrize("kind", ["gradual", "iterative"])
def test_schedules_keep_the_floor_and_refuse_unreachable_targets(kind: str) -> None:
    torch.manual_seed(0)
    model = hs.sparsify(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)), 0.0)
    with torch.no_grad():
        model[2].parametrizations.weight.original.mul_(1e-3)
    total = 64 * 32 + 32 * 4
    if kind == "gradual":
        sched: hs.GradualPruning | hs.IterativePruning = hs.GradualPruning(
            model, 0.95, start_step=0, end_step=4, every=1
        )
    else:
        sched = hs.IterativePruning(model, rounds=2, final_sparsity=0.95, every=2)
    prev = {k: v.clone() for k, v in hs.masks(model).items()}
    for _ in range(4):
        sched.step()
        m = hs.masks(model)
        assert all(not bool((m[k] & ~prev[k]).any()) for k in m)  # still nested
        assert _units_empty(m["0.weight"], 0) == 0 and _units_empty(m["2.weight"], 0) == 0
        prev = {k: v.clone() for k, v in m.items()}
    assert sum(int((~v).sum()) for v in hs.masks(model).values()) == round(0.95 * total)
    fresh = hs.sparsify(copy.deepcopy(model), 0.0)
    with pytest.raises(hs.InvalidArgumentError, match="final_sparsity=0.99 with scope='global'"):
        if kind == "gradual":
            hs.GradualPruning(fresh, 0.99, start_step=0, end_step=4, every=1)
        else:
            hs.IterativePruning(fresh, rounds=2, final_sparsity=0.99, every=2)
    assert all(bool(v.all()) for v in hs.masks(fresh).values())


# ----------------------------------------------------------------------------------------------
# include / exclude entries that match nothing
# ----------------------------------------------------------------------------------------------


def _verbs() -> list[tuple[str, Callable[..., object]]]:
    return [
        ("sparsify", lambda m, **kw: hs.sparsify(m, 0.5, **kw)),
        ("factorize", lambda m, **kw: hs.factorize(m, **kw)),
        ("fake_quantize", lambda m, **kw: hs.fake_quantize(m, **kw)),
        ("calibrate", lambda m, **kw: hs.calibrate(m, [torch.randn(2, 8)], **kw)),
        ("layer_densities", lambda m, **kw: hs.layer_densities(m, 0.5, **kw)),
    ]


@pytest.mark.parametrize("verb", [v for _, v in _verbs()], ids=[n for n, _ in _verbs()])
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"exclude": "classifier*"}, "exclude entry 'classifier\\*'"),
        ({"exclude": ["0", "2.wieght"]}, "exclude entry '2.wieght'"),
        ({"include": ["0.weight", nn.Conv2d]}, "include entry Conv2d"),
        ({"include": [nn.Linear, lambda name, mod: False]}, "include entry <lambda>"),
        ({"exclude": [nn.LayerNorm, "x"]}, "exclude entries LayerNorm, 'x'"),
    ],
)
def test_selector_matching_nothing_is_refused_before_changes(
    verb: Callable[..., object], kwargs: dict, named: str
) -> None:
    model = mlp()
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(hs.InvalidArgumentError, match=named):
        verb(model, **kwargs)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_selector_matching_nothing_refused_for_model_groups() -> None:
    model = mlp()
    x = torch.randn(2, 8)
    with pytest.raises(hs.InvalidArgumentError, match="exclude entry 'classifier.' matches no"):
        hs.sparsify(model, 0.5, structure="neuron", example_inputs=x, exclude="classifier*")
    with pytest.raises(hs.InvalidArgumentError, match="include entry nn_conv matches no"):

        def nn_conv(name: str, mod: nn.Module) -> bool:
            return isinstance(mod, nn.Conv2d)

        hs.sparsify(model, 0.5, structure="neuron", example_inputs=x, include=["0", nn_conv])
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    hs.sparsify(model, 0.5, structure="neuron", example_inputs=x, exclude="4")  # matches: fine


def test_selectors_that_match_still_work() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    hs.sparsify(model, 0.5, include=[nn.Embedding, "1"], exclude=["2.weight"])
    assert set(hs.masks(model)) == {"0.weight", "1.weight"}
    # an exclude entry that matches a tied (skipped) or opt-in tensor still counts as matching
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    hs.sparsify(model, 0.5, exclude="0")
    assert set(hs.masks(model)) == {"1.weight"}


# ----------------------------------------------------------------------------------------------
# non-finite weights, register_mask refusals, meta device
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_refused_with_their_name(bad: float) -> None:
    model = mlp()
    with torch.no_grad():
        model[2].weight[3, 4] = bad
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(hs.InvalidArgumentError, match=r"2\.weight has 1 non-finite value"):
        hs.sparsify(model, 0.5)
    with pytest.raises(hs.InvalidArgumentError, match=r"module\.weight has 1 non-finite"):
        hs.register_mask(model[2], "weight")
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]) or (k == "2.weight" and torch.equal(v.isnan(), sd[k].isnan()))
    hs.sparsify(model, 0.5, exclude="2")  # the others can still be pruned


def test_masked_entries_are_zero_after_sparsify() -> None:
    """What is refused is what would break "a masked entry is exactly 0": finite weights give 0 * w = 0."""
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = 1e38  # huge but finite
    hs.sparsify(model, 0.8)
    for name, m in hs.masks(model).items():
        w = model.get_submodule(name.rpartition(".")[0]).weight
        assert bool((w[~m] == 0).all()), name


@pytest.mark.parametrize(
    ("make", "name", "exc", "match"),
    [
        (lambda: nn.BatchNorm1d(4), "running_mean", hs.InvalidArgumentError, "is a buffer, not a Parameter"),
        (lambda: nn.BatchNorm1d(4), "num_batches_tracked", hs.InvalidArgumentError, "is a buffer"),
        (lambda: _IntParam(), "table", hs.InvalidTypeError, "dtype torch.int64; masks go on floating"),
        (lambda: _PlainAttr(), "scale", hs.InvalidArgumentError, "is a plain tensor attribute"),
    ],
)
def test_register_mask_refuses_buffers_and_non_floating(
    make: Callable[[], nn.Module], name: str, exc: type, match: str
) -> None:
    mod = make()
    with pytest.raises(exc, match=match):
        hs.register_mask(mod, name)
    assert not parametrize.is_parametrized(mod)


class _IntParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.arange(6).reshape(2, 3), requires_grad=False)


class _PlainAttr(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.ones(3)


def test_meta_device_masks_then_load() -> None:
    torch.manual_seed(0)
    real = mlp()
    with torch.device("meta"):
        model = mlp()
    hs.register_mask(model[0], "weight")
    hs.sparsify(model, 0.0)  # all-ones masks, no values needed
    assert all(m.is_meta for m in hs.masks(model).values())
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(hs.InvalidArgumentError, match=r"0\.weight is on the meta device.*load the weights"):
        hs.sparsify(model, 0.5)
    for method in ("random", "wanda"):
        with pytest.raises(hs.InvalidArgumentError, match="meta device"):
            hs.sparsify(model, 0.5, method=method, calibration=[torch.randn(2, 8)])
    assert all(m.is_meta for m in hs.masks(model).values()) and list(model.state_dict()) == list(sd)
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict())  # a dense checkpoint into the masked model
    with torch.no_grad():
        for m in hs.masks(model).values():
            m.fill_(True)  # to_empty left the buffers uninitialised
    hs.sparsify(model, 0.5)
    ref = copy.deepcopy(real)
    hs.sparsify(ref, 0.5)
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), ref(x))


# ----------------------------------------------------------------------------------------------
# schedules refuse a state from another configuration
# ----------------------------------------------------------------------------------------------


def test_schedule_refuses_state_from_another_configuration() -> None:
    model = hs.sparsify(mlp(), 0.0)
    a = hs.GradualPruning(model, final_sparsity=0.8, start_step=0, end_step=10, every=2)
    for _ in range(4):
        a.step()
    state = a.state_dict()
    same = hs.GradualPruning(model, final_sparsity=0.8, start_step=0, end_step=10, every=2)
    same.load_state_dict(state)
    assert same.last_step == 4
    other = hs.GradualPruning(model, final_sparsity=0.5, start_step=0, end_step=10, every=2)
    with pytest.raises(hs.InvalidArgumentError, match=r"final_sparsity: saved 0.8, this schedule 0.5"):
        other.load_state_dict(state)
    assert other.last_step == 0
    it = hs.IterativePruning(model, rounds=2, final_sparsity=0.8, every=3)
    s2 = it.state_dict()
    with pytest.raises(hs.InvalidArgumentError, match="every: saved 3, this schedule 4"):
        hs.IterativePruning(model, rounds=2, final_sparsity=0.8, every=4).load_state_dict(s2)


@pytest.mark.parametrize("opt", ["sgd_momentum", "adamw"])
def test_documented_optimizers_move_pruned_dense_values(opt: str) -> None:
    """docs/pretrained.md "Undoing after fine-tuning": masked positions get zero gradient, yet momentum and
    AdamW's decoupled decay still change their dense values, so sparsify(model, 0.0) brings back other values."""
    torch.manual_seed(0)
    model = mlp()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    if opt == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    x = torch.randn(16, 8)
    model(x).square().mean().backward()  # one dense step builds momentum everywhere
    optimizer.step()
    optimizer.zero_grad()
    hs.sparsify(model, 0.5)
    pruned = ~hs.masks(model)["0.weight"]
    before = model[0].parametrizations.weight.original.detach().clone()
    for _ in range(3):
        model(x).square().mean().backward()
        assert bool((model[0].parametrizations.weight.original.grad[pruned] == 0).all())
        optimizer.step()
        optimizer.zero_grad()
        assert bool((model[0].weight[pruned] == 0).all())  # still exactly zero in the forward
    after = model[0].parametrizations.weight.original.detach()
    assert not torch.equal(after[pruned], before[pruned])
    hs.sparsify(model, 0.0)
    assert not torch.equal(model[0].weight.detach()[pruned], dense["0.weight"][pruned])
