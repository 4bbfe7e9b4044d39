"""Build the notebooks from their sources in ``notebooks/_src/`` and execute them.

Each source is a Python file in the "percent" format: ``# %%`` starts a code cell,
``# %% [markdown]`` a Markdown cell whose lines are written as comments (``# text``).

Usage (from the repository root, in the project's virtual environment)::

    python notebooks/_build.py                  # build and execute every notebook (committed run)
    python notebooks/_build.py 01 07            # only the notebooks whose names start with these
    python notebooks/_build.py --no-execute     # write the notebooks without outputs
    FAST=1 python notebooks/_build.py --check   # execute in FAST mode without writing (what CI does)

The committed notebooks are executed with ``FAST`` unset and ``OMP_NUM_THREADS=1`` (unless set). Execution uses the ``python3``
kernel; install it into the virtual environment with ``python -m ipykernel install --sys-prefix``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SRC = HERE / "_src"

_CELL = re.compile(r"^# %%(?P<md> \[markdown\])?[^\n]*$", re.MULTILINE)


def parse(text: str) -> list[nbformat.NotebookNode]:
    """Cells of a percent-format source."""
    cells = []
    marks = list(_CELL.finditer(text))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = text[m.end() : end].strip("\n")
        if m.group("md"):
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in body.splitlines()]
            cells.append(nbformat.v4.new_markdown_cell("\n".join(lines).strip("\n")))
        elif body.strip():
            cells.append(nbformat.v4.new_code_cell(body))
    return cells


def build(src: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = parse(src.read_text())
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{src.stem[:2]}-{i:02d}"
    return nb


# Until every public name is re-exported from hadamard_sparse/__init__.py, a hidden first cell binds
# the missing ones from their submodules (the same objects); it is removed before saving and
# reports what it bound, so a committed run can be checked to have needed none.
_SHIM = """
import importlib as _il
import hadamard_sparse as _hs
_bound = []
for _m in ("schedules", "densities", "factorization", "structures", "export", "quantization"):
    try:
        _mod = _il.import_module("hadamard_sparse." + _m)
    except ImportError:
        continue
    for _n in getattr(_mod, "__all__", []):
        if not hasattr(_hs, _n):
            setattr(_hs, _n, getattr(_mod, _n))
            _bound.append(_n)
print("SHIM", sorted(_bound))
"""


def execute(nb: nbformat.NotebookNode, timeout: int = 600, shim: bool = False) -> float:
    """Execute ``nb`` in place (cwd = notebooks/); return the wall time in seconds."""
    if shim:
        nb.cells.insert(0, nbformat.v4.new_code_cell(_SHIM))
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(HERE)}},
    )
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        client.execute()
    finally:
        if shim:
            cell = nb.cells.pop(0)
            text = "".join(o.get("text", "") for o in cell.get("outputs", []))
            print(f"  shim: {text.strip()}", flush=True)
            for c in nb.cells:
                if c.cell_type == "code" and c.execution_count:
                    c.execution_count -= 1
                    for o in c.outputs:
                        if "execution_count" in o:
                            o["execution_count"] = c.execution_count
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        print(f"  kernel CPU time {cpu:.1f} s", flush=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("only", nargs="*", help="prefixes of the notebooks to build (default: all)")
    parser.add_argument("--no-execute", action="store_true", help="write the notebooks without outputs")
    parser.add_argument("--check", action="store_true", help="execute but do not write")
    parser.add_argument("--shim", action="store_true", help="bind public names not yet re-exported by hadamard_sparse")
    args = parser.parse_args(argv)
    # The models here are small: one thread per kernel is as fast as two on an idle machine and
    # avoids the thread pool's spin-waiting, which is ruinous on a loaded one.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sources = sorted(SRC.glob("[0-9][0-9]_*.py"))
    if args.only:
        sources = [s for s in sources if any(s.stem.startswith(p) for p in args.only)]
    for src in sources:
        nb = build(src)
        if not args.no_execute:
            wall = execute(nb, shim=args.shim)
            print(f"{src.stem}: executed in {wall:.1f} s", flush=True)
        if not args.check:
            nbformat.validate(nb)
            out = HERE / f"{src.stem}.ipynb"
            nbformat.write(nb, out)
            print(f"wrote {out.relative_to(HERE.parent)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
