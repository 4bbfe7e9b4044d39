"""Baking (remove_parametrizations), state_dict round trips, dense checkpoints, sparse checkpoints."""

from __future__ import annotations

import code
import contextlib
import copy
import io
import json
import pickle
from html.parser import HTMLParser

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import hadamard_sparse as hs
from tests.conftest import LayerCase, mlp, small_cnn


def test_bake_is_bitwise_and_restores_classes(layer_case: LayerCase) -> None:
    model = layer_case.make()
    classes = {n: type(m) for n, m in model.named_modules()}
    hs.sparsify(model, 0.6, scope="layer")
    model.eval()
    x = layer_case.input()
    # Same autograd mode on both sides: some CPU kernels (LSTM with proj_size) pick their path
    # from whether the weights require grad.
    before = model(x).detach()
    masks = {k: v.clone() for k, v in hs.masks(model).items()}
    hs.remove_parametrizations(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    after = model(x).detach()
    assert torch.equal(before, after)
    sd = model.state_dict()
    for name, m in masks.items():
        assert torch.all(sd[name][~m] == 0), name
    assert hs.masks(model) == {}


def test_bake_then_pickle_save_script_export() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    hs.sparsify(model, 0.7)
    with pytest.raises(RuntimeError):
        pickle.dumps(model)  # parametrized modules refuse pickling (torch's rule)
    hs.remove_parametrizations(model)
    x = torch.randn(2, 1, 8, 8)
    ref = model(x)
    again = pickle.loads(pickle.dumps(model))
    assert torch.equal(again(x), ref)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), ref)
    assert torch.equal(torch.jit.script(model)(x), ref)
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), ref)


def test_bake_lstm_exports() -> None:
    # torch.jit.script cannot script even a plain nn.LSTM in torch 2.13 (overloaded forward), so the
    # baked LSTM is checked with torch.export, the supported path.
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 5, num_layers=2, bidirectional=True)
    hs.sparsify(lstm, 0.5)
    x = torch.randn(3, 2, 4)
    ref = lstm(x)[0]
    hs.remove_parametrizations(lstm)
    assert type(lstm) is nn.LSTM
    assert torch.equal(lstm(x)[0], ref)
    ep = torch.export.export(lstm, (x,))
    torch.testing.assert_close(ep.module()(x)[0], ref)


def test_bake_deepcopy_leaves_source_working() -> None:
    torch.manual_seed(0)
    model = mlp()
    hs.sparsify(model, 0.5)
    x = torch.randn(3, 8)
    ref = model(x)
    clone = copy.deepcopy(model)
    hs.remove_parametrizations(clone)
    assert torch.equal(model(x), ref)  # the source still has its parametrization
    assert parametrize.is_parametrized(model[0], "weight")
    hs.remove_parametrizations(model)
    assert torch.equal(model(x), ref)


def test_bake_keeps_parameter_objects_for_optimizers() -> None:
    model = mlp()
    before = {id(p) for p in model.parameters()}
    hs.sparsify(model, 0.5)
    hs.remove_parametrizations(model)
    assert {id(p) for p in model.parameters()} == before


def test_bake_threshold() -> None:
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1e-5, -2e-5, 0.5, -0.5]] * 4))
    hs.register_mask(lin)
    hs.remove_parametrizations(lin, threshold=1e-4)
    assert int((lin.weight == 0).sum()) == 8
    with pytest.raises(ValueError, match="threshold"):
        hs.remove_parametrizations(lin, threshold=-1)


def test_bake_leaves_foreign_parametrizations() -> None:
    class Double(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    lin = nn.Linear(3, 3)
    parametrize.register_parametrization(lin, "bias", Double())
    hs.register_mask(lin)
    hs.remove_parametrizations(lin)
    assert parametrize.is_parametrized(lin, "bias")
    assert not parametrize.is_parametrized(lin, "weight")


def test_state_dict_round_trip_strict_and_into_fresh_model(layer_case: LayerCase) -> None:
    model = layer_case.make()
    fresh_plain = layer_case.make()
    fresh_sparse = hs.sparsify(layer_case.make(), 0.1, method="random", scope="layer")
    hs.sparsify(model, 0.6, scope="layer")
    model.eval()
    sd = model.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    x = layer_case.input()
    with torch.no_grad():
        ref = model(x)
    masks_before = {k: v for k, v in hs.masks(fresh_sparse).items()}
    fresh_sparse.load_state_dict(sd, strict=True)
    for k, v in hs.masks(fresh_sparse).items():
        assert v is masks_before[k]  # loaded in place
    hs.load_sparse_state_dict(fresh_plain, sd)
    for m in (fresh_sparse, fresh_plain):
        m.eval()
        with torch.no_grad():
            assert torch.equal(m(x), ref)


def test_dense_checkpoint_loads_strict_into_sparsified_model() -> None:
    torch.manual_seed(0)
    pretrained = mlp()
    model = hs.sparsify(mlp(), 0.5)
    masks = {k: v.clone() for k, v in hs.masks(model).items()}
    model.load_state_dict(pretrained.state_dict(), strict=True)
    for k, v in hs.masks(model).items():
        assert torch.equal(v, masks[k])  # current masks kept
    assert torch.equal(model[0].parametrizations.weight.original, pretrained[0].weight)
    assert torch.equal(model[0].weight, pretrained[0].weight * masks["0.weight"])


def test_bad_state_dicts_are_refused_clearly() -> None:
    model = hs.sparsify(mlp(), 0.5)
    sd = model.state_dict()
    bad = dict(sd)
    bad["0.weight_mask"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"0.weight_mask.*shape \(3, 3\).*\(16, 8\)"):
        hs.sparsify(mlp(), 0.5).load_state_dict(bad)
    bad["0.weight_mask"] = torch.full((16, 8), 0.5)
    with pytest.raises(ValueError, match="torch.bool"):
        hs.sparsify(mlp(), 0.5).load_state_dict(bad)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    bad2 = dict(sd)
    bad2["0.weight_mask"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="does not fit"):
        hs.load_sparse_state_dict(plain, bad2)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())  # untouched
    with pytest.raises(ValueError, match="unexpected"):
        hs.load_sparse_state_dict(nn.Sequential(nn.Linear(8, 16)), sd)


def test_report_counts_and_formats() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    hs.sparsify(model, 0.75)
    rep = hs.sparsity_report(model)
    manual = {
        n: (int((p == 0).sum()), p.numel())
        for n, p in hs.remove_parametrizations(copy.deepcopy(model)).named_parameters()
        if n.endswith("weight")
    }
    assert {t.name: (t.zeros, t.numel) for t in rep.tensors} == manual
    assert rep.zeros == round(0.75 * rep.numel)
    assert rep["0.weight"].shape == (4, 1, 3, 3)
    text = str(rep)
    assert "0.weight" in text and "total" in text and "75.00%" in text
    d = rep.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["zeros"] == rep.zeros
    baked = hs.remove_parametrizations(model)
    assert hs.sparsity_report(baked).to_dict() == d


def test_report_shows_its_table_in_a_repl_and_a_notebook() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    hs.sparsify(model, 0.5, scope="layer")
    rep = hs.sparsity_report(model)
    # Counted by hand: 16x8 and 4x16 weights, half of each zero.
    rows = [
        ["tensor", "shape", "numel", "zeros", "sparsity"],
        ["0.weight", "16x8", "128", "64", "50.00%"],
        ["2.weight", "4x16", "64", "32", "50.00%"],
        ["total", "", "192", "96", "50.00%"],
    ]
    table = str(rep)
    assert [line.split() for line in table.splitlines() if not line.startswith("-")] == [
        [c for c in r if c] for r in rows
    ]
    # The plain interactive interpreter shows the last expression's repr: the table, not a dataclass dump.
    console = code.InteractiveConsole({"rep": rep})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        console.push("rep")
    assert out.getvalue() == table + "\n"
    # IPython and Jupyter: the same text as plain text, and an HTML table with the same cells.
    pytest.importorskip("IPython", reason="IPython's display formatter")
    from IPython.core.formatters import DisplayFormatter

    data, _ = DisplayFormatter().format(rep)
    assert data["text/plain"] == table

    class Cells(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[list[str]] = []

        def handle_starttag(self, tag: str, attrs: object) -> None:
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.rows[-1].append("")

        def handle_data(self, data: str) -> None:
            if self.rows and self.rows[-1]:
                self.rows[-1][-1] += data

    parser = Cells()
    parser.feed(data["text/html"])
    assert data["text/html"].startswith("<table>") and parser.rows == rows
