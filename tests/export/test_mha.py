"""torch's nn.MultiheadAttention: ProjectedMultiheadAttention, heads removed by shrink, sparse projections.

References: ``nn.MultiheadAttention`` itself (``from_mha`` copies must compute what it computes, in
every mask and output mode), the masked model (``shrink`` must reproduce it with fewer heads) and
the dense baked model (``to_sparse`` must reproduce it with sparse projections). Models are
torch's own ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` / ``nn.TransformerDecoderLayer``
and small wrappers calling ``nn.MultiheadAttention`` the way user code does.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse.errors import InvalidArgumentError, InvalidTypeError
from hadamard_sparse.export import ProjectedMultiheadAttention, SparseLinear

E, H = 16, 4
N, L, S = 2, 5, 7


def _mha(**kw: object) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, **kw)  # type: ignore[arg-type]
    with torch.no_grad():  # nonzero biases (torch initialises them to zero)
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    return mha.eval()


def _masks(kind: str) -> dict[str, object]:
    g = torch.Generator().manual_seed(1)
    bool2 = torch.rand(L, S, generator=g) < 0.3
    bool2[:, 0] = False  # no fully masked row (both would give NaN)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, -2:] = True
    cases: dict[str, dict[str, object]] = {
        "none": {},
        "kpm_bool": {"key_padding_mask": kpm},
        "kpm_float": {"key_padding_mask": torch.randn(N, S, generator=g)},
        "attn_bool_2d": {"attn_mask": bool2},
        "attn_float_2d": {"attn_mask": torch.randn(L, S, generator=g)},
        "attn_bool_3d": {"attn_mask": bool2.repeat(N * H, 1, 1)},
        "attn_float_3d": {"attn_mask": torch.randn(N * H, L, S, generator=g)},
        "attn_and_kpm": {"attn_mask": torch.randn(L, S, generator=g), "key_padding_mask": kpm.float() * -1e4},
    }
    return cases[kind]


MASKS = [
    "none",
    "kpm_bool",
    "kpm_float",
    "attn_bool_2d",
    "attn_float_2d",
    "attn_bool_3d",
    "attn_float_3d",
    "attn_and_kpm",
]
WEIGHTS = [(False, True), (True, True), (True, False)]  # (need_weights, average_attn_weights)


def _inputs(batch_first: bool, kdim: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    q = torch.randn(N, L, E, generator=g)
    k = torch.randn(N, S, kdim or E, generator=g)
    v = torch.randn(N, S, kdim or E, generator=g)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    return q, k, v


def _close(
    got: tuple[torch.Tensor, torch.Tensor | None], ref: tuple[torch.Tensor, torch.Tensor | None]
) -> None:
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    if ref[1] is None:
        assert got[1] is None
    else:
        assert got[1] is not None
        torch.testing.assert_close(got[1], ref[1], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# ProjectedMultiheadAttention.from_mha == nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------


# The full product of the five options is 2 * 2 * 2 * 8 * 3 = 192 cases; the table below has 24 and
# still holds every pair of option values (test_pairwise_table_covers_every_pair checks it). That is
# enough because each branch of from_mha and of ProjectedMultiheadAttention.forward depends on at most
# two options: the copy of the projections on (kdim, bias); the layout transposes on batch_first;
# the additive mask on the mask kind alone (attn and padding masks are one option), and whether it goes
# to SDPA or to the explicit softmax on (mask, need_weights); the weights returned on (need_weights,
# average). A bug in one branch then shows in a case the table has; breaking the packed-projection
# split, the batch_first transposes, the 3-D mask reshape or the averaging each fails it.
#
# (batch_first, kdim, bias): an orthogonal array of strength 2, every pair of these values occurs once.
_TWO_VALUED = [(True, None, True), (True, 6, False), (False, None, False), (False, 6, True)]
#: (batch_first, kdim, bias, mask, need_weights, average): each (mask, weights) pair once, with the rows
#: of _TWO_VALUED in turn, so each mask meets 3 rows (both values of each option) and each weights
#: mode meets all 4.
PAIRWISE = [
    (*_TWO_VALUED[(i + j) % len(_TWO_VALUED)], mask, *weights)
    for i, mask in enumerate(MASKS)
    for j, weights in enumerate(WEIGHTS)
]


def _case_id(case: tuple[bool, int | None, bool, str, bool, bool]) -> str:
    batch_first, kdim, bias, mask, need_weights, average = case
    return "-".join(
        [
            "batch_first" if batch_first else "seq_first",
            "kdim_vdim" if kdim else "same_dim",
            str(bias),
            mask,
            str(need_weights),
            str(average),
        ]
    )


def test_pairwise_table_covers_every_pair() -> None:
    options = [[True, False], [None, 6], [True, False], MASKS, WEIGHTS]
    rows = [(bf, kdim, bias, mask, (nw, avg)) for bf, kdim, bias, mask, nw, avg in PAIRWISE]
    assert len(rows) == len(set(rows)) == 24
    for a, b in itertools.combinations(range(len(options)), 2):
        want = set(itertools.product(options[a], options[b]))
        assert {(r[a], r[b]) for r in rows} == want, (a, b)


@pytest.mark.parametrize(
    "batch_first,kdim,bias,mask,need_weights,average", PAIRWISE, ids=[_case_id(c) for c in PAIRWISE]
)
def test_from_mha_equals_multihead_attention(
    batch_first: bool, kdim: int | None, bias: bool, mask: str, need_weights: bool, average: bool
) -> None:
    mha = _mha(batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias)
    pm = ProjectedMultiheadAttention.from_mha(mha)
    q, k, v = _inputs(batch_first, kdim)
    kw = dict(_masks(mask), need_weights=need_weights, average_attn_weights=average)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MHA's "mismatched key_padding_mask and attn_mask" deprecation
        ref = mha(q, k, v, **kw)
    _close(pm(q, k, v, **kw), ref)


@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_hint_and_unbatched_inputs(need_weights: bool) -> None:
    mha = _mha(batch_first=True)
    pm = ProjectedMultiheadAttention.from_mha(mha)
    x = torch.randn(N, L, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    kw = {"attn_mask": causal, "is_causal": True, "need_weights": need_weights}
    _close(pm(x, x, x, **kw), mha(x, x, x, **kw))
    with pytest.raises(InvalidArgumentError, match="is_causal=True .* needs attn_mask"):
        pm(x, x, x, is_causal=True)
    u = x[0]  # unbatched (L, E), with a 3-D (num_heads, L, S) mask and a (S,) key_padding_mask
    kw3 = {"attn_mask": torch.randn(H, L, L), "key_padding_mask": torch.tensor([0.0, 0, 0, -1e4, 0])}
    _close(pm(u, u, u, need_weights=need_weights, **kw3), mha(u, u, u, need_weights=need_weights, **kw3))


def test_fast_path_training_and_gradients_match() -> None:
    mha = _mha(batch_first=True)
    pm = ProjectedMultiheadAttention.from_mha(mha)
    x = torch.randn(N, L, E)
    with torch.no_grad():  # eval + no grad + self-attention: nn.MultiheadAttention's native fast path
        _close(pm(x, x, x), mha(x, x, x))
    mha.train(), pm.train()  # dropout=0: training mode computes the same
    assert pm.training
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = mha(xa, xa, xa)[0], pm(xb, xb, xb)[0]
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-4)
    gq, gk, gv = mha.in_proj_weight.grad.split(E)
    for got, ref in ((pm.q_proj.weight.grad, gq), (pm.k_proj.weight.grad, gk), (pm.v_proj.weight.grad, gv)):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pm.out_proj.weight.grad, mha.out_proj.weight.grad, atol=1e-5, rtol=1e-4)


def test_forward_hooks_are_carried_over() -> None:
    mha = _mha(batch_first=True)
    seen: list[int] = []
    mha.register_forward_hook(lambda m, a, out: seen.append(out[0].shape[1]))
    pm = ProjectedMultiheadAttention.from_mha(mha)
    x = torch.randn(N, L, E)
    pm(x, x, x)
    assert seen == [L]


def test_dropout_in_training_draws_like_multihead_attention() -> None:
    mha = _mha(batch_first=True, dropout=0.5).train()
    pm = ProjectedMultiheadAttention.from_mha(mha)
    x = torch.randn(N, L, E)
    torch.manual_seed(5)
    ref = mha(x, x, x)
    torch.manual_seed(5)
    _close(pm(x, x, x), ref)


class SubMHA(nn.MultiheadAttention):
    def forward(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        return super().forward(*args, **kwargs)  # type: ignore[arg-type]


REFUSED = {
    "add_bias_kv": lambda: _mha(add_bias_kv=True, batch_first=True),
    "add_zero_attn": lambda: _mha(add_zero_attn=True, batch_first=True),
    "overrides": lambda: SubMHA(E, H, batch_first=True),
    "parametrized": lambda: hs.sparsify(nn.Sequential(_mha(batch_first=True)), 0.5)[0],
    # only out_proj masked: a copy would bake its mask into a plain Linear and drop it
    "out_proj parametrized": lambda: hs.sparsify(
        nn.Sequential(_mha(batch_first=True)), 0.5, include=["0.out_proj.weight"]
    )[0],
}


@pytest.mark.parametrize("option", list(REFUSED))
def test_from_mha_refuses_what_it_cannot_reproduce(option: str) -> None:
    mha = REFUSED[option]()
    before = {k: v.clone() for k, v in mha.state_dict().items()}
    with pytest.raises(
        InvalidArgumentError,
        match={
            "overrides": "overrides .*forward",
            "out_proj parametrized": "parametrized \\(out_proj\\)",
        }.get(option, option),
    ):
        ProjectedMultiheadAttention.from_mha(mha)
    after = mha.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bad_arguments_are_refused_naming_them() -> None:
    with pytest.raises(InvalidTypeError, match="mha must be an nn.MultiheadAttention, got Linear"):
        ProjectedMultiheadAttention.from_mha(nn.Linear(4, 4))  # type: ignore[arg-type]
    lin = nn.Linear
    with pytest.raises(InvalidArgumentError, match="widths q=8, k=8, v=12"):
        ProjectedMultiheadAttention(lin(16, 8), lin(16, 8), lin(16, 12), lin(12, 16), 4)
    with pytest.raises(InvalidArgumentError, match="dropout must be a float in \\[0, 1\\], got 1.5"):
        ProjectedMultiheadAttention(lin(16, 8), lin(16, 8), lin(16, 8), lin(8, 16), 2, dropout=1.5)
    with pytest.raises(InvalidArgumentError, match="num_heads must be a positive int, got 0"):
        ProjectedMultiheadAttention(lin(16, 8), lin(16, 8), lin(16, 8), lin(8, 16), 0)
    with pytest.raises(InvalidTypeError, match="q_proj must be an nn.Module"):
        ProjectedMultiheadAttention(torch.ones(2), lin(16, 8), lin(16, 8), lin(8, 16), 2)  # type: ignore[arg-type]
    pm = ProjectedMultiheadAttention.from_mha(_mha(batch_first=True))
    x = torch.randn(N, L, E)
    with pytest.raises(InvalidArgumentError, match=r"attn_mask must be 2-D \(5, 5\) or 3-D \(8, 5, 5\)"):
        pm(x, x, x, attn_mask=torch.zeros(3, L, L))
    with pytest.raises(InvalidArgumentError, match="key_padding_mask must be a bool or floating-point"):
        pm(x, x, x, key_padding_mask=torch.zeros(N, L, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# shrink: masked heads of nn.MultiheadAttention are removed
# ---------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """User code calling nn.MultiheadAttention with a per-head (3-D) additive mask and asking for weights."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.attn = _mha(batch_first=True, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, attn_mask=mask)[0]  # need_weights=True: the explicit softmax path


def _encoder_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True).eval()


def _encoder_stack() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0)  # sequence first
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def _decoder_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerDecoderLayer(E, H, 32, dropout=0.0, batch_first=True).eval()


def _kpm() -> torch.Tensor:
    m = torch.zeros(N, L, dtype=torch.bool)
    m[1, -2:] = True
    return m


SHRINK_CASES = {
    "encoder_layer": (_encoder_layer, lambda: {"src": torch.randn(N, L, E), "src_key_padding_mask": _kpm()}),
    "encoder_stack": (_encoder_stack, lambda: {"src": torch.randn(L, N, E)}),
    "decoder_layer": (
        _decoder_layer,
        lambda: {
            "tgt": torch.randn(N, L, E),
            "memory": torch.randn(N, S, E),
            "tgt_mask": nn.Transformer.generate_square_subsequent_mask(L),
            "tgt_is_causal": True,
        },
    ),
    "cross_attention_kdim": (
        lambda: CrossAttention(6).eval(),
        lambda: {"x": torch.randn(N, L, E), "memory": torch.randn(N, S, 6)},
    ),
}


def _attentions(model: nn.Module) -> list[nn.Module]:
    types = (nn.MultiheadAttention, ProjectedMultiheadAttention)
    return [m for m in model.modules() if isinstance(m, types)]


def _outputs(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**x)


@pytest.mark.parametrize("case", list(SHRINK_CASES))
def test_shrink_removes_masked_heads_of_torch_transformers(case: str) -> None:
    make, inputs = SHRINK_CASES[case]
    model, x = make(), inputs()
    hs.sparsify(model, 0.5, structure="head", scope="layer")
    ref = _outputs(model, x)
    n0 = sum(p.numel() for p in model.parameters())
    shrunk = hs.shrink(copy.deepcopy(model), x)
    torch.testing.assert_close(_outputs(shrunk, x), ref, atol=1e-5, rtol=1e-4)
    atts = _attentions(shrunk)
    assert atts and all(type(a) is ProjectedMultiheadAttention and a.num_heads == H // 2 for a in atts)
    assert all(a.q_proj.out_features == a.out_proj.in_features == E // 2 for a in atts)
    assert sum(p.numel() for p in shrunk.parameters()) <= n0 - len(atts) * E * E  # q rows + out columns


def test_shrink_keeps_per_head_masks_and_weights_and_removes_heads_again() -> None:
    model = SelfAttention()
    x, mask = torch.randn(N, L, E), torch.randn(N * H, L, L)
    hs.sparsify(model, 0.25, structure="head", scope="layer")
    ref = _outputs(model, {"x": x, "mask": mask})
    once = hs.shrink(copy.deepcopy(model), (x, mask))
    assert once.attn.num_heads == 3 and once.attn.mask_num_heads == H and len(once.attn.head_ids) == 3
    torch.testing.assert_close(_outputs(once, {"x": x, "mask": mask}), ref, atol=1e-5, rtol=1e-4)
    # the shrunk attention is an attention block too: its heads can be pruned and removed again
    heads = hs.Heads(once)
    assert heads.n == 3
    hs.sparsify(once, 1 / 3, structure=heads)
    ref2 = _outputs(once, {"x": x, "mask": mask})
    twice = hs.shrink(copy.deepcopy(once), (x, mask))
    assert twice.attn.num_heads == 2 and len(twice.attn.head_ids) == 2
    assert set(twice.attn.head_ids) < set(once.attn.head_ids)
    torch.testing.assert_close(_outputs(twice, {"x": x, "mask": mask}), ref2, atol=1e-5, rtol=1e-4)


def test_shrink_of_a_nested_tensor_encoder_turns_its_fast_path_off() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    assert enc.use_nested_tensor
    hs.sparsify(enc, 0.5, structure="head", scope="layer")
    x, kpm = torch.randn(N, L, E), _kpm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are in prototype stage"
        ref = _outputs(enc, {"src": x, "src_key_padding_mask": kpm})
        shrunk = hs.shrink(copy.deepcopy(enc), x)
        got = _outputs(shrunk, {"src": x, "src_key_padding_mask": kpm})
    assert not shrunk.use_nested_tensor
    # the nested fast path leaves zeros at padded positions; the regular path computes them
    torch.testing.assert_close(got[~kpm], ref[~kpm], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("option", ["add_bias_kv", "add_zero_attn"])
def test_shrink_keeps_an_attention_it_cannot_reproduce_and_says_why(option: str) -> None:
    model = nn.Sequential()
    model.add_module("attn", REFUSED[option]())

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner.attn(x, x, x, need_weights=False)[0]

    wrap = Wrap()
    hs.sparsify(wrap, 0.5, structure="head", scope="layer")
    x = torch.randn(N, L, E)
    ref = _outputs(wrap, {"x": x})
    n_masks = len(hs.masks(wrap))
    with pytest.warns(
        UserWarning, match=f"keeps the masked heads of nn.MultiheadAttention 'inner.attn'.*{option}"
    ):  # and as nothing else can go, shrink refuses rather than only baking the masks away
        with pytest.raises(
            hs.InvalidArgumentError, match=r"inner\.attn\.in_proj_weight \(MultiheadAttention\)"
        ):
            hs.shrink(wrap, x)
    assert len(hs.masks(wrap)) == n_masks > 0  # unchanged: still masked
    hs.shrink(hs.remove_parametrizations(wrap), x)  # baked: nothing to lose, the attention is kept whole
    assert type(wrap.inner.attn) is nn.MultiheadAttention
    torch.testing.assert_close(_outputs(wrap, {"x": x}), ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# to_sparse: sparse projections
# ---------------------------------------------------------------------------------------------


def _baked(model: nn.Module, sparsity: float = 0.9) -> nn.Module:
    return hs.remove_parametrizations(hs.sparsify(model, sparsity, scope="layer"))


PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")
SPARSE_CASES = {
    "encoder_stack": (
        _encoder_stack,
        lambda: {"src": torch.randn(L, N, E)},
        ["layers.0.self_attn", "layers.1.self_attn"],
    ),
    "decoder_layer": (
        _decoder_layer,
        lambda: {"tgt": torch.randn(N, L, E), "memory": torch.randn(N, S, E)},
        ["self_attn", "multihead_attn"],
    ),
}


@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_to_sparse_runs_attention_projections_sparse_and_reports_each(case: str) -> None:
    make, inputs, attn_names = SPARSE_CASES[case]
    dense, x = _baked(make()), inputs()
    model, report = hs.to_sparse(copy.deepcopy(dense), return_report=True)
    by_name = {c.name: c for c in report}
    for a in attn_names:
        att = model.get_submodule(a)
        assert type(att) is ProjectedMultiheadAttention
        for p in PROJ:
            assert by_name[f"{a}.{p}"].layout != "dense" and by_name[f"{a}.{p}"].kind == "Linear"
            assert isinstance(getattr(att, p), SparseLinear)
    with torch.inference_mode():
        torch.testing.assert_close(model(**x), dense(**x), atol=1e-5, rtol=1e-5)


def test_to_sparse_times_each_projection_on_its_input() -> None:
    dense = _baked(_encoder_stack())
    x = torch.randn(L, N, E)
    asked: dict[str, list[str]] = {}

    def timer(name: str, fns: dict[str, object]) -> dict[str, float]:
        asked[name] = list(fns)
        for fn in fns.values():
            fn()  # type: ignore[operator]
        fast = name == "layers.0.self_attn.v_proj"  # elsewhere dense is clearly faster
        return {c: 1.0 if c == "dense" else 0.1 if fast else 2.0 for c in fns}

    model, report = hs.to_sparse(copy.deepcopy(dense), example_inputs=x, timer=timer, return_report=True)
    by_name = {c.name: c for c in report}
    assert {f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in PROJ} <= set(asked)
    assert by_name["layers.0.self_attn.out_proj"].input_shape == (N, L, E)  # batch first inside
    assert by_name["layers.0.self_attn.q_proj"].input_shape == (N, L, E)
    att0, att1 = model.layers[0].self_attn, model.layers[1].self_attn
    assert type(att0) is ProjectedMultiheadAttention and isinstance(att0.v_proj, SparseLinear)
    assert type(att0.q_proj) is nn.Linear
    assert type(att1) is nn.MultiheadAttention  # nothing sparse there: left as it was
    with torch.inference_mode():
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)


def test_to_sparse_runs_the_users_attention_hooks_once_per_call() -> None:
    """The copy to_sparse times the projections through carries the attention's hooks; they must not
    run a second time on the copy (a pre-hook would change the projections' inputs twice)."""
    dense = _baked(_encoder_stack())
    x = torch.randn(L, N, E)
    calls: list[str] = []
    att = dense.layers[0].self_attn
    att.register_forward_pre_hook(lambda m, a: calls.append("pre") or (a[0] * 2, *a[1:]))
    att.register_forward_hook(lambda m, a, o: calls.append("post"))
    with torch.no_grad():
        dense(x)
    once = list(calls)
    assert once == ["pre", "post"]
    calls.clear()
    model = hs.to_sparse(
        dense, example_inputs=x, timer=lambda n, fns: {c: float(c == "dense") + 0.1 for c in fns}
    )
    assert calls == once  # the model ran once on example_inputs, each hook once
    assert type(model.layers[0].self_attn) is ProjectedMultiheadAttention  # hooks carried over
    calls.clear()
    with torch.no_grad():
        model(x)
    assert calls == once


@pytest.mark.parametrize("option", ["add_bias_kv", "add_zero_attn"])
def test_to_sparse_keeps_an_attention_it_cannot_reproduce_and_reports_why(option: str) -> None:
    model = nn.Sequential()
    model.add_module("attn", REFUSED[option]())
    _baked(model)
    attn = model.attn
    _, report = hs.to_sparse(model, max_density=1.0, return_report=True)
    assert model.attn is attn and type(attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    (choice,) = report
    assert choice.name == "attn.out_proj" and choice.layout == "dense"
    assert "nn.MultiheadAttention 'attn'" in choice.reason and option in choice.reason


def test_refused_to_sparse_leaves_the_attention_unchanged() -> None:
    model = _baked(_encoder_layer())
    attn = model.self_attn
    with pytest.raises(InvalidArgumentError, match="semi_structured.*'self_attn.q_proj'"):
        hs.to_sparse(model, "semi_structured")
    assert model.self_attn is attn and type(attn) is nn.MultiheadAttention
    with pytest.raises(InvalidArgumentError, match="include .*matches no"):
        hs.to_sparse(model, include="*.nothing")
    assert model.self_attn is attn


class CrossAttention(nn.Module):
    """Queries attending to a memory of another width (``kdim``/``vdim``), or of the same width."""

    def __init__(self, kdim: int | None) -> None:
        super().__init__()
        self.attn = _mha(kdim=kdim, vdim=kdim, batch_first=True)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.attn(x, memory, memory)[0]


@pytest.mark.parametrize("kdim", [None, 6], ids=["same_dim", "kdim_vdim"])
def test_to_sparse_checkpoints_keep_multihead_attention_names(kdim: int | None) -> None:
    torch.manual_seed(0)
    dense = _baked(CrossAttention(kdim).eval())
    model = hs.to_sparse(copy.deepcopy(dense), max_density=1.0)
    assert type(model.attn) is ProjectedMultiheadAttention
    sd = model.state_dict()
    assert sorted(sd) == sorted(dense.state_dict())
    x, memory = torch.randn(N, L, E), torch.randn(N, S, kdim or E)
    fresh = CrossAttention(kdim).eval()
    fresh.load_state_dict(sd)  # the dense model loads the sparse model's checkpoint
    other = hs.to_sparse(_baked(CrossAttention(kdim).eval(), 0.5), max_density=1.0)
    other.load_state_dict(dense.state_dict())  # and the other way round (re-sparsified)
    with torch.no_grad():
        ref = dense(x, memory)
        torch.testing.assert_close(fresh(x, memory), ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(other(x, memory), ref, atol=1e-5, rtol=1e-5)


def test_shrunk_attention_checkpoints_use_the_projection_names() -> None:
    model = SelfAttention()
    x, mask = torch.randn(N, L, E), torch.randn(N * H, L, L)
    hs.sparsify(model, 0.5, structure="head", scope="layer")
    shrunk = hs.shrink(model, (x, mask))
    assert sorted(shrunk.state_dict()) == sorted(f"attn.{p}.{t}" for p in PROJ for t in ("weight", "bias"))
    again = ProjectedMultiheadAttention.from_mha(_mha(batch_first=True))
    again.load_state_dict(_mha(batch_first=True).state_dict())  # MHA names load into a full-width copy


@pytest.mark.parametrize("exclude", [None, "*self_attn*"], ids=["all", "attention_dense"])
def test_to_sparse_layers_of_a_torch_encoder_skip_its_fused_kernels(exclude: str | None) -> None:
    # eval + no grad: nn.TransformerEncoderLayer's fused kernel reads linear1.weight etc. and
    # nn.TransformerEncoder nests padded inputs; a layer with sparse modules must take the regular path
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    dense = _baked(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval())
    model = hs.to_sparse(copy.deepcopy(dense), max_density=1.0, exclude=exclude)
    assert isinstance(model.layers[0].linear1, SparseLinear) and not model.use_nested_tensor
    assert (type(model.layers[0].self_attn) is nn.MultiheadAttention) == (exclude is not None)
    x, kpm = torch.randn(N, L, E), _kpm()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are in prototype stage"
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
        got, ref = model(x, src_key_padding_mask=kpm), dense(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(got[~kpm], ref[~kpm], atol=1e-5, rtol=1e-5)
