"""The README's set-up commands: CI runs them as written, and what they install serves a user's project.

* ``.ci/run`` holds the README's test command verbatim, so the two cannot drift, and runs it
  before it installs the optional Fashion-MNIST data set (a new user's machine does not have it).
* The editable install the README documents exposes the package's types: mypy, run in a user's
  project on what is installed (no ``PYTHONPATH``), sees ``hs.sparsify``'s signature, not ``Any``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_BASH = re.compile(r"^```bash\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)


def _setup_commands() -> list[str]:
    """The ```bash blocks of README.md's "Set-up" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Set-up")
    end = text.find("\n## ", start + 1)
    return [m["code"].strip() for m in _BASH.finditer(text[start : end if end >= 0 else None])]


def test_ci_runs_the_readmes_test_command_as_written_without_the_optional_data_set() -> None:
    blocks = _setup_commands()
    assert len(blocks) >= 2, "README.md's Set-up section lost its demo and test commands"
    command = blocks[1]
    assert "\n" not in command and "python -m pytest" in command, command
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert command in lines, (
        "the README's test command (Set-up, second bash block) must be a line of .ci/run, as written:\n"
        f"{command}"
    )
    at = lines.index(command)
    # The data set is hidden (or simply not installed yet) when the README's command runs.
    hide = next(i for i, line in enumerate(lines) if line.startswith("mount -t tmpfs"))
    install = next(i for i, line in enumerate(lines) if "apt-get install" in line)
    unhide = next(i for i, line in enumerate(lines) if line.startswith("umount"))
    assert hide < at < min(install, unhide)


def test_the_package_ships_its_type_marker() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    assert (ROOT / "hadamard_sparse" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert "py.typed" in config["package-data"]["hadamard_sparse"]
    # A plain .pth file for editable installs (not setuptools' import hook, which mypy cannot follow).
    assert config["package-dir"] == {"": "."}


_USER_CODE = """\
import hadamard_sparse as hs

reveal_type(hs.sparsify)
reveal_type(hs.sparsity_report)
"""

# torch and transformers are left out of the analysis (Any) to keep it to seconds: what matters is
# whether hadamard_sparse itself is found, with its annotations.
_MYPY_INI = """\
[mypy]

[mypy-torch.*]
follow_imports = skip

[mypy-transformers.*]
follow_imports = skip
"""


@pytest.mark.slow
def test_the_installed_package_exposes_its_types_to_mypy(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy (the dev extra) runs the check")
    try:
        dist = importlib.metadata.distribution("hadamard-sparse")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("hadamard-sparse is not installed here; the test checks what an install gives a user")
    (tmp_path / "user.py").write_text(_USER_CODE)
    (tmp_path / "mypy.ini").write_text(_MYPY_INI)
    # A user's project: only what is installed, nothing from this checkout's PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "user.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    hooks = [str(f) for f in dist.files or [] if re.match(r"__editable__.*finder\.py$", f.name)]
    hint = (
        f"\n\nhadamard-sparse was installed with setuptools' editable import hook ({hooks[0]}), which mypy "
        "cannot follow; reinstall it with the README's pip command (pip install -e .) from this checkout"
        if hooks
        else ""
    )
    assert proc.returncode == 0, f"mypy in a user's project:\n{out}{hint}"
    revealed = re.findall(r'Revealed type is "(.*)"', out)
    assert len(revealed) == 2, out
    assert revealed[0].startswith("def (model: ") and "sparsity: float | None" in revealed[0], out
    assert revealed[1].endswith("-> hadamard_sparse.report.SparsityReport"), out
