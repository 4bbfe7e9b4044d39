"""Schedules under DDP (gloo, 2 CPU processes started here): identical masks on every rank after every update.

Each rank trains on different data, so RigL's captured gradients differ per rank, and SET is given a
different seed per rank: masks stay identical only because the schedules all-reduce gradients and
broadcast their decisions themselves. ``broadcast_buffers=False`` removes DDP's own mask broadcast.
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

_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from hadamard_sparse.api import masks, sparsify
    from hadamard_sparse.schedules import SET, GradualPruning, IterativePruning, RigL

    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    def flat_masks(model):
        return torch.cat([m.flatten() for m in masks(model).values()]).to(torch.uint8)

    def same_on_all_ranks(t):
        gathered = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(gathered, t)
        return all(torch.equal(gathered[0], g) for g in gathered)

    report = {}
    for kind in ["gradual", "iterative", "set", "rigl"]:
        for broadcast_buffers in [True, False]:
            torch.manual_seed(0)
            model = sparsify(nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4)), 0.0)  # before DDP
            ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            if kind == "gradual":
                sched = GradualPruning(ddp, 0.9, end_step=8, every=2, method="random", seed=rank)
            elif kind == "iterative":
                sched = IterativePruning(ddp, rounds=2, final_sparsity=0.8, every=4, optimizer=opt)
            elif kind == "set":
                sched = SET(ddp, 0.7, every=2, drop_fraction=0.5, optimizer=opt, seed=rank)
            else:
                sched = RigL(ddp, opt, 0.7, every=2, drop_fraction=0.5, seed=rank)
            checks = [same_on_all_ranks(flat_masks(model))]
            changes = 0
            g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
            for step in range(1, 11):
                x = torch.randn(16, 10, generator=g)
                opt.zero_grad()
                ddp(x).pow(2).mean().backward()
                opt.step()
                before = flat_masks(model)
                sched.step()
                after = flat_masks(model)
                changes += int(not torch.equal(before, after))
                checks.append(same_on_all_ranks(after))
                weights = torch.cat([p.detach().flatten() for p in model.parameters()])
                checks.append(same_on_all_ranks(weights))
            report[f"{kind}-{broadcast_buffers}"] = {"all_same": all(checks), "changes": changes}
            del sched, opt, ddp  # release DDP's reducer before the next one is built
    with open(out, "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()
    # The report is written and every rank is past the barrier: leave without running C++ static
    # destructors, where gloo/DDP worker threads can abort the process on a loaded machine
    # ('terminate called without an active exception') after all the work has succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    """
)


def test_masks_identical_on_every_rank_after_every_update(tmp_path: Path) -> None:
    reports = run_ranks(tmp_path, _WORKER, timeout=120)
    assert reports[0] == reports[1]
    for key, rep in reports[0].items():
        assert rep["all_same"], key
        assert rep["changes"] >= 2, key  # the masks really were updated
