"""Every ```python block of README.md runs as written: copied into a file of its own and run (a
subprocess, in a fresh folder). A block that needs a package not installed here is skipped; one that
needs the network, or a deliberate fragment, says so in a comment (:data:`SKIP_MARKS`)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
#: A comment in a block that keeps it from running here: ``# readme: fragment`` (it continues
#: another block, names left undefined on purpose) or ``# readme: needs network``.
SKIP_MARKS = ("# readme: fragment", "# readme: needs network")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def _missing(block: str) -> list[str]:
    """The top-level packages the block imports that are not installed here."""
    names = re.findall(r"^(?:import|from)\s+([A-Za-z_]\w*)", block, re.M)
    return sorted({n for n in names if importlib.util.find_spec(n) is None})


@pytest.mark.slow
@pytest.mark.parametrize("block", _blocks(), ids=lambda b: b.strip().splitlines()[-1][:40])
def test_a_readme_python_block_runs_as_written(block: str, tmp_path: Path) -> None:
    mark = next((m for m in SKIP_MARKS if m in block), None)
    if mark is not None:
        pytest.skip(mark)
    if missing := _missing(block):
        pytest.skip(f"needs {', '.join(missing)}")
    (tmp_path / "sample.py").write_text(block, encoding="utf-8")
    got = subprocess.run(
        [sys.executable, "sample.py"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert got.returncode == 0, got.stderr[-3000:]
    for run in _log_dirs(block):  # the samples that train: a learnable task, read as healthy
        diag = subprocess.run(
            [sys.executable, "-m", "gradguard", "diagnose", "--json", "--no-write", run],
            cwd=tmp_path,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        findings = json.loads(diag.stdout)["findings"]
        assert not [f["id"] for f in findings if f["severity"] != "info"], findings


def _log_dirs(block: str) -> list[str]:
    """The ``log_dir="runs/..."`` folders a sample writes its run log to."""
    return re.findall(r'log_dir="(runs/[^"]+)"', block)


def test_no_two_readme_samples_write_the_same_run_directory() -> None:
    """Field test: the "Use" sample and the TensorBoard one both wrote ``runs/exp1``; run one after the
    other in one folder, the second was refused ("already holds a run log")."""
    dirs = [d for block in _blocks() for d in set(_log_dirs(block))]
    assert dirs and len(dirs) == len(set(dirs)), dirs


def test_the_readme_has_python_blocks_to_run() -> None:
    assert len(_blocks()) >= 6 and all(b.strip() for b in _blocks())
