"""The fault corpus (tests/faults/*.py): plain training scripts, each failing on torch 2.13 without
gradguard, each located correctly (phase, module, op, kind) with no change to the script."""

from __future__ import annotations

import ast
import contextlib
import math
import runpy
import warnings
from pathlib import Path

import pytest
import torch

from gradguard.errors import NonFiniteError
from gradguard.integrations.zerocode import ZeroCode
from gradguard.runlog import read_run

FAULTS = sorted((Path(__file__).parent / "faults").glob("*.py"))


def expected_of(script: Path) -> dict:
    """The script's ``EXPECTED = {...}`` (read, not run)."""
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXPECTED":
            return ast.literal_eval(node.value)
    raise AssertionError(f"{script.name} has no EXPECTED")


def run_plain(script: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return runpy.run_path(str(script), run_name="__main__")


@pytest.mark.parametrize("script", FAULTS, ids=[p.stem for p in FAULTS])
def test_the_script_really_fails_without_gradguard(script: Path) -> None:
    g = run_plain(script)
    loss = g["loss"]
    params = list(g["model"].parameters())
    assert not math.isfinite(float(loss.detach())) or not all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("script", FAULTS, ids=[p.stem for p in FAULTS])
def test_the_first_nonfinite_value_is_located(script: Path, tmp_path: Path) -> None:
    expected = expected_of(script)
    with contextlib.suppress(NonFiniteError), ZeroCode(out=tmp_path / "run", name=script.stem, every=10):
        run_plain(script)  # an explosion ends in NonFiniteError: every later step is skipped
    event = read_run(tmp_path / "run").first_nonfinite()
    assert event is not None
    got = {k: event.get(k) for k in expected}
    assert got == expected, event
