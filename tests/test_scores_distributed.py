"""``"movement"`` (hs.GradientScores) under DDP (gloo, 2 CPU processes started here).

Each rank trains on its half of a batch; the reference is one process training the same network on
the whole batch (the loss is a mean, so DDP's averaged gradient is the whole batch's). The hooks see
each rank's *local* gradient (they fire before DDP's all-reduce), so without
``GradientScores.synchronize`` (which ``GradualPruning`` calls before every pruning step) rank 0's
masks would rank by rank 0's half of the data only: the run without it must differ from the
reference, the run with it must match it. ``broadcast_buffers=False``: DDP does not copy masks.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import run_ranks

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

_DDP_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    import hadamard_sparse as hs

    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    STEPS, HALF = 8, 16
    data = torch.Generator().manual_seed(7)
    batches = [(torch.randn(world * HALF, 12, generator=data), torch.randn(world * HALF, 5, generator=data))
               for _ in range(STEPS)]

    def flat_masks(model):
        return torch.cat([m.flatten() for m in hs.masks(model).values()])

    def gathered(t):
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t)
        return out

    def run(variant):
        torch.manual_seed(0)
        model = hs.sparsify(nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 5)), 0.0)
        tracker = hs.GradientScores(model)  # before DDP
        if variant == "nosync":
            tracker.synchronize = lambda: None  # what the schedule did before it synchronised
        net = model if variant == "reference" else nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        sched = hs.GradualPruning(net, 0.8, start_step=2, end_step=8, every=2, method="movement",
                                  calibration=tracker, scope="layer")
        masks, local_differs = [], []
        for step, (x, y) in enumerate(batches, 1):
            if variant != "reference":
                x, y = x[rank * HALF:(rank + 1) * HALF], y[rank * HALF:(rank + 1) * HALF]
            opt.zero_grad()
            (net(x) - y).square().mean().backward()
            opt.step()
            if variant == "ddp" and step in (2, 4):  # before the schedule synchronises: local sums
                mv = tracker["0.weight"].movement.clone()
                a, b = gathered(mv)
                local_differs.append(not torch.allclose(a, b))
            sched.step()
            masks.append(flat_masks(model))
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        return torch.stack(masks), weights, local_differs

    ref_masks, ref_w, _ = run("reference")
    report = {}
    for variant in ["ddp", "nosync"]:
        m, w, local_differs = run(variant)
        mine = m.to(torch.uint8)
        report[variant] = {
            "same_on_ranks": all(torch.equal(g, mine) for g in gathered(mine)),
            "flips_vs_reference": int((m != ref_masks).sum()),
            "max_weight_diff": float((w - ref_w).abs().max()),
            "sparsity": float(1 - m[-1].float().mean()),
            "local_differs": local_differs,
        }
    with open(out, "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/schedules/test_distributed.py: no C++ static destructors after the work is done
    """
)


def test_movement_under_ddp_matches_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    reports = run_ranks(tmp_path, _DDP_WORKER, timeout=120)
    assert reports[0] == reports[1]
    ddp, nosync = reports[0]["ddp"], reports[0]["nosync"]
    assert ddp["local_differs"] == [True, True]  # the hooks saw each rank's own gradients
    assert ddp["same_on_ranks"] and nosync["same_on_ranks"]
    assert abs(ddp["sparsity"] - 0.8) < 0.01
    assert ddp["flips_vs_reference"] == 0  # the averaged movement is the whole batch's
    assert ddp["max_weight_diff"] < 1e-5
    assert nosync["flips_vs_reference"] > 0  # rank 0's half alone ranks differently


_FSDP_WORKER = textwrap.dedent(
    """
    import copy, json, os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    import hadamard_sparse as hs
    from hadamard_sparse.errors import InvalidArgumentError

    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    kinds = sys.argv[5].split(",")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    STEPS, HALF = 8, 8

    def build(kind):
        torch.manual_seed(0)
        if kind == "mlp":  # 33 and 5 output rows: uneven shards on 2 ranks
            return nn.Sequential(nn.Linear(12, 33), nn.Tanh(), nn.Linear(33, 5))
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=48, max_position_embeddings=16, num_labels=5,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(config).eval()  # eval: no dropout anywhere

    def shard(model):
        blocks = list(model.bert.encoder.layer) if hasattr(model, "bert") else [model[0], model[2]]
        for m in blocks:
            fully_shard(m)
        fully_shard(model)
        return model

    def batches(kind):
        g = torch.Generator().manual_seed(7)
        for _ in range(STEPS):
            if kind == "mlp":
                yield torch.randn(world * HALF, 12, generator=g), torch.randn(world * HALF, 5, generator=g)
            else:
                ids = torch.randint(0, 64, (world * HALF, 10), generator=g)
                yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randn(world * HALF, 5, generator=g)

    def half(batch):
        sl = slice(rank * HALF, (rank + 1) * HALF)
        return {k: v[sl] for k, v in batch.items()} if isinstance(batch, dict) else batch[sl]

    def out_of(model, x):
        y = model(**x) if isinstance(x, dict) else model(x)
        return y.logits if hasattr(y, "logits") else y

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    def flat_masks(model):
        return torch.cat([m.flatten() for m in hs.masks(model).values()])

    def flat_params(model):
        return torch.cat([full(p.detach()).flatten() for p in model.parameters()])

    def movement(kind, sharded):
        model = hs.sparsify(build(kind), 0.0)
        model = shard(model) if sharded else model
        tracker = hs.GradientScores(model)  # after fully_shard
        refusals = []
        if sharded:  # obs needs whole rows: refused on shards, both the kept gradients and the schedule
            for make in [lambda: hs.GradientScores(model, num_grads=4),
                         lambda: hs.GradualPruning(model, 0.5, method="obs", calibration=tracker)]:
                try:
                    make()
                    refusals.append(False)
                except InvalidArgumentError:
                    refusals.append(True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = hs.GradualPruning(model, 0.8, start_step=2, end_step=8, every=2, method="movement",
                                  calibration=tracker, scope="global" if kind == "mlp" else "layer")
        masks = []
        for x, y in batches(kind):
            if sharded:
                x, y = half(x), half(y)
            opt.zero_grad()
            (out_of(model, x) - y).square().mean().backward()
            opt.step()
            sched.step()
            masks.append(flat_masks(model))
        return torch.stack(masks), flat_params(model), tracker, refusals

    def distill(kind, sharded):
        dense = build(kind)
        teacher = copy.deepcopy(dense)  # made before pruning and sharding
        student = hs.sparsify(dense, 0.5, scope="layer")
        features = ["bert.encoder.layer.*"] if kind == "bert" else ["0", "2"]
        if not sharded:
            d = hs.Distiller(student, teacher, features=features, logits=True)
            step = lambda x: (d(half_of(x, 0)) + d(half_of(x, 1))) / 2  # what the ranks average
        else:
            shard(student)
            shard(teacher)
            before = {k: full(v).clone() for k, v in student.state_dict().items()}
            try:
                hs.Distiller(student, features=features)
                refused = False
            except InvalidArgumentError:
                refused = all(torch.equal(full(v), before[k]) for k, v in student.state_dict().items())
            d = hs.Distiller(student, teacher, features=features, logits=True)
            step = lambda x: d(half(x))
        opt = torch.optim.SGD(student.parameters(), lr=0.05)
        start = flat_params(student)
        losses = []
        for x, _ in batches(kind):
            loss = step(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        end = flat_params(student)
        return end, flat_masks(student), losses, (refused if sharded else True), float((end - start).abs().max())

    def half_of(x, r):
        sl = slice(r * HALF, (r + 1) * HALF)
        return {k: v[sl] for k, v in x.items()} if isinstance(x, dict) else x[sl]

    report = {}
    for kind in kinds:
        ref_m, ref_w, _, _ = movement(kind, False)
        m, w, tracker, refusals = movement(kind, True)
        report[f"movement-{kind}"] = {
            "flips": int((m != ref_m).sum()),
            "numel": m.numel(),
            "max_weight_diff": float((w - ref_w).abs().max()),
            "sparsity": float(1 - m[-1].float().mean()),
            "obs_refused": refusals,
            "local_movement": all(tg.sharded and tg.movement.shape == tg.param.to_local().shape
                                  for tg in tracker.values()),
        }
        ref_w, ref_m, ref_l, _, _ = distill(kind, False)
        w, m, losses, refused, moved = distill(kind, True)
        losses_all = [None] * world
        dist.all_gather_object(losses_all, losses)
        rank_mean = [sum(col) / world for col in zip(*losses_all)]
        report[f"distill-{kind}"] = {
            "max_weight_diff": float((w - ref_w).abs().max()),
            "same_masks": bool(torch.equal(m, ref_m)),
            "max_loss_diff": max(abs(a - b) for a, b in zip(rank_mean, ref_l)),
            "moved": moved,
            "refused_without_teacher": refused,
        }
    with open(out, "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/schedules/test_distributed.py: no C++ static destructors after the work is done
    """
)


def _check_fsdp(reports: list[dict], kind: str) -> None:
    assert reports[0] == reports[1]
    mv, di = reports[0][f"movement-{kind}"], reports[0][f"distill-{kind}"]
    assert mv["local_movement"]  # each rank recorded its own block of rows
    assert abs(mv["sparsity"] - 0.8) < 0.02
    assert mv["obs_refused"] == [True, True]
    assert mv["flips"] <= 0.002 * mv["numel"], mv  # reduce-scattered gradients: the whole batch's movement
    assert mv["max_weight_diff"] < 1e-4, mv
    assert di["refused_without_teacher"]  # teacher=None cannot copy a sharded student; nothing changed
    assert di["same_masks"]
    assert di["max_weight_diff"] < 1e-4, di  # the gradient of the mean of the per-rank losses
    assert di["max_loss_diff"] < 1e-4, di
    assert di["moved"] > 100 * di["max_weight_diff"], di  # the weights did train


def test_movement_and_distiller_under_fsdp2_match_one_process(tmp_path: Path) -> None:
    _check_fsdp(run_ranks(tmp_path, _FSDP_WORKER, "mlp", timeout=180), "mlp")


@pytest.mark.slow
def test_movement_and_distiller_under_fsdp2_on_tiny_bert(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="transformers is not installed")
    _check_fsdp(run_ranks(tmp_path, _FSDP_WORKER, "bert", timeout=300), "bert")
