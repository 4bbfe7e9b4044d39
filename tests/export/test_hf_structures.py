"""Attention heads and FFN neurons on every Hugging Face family we test: found, masked exactly, shrunk exactly.

Families (tiny configs, nothing downloaded): GPT-2 (q/k/v packed in one ``Conv1D``, weight
``(in, out)``), T5 (encoder-decoder, self- and cross-attention, a per-head position-bias table; the
v1.1 / flan gated FFN too), Whisper (encoder-decoder, cross-attention), wav2vec2, and Llama with
grouped-query attention. References: the masked model against the dense model with the pruned
heads' outputs zeroed at the output projection's input (a forward pre-hook), and the shrunk model
against the masked model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse.export.heads import attention_blocks
from hadamard_sparse.layers import weight_dims
from tests.hf_models import llama_config, transformers

ATOL = 1e-5
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
DEC = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))


def gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0,
        use_cache=False, attn_implementation="eager",
    )  # fmt: skip
    return transformers.GPT2Model(cfg)


def t5(ffn: str = "relu") -> nn.Module:
    cfg = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj=ffn,
        use_cache=False, attn_implementation="eager",
    )  # fmt: skip
    return transformers.T5Model(cfg)


def whisper() -> nn.Module:
    cfg = transformers.WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
        max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, use_cache=False, attn_implementation="eager",
    )  # fmt: skip
    return transformers.WhisperModel(cfg)


def wav2vec2() -> nn.Module:
    cfg = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        attn_implementation="eager",
    )  # fmt: skip
    return transformers.Wav2Vec2Model(cfg)


def llama() -> nn.Module:
    cfg = llama_config(intermediate_size=48, use_cache=False, attn_implementation="eager")
    return transformers.LlamaModel(cfg)


#: name -> (builder, inputs, head groups, FFN (intermediate layer, output layer) of the first block)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], dict[str, torch.Tensor], int, tuple[str, str]]] = {
    "gpt2": (gpt2, {"input_ids": IDS}, 2 * 4, ("h.0.mlp.c_fc", "h.0.mlp.c_proj")),
    # T5: heads are tied across a stack (encoder self, decoder self, decoder cross): 3 x 4 groups
    "t5": (t5, {"input_ids": IDS, "decoder_input_ids": DEC}, 3 * 4,
           ("encoder.block.0.layer.1.DenseReluDense.wi", "encoder.block.0.layer.1.DenseReluDense.wo")),
    "t5-gated": (lambda: t5("gated-gelu"), {"input_ids": IDS, "decoder_input_ids": DEC}, 3 * 4,
                 ("encoder.block.0.layer.1.DenseReluDense.wi_1", "encoder.block.0.layer.1.DenseReluDense.wo")),
    "whisper": (whisper, {"input_features": torch.randn(2, 8, 32), "decoder_input_ids": DEC}, 6 * 4,
                ("encoder.layers.0.fc1", "encoder.layers.0.fc2")),
    "wav2vec2": (wav2vec2, {"input_values": torch.randn(2, 400)}, 2 * 4,
                 ("encoder.layers.0.feed_forward.intermediate_dense", "encoder.layers.0.feed_forward.output_dense")),
    "llama": (llama, {"input_ids": IDS}, 2 * 2, ("layers.0.mlp.up_proj", "layers.0.mlp.down_proj")),
}  # fmt: skip


def build(family: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    make, x, _, _ = FAMILIES[family]
    return make().eval(), x


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def outputs(model: nn.Module, x: dict[str, Any]) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = model(**x).to_tuple()
    return [o for o in out if isinstance(o, torch.Tensor)]


def assert_same(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=ATOL, rtol=1e-4)


def shrink_matches_masked(model: nn.Module, x: dict[str, Any]) -> nn.Module:
    ref = outputs(model, x)
    shrunk = hs.shrink(copy.deepcopy(model), x)
    assert_same(outputs(shrunk, x), ref)
    return shrunk


def features(model: nn.Module, name: str) -> tuple[int, int]:
    """``(outputs, inputs)`` of a Linear or HF ``Conv1D``."""
    w = model.get_submodule(name).weight
    od, id_ = weight_dims(model.get_submodule(name))
    return w.shape[od], w.shape[id_]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_attention_module_is_a_block_and_every_head_a_group(family: str) -> None:
    model, _ = build(family)
    names = [
        n
        for n, m in model.named_modules()
        if type(m).__name__.endswith("Attention") and "Layer" not in type(m).__name__  # not T5's wrappers
    ]
    blocks = attention_blocks(model)
    assert sorted(b.name for b in blocks) == sorted(names)
    assert hs.Heads(model).n == FAMILIES[family][2]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_masked_heads_contribute_nothing(family: str) -> None:
    """Reference: the dense model with the pruned heads' slices zeroed at the output projection's input."""
    model, x = build(family)
    dense = copy.deepcopy(model)
    hs.sparsify(model, 0.5, structure="head", scope="layer")
    masks = hs.masks(model)
    hooks = []
    for b in attention_blocks(dense):
        o = dense.get_submodule(b.o)
        in_dim = weight_dims(o)[1]
        mask = masks[b.o + ".weight"]
        alive = mask.any(dim=1 - in_dim)  # input columns of the output projection still read
        assert 0 < int(alive.sum()) < alive.numel()
        assert int(alive.sum()) % b.head_dim == 0
        hooks.append(o.register_forward_pre_hook(lambda _m, a, keep=alive: (a[0] * keep.to(a[0].dtype),)))
    assert_same(outputs(model, x), outputs(dense, x))
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_heads_masked_then_shrunk_compute_the_masked_model(family: str) -> None:
    model, x = build(family)
    b = attention_blocks(model)[0]
    hs.sparsify(model, 0.5, structure="head", scope="layer")
    before = n_params(model)
    shrunk = shrink_matches_masked(model, x)
    assert n_params(shrunk) < before
    for blk in attention_blocks(shrunk):
        assert blk.n_kv == b.n_kv // 2 and blk.n_heads == b.n_heads // 2
        assert features(shrunk, blk.o)[1] == b.n_heads // 2 * b.head_dim
        for mod_name, attr, _ in blk.attrs:  # num_heads / n_heads / split_size / inner_dim updated
            assert getattr(shrunk.get_submodule(mod_name), attr) in (
                b.n_heads // 2,
                b.n_kv // 2,
                b.n_heads // 2 * b.head_dim,
            )
    assert hs.Heads(shrunk).n == FAMILIES[family][2] // 2  # found again after shrink


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ffn_neurons_masked_then_shrunk(family: str) -> None:
    model, x = build(family)
    fc, proj = FAMILIES[family][3]
    width = features(model, fc)[0]
    hs.sparsify(model, 0.5, structure="neuron", example_inputs=x, scope="layer")
    masks = hs.masks(model)
    assert int((~masks[fc + ".weight"]).all(dim=weight_dims(model.get_submodule(fc))[1]).sum()) == width // 2
    before = n_params(model)
    shrunk = shrink_matches_masked(model, x)
    assert n_params(shrunk) < before
    assert features(shrunk, fc)[0] == features(shrunk, proj)[1] == width // 2


def test_t5_position_bias_columns_go_with_their_heads() -> None:
    model, x = build("t5")
    heads = hs.Heads(model)
    assert set(heads.labels) == {
        "encoder.block.*.layer.*.SelfAttention",
        "decoder.block.*.layer.*.SelfAttention",
        "decoder.block.*.layer.*.EncDecAttention",
    }
    hs.sparsify(model, 0.25, structure=heads, scope="layer")
    m = hs.masks(model)
    q0, q1 = (
        m["encoder.block.0.layer.0.SelfAttention.q.weight"],
        m["encoder.block.1.layer.0.SelfAttention.q.weight"],
    )
    assert torch.equal(q0, q1)  # one decision per head for the whole stack
    table = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.detach().clone()
    kept = [h for h in range(4) if bool(q0[h * 8 : (h + 1) * 8].any())]
    assert len(kept) == 3
    shrunk = shrink_matches_masked(model, x)
    att = shrunk.encoder.block[0].layer[0].SelfAttention
    assert att.n_heads == 3 and att.inner_dim == 24 and att.q.out_features == att.o.in_features == 24
    torch.testing.assert_close(att.relative_attention_bias.weight, table[:, kept])
    assert shrunk.decoder.block[1].layer[1].EncDecAttention.n_heads == 3


def test_gpt2_packed_c_attn_loses_the_same_head_in_q_k_and_v() -> None:
    model, x = build("gpt2")
    hs.sparsify(model, 0.5, structure="head", scope="layer")
    m = hs.masks(model)["h.0.attn.c_attn.weight"]  # (in, 3 * 32): q | k | v
    rows = m.any(dim=0)
    assert torch.equal(rows[:32], rows[32:64]) and torch.equal(rows[:32], rows[64:])
    shrunk = shrink_matches_masked(model, x)
    att = shrunk.h[0].attn
    assert att.c_attn.weight.shape == (32, 48) and att.c_attn.nf == 48 and att.split_size == 16
    assert att.num_heads == 2 and att.c_proj.weight.shape == (16, 32) and att.c_proj.nx == 16


def test_gradual_head_pruning_on_gpt2() -> None:
    model, x = build("gpt2")
    heads = hs.Heads(model)
    hs.sparsify(model, 0.0, structure=heads)
    sched = hs.GradualPruning(model, 0.5, end_step=4, every=2, structure=heads, scope="layer")
    alive = []
    for _ in range(6):
        sched.step()
        alive.append(int(hs.masks(model)["h.0.attn.c_proj.weight"].any(dim=1).sum()) // 8)
    assert alive[0] == 4 and alive[-1] == 2 and alive == sorted(alive, reverse=True)
    shrunk = shrink_matches_masked(model, x)
    assert shrunk.h[0].attn.num_heads == shrunk.h[1].attn.num_heads == 2


def test_heads_on_a_model_without_attention_says_so() -> None:
    class SelfAttention(nn.Module):  # one fused projection: no finder knows it
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(8, 24)

    model = nn.Sequential(nn.Linear(8, 8), SelfAttention())
    with pytest.raises(
        hs.NoTargetsError, match=r"no attention block.*look like attention.*1 \(SelfAttention\)"
    ):
        hs.Heads(model)
    with pytest.raises(hs.NoTargetsError, match="no attention block"):
        hs.sparsify(nn.Sequential(nn.Linear(8, 8)), 0.5, structure="head")
    assert not hs.masks(model)


def test_heads_warns_about_attention_it_does_not_know() -> None:
    class MyAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(8, 24)

    model = nn.Sequential(nn.MultiheadAttention(8, 2), MyAttention())
    with pytest.warns(UserWarning, match=r"look like attention.*1 \(MyAttention\)"):
        assert hs.Heads(model).n == 2


def test_gpt2_cross_attention_heads_q_attn_and_c_attn() -> None:
    torch.manual_seed(0)
    model = transformers.GPT2Model(
        transformers.GPT2Config(**{**gpt2().config.to_dict(), "add_cross_attention": True})
    )
    x = {"input_ids": IDS, "encoder_hidden_states": torch.randn(2, 4, 32)}
    model.eval()
    assert hs.Heads(model).n == 2 * 2 * 4  # self- and cross-attention of 2 layers
    hs.sparsify(model, 0.5, structure="head", scope="layer")
    shrunk = shrink_matches_masked(model, x)
    cross = shrunk.h[0].crossattention
    assert cross.q_attn.nf == 16 and cross.c_attn.nf == 32 and cross.split_size == 16 and cross.num_heads == 2


@pytest.mark.parametrize("config", ["gpt2", "llama"])
def test_shrink_of_a_decoder_with_its_default_cache(config: str) -> None:
    """Default configs return a generation cache object (not a tensor tree ``torch.export`` can output);
    the capture runs with ``use_cache=False`` unless the caller set it, so heads and neurons still go."""
    if config == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
        )
    else:
        cfg = llama_config(intermediate_size=48)
    model = transformers.AutoModel.from_config(cfg).eval()
    assert model.config.use_cache
    x = {"input_ids": IDS}
    hs.sparsify(model, 0.5, structure="head", scope="layer")
    hs.sparsify(model, 0.5, structure="neuron", example_inputs=x, scope="layer")
    before = n_params(model)
    with torch.no_grad():
        ref = model(**x).last_hidden_state
    shrunk = hs.shrink(copy.deepcopy(model), x)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(**x).last_hidden_state, ref, atol=ATOL, rtol=1e-4)
    assert n_params(shrunk) < before
