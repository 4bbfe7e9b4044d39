"""HadamardMask's mask in the compute dtype, cached per buffer version: values, gradients and invalidation."""

from __future__ import annotations

import copy
import gc
import io
import pickle

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

import hadamard_sparse as hs
from hadamard_sparse.parametrizations import _MASK_CACHE, HadamardMask
from tests.conftest import LayerCase, mlp


def reference(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients of the originals from a plain copy called with ``original * mask``."""
    with torch.no_grad():
        model(x)  # RNNs keep the last forward's weights in _flat_weights; deepcopy needs them without grad
    plain = hs.remove_parametrizations(copy.deepcopy(model))
    masks = hs.masks(model)
    originals = {}
    for name in masks:
        mod, _, attr = name.rpartition(".")
        sub = model.get_submodule(mod)
        originals[name] = sub.parametrizations[attr].original.detach().clone().requires_grad_()
    params = {name: originals[name] * masks[name].to(originals[name].dtype) for name in masks}
    out = functional_call(plain, params, (x,))
    out = out[0] if isinstance(out, tuple) else out
    out.square().sum().backward()
    return out.detach(), {name: t.grad for name, t in originals.items()}


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    out.square().sum().backward()
    grads = {}
    for name in hs.masks(model):
        mod, _, attr = name.rpartition(".")
        grads[name] = model.get_submodule(mod).parametrizations[attr].original.grad
    return out.detach(), grads


def assert_matches_reference(model: nn.Module, x: torch.Tensor) -> None:
    out, grads = run(model, x)
    ref_out, ref_grads = reference(model, x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0)


def test_every_layer_type_matches_functional_reference(layer_case: LayerCase) -> None:
    model = layer_case.make().eval()
    hs.sparsify(model, 0.6, min_keep=0)
    x = layer_case.input()
    assert_matches_reference(model, x)
    assert_matches_reference(model, x)  # second call: from the cache
    for s in (0.2, 0.9):  # in-place updates are followed
        hs.sparsify(model, s, min_keep=0)
        assert_matches_reference(model, x)


def test_gradcheck_float64() -> None:
    mask = torch.rand(5, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    p = HadamardMask(mask).double()
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(p, (w,))
    assert torch.autograd.gradgradcheck(p, (w,))
    torch.testing.assert_close(p(w), w * mask, rtol=0, atol=0)
    rows = HadamardMask(torch.tensor([[True], [False], [True], [True], [False]]))  # broadcast mask
    assert torch.autograd.gradcheck(rows, (w,))


def test_cache_follows_copy_and_load_state_dict() -> None:
    lin = nn.Linear(6, 5)
    pm = hs.register_mask(lin, "weight", torch.rand(5, 6) > 0.5)
    x = torch.randn(3, 6)
    w = lin.parametrizations.weight.original.detach()
    for _ in range(3):
        new = torch.rand(5, 6) > 0.5
        with torch.no_grad():
            pm.mask.copy_(new)
        torch.testing.assert_close(lin(x), x @ (w * new).T + lin.bias, rtol=0, atol=0)
    other = torch.rand(5, 6) > 0.5
    sd = lin.state_dict()  # the effective weight (zero where masked) and "weight_mask"
    sd["weight_mask"] = other
    lin.load_state_dict(sd)
    torch.testing.assert_close(lin.weight, sd["weight"] * other, rtol=0, atol=0)
    with torch.no_grad():
        pm.mask[0].fill_(False)  # an in-place write through a view bumps the version too
    assert not lin.weight[0].any()


def test_backward_uses_the_mask_of_its_forward() -> None:
    lin = nn.Linear(4, 3)
    pm = hs.register_mask(lin, "weight", torch.ones(3, 4, dtype=torch.bool))
    y = lin(torch.randn(2, 4)).sum()
    with torch.no_grad():
        pm.mask.zero_()
    y.backward()  # no version-counter error, and the gradient is the forward's (all ones)
    assert bool((lin.parametrizations.weight.original.grad != 0).all())


def test_dtype_and_device_changes() -> None:
    torch.manual_seed(0)
    model = mlp()
    hs.sparsify(model, 0.5, min_keep=0)
    x = torch.randn(4, 8)
    assert_matches_reference(model, x)
    model.double()
    assert_matches_reference(model, x.double())
    model.half()
    with torch.no_grad():
        out = model(x.half())
    assert out.dtype == torch.float16
    assert all(
        m.parametrizations.weight[0].mask.dtype == torch.bool for m in model if parametrize.is_parametrized(m)
    )
    model.float()
    assert_matches_reference(model, x)
    model.to("meta")  # a device move replaces the buffers
    assert model(x.to("meta")).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_move() -> None:
    torch.manual_seed(0)
    model = mlp()
    hs.sparsify(model, 0.5, min_keep=0)
    x = torch.randn(4, 8)
    ref = model(x)
    model.cuda()
    torch.testing.assert_close(model(x.cuda()).cpu(), ref)
    model.cpu()
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_inference_mode_then_training() -> None:
    torch.manual_seed(0)
    model = mlp()
    hs.sparsify(model, 0.5, min_keep=0)
    x = torch.randn(4, 8)
    with torch.inference_mode():
        ref = model(x)
    assert_matches_reference(model, x)  # the inference-mode conversion is not reused for autograd
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_compiled_and_eager_follow_updates() -> None:
    torch.manual_seed(0)
    model = mlp()
    hs.sparsify(model, 0.5, min_keep=0)
    x = torch.randn(4, 8)
    model(x)  # fill the eager cache first
    torch._dynamo.reset()
    cmodel = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for s in (0.5, 0.8, 0.1):
            hs.sparsify(model, s, min_keep=0)
            expected, _ = reference(model, x)
            torch.testing.assert_close(cmodel(x), expected, rtol=0, atol=0)
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_state_dict_deepcopy_and_pickle_unchanged_by_the_cache() -> None:
    torch.manual_seed(0)
    model = mlp()
    hs.sparsify(model, 0.5, min_keep=0)
    x = torch.randn(4, 8)
    keys = list(model.state_dict())
    pm = model[0].parametrizations.weight[0]  # parametrized modules themselves refuse pickling (torch)
    size = len(pickle.dumps(pm))
    model(x)
    assert list(model.state_dict()) == keys
    assert len(pickle.dumps(pm)) == size  # the converted mask is not pickled
    assert torch.equal(pickle.loads(pickle.dumps(pm)).mask, pm.mask)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = hs.sparsify(mlp(), 0.5, min_keep=0)
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    hs.sparsify(twin, 0.9, min_keep=0)  # the copy's masks are its own
    assert_matches_reference(twin, x)
    assert_matches_reference(model, x)


def test_cache_entries_go_with_their_module() -> None:
    lin = nn.Linear(8, 8)
    hs.register_mask(lin, "weight", torch.rand(8, 8) > 0.5)
    lin(torch.randn(1, 8))
    gc.collect()
    n = len(_MASK_CACHE)
    del lin
    gc.collect()
    assert len(_MASK_CACHE) == n - 1


def test_stored_only_for_repeated_training_forwards() -> None:
    """One-off and no_grad calls keep no converted mask; the second training forward stores it."""
    lin = nn.Linear(8, 8)
    pm = hs.register_mask(lin, "weight", torch.rand(8, 8) > 0.5)  # registration runs the forward once
    with torch.no_grad():
        lin(torch.randn(2, 8))
        lin(torch.randn(2, 8))
    assert _MASK_CACHE.get(pm) is None or _MASK_CACHE[pm][-1] is None
    lin(torch.randn(2, 8))
    lin(torch.randn(2, 8))
    stored = _MASK_CACHE[pm][-1]
    assert stored is not None and stored.dtype == torch.float32 and torch.equal(stored.bool(), pm.mask)
    with torch.no_grad():
        lin(torch.randn(2, 8))  # reuses it
        assert _MASK_CACHE[pm][-1] is stored
        pm.mask.copy_(~pm.mask)
    lin(torch.randn(2, 8))
    assert _MASK_CACHE[pm][-1] is None  # changed mask: remembered again, stored on the next call
