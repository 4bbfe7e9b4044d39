"""What a recovery recipe needs from the schedules: include/exclude on every schedule (tiny HF BERT),
the learning rate restarting at every pruning step and the default training length (hand-computed values)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse.errors import InvalidArgumentError, NoTargetsError
from hadamard_sparse.schedules import (
    SET,
    GradualPruning,
    IterativePruning,
    RestartingLR,
    RigL,
    recovery_steps,
    restart_factor,
    update_steps,
)
from tests.hf_models import bert_config, transformers


def _bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = bert_config(max_position_embeddings=16)
    return hs.sparsify(transformers.BertModel(cfg), 0.0)


def _zeros(model: nn.Module) -> dict[str, int]:
    return {k: int((~m).sum()) for k, m in hs.masks(model).items()}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _make(kind: str, model: nn.Module, **kw: object) -> object:
    if kind == "gradual":
        return GradualPruning(model, 0.5, start_step=0, end_step=2, every=1, **kw)
    if kind == "iterative":
        return IterativePruning(model, rounds=1, final_sparsity=0.5, every=1, **kw)
    if kind == "set":
        return SET(model, 0.5, every=1, distribution="uniform", **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return RigL(model, opt, 0.5, every=1, distribution="uniform", **kw)


def _advance(kind: str, model: nn.Module, sched: object) -> None:
    for _ in range(2):
        if kind == "rigl":
            out = model(input_ids=torch.randint(0, 64, (2, 8)))
            (out.last_hidden_state.sum() + out.pooler_output.sum()).backward()
        sched.step()  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["gradual", "iterative", "set", "rigl"])
def test_include_exclude_drive_only_the_selected_masks(kind: str) -> None:
    for kw in (
        {"include": "encoder.layer.0.*"},
        {"exclude": ["encoder.layer.0.*", "pooler.*"]},
        {"include": nn.Linear, "exclude": lambda name, m: name.endswith("intermediate.dense")},
    ):
        model = _bert()
        sched = _make(kind, model, **kw)
        _advance(kind, model, sched)
        zeros = _zeros(model)
        if "include" in kw and isinstance(kw["include"], str):
            driven = {k for k in zeros if k.startswith("encoder.layer.0.")}
        elif "include" in kw:
            driven = {k for k in zeros if not k.endswith("intermediate.dense.weight")}
        else:
            driven = {k for k in zeros if not k.startswith(("encoder.layer.0.", "pooler"))}
        assert driven and driven != set(zeros)
        assert all(zeros[k] == 0 for k in set(zeros) - driven), (kind, kw)
        assert sum(zeros[k] for k in driven) > 0, (kind, kw)
        total = sum(hs.masks(model)[k].numel() for k in driven)
        # the target sparsity holds over the driven tensors alone
        assert sum(zeros[k] for k in driven) == pytest.approx(0.5 * total, abs=len(driven))
        assert sched.state_dict()["config"]["tensors"] == sorted(driven, key=list(zeros).index)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["gradual", "iterative", "set", "rigl"])
def test_unmatched_selector_raises_naming_it_before_any_change(kind: str) -> None:
    model = _bert()
    before = _state(model)
    with pytest.raises(
        InvalidArgumentError, match=r"exclude entry 'encoder\.layr\.\*' matches none of the masked"
    ):
        _make(kind, model, exclude=["pooler.*", "encoder.layr.*"])
    with pytest.raises(InvalidArgumentError, match="include entry Conv2d matches none"):
        _make(kind, model, include=[nn.Linear, nn.Conv2d])
    with pytest.raises(NoTargetsError, match="leave none of the masked tensors"):
        _make(kind, model, include="pooler.*", exclude="pooler.dense")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_selected_schedule_state_refuses_another_selection() -> None:
    model = _bert()
    sd = GradualPruning(model, 0.5, end_step=2, every=1, include="encoder.*").state_dict()
    with pytest.raises(InvalidArgumentError, match="tensors"):
        GradualPruning(_bert(), 0.5, end_step=2, every=1).load_state_dict(sd)


def test_restart_factor_hand_values() -> None:
    # cycles [0, 4), [4, 6), [6, 10): linear from 1 down to the floor, then the floor from 10 on
    got = [restart_factor(t, restarts=[4, 6], total_steps=10) for t in range(12)]
    want = [1, 0.75, 0.5, 0.25, 1, 0.5, 1, 0.75, 0.5, 0.25, 0, 0]
    assert got == pytest.approx(want)
    got = [restart_factor(t, restarts=[0, 2, 20], total_steps=4, floor=0.2) for t in range(5)]
    assert got == pytest.approx([1, 0.6, 1, 0.6, 0.2])


def test_restarting_lr_follows_the_pruning_steps_and_resumes() -> None:
    model = hs.sparsify(nn.Sequential(nn.Linear(8, 8)), 0.0)
    sched = GradualPruning(model, 0.5, start_step=2, end_step=6, every=3)
    assert update_steps(sched) == [2, 5, 6]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr = RestartingLR(opt, sched)  # total_steps = end_step + every = 9
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(10):
        opt.step()
        lr.step()
        seen.append(opt.param_groups[0]["lr"])
    # bounds 0, 2, 5, 6, 9: the learning rate used by optimizer step t+1 is the factor at t
    want = [1, 0.5, 1, 2 / 3, 1 / 3, 1, 1, 2 / 3, 1 / 3, 0, 0]
    assert seen == pytest.approx([1e-3 * w for w in want])
    # state_dict() restores it exactly: a new scheduler picks up at step 4
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr2 = RestartingLR(opt2, sched)
    lr_mid = RestartingLR(torch.optim.AdamW(model.parameters(), lr=1e-3), sched)
    for _ in range(4):
        lr_mid.optimizer.step()
        lr_mid.step()
    lr2.load_state_dict(lr_mid.state_dict())
    opt2.step()
    lr2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * want[5])


def test_restarting_lr_refuses_bad_arguments() -> None:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(InvalidArgumentError, match="total_steps is required"):
        RestartingLR(opt, [3])
    with pytest.raises(InvalidArgumentError, match="floor"):
        RestartingLR(opt, [3], total_steps=5, floor=1.5)
    with pytest.raises(TypeError, match="restarts must be"):
        RestartingLR(opt, 3)  # type: ignore[arg-type]
    assert opt.param_groups[0]["lr"] == 0.1


def test_recovery_steps_grow_with_halvings() -> None:
    assert recovery_steps(0.5) == 300
    assert recovery_steps(0.75) == 600
    assert recovery_steps(0.9) == math.ceil(300 * math.log2(10))
    assert recovery_steps(0.1) == 100  # the minimum
    assert recovery_steps(0.9, steps_per_halving=10, minimum=1) == 34
    values = [recovery_steps(s / 100) for s in range(0, 99)]
    assert values == sorted(values)
    with pytest.raises(InvalidArgumentError, match="sparsity"):
        recovery_steps(1.0)
