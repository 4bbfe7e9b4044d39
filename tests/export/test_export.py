"""shrink and to_sparse: exact equivalence with the masked/baked model, refusals, round trips."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import hadamard_sparse as hs
from hadamard_sparse.api import register_mask, remove_parametrizations, sparsify
from hadamard_sparse.errors import InvalidArgumentError, UnsupportedGraphError
from hadamard_sparse.export import SparseLinear, graph, layer_registry, layer_rules, shrink, to_sparse

ATOL = 1e-5


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def row_mask(out: int, pruned: list[int], ndim: int = 2) -> torch.Tensor:
    keep = torch.ones(out, dtype=torch.bool)
    keep[pruned] = False
    return keep.view(out, *([1] * (ndim - 1)))


def prune_rows(layer: nn.Module, pruned: list[int], *, bias: bool = False) -> None:
    """Mask whole output rows/filters of ``layer`` (and their bias entries when ``bias``)."""
    register_mask(layer, "weight", row_mask(layer.weight.shape[0], pruned, layer.weight.dim()))
    if bias:
        register_mask(layer, "bias", row_mask(layer.weight.shape[0], pruned, 1))


def zero_bn(bn: nn.BatchNorm2d, pruned: list[int]) -> None:
    """Mask the affine parameters of pruned channels, so BatchNorm outputs exactly 0 there."""
    for name in ("weight", "bias"):
        register_mask(bn, name, row_mask(bn.num_features, pruned, 1))


def randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


def check_equal(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """Shrink a deepcopy; assert its output equals the masked model's (eval mode). Returns it."""
    model.eval()
    with torch.no_grad():
        ref = model(x)
    shrunk = shrink(copy.deepcopy(model), x[:1])
    shrunk.eval()
    with torch.no_grad():
        got = shrunk(x)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-5)
    # the masked reference itself still computes what a baked copy computes
    with torch.no_grad():
        torch.testing.assert_close(remove_parametrizations(copy.deepcopy(model))(x), ref)
    return shrunk, ref


# ---------------------------------------------------------------------------------------------
# shrink: sequential chains
# ---------------------------------------------------------------------------------------------


def test_shrink_mlp_folds_constant_neurons_into_next_bias() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 3))
    prune_rows(model[0], [0, 3, 5, 7, 9])  # biases stay: these neurons output relu(b), folded
    prune_rows(model[2], [1, 2])
    before = n_params(model)
    shrunk, _ = check_equal(model, torch.randn(6, 8))
    assert isinstance(shrunk[0], nn.Linear) and type(shrunk[0]) is nn.Linear
    assert (shrunk[0].out_features, shrunk[2].in_features) == (11, 11)
    assert (shrunk[2].out_features, shrunk[4].in_features) == (10, 10)
    assert shrunk[4].out_features == 3  # outputs are never removed
    assert n_params(shrunk) == before - 5 * (8 + 1) - 5 * 12 - 2 * (11 + 1) - 2 * 3


def test_shrink_works_on_baked_and_3d_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 10), nn.Tanh(), nn.Dropout(0.3), nn.Linear(10, 4))
    prune_rows(model[0], [2, 4])
    remove_parametrizations(model)
    shrunk, _ = check_equal(model, torch.randn(2, 5, 8))
    assert shrunk[0].out_features == 8 and shrunk[3].in_features == 8


def conv_bn_chain() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(20, 4),
    )


def test_shrink_conv_bn_relu_conv_chain() -> None:
    torch.manual_seed(0)
    model = conv_bn_chain()
    randomize_bn(model)
    prune_rows(model[0], [1, 4, 6])
    zero_bn(model[1], [1, 4, 6])  # BN outputs 0 there: removable before the padded conv
    prune_rows(model[3], [0, 5])  # nonzero bias, but the 1x1 conv consumer has no padding: folded
    prune_rows(model[6], [2])  # constant through avg pool + flatten: folded into the Linear
    before = n_params(model)
    shrunk, _ = check_equal(model, torch.randn(4, 3, 8, 8))
    assert (shrunk[0].out_channels, shrunk[1].num_features, shrunk[3].in_channels) == (5, 5, 5)
    assert shrunk[1].running_mean.shape == (5,)
    assert (shrunk[3].out_channels, shrunk[6].in_channels) == (4, 4)
    assert (shrunk[6].out_channels, shrunk[10].in_features) == (4, 16)
    assert isinstance(shrunk[3], nn.Conv2d)
    assert n_params(shrunk) < before


def test_shrink_keeps_constant_channels_before_padded_conv() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    with torch.no_grad():
        model[0].bias.fill_(0.5)  # relu(0.5) != 0: zero padding would make the border differ
    prune_rows(model[0], [0, 1, 2])
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    # nothing can go, so shrink would only bake the masks away: refused, naming the layer and why
    with pytest.raises(
        InvalidArgumentError,
        match=r"0\.weight \(Conv2d\): 3 of 3 masked output units stay: .*their unmasked bias; e\.g\. 0\.5\) "
        r"into layer '2' \(Conv2d\), which pads with zeros(.|\n)*channel_group",
    ):
        shrink(model, x)
    assert parametrize.is_parametrized(model[0], "weight") and model[0].out_channels == 8
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    # with the bias masked too, the channels are zero and go
    model2 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    prune_rows(model2[0], [0, 1, 2], bias=True)
    shrunk2, _ = check_equal(model2, torch.randn(2, 3, 6, 6))
    assert shrunk2[0].out_channels == 5 and shrunk2[2].in_channels == 5


# ---------------------------------------------------------------------------------------------
# shrink: flatten -> Linear, residual additions, concatenation, depthwise
# ---------------------------------------------------------------------------------------------


class FlattenNet(nn.Module):
    def __init__(self, use_view: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.fc = nn.Linear(6 * 4 * 3, 5)
        self.use_view = use_view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        h = h.view(h.size(0), -1) if self.use_view else torch.flatten(h, 1)
        return self.fc(h)


@pytest.mark.parametrize("use_view", [False, True], ids=["flatten", "view"])
def test_shrink_flatten_linear_maps_each_channel_to_hw_inputs(use_view: bool) -> None:
    torch.manual_seed(0)
    model = FlattenNet(use_view)
    prune_rows(model.conv, [1, 4])  # nonzero biases: relu(b) * fc columns folded into fc.bias
    shrunk, _ = check_equal(model, torch.randn(3, 2, 6, 5))
    assert shrunk.conv.out_channels == 4
    assert shrunk.fc.in_features == 4 * 4 * 3
    # the kept columns are exactly those of the kept channels, in order
    keep = [c for c in range(6) if c not in (1, 4)]
    cols = torch.cat([torch.arange(c * 12, (c + 1) * 12) for c in keep])
    torch.testing.assert_close(shrunk.fc.weight, model.fc.weight[:, cols])


class ResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        r = self.conv2(F.relu(self.conv1(h)))
        h = F.relu(h + r)
        return self.head(h.mean((2, 3)))


def test_shrink_residual_removes_only_channels_pruned_in_every_branch() -> None:
    torch.manual_seed(0)
    model = ResBlock()
    prune_rows(model.stem, [0, 2, 5], bias=True)
    prune_rows(model.conv2, [0, 2, 7], bias=True)  # channel 5 lives in the skip; 7 in the stem
    prune_rows(model.conv1, [1, 3], bias=True)  # inner channels: no residual constraint
    shrunk, _ = check_equal(model, torch.randn(2, 3, 6, 6))
    assert shrunk.stem.out_channels == 6  # 0 and 2 removed; 5 kept (conv2 produces it)
    assert shrunk.conv2.out_channels == 6 and shrunk.conv1.in_channels == 6
    assert shrunk.conv1.out_channels == 6 and shrunk.conv2.in_channels == 6
    assert shrunk.head.in_features == 6


class ConcatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(10, 5, 1)
        self.out = nn.Conv2d(5, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        return self.out(F.relu(self.mix(h)))


def test_shrink_concat_uses_channel_offsets() -> None:
    torch.manual_seed(0)
    model = ConcatNet()
    prune_rows(model.a, [1, 3])  # constants folded into the 1x1 mix conv (no padding)
    prune_rows(model.b, [0, 4, 5])  # sigmoid(b) folded
    prune_rows(model.mix, [2], bias=True)  # zero before a padded conv: removed
    shrunk, _ = check_equal(model, torch.randn(2, 3, 5, 5))
    assert (shrunk.a.out_channels, shrunk.b.out_channels) == (2, 3)
    assert shrunk.mix.in_channels == 5 and shrunk.mix.out_channels == 4 and shrunk.out.in_channels == 4
    kept = [0, 2, 4 + 1, 4 + 2, 4 + 3]
    torch.testing.assert_close(shrunk.mix.weight, model.mix.weight[[0, 1, 3, 4]][:, kept])


def test_shrink_through_depthwise_conv() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )
    prune_rows(model[0], [1, 6], bias=True)  # zero into the depthwise conv, whose bias is folded later
    shrunk, _ = check_equal(model, torch.randn(2, 3, 5, 5))
    assert shrunk[0].out_channels == 6
    assert (shrunk[2].in_channels, shrunk[2].out_channels, shrunk[2].groups) == (6, 6, 6)
    assert shrunk[4].in_channels == 6


def test_shrink_unstructured_masks_are_refused_and_a_baked_model_is_identity() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    register_mask(model[0], "weight", torch.arange(24).view(6, 4) % 2 == 0)  # no empty row
    x = torch.randn(3, 4)
    with torch.no_grad():
        ref = model(x)
    # nothing to remove: shrink would only bake the masks away, so it refuses and says what to do
    with pytest.raises(
        InvalidArgumentError,
        match=r"0\.weight \(Linear\): unstructured mask \(12 of 24 entries(.|\n)*hs\.to_sparse",
    ):
        shrink(model, x)
    assert parametrize.is_parametrized(model[0], "weight")
    torch.testing.assert_close(model(x), ref)
    # baked, there is no mask to lose: shrink is the identity
    remove_parametrizations(model)
    out = shrink(model, x)
    assert out is model
    assert model[0].out_features == 6 and not hasattr(model[0], "parametrizations")
    torch.testing.assert_close(model(x), ref)


def test_shrink_keeps_channels_normalised_by_layernorm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 10), nn.LayerNorm(10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2)
    )
    prune_rows(model[0], [1, 2], bias=True)  # LayerNorm statistics include these zeros: kept
    prune_rows(model[3], [0, 5])  # after the LayerNorm: removed, relu(bias) folded
    shrunk, _ = check_equal(model, torch.randn(4, 6))
    assert shrunk[0].out_features == 10 and shrunk[1].normalized_shape == (10,)
    assert shrunk[3].out_features == 6 and shrunk[5].in_features == 6


def test_shrink_does_not_touch_batchnorm_statistics_or_modes() -> None:
    torch.manual_seed(0)
    model = conv_bn_chain()
    randomize_bn(model)
    prune_rows(model[3], [1])
    model.train()
    stats = model[1].running_mean.clone(), model[1].num_batches_tracked.clone()
    shrink(model, torch.randn(2, 3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, stats[0]) and torch.equal(
        model[1].num_batches_tracked, stats[1]
    )


# ---------------------------------------------------------------------------------------------
# shrink: refusals
# ---------------------------------------------------------------------------------------------


class ReshapeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x).view(x.shape[0], 2, 4))


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 4, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped(self.conv(x))


class SoftmaxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.softmax(self.fc1(x), dim=-1))


@pytest.mark.parametrize(
    ("make", "layer", "x", "named"),
    [
        (ReshapeNet, "fc1", torch.randn(2, 6), "view"),
        (SoftmaxNet, "fc1", torch.randn(2, 6), "softmax"),
    ],
    ids=["reshape", "softmax"],
)
def test_shrink_refuses_unsupported_graph_and_leaves_model_unchanged(make, layer, x, named) -> None:
    torch.manual_seed(0)
    model = make()
    prune_rows(getattr(model, layer), [0, 1])
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(UnsupportedGraphError, match=named):
        shrink(model, x)
    assert hasattr(getattr(model, layer), "parametrizations")  # not baked
    after = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize(("pruned", "kept"), [([0, 4], 6), ([0, 1], 8)], ids=["aligned", "one_group"])
@pytest.mark.parametrize("bias", [True, False], ids=["zero", "bias_folded"])
def test_shrink_grouped_conv_removes_group_aligned_channels(pruned: list[int], kept: int, bias: bool) -> None:
    """Channel j of each group of a grouped conv goes together: pruned in every group, or kept.

    Without its bias masked, a pruned channel carries its bias, a constant that the grouped conv (no
    padding) folds into the bias of the rows of that channel's group.
    """
    torch.manual_seed(0)
    model = GroupedNet()  # conv: 8 channels -> grouped (2 groups of 4)
    prune_rows(model.conv, pruned, bias=bias)
    if kept == 8:  # nothing can go: refused (the masks would only be baked away), naming why
        with pytest.raises(InvalidArgumentError, match="another group of a grouped convolution"):
            shrink(model, torch.randn(2, 3, 5, 5))
        model = remove_parametrizations(model)  # baked, nothing is lost: shrink keeps every channel
    shrunk, _ = check_equal(model, torch.randn(2, 3, 5, 5))
    assert shrunk.conv.out_channels == shrunk.grouped.in_channels == kept
    assert shrunk.grouped.groups == 2 and shrunk.grouped.weight.shape == (4, kept // 2, 3, 3)


def test_shrink_unsupported_op_on_unpruned_tensor_is_fine() -> None:
    torch.manual_seed(0)
    model = SoftmaxNet()
    prune_rows(model.fc2, [0])  # the softmax reads fc1's (dense) output only
    # fc2's pruned output is a model output, so nothing can go: refused for that, not for the softmax
    with pytest.raises(InvalidArgumentError, match=r"fc2\.weight \(Linear\): 1 of 1 masked .*model's output"):
        shrink(copy.deepcopy(model), torch.randn(2, 6))
    shrunk, _ = check_equal(remove_parametrizations(model), torch.randn(2, 6))
    assert shrunk.fc2.out_features == 3


class Erf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(x)


def test_shrink_new_op_is_one_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """An op shrink does not know is refused, naming it and its layer; registering one rule is enough."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Erf(), nn.Linear(16, 3))
    prune_rows(model[0], [0, 2, 4])
    with pytest.raises(UnsupportedGraphError, match="'erf' in layer '1' \\(Erf\\)"):
        shrink(copy.deepcopy(model), torch.randn(2, 8))
    monkeypatch.setattr(graph, "FUNCTION_RULES", dict(graph.FUNCTION_RULES))

    @graph.function_rule(torch.ops.aten.erf)
    def erf_rule(flow: graph.ChannelFlow, node: torch.fx.Node) -> None:
        flow.passthrough(node, node.args[0], torch.erf)

    shrunk, _ = check_equal(model, torch.randn(6, 8))
    assert (shrunk[0].out_features, shrunk[2].in_features) == (13, 13)


def test_shrink_untraceable_model_raises() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(UnsupportedGraphError, match="could not capture Branchy"):
        shrink(Branchy(), torch.randn(1, 3))


def test_shrink_bad_example_inputs() -> None:
    with pytest.raises(TypeError, match="example_inputs"):
        shrink(nn.Sequential(nn.Linear(2, 2)), "x")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# to_sparse
# ---------------------------------------------------------------------------------------------


def sparse_mlp(sparsity: float = 0.9) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    return remove_parametrizations(sparsify(model, sparsity, scope="layer"))


@pytest.mark.parametrize("layout", ["csr", "bsr"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("shape", [(1, 32), (5, 32), (2, 3, 32)], ids=["b1", "b5", "3d"])
def test_to_sparse_matches_dense(layout: str, mode: str, shape: tuple[int, ...]) -> None:
    dense = sparse_mlp()
    sp = to_sparse(
        copy.deepcopy(dense), layout, blocksize=(8, 8) if layout == "bsr" else (16, 16), max_density=1.0
    )
    assert all(isinstance(sp[i], SparseLinear) for i in (0, 2, 4))
    assert sp[0].in_features == 32 and sp[0].out_features == 64
    x = torch.randn(*shape)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        ref = F.linear(
            F.relu(
                F.linear(F.relu(F.linear(x, dense[0].weight, dense[0].bias)), dense[2].weight, dense[2].bias)
            ),
            dense[4].weight,
            dense[4].bias,
        )
        got = sp(x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_to_sparse_stores_int32_csr_and_keeps_dense_layers() -> None:
    model = sparse_mlp(0.9)
    with torch.no_grad():
        model[4].weight.fill_(1.0)  # fully dense: stays nn.Linear
    to_sparse(model, "csr")
    w = model[0].weight
    assert w.layout == torch.sparse_csr and w.crow_indices().dtype == torch.int32
    assert w.values().numel() == int(sparse_mlp(0.9)[0].weight.count_nonzero())
    assert type(model[4]) is nn.Linear
    dense = sparse_mlp(0.9)
    to_sparse(dense, "csr", max_density=0.05)  # 10% dense > 5%: nothing converted
    assert all(type(m) is nn.Linear for m in dense if isinstance(m, nn.Linear))


def test_to_sparse_bsr_skips_indivisible_shapes() -> None:
    model = sparse_mlp()
    to_sparse(model, "bsr", blocksize=(16, 16), max_density=1.0)
    assert isinstance(model[0], SparseLinear) and model[0].weight.layout == torch.sparse_bsr
    assert type(model[4]) is nn.Linear  # 8 x 48 is not divisible into 16 x 16 blocks


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_to_sparse_state_dict_round_trip(layout: str) -> None:
    dense = sparse_mlp()
    sp = to_sparse(copy.deepcopy(dense), layout, blocksize=(8, 8), max_density=1.0)
    sd = sp.state_dict()
    assert sd.keys() == dense.state_dict().keys()
    assert all(v.layout == torch.strided for v in sd.values())
    fresh = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    fresh.load_state_dict(sd, strict=True)
    for k, v in dense.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # and a dense checkpoint loads back into the sparse model (re-sparsified)
    other = sparse_mlp(0.95)
    sp.load_state_dict(other.state_dict(), strict=True)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        torch.testing.assert_close(sp(x), other(x), atol=1e-5, rtol=1e-5)
    assert sp[0].weight.layout in (torch.sparse_csr, torch.sparse_bsr)


@pytest.mark.parametrize("layout", ["csr", "bsr", "csr_kernel"])
def test_state_dict_with_a_wrong_bias_is_refused_like_a_linear(layout: str) -> None:
    dense = sparse_mlp()
    sd = dense.state_dict()
    sd["0.bias"] = torch.zeros(63)
    with pytest.raises(RuntimeError, match="size mismatch for 0.bias"):
        copy.deepcopy(dense).load_state_dict(sd)  # the reference: what nn.Linear says
    sp = to_sparse(copy.deepcopy(dense), layout, blocksize=(8, 8), max_density=1.0)
    assert isinstance(sp[0], SparseLinear)
    with pytest.raises(
        RuntimeError, match="size mismatch for 0.bias: expected shape \\(64,\\), got \\(63,\\)"
    ):
        sp.load_state_dict(sd)


def test_to_sparse_validates_before_changing() -> None:
    model = sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), 0.8)
    for args, kwargs, match in [
        (("coo",), {}, "layout"),
        (("semi_structured",), {"max_density": 1.0}, "semi_structured"),
        ((), {"include": ["nothing.*"]}, "include"),
    ]:  # a masked model is baked only once every check passed: refused, it stays masked
        with pytest.raises(ValueError, match=match):
            to_sparse(model, *args, **kwargs)
        assert all(parametrize.is_parametrized(model[i], "weight") for i in (0, 2))
    baked = remove_parametrizations(model)
    with pytest.raises(ValueError, match="layout"):
        to_sparse(baked, "coo")
    with pytest.raises(ValueError, match="max_density"):
        to_sparse(baked, max_density=1.5)
    with pytest.raises(ValueError, match="blocksize"):
        to_sparse(baked, "bsr", blocksize=(0, 4))
    with pytest.raises(ValueError, match="semi_structured"):
        to_sparse(baked, "semi_structured", max_density=1.0)
    assert all(type(m) is nn.Linear for m in baked if not isinstance(m, nn.ReLU))


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_to_sparse_failure_while_building_leaves_model_unchanged(
    layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = sparse_mlp(0.95)
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    before_mods = dict(model.named_modules())
    original = SparseLinear._sparsify
    calls = []

    def failing(self: SparseLinear, w: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:  # the first layer is already built when the second fails
            raise RuntimeError("simulated kernel failure")
        return original(self, w)

    monkeypatch.setattr(SparseLinear, "_sparsify", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        to_sparse(model, layout, max_density=1.0, blocksize=(8, 8))
    assert len(calls) == 2
    after_mods = dict(model.named_modules())
    assert after_mods.keys() == before_mods.keys()
    assert all(after_mods[k] is before_mods[k] for k in before_mods)
    after_sd = model.state_dict()
    assert after_sd.keys() == before_sd.keys()
    assert all(torch.equal(after_sd[k], before_sd[k]) for k in before_sd)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured sparsity needs a CUDA GPU")
def test_to_sparse_semi_structured_cuda() -> None:  # pragma: no cover - needs a GPU
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)).half().cuda()
    with torch.no_grad():
        for lin in (model[0], model[2]):
            w = lin.weight.view(128, 32, 4)
            keep = w.abs().argsort(dim=-1, descending=True)[..., :2]
            mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, keep, True)
            lin.weight.mul_(mask.view(128, 128))
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    with torch.inference_mode():
        ref = model(x)
        to_sparse(model, "semi_structured")
        assert isinstance(model[0], SparseLinear)
        torch.testing.assert_close(model(x), ref, atol=1e-2, rtol=1e-2)


def test_sparse_linear_deepcopy_save_and_dtype() -> None:
    import io

    dense = sparse_mlp()
    sp = to_sparse(copy.deepcopy(dense), "csr", max_density=1.0)
    x = torch.randn(3, 32)
    clone = copy.deepcopy(sp)
    assert clone[0].weight is not sp[0].weight
    buf = io.BytesIO()
    torch.save(sp, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    as64 = copy.deepcopy(sp).double()
    with torch.no_grad():
        ref = dense(x)
        torch.testing.assert_close(clone(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(as64(x.double()), dense.double()(x.double()), atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# shrink with masked units it cannot remove: warned, or refused when nothing at all can go
# ---------------------------------------------------------------------------------------------


def crepe_like() -> nn.Sequential:
    """CREPE's conv stack as published (Conv -> ReLU -> BatchNorm -> MaxPool -> Dropout), small, trained-like BN."""

    def block(cin: int, cout: int, k: int) -> list[nn.Module]:
        conv = nn.Conv2d(cin, cout, (k, 1), padding=(k // 2, 0))
        return [conv, nn.ReLU(), nn.BatchNorm2d(cout), nn.MaxPool2d((2, 1)), nn.Dropout(0.25)]

    torch.manual_seed(0)
    model = nn.Sequential(
        *block(1, 16, 9), *block(16, 8, 5), *block(8, 8, 3), nn.Flatten(), nn.Linear(64, 10)
    )
    randomize_bn(model)
    return model.eval()


def test_shrink_crepe_filters_masked_without_bias_and_batchnorm_are_named() -> None:
    model = crepe_like()
    x = torch.randn(2, 1, 64, 1)
    prune_rows(model[0], [0, 1, 2, 3], bias=True)  # bias masked too: the BatchNorm shift stays
    prune_rows(model[5], [0, 1])  # bias not masked
    prune_rows(model[10], [0, 1, 2])  # read by Flatten -> Linear: its constants fold into the Linear's bias
    with pytest.warns(UserWarning) as record:
        shrunk, _ = check_equal(model, x)
    (msg,) = [str(w.message) for w in record if "could not be removed" in str(w.message)]
    assert (
        "0.weight (Conv2d): 4 of 4 masked output units stay: they still output a non-zero constant (a BatchNorm shift"
        in msg
    )
    assert "into layer '5' (Conv2d), which pads with zeros" in msg
    assert (
        "5.weight (Conv2d): 2 of 2 masked output units stay: they still output a non-zero constant (their unmasked bias"
        in msg
    )
    assert "10.weight" not in msg and 'structure="channel_group"' in msg
    assert (shrunk[0].out_channels, shrunk[5].out_channels, shrunk[10].out_channels) == (16, 8, 5)
    assert shrunk[16].in_features == 40


def test_shrink_crepe_refused_when_nothing_can_go_and_channel_groups_shrink() -> None:
    model = crepe_like()
    x = torch.randn(2, 1, 64, 1)
    hs.sparsify(model, 0.5, structure="out_channel", scope="layer", include=["0", "5"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        InvalidArgumentError, match=r"(?s)0\.weight .*5\.weight .*pads with zeros.*channel_group"
    ):
        shrink(model, x)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert len(hs.masks(model)) == 2  # still masked: nothing lost
    # what the message says to do: channel groups mask bias and BatchNorm with each filter
    model = crepe_like()
    hs.sparsify(model, 0.5, structure="channel_group", scope="layer", example_inputs=x, include=["0", "5"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shrunk, _ = check_equal(model, x)
    assert (shrunk[0].out_channels, shrunk[5].out_channels) == (8, 4)


def test_shrink_unstructured_mlp_is_refused_naming_every_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    hs.sparsify(model, 0.5)
    with pytest.raises(InvalidArgumentError) as info:
        shrink(model, torch.randn(2, 8))
    msg = str(info.value)
    for name in ("0", "2", "4"):
        assert f"{name}.weight (Linear): unstructured mask" in msg
    assert "hs.to_sparse" in msg and len(hs.masks(model)) == 3


# ---------------------------------------------------------------------------------------------
# a masked model: shrink and to_sparse both bake it (export/baking.py)
# ---------------------------------------------------------------------------------------------


def _bake_agreement(model: nn.Module, x: object) -> None:
    """shrink and to_sparse on copies of the masked ``model``: both baked, both compute the baked reference."""
    args, kwargs = graph.as_inputs(x)
    baked = remove_parametrizations(copy.deepcopy(model)).eval()
    with torch.no_grad():
        ref = baked(*args, **kwargs)
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    timer = lambda name, fns: {c: 1.0 if c == "dense" else 0.5 for c in fns}  # noqa: E731
    exports = {
        "shrink": shrink(copy.deepcopy(model), x),
        "to_sparse": to_sparse(copy.deepcopy(model), max_density=1.0),
        "to_sparse timed": to_sparse(copy.deepcopy(model), example_inputs=x, max_density=1.0, timer=timer),
    }
    for how, out in exports.items():
        assert not hs.masks(out) and not any(parametrize.is_parametrized(m) for m in out.modules()), how
        with torch.inference_mode():
            got = out.eval()(*args, **kwargs)
        got = got if isinstance(got, torch.Tensor) else got[0]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=how)
    assert any(isinstance(m, SparseLinear) for m in exports["to_sparse"].modules())
    assert any(isinstance(m, SparseLinear) for m in exports["to_sparse timed"].modules())


def test_shrink_and_to_sparse_both_bake_a_masked_linear_conv_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    ).eval()
    x = torch.randn(2, 1, 4, 4)
    hs.sparsify(model, 0.5, structure="channel_group", scope="layer", example_inputs=x)
    assert hs.masks(model)
    _bake_agreement(model, x)


def test_shrink_and_to_sparse_both_bake_a_masked_bert() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    hs.sparsify(model, 0.5, structure="neuron", scope="layer", example_inputs=x)
    _bake_agreement(model, x)


# ---------------------------------------------------------------------------------------------
# export/layer_rules.py: a new layer type is one rule object
# ---------------------------------------------------------------------------------------------


class ToyLinear(nn.Module):
    """A layer no built-in rule knows: ``F.linear`` on its own parameters."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * 0.3)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@pytest.fixture
def restore_layer_rules() -> object:
    """Undo the test's rule registrations (the registries are module-level)."""
    tables = (layer_registry._BY_TYPE, graph.MODULE_RULES)
    saved = [dict(t) for t in tables]
    weighted, labels = set(graph.WEIGHTED_MODULES), list(graph.LAYER_LABELS)
    yield
    for t, s in zip(tables, saved):
        t.clear()
        t.update(s)
    graph.WEIGHTED_MODULES.clear()
    graph.WEIGHTED_MODULES.update(weighted)
    graph.LAYER_LABELS[:] = labels


def test_a_new_layer_type_is_one_rule(restore_layer_rules: object) -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def make() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(ToyLinear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        with torch.no_grad():
            model[0].weight[4:12] = 0.0  # 8 neurons pruned (a baked model)
            model[0].weight[:4, ::2] = 0.0
        return model

    with torch.no_grad():
        ref = make()(x)
    # unknown: shrink leaves it whole, to_sparse does not see it, no channel group comes from it
    assert shrink(make(), x)[0].out_features == 16
    _, report = to_sparse(make(), max_density=1.0, return_report=True)
    assert [c.name for c in report] == ["2"]
    assert not any(k.startswith("0.") for k in hs.ChannelGroups(make(), x).members)

    @layer_rules.register_layer_rule(ToyLinear)
    class _ToyRule(layer_rules.LinearRule):  # flow, rebuild and members of nn.Linear
        label = "ToyLinear"

        def sparse(self, mod: nn.Module) -> layer_rules.SparseSpec | None:
            return layer_rules.SparseSpec("ToyLinear", lambda m: (m.weight.detach(), m.bias))

    assert _ToyRule.capabilities() == {"flow", "rebuild", "members", "sparse"}
    assert layer_rules.rule_of(ToyLinear(2, 2)).label == "ToyLinear"
    assert "ToyLinear" in layer_rules.supported("sparse") and "ToyLinear" in graph.LAYER_LABELS
    shrunk = shrink(make(), x)
    assert (shrunk[0].out_features, shrunk[2].in_features) == (8, 8) and type(shrunk[0]) is ToyLinear
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), ref, atol=ATOL, rtol=1e-5)
    sparse, report = to_sparse(make(), max_density=1.0, return_report=True)
    assert [(c.name, c.kind) for c in report] == [("0", "ToyLinear"), ("2", "Linear")]
    assert isinstance(sparse[0], SparseLinear)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), ref, atol=ATOL, rtol=1e-5)
    groups = hs.ChannelGroups(make(), x)
    assert {"0.weight", "0.bias", "2.weight"} <= set(groups.members)


def test_a_subclass_uses_its_base_rule_and_a_rule_declares_what_it_supports(
    restore_layer_rules: object,
) -> None:
    class MyConv(nn.Conv2d):
        pass

    assert isinstance(layer_rules.rule_of(MyConv(1, 2, 3)), layer_rules.ConvRule)  # along the MRO
    assert layer_rules.rule_of(nn.BatchNorm2d(3), "sparse") is None  # BatchNorm: no sparse form

    @layer_rules.register_layer_rule(ToyLinear)
    class _ShrinkOnly(layer_rules.ExportRule):
        label = "ToyLinear"

        def rebuild(self, new: nn.Module, mod: nn.Module, plan: object, removed: object) -> None:
            raise AssertionError("not planned: the rule has no flow")

    assert _ShrinkOnly.capabilities() == {"rebuild"}
    assert layer_rules.rule_of(ToyLinear(2, 2), "sparse") is None
    assert "ToyLinear" not in layer_rules.supported("sparse") and "ToyLinear" not in graph.LAYER_LABELS
    assert "ToyLinear" in layer_rules.supported("rebuild")
    # the former table and decorator still work, on top of the rule objects
    shrink_module = importlib.import_module("hadamard_sparse.export.shrink")
    assert shrink_module.REBUILD_RULES[nn.Linear].__func__ is layer_rules.LinearRule.rebuild

    @shrink_module.rebuild_rule(nn.BatchNorm1d)
    def legacy(new: nn.Module, mod: nn.Module, plan: object, removed: object) -> None:
        pass

    bn = layer_rules.rule_of(nn.BatchNorm1d(2))
    assert isinstance(bn, layer_rules.BatchNormRule) and bn.capabilities() >= {"flow", "rebuild", "members"}
    assert shrink_module.REBUILD_RULES[nn.BatchNorm1d].__func__ is not layer_rules.BatchNormRule.rebuild
