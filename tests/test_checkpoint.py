"""Checkpoints of plain tensors: the plain view, prune interop, foreign parametrizations, atomic linear loading."""

from __future__ import annotations

import copy
import io
import time

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

import hadamard_sparse as hs
from tests.conftest import LayerCase, mlp, small_cnn


def _sparse_with_kept_zeros(layer_case: LayerCase) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A sparsified model in which some *kept* weights are exactly zero."""
    model = hs.sparsify(layer_case.make(), 0.5, scope="layer", method="random")
    with torch.no_grad():
        for module in model.modules():
            if parametrize.is_parametrized(module):
                for plist in module.parametrizations.values():
                    mask = plist[0].mask
                    first_kept = mask.flatten().nonzero()[0, 0]
                    plist.original.view(-1)[first_kept] = 0.0
    return model.eval(), {k: v.clone() for k, v in hs.masks(model, compact=True).items()}


def test_state_dict_is_the_baked_view_plus_masks(layer_case: LayerCase) -> None:
    model, masks = _sparse_with_kept_zeros(layer_case)
    sd = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    baked = hs.remove_parametrizations(copy.deepcopy(model)).state_dict()
    assert set(sd) == set(baked) | {f"{k}_mask" for k in masks}
    for k, v in baked.items():
        assert torch.equal(sd[k], v), k  # the effective tensors under the plain names
    for k, m in masks.items():
        assert sd[f"{k}_mask"].dtype == torch.bool and torch.equal(sd[f"{k}_mask"], m)
    # a plain model (no hadamard_sparse involved) loads the sparse model's outputs; only masks are unexpected
    plain = layer_case.make().eval()
    result = plain.load_state_dict(sd, strict=False)
    assert not result.missing_keys and sorted(result.unexpected_keys) == sorted(f"{k}_mask" for k in masks)
    x = layer_case.input()
    with torch.no_grad():  # equal up to kernel choice (a plain LSTM runs on flattened weights)
        torch.testing.assert_close(plain(x), model(x), rtol=1e-6, atol=1e-7)


def test_safetensors_round_trip_restores_masks_bitwise(layer_case: LayerCase) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, masks = _sparse_with_kept_zeros(layer_case)
    data = safetensors_torch.save(model.state_dict())
    fresh = hs.load_sparse_state_dict(layer_case.make().eval(), safetensors_torch.load(data))
    got = hs.masks(fresh, compact=True)
    assert got.keys() == masks.keys()
    assert all(torch.equal(got[k], masks[k]) for k in masks)  # kept zeros stay kept
    x = layer_case.input()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # and into the same (sparsified) model, strictly
    model.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_dense_values_at_pruned_positions_are_not_saved() -> None:
    torch.manual_seed(0)
    model = hs.sparsify(mlp(), 0.5)
    sd = model.state_dict()
    mask = model[0].parametrizations.weight[0].mask
    assert torch.all(sd["0.weight"][~mask] == 0)
    fresh = hs.load_sparse_state_dict(mlp(), sd)
    assert torch.equal(fresh[0].parametrizations.weight.original, sd["0.weight"])


def test_keep_vars_deepcopy_and_compile() -> None:
    torch.manual_seed(0)
    model = hs.sparsify(mlp(), 0.5)
    sd = model.state_dict(keep_vars=True)
    assert sd.keys() == model.state_dict().keys()
    assert sd["0.weight_mask"] is model[0].parametrizations.weight[0].mask  # the live buffer
    assert sd["0.bias"] is model[0].bias
    assert torch.equal(sd["0.weight"], model[0].weight)
    clone = copy.deepcopy(model)
    a, b = model.state_dict(), clone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    compiled = torch.compile(model, backend="eager")
    csd = compiled.state_dict()
    assert set(csd) == {f"_orig_mod.{k}" for k in a}
    compiled.load_state_dict(csd, strict=True)
    x = torch.randn(4, 8)
    assert torch.equal(compiled(x), clone(x))


def test_torch_save_of_a_state_dict_and_plain_tensor_code() -> None:
    torch.manual_seed(0)
    model = hs.sparsify(small_cnn(), 0.6)
    ema = {k: v.clone() for k, v in model.state_dict().items()}  # code that treats a state_dict as tensors
    avg = {k: (v + ema[k]) / 2 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(avg, buf)
    buf.seek(0)
    fresh = hs.load_sparse_state_dict(small_cnn(), torch.load(buf, weights_only=True))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("quant_first", [False, True])
def test_chains_of_factorization_mask_and_fake_quant_round_trip(quant_first: bool) -> None:
    torch.manual_seed(0)
    model = hs.factorize(mlp(), depth=2)
    if quant_first:
        hs.fake_quantize(model, bits=4)
        hs.sparsify(model, 0.5)
    else:
        hs.sparsify(model, 0.5)
        hs.fake_quantize(model, bits=4)
    sd = model.state_dict()
    assert sd["0.weight_fake_quant"].tolist() == [4, 0, 1 if quant_first else 2]
    assert sd["0.weight_factorization"].dtype == torch.int64
    assert {"0.weight_factor0", "0.weight_factor1", "0.weight"} <= set(sd)
    fresh = hs.load_sparse_state_dict(mlp(), sd)
    kinds = [type(p).__name__ for p in fresh[0].parametrizations.weight]
    expected = ["HadamardFactorization", "FakeQuant", "HadamardMask"]
    assert kinds == (expected if quant_first else [expected[0], expected[2], expected[1]])
    x = torch.randn(4, 8)
    assert torch.equal(fresh(x), model(x))
    other = hs.fake_quantize(hs.sparsify(hs.factorize(mlp(), depth=2), 0.5), bits=8)
    with pytest.raises(ValueError, match="FakeQuant"):
        other.load_state_dict(sd)


def test_reads_torch_prune_checkpoints() -> None:
    torch.manual_seed(0)
    pruned = mlp()
    for i in (0, 2, 4):
        prune.l1_unstructured(pruned[i], "weight", amount=0.6)
    sd = pruned.state_dict()
    assert sd["0.weight_mask"].dtype == torch.float32 and "0.weight_orig" in sd
    fresh = hs.load_sparse_state_dict(mlp(), sd)
    x = torch.randn(5, 8)
    assert torch.equal(fresh(x), pruned(x))
    for i in (0, 2, 4):
        assert torch.equal(hs.masks(fresh)[f"{i}.weight"], pruned[i].weight_mask.bool())
        assert torch.equal(
            fresh[i].parametrizations.weight.original, pruned[i].weight_orig
        )  # dense values too
    # and into a sparsified model with load_state_dict
    target = hs.sparsify(mlp(), 0.1)
    target.load_state_dict(sd, strict=True)
    assert torch.equal(target(x), pruned(x))


# ---------------------------------------------------------------------------------------------
# atomic, linear-time loading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("2.bias"), r"2.bias: missing"),
        (lambda sd: sd.__setitem__("9.weight", torch.zeros(3)), r"9.weight: unexpected"),
        (lambda sd: sd.__setitem__("4.weight", torch.zeros(3, 15)), r"4.weight: shape \(3, 15\)"),
        (
            lambda sd: sd.__setitem__("4.weight_mask", torch.ones(3, 15, dtype=torch.bool)),
            "does not broadcast",
        ),
        (lambda sd: sd.__setitem__("4.weight_mask", torch.full((3, 16), 0.5)), "torch.bool"),
        (lambda sd: sd.__setitem__("2.bias", torch.ones(16, dtype=torch.bool)), "2.bias: dtype"),
        (lambda sd: sd.__setitem__("2.bias", {"a": 1}), "2.bias: a dict"),
    ],
)
def test_refused_state_dict_leaves_fresh_model_unchanged(edit, match) -> None:
    torch.manual_seed(0)
    sd = dict(hs.sparsify(mlp(), 0.5).state_dict())
    edit(sd)
    fresh = mlp()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(hs.HadamardSparseError, match=match):
        hs.load_sparse_state_dict(fresh, sd)
    assert not any(parametrize.is_parametrized(m) for m in fresh.modules())
    after = fresh.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_non_strict_loading_skips_missing_and_unexpected() -> None:
    sd = dict(hs.sparsify(mlp(), 0.5).state_dict())
    sd.pop("2.bias")
    sd["extra"] = torch.zeros(1)
    fresh = hs.load_sparse_state_dict(mlp(), sd, strict=False)
    assert set(hs.masks(fresh)) == {"0.weight", "2.weight", "4.weight"}


def _deep(blocks: int, per_block: int) -> nn.Module:
    return nn.Sequential(
        *[nn.Sequential(*[nn.Linear(2, 2) for _ in range(per_block)]) for _ in range(blocks)]
    )


@pytest.mark.parametrize("blocks", [20, pytest.param(100, marks=pytest.mark.slow)], ids=["1000", "5000"])
def test_loading_many_layers_is_linear(blocks: int) -> None:
    torch.manual_seed(0)
    sd = dict(_deep(blocks, 50).state_dict())
    for k in [k for k in sd if k.endswith(".weight")]:
        sd[f"{k}_mask"] = torch.rand(2, 2) > 0.5
    fresh = _deep(blocks, 50)
    t0 = time.perf_counter()
    hs.load_sparse_state_dict(fresh, sd)
    took = time.perf_counter() - t0
    t0 = time.perf_counter()
    fresh.load_state_dict(sd)  # torch's own load of the same entries into the parametrized model, for scale
    plain = time.perf_counter() - t0
    got = hs.masks(fresh)
    last = f"{blocks - 1}.49.weight"
    assert len(got) == 50 * blocks and torch.equal(got[last], sd[f"{last}_mask"])
    # Was quadratic (58 s for 5,000 layers); now registration + checks + torch's load: a small multiple of the load.
    assert took < 5 * plain + 2.0, (took, plain)


# ---------------------------------------------------------------------------------------------
# foreign parametrizations
# ---------------------------------------------------------------------------------------------


class Scale(nn.Module):
    """A user parametrization with an exact right_inverse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3.0 * x

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x / 3.0


def _foreign(kind: str, lin: nn.Module) -> nn.Module:
    if kind == "weight_norm":
        return weight_norm(lin, "weight", dim=0)
    if kind == "spectral_norm":
        return spectral_norm(lin, "weight")
    if kind == "orthogonal":
        return orthogonal(lin, "weight")
    parametrize.register_parametrization(lin, "weight", Scale())
    return lin


def _foreign_mlp(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    _foreign(kind, model[0])
    return model


FOREIGN = ["weight_norm", "spectral_norm", "orthogonal", "user"]


@pytest.mark.parametrize("kind", FOREIGN)
def test_masks_stack_on_foreign_parametrizations_and_checkpoint(kind: str) -> None:
    model = hs.sparsify(_foreign_mlp(kind), 0.4, scope="layer").eval()
    chain = [type(p).__name__ for p in model[0].parametrizations.weight]
    assert chain[-1] == "HadamardMask" and len(chain) == 2
    x = torch.randn(4, 6)
    with torch.no_grad():
        ref = model(x)
        masked = model[0].weight
    assert torch.all(masked[~hs.masks(model)["0.weight"]] == 0)
    sd = model.state_dict()
    assert "0.weight" not in sd and "0.weight_mask" in sd  # their keys, as in the baked model
    fresh = _foreign_mlp(kind).eval()
    hs.load_sparse_state_dict(fresh, sd)
    assert torch.equal(hs.masks(fresh)["0.weight"], hs.masks(model)["0.weight"])
    again = _foreign_mlp(kind).eval()
    hs.sparsify(again, 0.9, method="random", scope="layer")
    again.load_state_dict(sd, strict=True)
    with torch.no_grad():
        if kind in ("weight_norm", "user"):  # they can represent the masked weight: same outputs
            torch.testing.assert_close(fresh(x), ref)
            torch.testing.assert_close(again(x), ref)
            torch.testing.assert_close(fresh[0].weight, masked)
        else:  # the mask still applies on top of whatever their chain gives
            assert torch.all(fresh[0].weight[~hs.masks(model)["0.weight"]] == 0)


@pytest.mark.parametrize("kind", ["weight_norm", "user"])
def test_bake_keeps_foreign_parametrizations_with_same_outputs(kind: str) -> None:
    model = hs.sparsify(_foreign_mlp(kind), 0.4, scope="layer").eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        ref = model(x)
        masked = model[0].weight.clone()
    hs.remove_parametrizations(model)
    chain = [type(p).__name__ for p in model[0].parametrizations.weight]
    assert chain == [("_WeightNorm" if kind == "weight_norm" else "Scale")]
    assert not parametrize.is_parametrized(model[2])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
        torch.testing.assert_close(model[0].weight, masked)
    # a plain model with their parametrization loads the baked checkpoint
    fresh = _foreign_mlp(kind).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref)


@pytest.mark.parametrize("kind", ["spectral_norm", "orthogonal"])
def test_bake_refuses_foreign_chains_that_cannot_hold_the_masked_value(kind: str) -> None:
    model = hs.sparsify(_foreign_mlp(kind), 0.4, scope="layer").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(hs.HadamardSparseError, match=r"0.weight.*remove theirs first"):
        hs.remove_parametrizations(model)
    assert parametrize.is_parametrized(model[2]) and len(model[0].parametrizations.weight) == 2
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_foreign_parametrization_after_the_mask_keeps_its_input() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    hs.register_mask(lin, "weight", torch.rand(6, 6) > 0.5)
    spectral_norm(lin, "weight")
    lin.eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        ref = lin(x)
    sd = lin.state_dict()
    fresh = nn.Linear(6, 6)
    hs.register_mask(fresh, "weight", torch.ones(6, 6, dtype=torch.bool))
    spectral_norm(fresh, "weight")
    fresh.eval()
    fresh.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref)
    hs.remove_parametrizations(lin)
    assert [type(p).__name__ for p in lin.parametrizations.weight] == ["_SpectralNorm"]
    with torch.no_grad():
        torch.testing.assert_close(lin(x), ref)
        assert int((lin.parametrizations.weight.original == 0).sum()) >= int(
            (~hs.masks(fresh)["weight"]).sum()
        )


def test_ddp_state_dict_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    torch.manual_seed(0)
    model = hs.sparsify(mlp(), 0.5)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        sd = ddp.state_dict()
        assert "module.0.weight_mask" in sd and "module.0.weight" in sd
        ddp.load_state_dict(sd, strict=True)
        fresh = hs.load_sparse_state_dict(mlp(), {k.removeprefix("module."): v for k, v in sd.items()})
        x = torch.randn(3, 8)
        assert torch.equal(fresh(x), ddp(x))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# torch.distributed.checkpoint's state_dict helpers (they map every key to a module attribute)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mask", "factorization", "fake_quant"])
def test_dcp_state_dict_helpers_accept_sparse_models(kind: str) -> None:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
    )

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = mlp()
        if kind == "factorization":
            hs.factorize(m)
        hs.sparsify(m, 0.5, method="random", seed=seed)
        if kind == "fake_quant":
            hs.fake_quantize(m, bits=4)
        return m

    src, dst = make(0), make(1)
    sd = get_model_state_dict(src)
    assert sd.keys() == src.state_dict().keys()
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in sd.items())
    set_model_state_dict(dst, sd)
    x = torch.randn(4, 8)
    torch.testing.assert_close(dst(x), src(x))
    assert all(torch.equal(a, b) for a, b in zip(hs.masks(src).values(), hs.masks(dst).values()))
    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    src(x).sum().backward()
    opt.step()
    model_sd, optim_sd = get_state_dict(src, opt)
    assert model_sd.keys() == src.state_dict().keys() and "state" in optim_sd
    with pytest.raises(AttributeError):
        _ = next(m for m in src.modules() if parametrize.is_parametrized(m)).weight_nonexistent
