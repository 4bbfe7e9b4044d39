"""Every ```python block of README.md and docs/*.md runs as written, top to bottom.

The blocks of one Markdown file run in order, in one fresh interpreter (a subprocess started in an
empty temporary directory), so a block sees what the blocks above it defined: exactly what a reader
gets who pastes the file's blocks, one after the other, into a fresh ``python``. There is no way to
mark a block as an alternative that runs on a copy of the state: write alternatives so that they
run in sequence (each on its own fresh model, say), or as separate blocks that set up what they
need. The conventions, also described in docs/architecture.md ("Docs that run"):

* Only fences whose info string starts with ``python`` run; ``bash``, ``text`` and other fences do
  not, nor does a block holding ``>>>`` prompts (doctest style).
* ``# requires: name[, name]`` (a comment line in the block) names what the block needs besides the
  package: importable module names, or ``cc`` for a C compiler. Third-party modules the block imports
  are added automatically. When one is missing, that block and every later block of the file are
  skipped, and the test reports why.

Tracebacks point at the Markdown file and line. Run ``python tests/project/test_docs.py README.md`` to run
one file by hand (in a temporary directory).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_TIMEOUT_S = 300

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_REQUIRES = re.compile(r"^\s*#\s*requires:\s*(?P<names>[\w.,\s-]+?)\s*$", re.IGNORECASE | re.MULTILINE)
_PACKAGE = "hadamard_sparse"


@dataclass
class Step:
    """One unit of execution: a block."""

    line: int  # 1-based line of the code's first line in the Markdown file
    code: str
    requires: list[str] = field(default_factory=list)


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(first code line, info string, code)`` for every fenced block of ``text``."""
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m["fence"], m["info"].strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence[0] * len(fence)) and not lines[j].strip().strip(fence[0])
        ):
            body.append(lines[j])
            j += 1
        indent = len(m["indent"])
        out.append((i + 2, info, "\n".join(s[indent:] if s[:indent].isspace() else s for s in body)))
        i = j + 1
    return out


def _imports(tree: ast.AST) -> list[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    stdlib = getattr(sys, "stdlib_module_names", frozenset())
    return sorted(n for n in names if n not in stdlib and n not in ("torch", _PACKAGE))


def _requires(code: str, tree: ast.AST) -> list[str]:
    named = [n.strip() for m in _REQUIRES.finditer(code) for n in m["names"].split(",") if n.strip()]
    return sorted(set(named) | set(_imports(tree)))


def plan(path: Path) -> list[Step]:
    """The steps that run ``path``'s Python blocks, in order."""
    steps: list[Step] = []
    for line, info, code in fenced_blocks(path.read_text(encoding="utf-8")):
        if not info.split() or info.split()[0].lower() not in ("python", "py", "python3"):
            continue
        if re.search(r"^\s*>>>", code, re.MULTILINE):
            continue
        try:
            tree = ast.parse(code)
        except SyntaxError:  # reported when the block runs, with its Markdown line
            steps.append(Step(line, code))
            continue
        steps.append(Step(line, code, _requires(code, tree)))
    return steps


# ------------------------------------------------------------------------------------------------
# The runner: executes a plan inside the subprocess
# ------------------------------------------------------------------------------------------------


def _available(name: str) -> bool:
    if name == "cc":
        cc = os.environ.get("CC", "").strip()  # a set CC is the only compiler the kernel build uses
        return bool(shutil.which(cc)) if cc else any(shutil.which(c) for c in ("cc", "gcc", "clang"))
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _exec(step: dict[str, Any], filename: str, ns: dict[str, Any]) -> str | None:
    """Run one step in ``ns``; the traceback (pointing at the Markdown file) or ``None``."""
    try:
        code = compile("\n" * (step["line"] - 1) + step["code"], filename, "exec")
        exec(code, ns)
    except BaseException as e:
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # drop this frame
        return "".join(traceback.format_exception(type(e), e, tb))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return None


def run_plan(filename: str, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Execute ``steps`` in order in one namespace; one result per step."""
    ns: dict[str, Any] = {"__name__": "__main__"}
    results: list[dict[str, Any]] = []
    blocked: str | None = None
    for step in steps:
        where = f"{filename}:{step['line']}"
        if blocked is not None:
            results.append({"where": where, "status": "skipped", "why": blocked})
            continue
        missing = [r for r in step["requires"] if not _available(r)]
        if missing:
            why = f"{where} needs {', '.join(missing)} (not installed)"
            results.append({"where": where, "status": "skipped", "why": why})
            blocked = f"after {why}"
            continue
        err = _exec(step, filename, ns)
        if err is None:
            results.append({"where": where, "status": "ok"})
        else:
            results.append({"where": where, "status": "failed", "why": err})
            blocked = f"after the failure at {where}"
    return results


def _runner_main(argv: list[str]) -> None:
    """``python tests/project/test_docs.py FILE.md [RESULTS.json]``: run one file's blocks."""
    path = Path(argv[0]).resolve()
    sys.path.insert(0, str(ROOT))
    try:
        filename = str(path.relative_to(ROOT))
    except ValueError:
        filename = str(path)
    out = Path(argv[1]).resolve() if len(argv) > 1 else None
    with tempfile.TemporaryDirectory() as tmp:  # what the blocks write stays out of the checkout
        os.chdir(tmp)
        tempfile.tempdir = tmp  # and so does what they put in temporary folders
        results = run_plan(filename, [asdict(s) for s in plan(path)])
        tempfile.tempdir = None
        os.chdir(ROOT)
    if out is not None:
        out.write_text(json.dumps(results))
    for r in results:
        print(f"{r['status']:8} {r['where']}" + (f"\n{r['why']}" if r.get("why") else ""), file=sys.stderr)
    sys.exit(1 if any(r["status"] == "failed" for r in results) else 0)


# ------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------


def run_doc(path: Path, tmp: Path) -> tuple[list[dict[str, Any]], str]:
    """Run ``path``'s blocks in a fresh interpreter with ``tmp`` as working directory."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "TQDM_DISABLE": "1",
    }
    out = tmp / "results.json"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(path), str(out)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
    )
    if not out.exists():
        raise AssertionError(
            f"the runner for {path.name} crashed (exit {proc.returncode}):\n{proc.stderr[-5000:]}"
        )
    return json.loads(out.read_text()), proc.stdout + proc.stderr


if __name__ == "__main__":
    _runner_main(sys.argv[1:])
else:
    import pytest

    _WITH_CODE = [p for p in DOCS if plan(p)]

    @pytest.mark.parametrize("path", _WITH_CODE, ids=[str(p.relative_to(ROOT)) for p in _WITH_CODE])
    def test_doc_snippets_run(path: Path, tmp_path: Path) -> None:
        results, output = run_doc(path, tmp_path)
        failed = [r for r in results if r["status"] == "failed"]
        if failed:
            report = "\n\n".join(f"{r['where']} failed:\n{r['why']}" for r in failed)
            pytest.fail(f"{report}\n\noutput of the blocks:\n{output[-3000:]}", pytrace=False)
        skipped = [r for r in results if r["status"] == "skipped"]
        if skipped:
            ran = len(results) - len(skipped)
            pytest.skip(f"ran {ran} block(s); skipped {len(skipped)}: {skipped[0]['why']}")

    def _write(tmp_path: Path, text: str) -> Path:
        path = tmp_path / "doc.md"
        path.write_text(text)
        return path

    def test_plan_reads_the_conventions(tmp_path: Path) -> None:
        doc = _write(
            tmp_path,
            "# t\n\n```python\nx = 1\n```\n\n```bash\nexit 1\n```\n\n```python\n>>> 1 + 1\n2\n```\n\n"
            "```python\n# alternatives: one per line\nimport math\nx = 2\ny = math.pi\n```\n\n"
            "```python\n# requires: matplotlib, cc\nimport sklearn.datasets\n```\n",
        )
        steps = plan(doc)
        # One step per python block, whole, whatever its first comment says.
        assert [s.line for s in steps] == [4, 17, 24]
        assert steps[1].code == "# alternatives: one per line\nimport math\nx = 2\ny = math.pi"
        assert steps[-1].requires == ["cc", "matplotlib", "sklearn"]

    def test_runner_runs_every_block_as_written_top_to_bottom(tmp_path: Path) -> None:
        # What a reader pasting the blocks in order gets: the "alternatives" block's lines run in
        # sequence on the same state, so its assert fails (it passed when alternatives forked).
        doc = _write(
            tmp_path,
            "```python\nx = [1]\n```\n\n"
            "```python\n# alternatives\nx.append(2)\nassert x == [1], x\n```\n\n"
            "```python\nprint('never')\n```\n",
        )
        work = tmp_path / "work"
        work.mkdir()
        results, _ = run_doc(doc, work)
        status = [(r["where"].rsplit(":", 1)[1], r["status"]) for r in results]
        assert status == [("2", "ok"), ("6", "failed"), ("12", "skipped")]
        assert "AssertionError: [1, 2]" in results[1]["why"]
        assert 'doc.md", line 8' in results[1]["why"]  # the Markdown file and line

    def test_runner_reports_a_broken_snippet(tmp_path: Path) -> None:
        doc = _write(
            tmp_path,
            "```python\nx = [1]\n```\n\n"
            "```python\nx.append(2)\n```\n\n"
            "```python\nassert x == [1, 2], x\ny = undefined_name + 1\n```\n\n"
            "```python\nprint('never')\n```\n\n"
            "```python\n# requires: no_such_module_hs\n```\n",
        )
        work = tmp_path / "work"
        work.mkdir()
        results, _ = run_doc(doc, work)
        status = [(r["where"].rsplit(":", 1)[1], r["status"]) for r in results]
        assert status == [("2", "ok"), ("6", "ok"), ("10", "failed"), ("15", "skipped"), ("19", "skipped")]
        assert "NameError" in results[2]["why"] and "undefined_name" in results[2]["why"]
        assert 'doc.md", line 11' in results[2]["why"]  # the Markdown file and line

    def test_runner_skips_with_the_reason(tmp_path: Path) -> None:
        doc = _write(tmp_path, "```python\n# requires: no_such_module_hs\nx = 1\n```\n\n```python\nx\n```\n")
        work = tmp_path / "work"
        work.mkdir()
        results, _ = run_doc(doc, work)
        assert [r["status"] for r in results] == ["skipped", "skipped"]
        assert "no_such_module_hs (not installed)" in results[0]["why"]
        assert results[1]["why"].startswith("after ")
