"""Core behaviour of sparsify / register_mask on every layer type, against an independent dense twin."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as tprune
from torch import nn
from torch.nn.utils import parametrize

import hadamard_sparse as hs
from tests.conftest import LAYER_CASES, Conv1D, LayerCase, mlp, small_cnn


def _twin_with_masks(twin: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The unparametrized twin with each masked weight multiplied by its mask (plain tensors)."""
    with torch.no_grad():
        for name, m in masks.items():
            mod_name, _, tname = name.rpartition(".")
            mod = twin.get_submodule(mod_name)
            getattr(mod, tname).mul_(m)
    return twin


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_and_grad_match_dense_twin(layer_case: LayerCase, mode: str) -> None:
    model = layer_case.make()
    twin = copy.deepcopy(model)
    hs.sparsify(model, 0.6, scope="layer")
    masks = hs.masks(model)
    assert len(masks) == layer_case.n_targets
    _twin_with_masks(twin, masks)
    getattr(model, mode)()
    getattr(twin, mode)()
    x = layer_case.input()
    if mode == "eval":
        with torch.no_grad():  # takes MHA / TransformerEncoderLayer fast paths
            torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-6)
    out, ref = model(x), twin(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    for name, m in masks.items():
        mod_name, _, tname = name.rpartition(".")
        orig = model.get_submodule(mod_name).parametrizations[tname].original
        twin_p = getattr(twin.get_submodule(mod_name), tname)
        assert torch.all(orig.grad[~m] == 0), name
        torch.testing.assert_close(orig.grad * m, twin_p.grad * m, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("make", "x", "fn"),
    [
        (lambda: nn.Linear(6, 4), torch.randn(3, 6), lambda m, x, w: F.linear(x, w, m.bias)),
        (
            lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1, groups=1),
            torch.randn(2, 3, 8, 8),
            lambda m, x, w: F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups),
        ),
        (
            lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1),
            torch.randn(2, 3, 4, 4),
            lambda m, x, w: F.conv_transpose2d(
                x, w, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation
            ),
        ),
    ],
    ids=["linear", "conv2d", "convT2d"],
)
def test_matches_functional_op(make, x, fn) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    m = make()
    hs.sparsify(m, 0.5)
    w = m.parametrizations.weight.original * m.parametrizations.weight[0].mask
    torch.testing.assert_close(m(x), fn(m, x, w))


def test_mha_functional_reference() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    hs.sparsify(mha, 0.5, scope="layer")
    mk = hs.masks(mha)
    x = torch.randn(4, 2, 8)
    w_in = mha.parametrizations.in_proj_weight.original * mk["in_proj_weight"]
    w_out = mha.out_proj.parametrizations.weight.original * mk["out_proj.weight"]
    ref = F.multi_head_attention_forward(
        x, x, x, 8, 2, w_in, mha.in_proj_bias, None, None, False, 0.0, w_out, mha.out_proj.bias,
        training=False, need_weights=False,
    )[0]  # fmt: skip
    mha.eval()
    with torch.no_grad():
        torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], ref)


def test_targets_and_opt_in_embedding() -> None:
    model = nn.ModuleDict(
        {"emb": nn.Embedding(10, 4), "lin": nn.Linear(4, 3), "norm": nn.LayerNorm(3), "hf": Conv1D(2, 3)}
    )
    hs.sparsify(model, 0.5)
    assert set(hs.masks(model)) == {"lin.weight", "hf.weight"}
    model2 = nn.ModuleDict({"emb": nn.Embedding(10, 4), "lin": nn.Linear(4, 3)})
    hs.sparsify(model2, 0.5, include=[nn.Embedding, nn.Linear])
    assert set(hs.masks(model2)) == {"emb.weight", "lin.weight"}


def test_subclass_counts() -> None:
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(4, 4))
    hs.sparsify(model, 0.5)
    assert list(hs.masks(model)) == ["0.weight"]


def test_include_exclude_selectors() -> None:
    model = small_cnn()
    hs.sparsify(model, 0.5, include=nn.Conv2d)
    assert set(hs.masks(model)) == {"0.weight", "2.weight"}
    model = small_cnn()
    hs.sparsify(model, 0.5, exclude=["0.*", lambda name, m: isinstance(m, nn.Linear)])
    assert set(hs.masks(model)) == {"2.weight"}
    model = small_cnn()
    hs.sparsify(model, 0.5, include="6.weight")
    assert set(hs.masks(model)) == {"6.weight"}


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_exact_counts(scope: str, sparsity: float) -> None:
    torch.manual_seed(0)
    model = small_cnn()
    hs.sparsify(model, sparsity, scope=scope, min_keep=0)  # the floor is tested in test_safe_defaults
    rep = hs.sparsity_report(model)
    if scope == "global":
        assert rep.zeros == round(sparsity * rep.numel)
    else:
        for t in rep.tensors:
            assert t.zeros == round(sparsity * t.numel), t.name


def test_global_magnitude_matches_torch_prune() -> None:
    """Independent reference: tprune.global_unstructured with L1 (no ties in random weights)."""
    torch.manual_seed(3)
    a, b = mlp(), None
    b = copy.deepcopy(a)
    hs.sparsify(a, 0.8, min_keep=0)  # plain global selection; with the floor: test_safe_defaults
    params = [(m, "weight") for m in b.modules() if isinstance(m, nn.Linear)]
    total = sum(m.weight.numel() for m, _ in params)
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=round(0.8 * total))
    ours = hs.masks(a)
    for i, (m, _) in enumerate(params):
        name = next(n for n, mm in b.named_modules() if mm is m) + ".weight"
        assert torch.equal(ours[name], m.weight_mask.bool()), (i, name)


def test_ties_are_deterministic_and_exact() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    hs.sparsify(model, 0.25, min_keep=0)
    m = hs.masks(model)
    # 8 of 32 equal scores pruned: the first tensor first, lowest flat indices first.
    assert (~m["0.weight"]).flatten().nonzero().flatten().tolist() == list(range(8))
    assert bool(m["1.weight"].all())


def test_resparsify_updates_in_place_and_undoes() -> None:
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(5, 8)
    dense_out = model(x)
    hs.sparsify(model, 0.9)
    buf = hs.masks(model)["0.weight"]
    ptr = buf.data_ptr()
    hs.sparsify(model, 0.5)
    assert hs.masks(model)["0.weight"] is buf and buf.data_ptr() == ptr
    assert len(model[0].parametrizations.weight) == 1
    assert hs.sparsity_report(model).sparsity == pytest.approx(0.5, abs=1e-2)
    hs.sparsify(model, 0.0)
    torch.testing.assert_close(model(x), dense_out)


def test_optimizer_created_before_sparsify_keeps_training() -> None:
    torch.manual_seed(0)
    model = mlp()
    params_before = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hs.sparsify(model, 0.7)
    assert model[0].parametrizations.weight.original is params_before[0]
    m = hs.masks(model)["0.weight"]
    before = model[0].parametrizations.weight.original.detach().clone()
    loss = model(torch.randn(16, 8)).square().mean()
    loss.backward()
    opt.step()
    after = model[0].parametrizations.weight.original.detach()
    assert not torch.equal(before[m], after[m])
    assert torch.equal(before[~m], after[~m])
    assert torch.all(model[0].weight[~m] == 0)


def test_register_mask_refuses_bad_masks_and_leaves_module_unchanged() -> None:
    lin = nn.Linear(4, 3)
    with pytest.raises(TypeError, match="torch.bool"):
        hs.register_mask(lin, "weight", torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        hs.register_mask(lin, "weight", torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="name"):
        hs.register_mask(lin, "nope")
    assert not parametrize.is_parametrized(lin)
    pm = hs.register_mask(lin, "weight", torch.ones(3, 1, dtype=torch.bool))  # broadcastable
    assert pm.mask.shape == (3, 1)


def test_compile_follows_in_place_mask_updates_without_recompiling() -> None:
    torch.manual_seed(0)
    model = mlp()
    hs.sparsify(model, 0.5)
    compiles = []

    def backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    cmodel = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(4, 8)
    torch.testing.assert_close(cmodel(x), model(x))
    for s in (0.8, 0.2, 0.9):
        hs.sparsify(model, s)
        torch.testing.assert_close(cmodel(x), model(x))
    assert len(compiles) == 1


def test_dtype_device_moves_keep_masks_boolean() -> None:
    model = mlp()
    hs.sparsify(model, 0.5)
    ref = {k: v.clone() for k, v in hs.masks(model).items()}
    model.to(torch.float64)
    model.half()
    for k, v in hs.masks(model).items():
        assert v.dtype == torch.bool and torch.equal(v, ref[k])
    meta = mlp()
    hs.sparsify(meta, 0.5)
    meta.to("meta")
    meta.to_empty(device="cpu")
    assert all(v.dtype == torch.bool for v in hs.masks(meta).values())


def test_averaged_model_keeps_masks_boolean() -> None:
    torch.manual_seed(0)
    model = mlp()
    hs.sparsify(model, 0.5)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
    )
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        ema.update_parameters(model)
    for name, m in hs.masks(ema.module).items():
        assert m.dtype == torch.bool
        assert torch.equal(m, hs.masks(model)[name])
    x = torch.randn(2, 8)
    ema(x)  # still runs


def test_tied_weights_are_skipped_with_a_warning() -> None:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight
            self.body = nn.Linear(4, 4)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(self.emb(idx)))

    lm = LM()
    with pytest.warns(UserWarning, match="head.weight.*tied"):
        hs.sparsify(lm, 0.5)
    assert set(hs.masks(lm)) == {"body.weight"}
    assert lm.head.weight is lm.emb.weight


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"sparsity": 1.5}, ValueError, r"sparsity must be a float in \[0, 1\], got 1.5"),
        ({"sparsity": -0.1}, ValueError, "sparsity"),
        ({"sparsity": "0.5"}, TypeError, "sparsity"),
        ({"sparsity": float("nan")}, ValueError, "sparsity"),
        ({"sparsity": True}, TypeError, "sparsity"),
        ({"method": "nope"}, ValueError, r"method must be one of \[.*'magnitude'.*\], got 'nope'"),
        ({"scope": "world"}, ValueError, r"scope must be one of \['global', 'layer'.*\], got 'world'"),
        ({"include": 3}, TypeError, "include"),
        ({"include": nn.LayerNorm}, hs.InvalidArgumentError, "include entry LayerNorm matches no"),
        ({"exclude": "*"}, hs.NoTargetsError, "no tensor"),
        ({"exclude": ["0", "classifier*"]}, hs.InvalidArgumentError, "exclude entry 'classifier.' matches"),
        ({"sparsity": 0.99}, hs.InvalidArgumentError, "min_keep=1 keeps the best 1 of every output unit"),
        ({"min_keep": -1}, hs.InvalidArgumentError, "min_keep must be an int >= 0"),
    ],
)
def test_bad_arguments(kwargs: dict, exc: type, match: str) -> None:
    model = mlp()
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=match):
        hs.sparsify(model, **kwargs)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])


def test_nothing_to_sparsify() -> None:
    with pytest.raises(hs.NoTargetsError, match="no tensor"):
        hs.sparsify(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        hs.sparsify("model")  # type: ignore[arg-type]


def test_refuses_ddp_wrapped_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(mlp())
        with pytest.raises(TypeError, match="before wrapping"):
            hs.sparsify(ddp, 0.5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "case", [c for c in LAYER_CASES if c.id in ("linear", "conv2d", "lstm_bi_proj")], ids=str
)
def test_gradcheck_through_parametrized_module(case: LayerCase) -> None:
    torch.manual_seed(0)
    model = case.make().double()
    hs.sparsify(model, 0.5, scope="layer")
    x = case.input().double()
    name, _mask = next(iter(hs.masks(model).items()))
    mod_name, _, tname = name.rpartition(".")
    pm = model.get_submodule(mod_name).parametrizations[tname][0]
    w = model.get_submodule(mod_name).parametrizations[tname].original.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(pm, (w,))
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda inp: model(inp), (x,))


def test_register_score_plugs_a_new_method() -> None:
    @hs.register_score("largest_first")
    def _neg_abs(ctx: hs.ScoreContext) -> torch.Tensor:
        return -ctx.weight.abs()

    assert "largest_first" in hs.available_scores()
    torch.manual_seed(0)
    lin = nn.Linear(10, 10)
    hs.sparsify(lin, 0.3, method="largest_first", scope="layer")
    w = lin.parametrizations.weight.original.detach().abs().flatten()
    expected = torch.ones(100, dtype=torch.bool)
    expected[w.argsort(descending=True)[:30]] = False  # no ties in random weights
    assert torch.equal(hs.masks(lin)["weight"].flatten(), expected)
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        hs.register_score("")
    from hadamard_sparse import scores

    scores._SCORES.pop("largest_first")  # keep the registry as other tests expect it


# --------------------------------------------------------------------------- plan, then apply


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple]]:
    """The state_dict (cloned) and the parametrization registry: per module its class, flag, hooks, chains."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    registry = [
        (
            name,
            type(m).__name__,
            m.training,
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._state_dict_hooks),
            len(m._load_state_dict_pre_hooks),
            {t: [type(p).__name__ for p in pl] for t, pl in m.parametrizations.items()}
            if parametrize.is_parametrized(m)
            else {},
        )
        for name, m in model.named_modules()
    ]
    return state, registry


def _assert_same(before: tuple, model: nn.Module) -> None:
    state, registry = _snapshot(model)
    assert registry == before[1]
    assert list(state) == list(before[0])
    for k, v in state.items():  # bitwise, NaN included
        assert v.dtype == before[0][k].dtype and v.shape == before[0][k].shape, k
        assert torch.equal(v.reshape(-1).view(torch.uint8), before[0][k].reshape(-1).view(torch.uint8)), k


_XS = [torch.randn(4, 8) for _ in range(2)]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"sparsity": 1.5}, hs.InvalidArgumentError),
        ({"sparsity": "0.5"}, hs.InvalidTypeError),
        ({"method": "nope"}, hs.InvalidArgumentError),
        ({"method": "wanda"}, hs.InvalidArgumentError),  # no calibration
        ({"method": "wanda", "calibration": [torch.randn(4, 5)]}, hs.CalibrationError),  # wrong width
        ({"scope": "row", "structure": "row"}, hs.InvalidArgumentError),
        ({"structure": "3:2"}, hs.InvalidArgumentError),
        ({"structure": "neuron"}, hs.InvalidArgumentError),  # no example_inputs
        ({"distribution": "normal"}, hs.InvalidArgumentError),
        ({"distribution": "erk", "structure": "row"}, hs.InvalidArgumentError),
        ({"allocation": "owl"}, hs.InvalidArgumentError),  # no calibration
        ({"include": "nothing*"}, hs.InvalidArgumentError),
        ({"exclude": "*"}, hs.NoTargetsError),
        ({"seed": 1.0}, hs.InvalidTypeError),
        ({"min_keep": -1}, hs.InvalidArgumentError),
        ({"sparsity": 0.999, "min_keep": 4}, hs.InvalidArgumentError),  # the floor cannot be met
        ({"method": "movement"}, hs.InvalidArgumentError),  # no recorded gradients
    ],
)
def test_plan_builder_changes_nothing_when_it_refuses(kwargs: dict, exc: type, masked: bool) -> None:
    """Every refusal comes from the plan builder, and the builder leaves state_dict and registry alone."""
    from hadamard_sparse._plan import plan_sparsify

    torch.manual_seed(0)
    model = mlp()
    if masked:
        hs.sparsify(model, 0.3, scope="layer")
    before = _snapshot(model)
    kw = {"sparsity": 0.5, **kwargs}
    with pytest.raises(exc):
        plan_sparsify(model, kw.pop("sparsity"), **kw)
    _assert_same(before, model)
    with pytest.raises(exc):  # sparsify refuses the same way (it is plan, then apply)
        hs.sparsify(model, 0.5 if "sparsity" not in kwargs else kwargs["sparsity"], **kw)
    _assert_same(before, model)


def test_plan_builder_refuses_non_finite_weights_and_a_mask_of_another_shape() -> None:
    from hadamard_sparse._plan import plan_sparsify

    torch.manual_seed(0)
    model = hs.sparsify(mlp(), 0.3, scope="layer", structure="row")  # compact (out, 1) masks
    before = _snapshot(model)
    with pytest.raises(hs.InvalidArgumentError, match="keep their shape"):
        plan_sparsify(model, 0.5)  # unstructured masks do not fit them
    _assert_same(before, model)
    with torch.no_grad():
        model[2].parametrizations.weight.original[0, 0] = float("nan")
    before = _snapshot(model)
    with pytest.raises(hs.InvalidArgumentError, match="non-finite"):
        plan_sparsify(model, 0.5)
    _assert_same(before, model)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"scope": "layer", "structure": "row"},
        {"distribution": "erk"},
        {"method": "wanda", "calibration": _XS},
        {"method": "wanda", "calibration": _XS, "allocation": "owl"},
        {"method": "sparsegpt", "calibration": _XS},
        {"structure": "neuron", "example_inputs": _XS[0]},
    ],
)
def test_plan_builder_changes_nothing_and_apply_matches_sparsify(kwargs: dict) -> None:
    """An accepted plan changed nothing (calibration passes included); applying it is sparsify."""
    from hadamard_sparse._plan import apply_plan, plan_sparsify

    torch.manual_seed(0)
    model = mlp()
    model.train()
    twin = copy.deepcopy(model)
    before = _snapshot(model)
    plan = plan_sparsify(model, 0.5, **kwargs)
    _assert_same(before, model)
    assert plan.model is model and len(plan.targets) == len(plan.sparsities()) > 0
    assert "SparsifyPlan(model=Sequential" in repr(plan)
    assert apply_plan(plan) is model
    hs.sparsify(twin, 0.5, **kwargs)
    ours, ref = hs.masks(model), hs.masks(twin)
    assert list(ours) == list(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    sd, sd_ref = model.state_dict(), twin.state_dict()
    assert all(torch.equal(sd[k], sd_ref[k]) for k in sd_ref)
