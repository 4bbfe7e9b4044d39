"""sparsify(..., allocation="owl"): OWL's per-layer sparsities (Yin et al. 2024) against a hand-written reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse.allocation import owl_sparsities
from hadamard_sparse.calibration import calibrate
from hadamard_sparse.layers import resolve_targets
from tests.hf_models import bert_config

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def _bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = bert_config(num_hidden_layers=3)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # give the layers different outlier ratios
        model.encoder.layer[1].intermediate.dense.weight[:, :3] *= 8.0
    return model


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, 64, (2, 10), generator=g)} for _ in range(4)]


def _reference(model: nn.Module, batches: list, sparsity: float, lam: float = 0.08, m: float = 5.0) -> dict:
    """OWL as in the paper's code, per encoder layer, from inputs gathered with plain forward hooks."""
    sq: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):

            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[name] = sq.get(name, 0) + x.square().sum(0)

            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    groups: dict[str, list[str]] = {}
    for name in sq:
        key = ".".join(name.split(".")[:3]) if name.startswith("encoder.layer.") else name
        groups.setdefault(key, []).append(name)
    mods = dict(model.named_modules())
    ratios, sizes = {}, {}
    for key, names in groups.items():
        s = torch.cat([(mods[n].weight.double().abs() * sq[n].sqrt()[None]).flatten() for n in names])
        ratios[key] = float((s > m * s.mean()).sum()) / s.numel()
        sizes[key] = s.numel()
    lo, hi = min(ratios.values()), max(ratios.values())
    dens = {k: (r - lo) / (hi - lo) * 2 * lam for k, r in ratios.items()}
    mean = sum(dens[k] * sizes[k] for k in dens) / sum(sizes.values())
    per_group = {k: min(1.0, max(0.0, 1 - (d - mean + 1 - sparsity))) for k, d in dens.items()}
    return {f"{n}.weight": per_group[k] for k, names in groups.items() for n in names}


def test_owl_sparsities_match_the_reference() -> None:
    model, batches = _bert(), _batches()
    targets = resolve_targets(model, None, None)
    got = owl_sparsities(model, targets, 0.5, calibrate(model, batches))
    ref = _reference(model, batches, 0.5)
    assert set(ref) == {t.qualified for t in targets}
    for t, sp in zip(targets, got):
        assert sp == pytest.approx(ref[t.qualified], abs=1e-6), t.qualified
    sizes = torch.tensor([t.value().numel() for t in targets], dtype=torch.float64)
    assert float((torch.tensor(got, dtype=torch.float64) * sizes).sum() / sizes.sum()) == pytest.approx(0.5)
    layer_sp = [got[i] for i, t in enumerate(targets) if t.qualified.endswith("intermediate.dense.weight")]
    assert layer_sp[1] == min(layer_sp)  # the layer with the outliers is pruned least


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
def test_sparsify_owl_prunes_each_tensor_at_its_allocated_sparsity(method: str) -> None:
    model, batches = _bert(), _batches()
    targets = resolve_targets(model, None, None)
    expect = dict(
        zip([t.qualified for t in targets], owl_sparsities(model, targets, 0.6, calibrate(model, batches)))
    )
    scope = "row"
    hs.sparsify(model, 0.6, method=method, scope=scope, calibration=batches, allocation="owl")
    for name, keep in hs.masks(model).items():
        n_in = keep.shape[1]
        pruned = (~keep).sum(1)
        assert bool((pruned == round(expect[name] * n_in)).all()), name


def test_uniform_is_the_default() -> None:
    model, batches = _bert(), _batches()
    a = hs.sparsify(copy.deepcopy(model), 0.5, method="wanda", calibration=batches)
    b = hs.sparsify(copy.deepcopy(model), 0.5, method="wanda", calibration=batches, allocation="uniform")
    for (na, ma), (nb, mb) in zip(hs.masks(a).items(), hs.masks(b).items()):
        assert na == nb and torch.equal(ma, mb)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"allocation": "outliers", "method": "wanda"},
        {"allocation": "owl", "method": "magnitude", "scope": "row"},  # no calibration
        {"allocation": "owl", "method": "wanda", "structure": "2:4", "calib": True},
        {"allocation": "owl", "method": "wanda", "distribution": "erk", "calib": True},
        {"allocation": "owl", "method": "magnitude", "scope": "global", "calib": True},
    ],
)
def test_refused_allocations_leave_the_model_unchanged(kwargs: dict) -> None:
    model = _bert()
    kwargs = dict(kwargs)
    if kwargs.pop("calib", False) or kwargs["method"] == "wanda":
        kwargs["calibration"] = _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(hs.HadamardSparseError):
        hs.sparsify(model, 0.5, **kwargs)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not hs.masks(model)
