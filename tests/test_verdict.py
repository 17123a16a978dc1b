"""The verdict a user reads (issue 12): the headline finding, its cause and its fix.

* Severity a CI gate can trust: ``gradguard diagnose`` exits 0 on healthy runs of many kinds and
  1 on runs that diverged (finite or not) — real short Guard runs (tests/verdict_runs.py).
* One headline with its precedence written once (the registry): bad data only when a tensor
  entering the step was non-finite; a located op on finite inputs is an op fault.
* Fixes from evidence: each fault script (tests/faults/) fails on torch without gradguard; run
  through ``gradguard run``, its headline, cause and fix are what a user should read.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import verdict_runs as runs_of
from gradguard.diagnose import diagnose, headline
from gradguard.report import print_summary
from gradguard.runlog import RunWriter, read_run

HERE = Path(__file__).parent
FAULTS = HERE / "faults"
ENV_KEYS = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, **ENV_KEYS}
    cmd = [sys.executable, "-m", "gradguard", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verdict")
    build = {**runs_of.HEALTHY, **runs_of.DIVERGED, "endless_warmup": runs_of.endless_warmup}
    return {name: fn(root / name) for name, fn in build.items()}


# ------------------------------------------------------------------ severity a CI gate can trust
@pytest.mark.parametrize("name", list(runs_of.HEALTHY))
def test_a_healthy_run_has_no_error_and_diagnose_exits_0(runs: dict[str, Path], name: str) -> None:
    findings = diagnose(runs[name])
    assert headline(findings) is None, [(f.id, f.message) for f in findings]
    assert not {"divergence", "explosion", "lr_too_high", "vanishing"} & {f.id for f in findings}
    assert cli("diagnose", str(runs[name]), cwd=runs[name].parent).returncode == 0


@pytest.mark.parametrize("name", list(runs_of.DIVERGED))
def test_a_diverged_run_is_an_error_and_diagnose_exits_1(runs: dict[str, Path], name: str) -> None:
    findings = diagnose(runs[name])
    top = headline(findings)
    assert top is not None and top.id == "explosion", [(f.id, f.severity) for f in findings]
    if name != "explodes":  # finite: the divergence is an error too
        assert any(f.id == "divergence" and f.severity == "error" for f in findings)
    got = cli("diagnose", str(runs[name]), cwd=runs[name].parent)
    assert got.returncode == 1
    assert got.stdout.splitlines()[0].startswith("verdict: explosion")


def test_an_rl_loss_that_grows_with_longer_episodes_is_not_divergence(runs: dict[str, Path]) -> None:
    log = read_run(runs["rl_episodic"])
    losses = [r["loss"] for r in log.metrics]
    assert losses[-1] > 1000 * losses[0]  # the loss really grew by orders of magnitude
    assert not {"divergence", "explosion"} & {f.id for f in diagnose(runs["rl_episodic"])}


def test_a_warmup_that_never_stops_is_blamed_an_ordinary_one_is_not(runs: dict[str, Path]) -> None:
    assert "lr_too_high" not in {f.id for f in diagnose(runs["warmup"])}
    lr = next(f for f in diagnose(runs["endless_warmup"]) if f.id == "lr_too_high")
    assert "warm-up that never stops" in lr.message and lr.evidence["lr_still_rising_from_step"] > 20
    assert lr.recommendation["lr"] < lr.evidence["lr_last"]


# ------------------------------------------------------------------ one headline, its precedence
def _lone_run(path: Path, event: dict[str, object] | None) -> Path:
    """50 healthy steps, one non-finite step (50), 10 healthy again; ``event`` at step 50."""
    rows = [{"step": s, "loss": 1.0, "grad_norm": 1.0 + 0.01 * (s % 3)} for s in range(61)]
    rows[50].update(loss=float("nan"), grad_norm=float("nan"), nonfinite=True, skipped=True)
    with RunWriter(path) as w:
        w.write_metrics(rows)
        if event is not None:
            w.write_events([{"type": "nonfinite", "step": 50, **event}])
    return path


def test_a_lone_step_located_on_finite_inputs_is_the_ops_fault_not_bad_data(tmp_path: Path) -> None:
    event = {
        "phase": "forward",
        "module": "attn",
        "op": "softmax",
        "kind": "nan",
        "located_by": "replay",
        "evidence": {"reason": "a row of all -inf (every key masked) gives 0/0"},
    }
    findings = diagnose(_lone_run(tmp_path / "op", event))
    top = headline(findings)
    assert top is not None and top.id == "nonfinite_op" and "bad_data" not in {f.id for f in findings}
    assert "leave at least one key unmasked" in top.recommendation["text"]


def test_a_lone_step_whose_op_was_given_a_nan_stays_a_possible_bad_batch(tmp_path: Path) -> None:
    event = {
        "phase": "forward",
        "op": "linear",
        "kind": "nan",
        "evidence": {"reason": "a NaN was already in the input"},
    }
    findings = diagnose(_lone_run(tmp_path / "passed", event))
    assert any(f.id == "bad_data" and f.severity == "warning" for f in findings)


def test_bad_data_names_the_tensor_and_heads_the_verdict(tmp_path: Path) -> None:
    event = {"phase": "data", "tensor": "input", "kind": "nan", "located_by": "replay"}
    findings = diagnose(_lone_run(tmp_path / "data", event))
    top = headline(findings)
    assert top is not None and top.id == "bad_data" and "the model's input" in top.message
    out = io.StringIO()
    print_summary(read_run(tmp_path / "data"), findings, file=out)
    first, fix = out.getvalue().splitlines()[:2]
    assert first.startswith("verdict: bad_data at step 50") and fix.startswith("fix: Clean the data")


def test_a_healthy_run_has_no_headline_and_prints_none() -> None:
    assert headline([]) is None


# ------------------------------------------------------------------ fixes from evidence
def _expected(script: Path) -> dict[str, object]:
    line = next(x for x in script.read_text().splitlines() if x.startswith("EXPECTED"))
    return json.loads(line.split("=", 1)[1].strip().replace("None", "null"))


# script → (what the cause says, the fix's key phrase)
VERDICTS = {
    "masked_attention": ("every key masked", "leave at least one key unmasked"),
    "zero_std": ("division by zero", "clamp_min(eps)"),
    "zero_count": ("div", "guard empty counts"),
    "hypot_origin": ("hypot at 0", "torch.sqrt(x * x + y * y + eps)"),
    "acos_cosine": ("acos", "x.clamp(-1 + 1e-6, 1 - 1e-6)"),
    "pow_fractional_negative": ("a negative base to a fractional power", "x.clamp_min(0) ** p"),
    "normalize_zero_row": ("division by zero", "F.normalize"),
    "focal_loss": ("pow", "(1 - p).clamp_min(eps) ** gamma"),
    "ce_all_ignored": ("cross_entropy", "no valid target"),
    "vae_kl_exp": ("exp", "clamp the argument before exp"),
}


@pytest.mark.parametrize("fault", list(VERDICTS))
def test_the_verdict_a_user_reads_names_the_op_its_cause_and_its_fix(tmp_path: Path, fault: str) -> None:
    script = FAULTS / f"{fault}.py"
    got = cli("run", "--out", str(tmp_path / "run"), "--no-report", str(script), cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    expected = _expected(script)
    event = read_run(tmp_path / "run").first_nonfinite()
    assert {k: event.get(k) for k in expected} == expected
    top = headline(diagnose(tmp_path / "run"))
    cause, fix = VERDICTS[fault]
    assert top is not None and top.id == "nonfinite_op" and top.step == event["step"]
    assert cause in top.message and fix in top.recommendation["text"]
    shown = cli("diagnose", str(tmp_path / "run"), cwd=tmp_path)
    assert shown.returncode == 1 and shown.stdout.startswith("verdict: nonfinite_op")
