"""The bottom-floor model I/O helpers (issue 20): inputs, call, eval mode, submodule names."""

from __future__ import annotations

import ast
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse._model_io import (
    as_inputs,
    call_model,
    eval_mode,
    join_name,
    set_submodule,
    train_mode,
    unwrap_parallel,
)
from hadamard_sparse.recover.quality import embeddings


class _Args(nn.Module):
    """Returns what it was called with, so a test sees exactly how the inputs arrived."""

    def forward(self, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, kwargs


def test_each_input_form() -> None:
    x, y = torch.ones(2), torch.zeros(3)
    args, kwargs = as_inputs(x)
    assert args == (x,) and kwargs == {}
    for seq in ((x, y), [x, y]):
        args, kwargs = as_inputs(seq)
        assert type(args) is tuple and len(args) == 2 and args[0] is x and args[1] is y and kwargs == {}
    mapping = OrderedDict(a=x, b=y)  # any Mapping, not only dict
    args, kwargs = as_inputs(mapping)
    assert args == () and type(kwargs) is dict and kwargs == {"a": x, "b": y} and kwargs is not mapping
    assert as_inputs(()) == ((), {}) and as_inputs({}) == ((), {})


@pytest.mark.parametrize("bad", [3, "text", None, {1: torch.ones(1)}])
def test_other_inputs_are_refused_naming_the_argument(bad: Any) -> None:
    with pytest.raises(hs.InvalidTypeError, match=rf"my_arg must be a tensor.*got {type(bad).__name__}"):
        as_inputs(bad, name="my_arg")


def test_call_model_each_form() -> None:
    m, x = _Args(), torch.ones(2)
    assert call_model(m, x) == ((x,), {})
    assert call_model(m, (x, 1)) == ((x, 1), {})
    assert call_model(m, {"k": x}) == ((), {"k": x})


def test_a_sequential_given_a_mapping_gets_a_copy_of_it() -> None:
    """As sentence-transformers takes its features: one dict, a copy (it writes its outputs into it)."""
    seen: list[Any] = []

    class Record(nn.Module):
        def forward(self, features: dict[str, Any]) -> dict[str, Any]:
            seen.append(features)
            features["out"] = 1
            return features

    seq, batch = nn.Sequential(Record()), {"input_ids": torch.ones(1)}
    for model in (seq, nn.DataParallel(seq)):
        seen.clear()
        call_model(model, batch)
        assert len(seen) == 1 and seen[0] is not batch and seen[0]["input_ids"] is batch["input_ids"]
        assert batch == {"input_ids": batch["input_ids"]}  # untouched
    assert unwrap_parallel(nn.DataParallel(seq)) is seq and unwrap_parallel(seq) is seq
    # without the model, a mapping stays keyword inputs
    assert as_inputs(batch) == ((), batch)


def _mixed() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(), nn.Dropout()), nn.Dropout())
    model[1].eval()  # a frozen part inside a training model
    model[1][1].train()  # and a child that differs from its parent
    return model


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_eval_mode_restores_each_modules_own_flag() -> None:
    model = _mixed()
    before = _flags(model)
    assert before == [True, True, False, False, True, True]
    with eval_mode(model):
        assert _flags(model) == [False] * 6
    assert _flags(model) == before
    # train() on restore would have put model[1] and its children back to True
    with train_mode(model, mode=True):
        assert _flags(model) == [True] * 6
    assert _flags(model) == before


def test_eval_mode_restores_on_exception_and_takes_several_modules() -> None:
    a, b = _mixed(), nn.Dropout()
    before_a, before_b = _flags(a), b.training
    with pytest.raises(RuntimeError, match="boom"), eval_mode(a, b):
        assert _flags(a) == [False] * 6 and not b.training
        raise RuntimeError("boom")
    assert _flags(a) == before_a and b.training == before_b


def test_eval_mode_restores_a_shared_module_once() -> None:
    """A module under two parents: restoring with ``train()`` parent by parent would overwrite it."""
    shared = nn.Dropout().eval()
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    with eval_mode(model):
        pass
    assert not shared.training and model.training and model[1].training


def test_eval_mode_switches_dropout_off() -> None:
    model, x = nn.Dropout(0.9), torch.ones(1000)
    with eval_mode(model):
        assert torch.equal(model(x), x)
    assert not torch.equal(model(x), x)


def test_join_name_and_set_submodule() -> None:
    assert join_name("", "weight") == "weight"
    assert join_name("encoder.fc", "weight") == "encoder.fc.weight"
    assert join_name("a", "", "b") == "a.b"
    model = nn.Sequential(OrderedDict(enc=nn.Sequential(OrderedDict(fc=nn.Linear(2, 2)))))
    new = nn.Linear(2, 3)
    set_submodule(model, "enc.fc", new)
    assert model.get_submodule("enc.fc") is new
    top = nn.Identity()
    set_submodule(model, "enc", top)
    assert model.enc is top


def test_quality_embeddings_run_in_eval_mode_and_restore_each_flag() -> None:
    """``recover.quality.embeddings`` uses eval_mode: dropout off inside, every own flag back after
    (``model.train(was)`` would have set the frozen part back to training)."""
    torch.manual_seed(0)
    model = _mixed()
    before = _flags(model)
    batches = [torch.randn(3, 2), torch.randn(2, 2)]
    got = embeddings(model, batches)
    assert _flags(model) == before
    with eval_mode(model), torch.no_grad():
        want = torch.cat([model(b) for b in batches])
    assert torch.equal(got, want)


def test_only_model_io_saves_and_restores_training_flags() -> None:
    """One restore semantic: no module but _model_io keeps a ``.training`` flag to put it back later
    (``was = m.training`` ... ``m.train(was)``) or writes ``.training`` itself; they use eval_mode/train_mode."""
    package = Path(hs.__file__).parent
    bad = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "_model_io.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                writes = any(isinstance(t, ast.Attribute) and t.attr == "training" for t in targets)
                saves = isinstance(node.value, ast.Attribute) and node.value.attr == "training"
                if writes or saves:
                    bad.append(f"{path.relative_to(package)}:{node.lineno}")
    assert not bad, f"training flags saved or written by hand (use _model_io.eval_mode/train_mode): {bad}"
