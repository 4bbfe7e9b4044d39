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
from conftest import run_ranks

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
    os._exit(0)  # see tests/test_distributed.py: no C++ static destructors after the work is done
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
