"""How far ``hs.sparsify``'s ``model`` argument travels through the package, traced with ``sys.setprofile``.

Issue 20 calls ``sparsify`` a hub: a function whose checks and work call out to many modules
and keep coming back. This script measures it on representative calls (a 3-layer MLP, one call
per row) from the profiler's ``call`` events of functions inside ``hadamard_sparse``:

- ``stops``: calls that receive the model (an argument that is the model, or an object holding it
  as ``.model``, such as a plan); ``modules``: the distinct package modules among them;
- ``climbs to api``: stops made from a frame in ``api.py`` into another module (each returns to
  ``api.py``);
- ``<f> fan-out``: calls made directly by the frame of ``sparsify`` and, where they exist, of the
  plan builder ``plan_sparsify`` and of ``apply_plan``, into package functions (calls / distinct
  modules). A hub has a wide fan-out; plan-then-apply moves the checks into one builder.

Run on any checkout (the package found first on ``sys.path`` is traced)::

    PYTHONPATH=. python benchmarks/sparsify_hub.py [-v]

``benchmarks/results/sparsify_hub.md`` holds the figures before and after issue 20.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import torch
from torch import nn

import hadamard_sparse as hs

PKG = Path(hs.__file__).parent
HUBS = ("sparsify", "plan_sparsify", "apply_plan")


def _module(code: CodeType) -> str | None:
    try:
        return str(Path(code.co_filename).relative_to(PKG))
    except ValueError:
        return None


def _holds(value: object, model: nn.Module) -> bool:
    return value is model or (not isinstance(value, nn.Module) and getattr(value, "model", None) is model)


def trace(
    call: Callable[[nn.Module], Any], model: nn.Module
) -> tuple[list[tuple[str, str, str | None]], dict[str, list[str]]]:
    """``(stops, fan-outs)``: (module, function, caller's module) per stop; callee modules per hub."""
    stops: list[tuple[str, str, str | None]] = []
    fans: dict[str, list[str]] = {h: [] for h in HUBS}
    frames: dict[str, FrameType] = {}

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event != "call":
            return
        mod = _module(frame.f_code)
        if mod is None:
            return
        code, caller = frame.f_code, frame.f_back
        if code.co_name in HUBS and code.co_name not in frames:
            frames[code.co_name] = frame
        for hub, f in frames.items():
            if caller is f:
                fans[hub].append(mod)
        args = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        if any(_holds(frame.f_locals.get(a), model) for a in args):
            stops.append((mod, code.co_name, None if caller is None else _module(caller.f_code)))

    sys.setprofile(profile)
    try:
        call(model)
    finally:
        sys.setprofile(None)
    return stops, fans


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def main() -> None:
    xs = [torch.randn(8, 16) for _ in range(2)]
    calls: dict[str, Callable[[nn.Module], Any]] = {
        "magnitude": lambda m: hs.sparsify(m, 0.5),
        "wanda 2:4": lambda m: hs.sparsify(m, method="wanda", structure="2:4", calibration=xs),
        "erk": lambda m: hs.sparsify(m, 0.5, distribution="erk"),
        "owl wanda": lambda m: hs.sparsify(m, 0.5, method="wanda", allocation="owl", calibration=xs),
        "sparsegpt": lambda m: hs.sparsify(m, 0.5, method="sparsegpt", calibration=xs),
        "neuron": lambda m: hs.sparsify(m, 0.25, structure="neuron", example_inputs=xs[0]),
    }
    verbose = "-v" in sys.argv
    print("| call | stops | modules | climbs to api | " + " | ".join(f"{h} fan-out" for h in HUBS) + " |")
    print("|---" * (4 + len(HUBS)) + "|")
    every: set[str] = set()
    totals = [0] * (2 + len(HUBS))
    for name, call in calls.items():
        stops, fans = trace(call, _mlp())
        mods = {m for m, _, _ in stops}
        every |= mods
        climbs = sum(1 for m, _, c in stops if c == "api.py" and m != "api.py")
        counts = [len(stops), climbs] + [len(fans[h]) for h in HUBS]
        totals = [a + b for a, b in zip(totals, counts)]
        cells = [f"{len(fans[h])} / {len(set(fans[h]))}" for h in HUBS]
        print(f"| {name} | {len(stops)} | {len(mods)} | {climbs} | " + " | ".join(cells) + " |")
        if verbose:
            print("    " + " > ".join(f"{m}:{f}" for m, f, _ in stops))
    cells = [str(t) for t in totals[2:]]
    print(f"| all | {totals[0]} | {len(every)} | {totals[1]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
