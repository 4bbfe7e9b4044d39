"""Execute every committed notebook (FAST mode) and fail on any error.

Deselect with ``-m "not notebooks"``. Each notebook gets at most ``_TIMEOUT_S`` seconds.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import hadamard_sparse as hs

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
_PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
_TIMEOUT_S = 120
_HS_NAME = re.compile(r"\bhs\.([A-Za-z_]\w*)")

pytestmark = [pytest.mark.notebooks, pytest.mark.slow]


def _code(path: Path) -> str:
    nb = json.loads(path.read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def test_notebooks_exist_and_have_outputs() -> None:
    assert _PATHS, "no executed notebook in notebooks/"
    for path in _PATHS:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code and all(c["execution_count"] for c in code), f"{path.name} is not fully executed"
        errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
        assert not errors, f"{path.name} was committed with an error output"
        assert 'FAST = os.environ.get("FAST") == "1"' in _code(path)


@pytest.mark.parametrize("path", _PATHS, ids=[p.stem for p in _PATHS])
def test_notebook_executes(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to run the notebooks")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is needed to run the notebooks")
    pytest.importorskip("ipykernel", reason="ipykernel is needed to run the notebooks")
    pytest.importorskip("matplotlib", reason="the notebooks draw with matplotlib")
    pytest.importorskip("sklearn", reason="the notebooks read scikit-learn's bundled data sets")
    from jupyter_client.kernelspec import NoSuchKernel

    missing = sorted({n for n in _HS_NAME.findall(_code(path)) if not hasattr(hs, n)})
    if missing:
        pytest.skip(f"hadamard_sparse does not export {missing} yet")
    monkeypatch.setenv("FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    try:
        client.execute()
    except NoSuchKernel:
        pytest.skip(
            "no 'python3' Jupyter kernel; install one with `python -m ipykernel install --sys-prefix`"
        )
    assert os.environ["FAST"] == "1"
