"""Channel groups, FFN neurons and attention heads on real-style networks: masked == shrunk, refusals named.

Networks: a CREPE-style pitch CNN (F.pad, (k, 1) convs, ReLU then BatchNorm, max-pool, permute +
reshape into a Linear, an ``if embed:`` argument branch), a ResNet basic-block net (residual adds,
downsample shortcut), Hugging Face BERT / ViT / Llama (GQA) from tiny configs, and torch's
``nn.MultiheadAttention``. Each test compares the shrunk model with the masked model (the reference).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse.errors import UnsupportedGraphError
from tests.hf_models import bert_config, llama_config, transformers, vit_config

ATOL = 1e-5


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_bn(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


def outputs(model: nn.Module, x: object) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, tuple) else model(x)
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [o for o in out if isinstance(o, torch.Tensor)]


def shrink_matches_masked(model: nn.Module, x: object, example: object = None) -> nn.Module:
    """Shrink a deepcopy of the masked ``model``; assert it computes the masked model's outputs."""
    ref = outputs(model, x)
    shrunk = hs.shrink(copy.deepcopy(model), x if example is None else example)
    got = outputs(shrunk, x)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=ATOL, rtol=1e-4)
    return shrunk


# ---------------------------------------------------------------------------------------------
# networks written like published ones
# ---------------------------------------------------------------------------------------------


class CrepeLike(nn.Module):
    """torchcrepe's ``Crepe`` at a small capacity: frame -> 6 x (pad, conv (k,1), relu, BN, pool) -> Linear."""

    def __init__(self, capacity: int = 2, frame: int = 256) -> None:
        super().__init__()
        in_ch = [1, 32 * capacity, 4 * capacity, 4 * capacity, 4 * capacity, 8 * capacity]
        out_ch = [32 * capacity, 4 * capacity, 4 * capacity, 4 * capacity, 8 * capacity, 16 * capacity]
        kernels = [frame // 2] + 5 * [16]
        strides = [4] + 5 * [1]
        self.pads = [(0, 0, frame // 4 - 2, frame // 4 - 2)] + 5 * [(0, 0, 7, 8)]
        for i in range(6):
            setattr(self, f"conv{i + 1}", nn.Conv2d(in_ch[i], out_ch[i], (kernels[i], 1), (strides[i], 1)))
            setattr(
                self, f"conv{i + 1}_BN", nn.BatchNorm2d(out_ch[i], eps=0.0010000000474974513, momentum=0.0)
            )
        self.in_features = out_ch[-1] * (frame // 256)
        self.classifier = nn.Linear(self.in_features, 360)

    def layer(self, x: torch.Tensor, i: int) -> torch.Tensor:
        x = F.pad(x, self.pads[i])
        x = F.relu(getattr(self, f"conv{i + 1}")(x))
        x = getattr(self, f"conv{i + 1}_BN")(x)  # BatchNorm after ReLU, as in CREPE
        return F.max_pool2d(x, (2, 1), (2, 1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None, :, None]
        for i in range(5):
            x = self.layer(x, i)
        return x

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        x = self.embed(x)
        if embed:
            return x
        x = self.layer(x, 5)
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)  # torchcrepe: a width stored on the model
        return torch.sigmoid(self.classifier(x))


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: in-place ReLU, ``out += identity``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """torchvision's ResNet layout with two basic blocks per stage (residual adds, downsample shortcut)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def crepe() -> CrepeLike:
    torch.manual_seed(0)
    model = CrepeLike()
    randomize_bn(model)
    return model


# ---------------------------------------------------------------------------------------------
# channel groups on CNNs
# ---------------------------------------------------------------------------------------------


def test_crepe_channel_groups_discover_every_conv_and_shrink_exactly() -> None:
    model = crepe()
    x = torch.randn(4, 256)
    groups = hs.ChannelGroups(model, x[:1])
    # every conv channel is a group (CREPE has no residuals); the classifier's outputs are not
    assert groups.n == sum(getattr(model, f"conv{i}").out_channels for i in range(1, 7))
    assert {"conv1.weight", "conv1.bias", "conv1_BN.weight", "conv1_BN.bias", "classifier.weight"} <= set(
        groups.members
    )
    hs.sparsify(model, 0.5, structure=groups, scope="layer")
    m = hs.masks(model)
    # a pruned channel is masked everywhere it lives: filter, bias, BN affine, next layer's inputs
    dead = ~m["conv2.bias"]
    assert int(dead.sum()) == model.conv2.out_channels // 2
    assert not m["conv2_BN.weight"][dead].any() and not m["conv2_BN.bias"][dead].any()
    assert not m["conv3.weight"][:, dead].any()
    before = n_params(model)
    shrunk = shrink_matches_masked(model, x, x[:1])
    assert shrunk.conv2.out_channels == shrunk.conv2_BN.num_features == shrunk.conv3.in_channels
    assert shrunk.conv2.out_channels == model.conv2.out_channels // 2
    assert shrunk.in_features == shrunk.classifier.in_features == model.classifier.in_features // 2
    assert n_params(shrunk) <= 0.40 * before
    # the argument branch: the embedding path still works on the shrunk model
    assert outputs(shrunk, (x, True))[0].shape[1] == shrunk.conv5.out_channels


def test_crepe_hardcoded_width_is_refused_naming_the_reshape() -> None:
    class Hardcoded(CrepeLike):
        def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
            x = self.layer(self.embed(x), 5)
            return torch.sigmoid(self.classifier(x.permute(0, 2, 1, 3).reshape(-1, 32)))  # 32: hard-coded

    torch.manual_seed(0)
    model = Hardcoded()
    randomize_bn(model)
    x = torch.randn(2, 256)
    hs.sparsify(model, 0.5, structure="channel_group", example_inputs=x, scope="layer")
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(UnsupportedGraphError, match="reshape.*constant 32"):
        hs.shrink(model, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # unchanged
    assert hs.masks(model)


def test_resnet_groups_tie_residual_branches() -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    randomize_bn(model)
    x = torch.randn(2, 3, 16, 16)
    groups = hs.ChannelGroups(model, x)
    stage1 = {"conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight"}
    rows = [groups.members[n].rows for n in sorted(stage1)]
    assert all(torch.equal(rows[0], r) for r in rows)  # one group per residual channel
    hs.sparsify(model, 0.5, structure=groups, scope="layer")
    before = n_params(model)
    shrunk = shrink_matches_masked(model, x)
    assert shrunk.layer1[0].conv1.out_channels == 8
    assert shrunk.conv1.out_channels == shrunk.layer1[1].conv2.out_channels < 16
    assert n_params(shrunk) < 0.5 * before


@pytest.mark.parametrize("schedule", ["gradual", "iterative"])
def test_schedules_prune_channel_groups_with_bias_and_batchnorm(schedule: str) -> None:
    model = crepe()
    x = torch.randn(2, 256)
    groups = hs.ChannelGroups(model, x)
    hs.sparsify(model, 0.0, structure=groups)  # all-ones masks on every member
    if schedule == "gradual":
        sched = hs.GradualPruning(model, 0.5, end_step=4, every=2, structure=groups, scope="layer")
    else:
        sched = hs.IterativePruning(
            model, rounds=2, final_sparsity=0.5, every=2, structure=groups, scope="layer"
        )
    for _ in range(6):
        sched.step()
    m = hs.masks(model)
    assert int((~m["conv2.bias"]).sum()) == model.conv2.out_channels // 2
    shrink_matches_masked(model, x)


# ---------------------------------------------------------------------------------------------
# transformers: FFN neurons and heads
# ---------------------------------------------------------------------------------------------


def bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = bert_config(num_attention_heads=4, attn_implementation="eager")
    return transformers.BertModel(cfg).eval()


def bert_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_bert_ffn_neurons_and_heads_shrink_exactly() -> None:
    model = bert()
    x = bert_inputs()
    neurons = hs.ChannelGroups(model, x, layers="linear")
    assert neurons.n == 2 * 64  # the intermediate neurons only: q/k/v go into heads, the rest into LayerNorm
    hs.sparsify(model, 0.75, structure=neurons, scope="layer")
    heads = hs.Heads(model)
    assert heads.n == 2 * 4
    hs.sparsify(model, 0.5, structure=heads, scope="layer")
    before = n_params(model)
    shrunk = shrink_matches_masked(model, x)
    layer = shrunk.encoder.layer[0]
    assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 16
    att = layer.attention
    assert att.self.num_attention_heads == 2 and att.self.all_head_size == 16
    assert att.self.query.out_features == att.output.dense.in_features == 16
    assert n_params(shrunk) < before


def test_vit_heads_and_neurons() -> None:
    torch.manual_seed(0)
    cfg = vit_config(num_attention_heads=4, patch_size=8, attn_implementation="eager")
    model = transformers.ViTModel(cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    hs.sparsify(model, 0.5, structure="neuron", example_inputs=x, scope="layer")
    hs.sparsify(model, 0.25, structure="head", scope="layer")
    shrunk = shrink_matches_masked(model, x)
    att = shrunk.layers[0].attention
    assert att.q_proj.out_features == att.o_proj.in_features == 24
    assert shrunk.layers[0].mlp.fc1.out_features == 32


def test_llama_gqa_heads_go_with_their_kv_head() -> None:
    torch.manual_seed(0)
    cfg = llama_config(
        num_hidden_layers=1, intermediate_size=48, attn_implementation="eager", use_cache=False
    )
    model = transformers.LlamaModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 6))
    heads = hs.Heads(model)
    assert heads.n == 2  # one group per kv head (2 query heads each)
    hs.sparsify(model, 0.5, structure=heads)
    neurons = hs.ChannelGroups(model, {"input_ids": ids}, layers="linear")
    gate, up = (
        neurons.members["layers.0.mlp.gate_proj.weight"],
        neurons.members["layers.0.mlp.up_proj.weight"],
    )
    assert neurons.n == 48 and torch.equal(gate.rows, up.rows)  # SwiGLU: act(gate) * up ties the two rows
    hs.sparsify(model, 0.5, structure=neurons)
    shrunk = shrink_matches_masked(model, {"input_ids": ids})
    att = shrunk.layers[0].self_attn
    assert (att.q_proj.out_features, att.k_proj.out_features, att.o_proj.in_features) == (16, 8, 16)
    assert att.num_key_value_groups == 2
    mlp = shrunk.layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 24


def _mha_reference(mha: nn.MultiheadAttention, x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """Self-attention computed head by head from the dense weights, summing only ``heads`` (plus out bias)."""
    e, d = mha.embed_dim, mha.head_dim
    w = mha.in_proj_weight.detach()  # baked effective weights are not used: dense weights, kept heads only
    b = mha.in_proj_bias.detach()
    wo, bo = mha.out_proj.weight.detach(), mha.out_proj.bias.detach()
    out = bo.expand(x.shape[0], x.shape[1], e).clone()
    for h in heads:
        rows = slice(h * d, (h + 1) * d)
        q = x @ w[:e][rows].t() + b[:e][rows]
        k = x @ w[e : 2 * e][rows].t() + b[e : 2 * e][rows]
        v = x @ w[2 * e :][rows].t() + b[2 * e :][rows]
        att = torch.softmax(q @ k.transpose(1, 2) / d**0.5, dim=-1)
        out = out + (att @ v) @ wo[:, rows].t()
    return out


def test_multihead_attention_heads_are_masked_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(16, 4, batch_first=True))
    dense = copy.deepcopy(model[0])
    heads = hs.Heads(model)
    assert heads.n == 4
    hs.sparsify(model, 0.5, structure=heads)
    kept = [h for h in range(4) if bool(hs.masks(model)["attn.in_proj_weight"][h * 4].any())]
    assert len(kept) == 2
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        out, _ = model[0](x, x, x)
        torch.testing.assert_close(out, _mha_reference(dense, x, kept), atol=ATOL, rtol=1e-4)


def test_bert_pruned_query_rows_are_refused_naming_the_view_and_layer() -> None:
    model = bert()
    x = bert_inputs()
    hs.sparsify(model, 0.25, structure="row", include=["encoder.layer.0.attention.self.query"], scope="layer")
    with pytest.raises(UnsupportedGraphError, match="'view' in layer 'encoder.layer.0.attention.self'"):
        hs.shrink(model, x)
    assert hs.masks(model)  # unchanged: still masked


def test_head_string_structure_needs_no_inputs_but_channel_group_does() -> None:
    model = bert()
    with pytest.raises(ValueError, match="example_inputs"):
        hs.sparsify(model, 0.5, structure="channel_group")
    with pytest.raises(ValueError, match="built from the model"):
        hs.GradualPruning(model, 0.5, structure="head")


class SeparableCat(nn.Module):
    """MobileNet-style depthwise-separable block and an Inception-style concatenation of two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.dw_bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.branch_a = nn.Conv2d(24, 8, 1)
        self.branch_b = nn.Conv2d(24, 8, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu6(self.dw_bn(self.dw(x)))
        x = F.relu(self.pw(x))
        x = torch.cat([F.relu(self.branch_a(x)), F.relu(self.branch_b(x))], dim=1)
        return self.head(x.mean(dim=(2, 3)))


def test_depthwise_and_concatenation_groups() -> None:
    torch.manual_seed(0)
    model = SeparableCat()
    randomize_bn(model)
    x = torch.randn(2, 3, 8, 8)
    groups = hs.ChannelGroups(model, x)
    # the stem's channel runs through its BN, the depthwise conv and its BN: one group each
    assert groups.members["stem.weight"].rows.tolist() == groups.members["dw.weight"].rows.tolist()
    assert groups.n == 16 + 24 + 8 + 8
    hs.sparsify(model, 0.5, structure=groups, scope="layer")
    shrunk = shrink_matches_masked(model, x)
    assert shrunk.dw.groups == shrunk.dw.in_channels == shrunk.dw.out_channels == 8
    assert shrunk.head.in_features == 8


def test_channel_group_masks_round_trip_through_a_checkpoint() -> None:
    model = crepe()
    x = torch.randn(2, 256)
    hs.sparsify(model, 0.5, structure="channel_group", example_inputs=x, scope="layer")
    fresh = CrepeLike()
    hs.load_sparse_state_dict(fresh, model.state_dict())
    for name, mask in hs.masks(model, compact=True).items():
        assert torch.equal(hs.masks(fresh, compact=True)[name], mask)
    torch.testing.assert_close(outputs(fresh, x)[0], outputs(model, x)[0])


def test_include_and_exclude_select_groups() -> None:
    model = crepe()
    x = torch.randn(2, 256)
    hs.sparsify(model, 0.5, structure="channel_group", example_inputs=x, scope="layer", exclude="conv1*")
    m = hs.masks(model)
    assert "conv1.weight" not in m and "conv1_BN.bias" not in m  # conv1's channels are never pruned
    assert int((~m["conv2.bias"]).sum()) == model.conv2.out_channels // 2
    fresh = crepe()
    hs.sparsify(fresh, 0.5, structure="channel_group", example_inputs=x, scope="layer", include="conv3")
    assert {k.rpartition(".")[0] for k in hs.masks(fresh)} == {"conv3", "conv3_BN", "conv4"}
    with pytest.raises(hs.InvalidArgumentError, match="include entry 'nothing' matches no"):
        hs.sparsify(crepe(), 0.5, structure="channel_group", example_inputs=x, include="nothing")
    with pytest.raises(hs.NoTargetsError, match="no group left"):
        hs.sparsify(
            crepe(), 0.5, structure="channel_group", example_inputs=x, include="conv1", exclude="conv1*"
        )


def test_groups_built_for_another_model_are_refused() -> None:
    model = crepe()
    x = torch.randn(2, 256)
    groups = hs.ChannelGroups(model, x)
    hs.sparsify(model, 0.5, structure=groups, scope="layer")
    small = hs.shrink(copy.deepcopy(model), x)
    with pytest.raises(ValueError, match="build it again"):
        hs.sparsify(small, 0.5, structure=groups)
    assert not hs.masks(small)


class ResNeXtBlock(nn.Module):
    """A ResNeXt bottleneck (1x1 -> grouped 3x3 -> 1x1, BatchNorm after each, residual add), in 2-D or 1-D."""

    def __init__(self, c: int = 16, width: int = 24, groups: int = 4, dims: int = 2) -> None:
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.stem = conv(3, c, 3, padding=1)
        self.stem_bn = bn(c)
        self.reduce = conv(c, width, 1, bias=False)
        self.reduce_bn = bn(width)
        self.grouped = conv(width, width, 3, padding=1, groups=groups, bias=False)
        self.grouped_bn = bn(width)
        self.expand = conv(width, c, 1, bias=False)
        self.expand_bn = bn(c)
        self.head = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        h = F.relu(self.reduce_bn(self.reduce(x)))
        h = F.relu(self.grouped_bn(self.grouped(h)))
        x = F.relu(x + self.expand_bn(self.expand(h)))
        return self.head(x.flatten(2).mean(-1))


@pytest.mark.parametrize("dims", [2, 1], ids=["Conv2d", "Conv1d"])
def test_resnext_grouped_conv_channel_groups_shrink_exactly(dims: int) -> None:
    torch.manual_seed(0)
    model = ResNeXtBlock(dims=dims)
    randomize_bn(model)
    x = torch.randn(2, 3, 8, 8) if dims == 2 else torch.randn(2, 3, 20)
    groups = hs.ChannelGroups(model, x)
    # the grouped conv couples channel j of each of its 4 groups (6 channels per group): 6 groups of the
    # reduce conv's 24 channels, 6 of its own 24 outputs
    rows = groups.members["reduce.weight"].rows
    assert rows.view(4, 6).eq(rows.view(4, 6)[0]).all() and len(set(rows.tolist())) == 6
    assert groups.members["grouped.weight"].cols.tolist() == rows[:6].tolist()
    hs.sparsify(model, 0.5, structure=groups, scope="layer")
    shrunk = shrink_matches_masked(model, x)
    g = shrunk.grouped
    assert g.groups == 4 and (g.in_channels, g.out_channels) == (12, 12)
    assert g.weight.shape[:2] == (12, 3) and shrunk.reduce.out_channels == 12
    assert shrunk.grouped_bn.num_features == 12 and shrunk.expand.in_channels == 12
    assert n_params(shrunk) < n_params(model)


def test_gradual_pruning_of_resnext_channel_groups() -> None:
    torch.manual_seed(0)
    model = ResNeXtBlock()
    randomize_bn(model)
    x = torch.randn(2, 3, 8, 8)
    groups = hs.ChannelGroups(model, x)
    hs.sparsify(model, 0.0, structure=groups)  # all-ones masks on every member
    sched = hs.GradualPruning(model, 0.5, end_step=4, every=2, structure=groups, scope="layer")
    for _ in range(6):
        sched.step()
    gone = ~hs.masks(model)["grouped_bn.bias"]
    assert int(gone.sum()) == 12 and gone.view(4, 6).eq(gone.view(4, 6)[0]).all()  # group-aligned
    shrunk = shrink_matches_masked(model, x)
    assert (shrunk.grouped.in_channels, shrunk.grouped.out_channels, shrunk.grouped.groups) == (12, 12, 4)


def test_grouped_conv_with_unaligned_pruning_keeps_the_channels_exactly() -> None:
    """Rows pruned in one group only: removing them would make the groups unequal, so they stay (exact)."""
    torch.manual_seed(0)
    model = ResNeXtBlock()
    randomize_bn(model)
    x = torch.randn(2, 3, 8, 8)
    # 4 groups of 6 channels: channel 1 of every group (1, 7, 13, 19) is pruned and goes; channel 0 is
    # pruned in group 0 only and stays (its coupled channels 6, 12, 18 are live).
    hs.register_mask(model.reduce, "weight")
    hs.register_mask(model.reduce_bn, "weight")
    hs.register_mask(model.reduce_bn, "bias")
    pruned = [0, 1, 7, 13, 19]
    with torch.no_grad():
        for t in (
            model.reduce.parametrizations.weight[0].mask,
            model.reduce_bn.parametrizations.weight[0].mask,
        ):
            t[pruned] = False
        model.reduce_bn.parametrizations.bias[0].mask[pruned] = False
    shrunk = shrink_matches_masked(model, x)
    assert shrunk.reduce.out_channels == 20 and shrunk.grouped.in_channels == 20
    assert shrunk.grouped.groups == 4 and shrunk.grouped.weight.shape[1] == 5


@pytest.mark.parametrize("dims", [2, 1], ids=["Conv2d", "Conv1d"])
def test_grouped_conv_folds_each_groups_constant_channels_into_its_own_rows(dims: int) -> None:
    """Removed channels that carry a constant (BN bias through ReLU): each group's output rows get
    their own group's constants in the bias (a grouped conv with a bias)."""
    torch.manual_seed(0)
    model = ResNeXtBlock(dims=dims)
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    model.grouped = conv(24, 24, 1, groups=4, bias=True)  # 1x1: no zero padding, so constants fold
    randomize_bn(model)
    with torch.no_grad():
        model.reduce_bn.bias.copy_(torch.linspace(0.5, 3.0, 24))  # every channel's constant differs (> 0)
    x = torch.randn(2, 3, 8, 8) if dims == 2 else torch.randn(2, 3, 20)
    hs.register_mask(model.reduce, "weight")
    hs.register_mask(model.reduce_bn, "weight")
    pruned = [1, 7, 13, 19, 4, 10, 16, 22]  # channels 1 and 4 of every group: relu(bias) constants
    with torch.no_grad():
        for t in (
            model.reduce.parametrizations.weight[0].mask,
            model.reduce_bn.parametrizations.weight[0].mask,
        ):
            t[pruned] = False
    shrunk = shrink_matches_masked(model, x)  # exact against the masked model
    assert (shrunk.grouped.in_channels, shrunk.grouped.groups) == (16, 4)
    assert not torch.equal(shrunk.grouped.bias, model.grouped.bias)  # the constants went into the bias


class PermutedGrouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.grouped = nn.Conv2d(6, 4, 1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 6, 5, 4); fc's features land on W
        return self.grouped(self.fc(x))


def test_grouped_conv_refusal_names_the_layer() -> None:
    """Pruned features reaching a grouped conv on a spatial dimension: refused, naming the conv."""
    torch.manual_seed(0)
    model = PermutedGrouped()
    hs.register_mask(model.fc, "weight")
    with torch.no_grad():
        model.fc.parametrizations.weight[0].mask[:2] = False
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedGraphError, match="layer 'grouped' \\(Conv2d\\).*input-channel dimension"):
        hs.shrink(model, torch.randn(2, 6, 5, 4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
