"""``gradguard run`` inside ``torchrun`` (``torchrun --nproc-per-node 2 -m gradguard run script.py``) on a
DDP script (gloo, 2 ranks, CPU): the healthy run prints, saves and exits as the plain run; rank 0
writes the one run log (as a :class:`gradguard.Guard` does under DDP) with the script's pre-clip norms
and the loss averaged over the ranks; one summary and one report; the diverging variant is
located and diagnosed, with the plain run's exit code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from gradguard.runlog import read_run
from torchrun import torchrun

SCRIPT = Path(__file__).parent / "run_scripts" / "ddp_regression.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun with gloo on Linux")


@cache
def _runs(
    root: Path, *extra: str
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    plain_dir, guarded_dir, run_dir = root / "plain", root / "guarded", root / "run"
    plain = torchrun(str(SCRIPT), *extra, cwd=plain_dir, env=ENV, fresh=[plain_dir])
    guarded = torchrun(
        "-m", "gradguard", "run", "--out", str(run_dir), str(SCRIPT), *extra,
        cwd=guarded_dir, env=ENV, fresh=[guarded_dir, run_dir],
    )  # fmt: skip
    return plain, guarded


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    _runs(root)
    return root


def test_the_healthy_ddp_run_prints_saves_and_exits_as_the_plain_run(healthy: Path) -> None:
    plain, guarded = _runs(healthy)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert guarded.returncode == 0, guarded.stderr[-2000:]
    assert guarded.stdout == plain.stdout
    saved = (healthy / "guarded" / "regressor.pt").read_bytes()
    assert saved == (healthy / "plain" / "regressor.pt").read_bytes()
    assert guarded.stderr.count("Run log:") == 1  # rank 0's summary only
    assert guarded.stderr.count("gradguard: report:") <= 1


def test_rank_zero_logs_the_scripts_pre_clip_norms_and_the_mean_loss(healthy: Path) -> None:
    plain, _ = _runs(healthy)
    printed = re.findall(r"loss (\d+\.\d+) norm (\d+\.\d+)", plain.stdout)
    log = read_run(healthy / "run")
    assert log.meta["world_size"] == 2
    assert not (healthy / "run" / "ranks").exists()
    assert [(f"{r['loss']:.6f}", f"{r['grad_norm']:.4f}") for r in log.metrics] == printed
    assert [r["global_step"] for r in log.metrics] == list(range(len(printed)))
    assert all(r["threshold"] == pytest.approx(0.3) for r in log.metrics)
    assert [r["clip_fraction"] for r in log.metrics] == [1.0 if float(n) > 0.3 else 0.0 for _, n in printed]


def test_a_diverging_ddp_run_is_located_and_diagnosed(tmp_path: Path) -> None:
    plain, guarded = _runs(tmp_path, "--diverge")
    assert plain.returncode != 0 and guarded.returncode != 0
    event = read_run(tmp_path / "run").first_nonfinite()
    assert event is not None and event["located_by"] and event["phase"], event
    assert f"first non-finite value at step {event['step']}" in guarded.stderr
    diag = subprocess.run(
        [sys.executable, "-m", "gradguard", "diagnose", "--json", "--no-write", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert diag.returncode == 1
    findings = json.loads(diag.stdout)["findings"]
    assert {f["id"] for f in findings} & {"explosion", "nonfinite", "divergence"}
    # the check it advises runs the script as it ran: under torchrun (the tune line failed, "RANK expected")
    texts = " ".join(f["recommendation"].get("text", "") for f in findings)
    assert "unverified" not in texts or "torchrun --nproc-per-node 2 -m gradguard run" in texts, texts
    assert "gradguard tune --run" not in texts


def test_an_fsdp2_scripts_own_clip_is_logged_not_an_internal_error(tmp_path: Path) -> None:
    """FSDP2: torch's ``clip_grad_norm_`` returns the total norm of sharded gradients as a DTensor;
    writing it into the step's row raised inside the hook: "internal error in clip_grad_norm_;
    gradguard stops guarding this run", 0 steps logged, and diagnose read "No findings"."""
    script = Path(__file__).parent / "run_scripts" / "fsdp2_clip.py"
    plain = torchrun(str(script), cwd=tmp_path, env=ENV)
    got = torchrun(
        "-m", "gradguard", "run", "--out", str(tmp_path / "run"), "--no-report", str(script),
        cwd=tmp_path, env=ENV, fresh=[tmp_path / "run"],
    )  # fmt: skip
    assert got.returncode == plain.returncode == 0, got.stderr
    assert "internal error" not in got.stderr and got.stdout == plain.stdout
    log = read_run(tmp_path / "run")
    assert len(log.metrics) == 12
    printed = [float(v) for v in re.findall(r"grad norm ([0-9.]+)", plain.stdout)]
    logged = [log.metrics[s]["grad_norm"] for s in (0, 4, 8)]
    assert logged == pytest.approx(printed, abs=1e-4)  # the script's own total norm, pre-clip
    assert "the script called clip_grad_norm_(max_norm=1) on 12 steps" in got.stderr


def test_fsdp2_in_one_process_is_guarded_and_a_bad_batch_skipped(tmp_path: Path) -> None:
    """FSDP2 launched as one process (``torchrun --nproc-per-node 1``, the single-process rerun
    diagnose advises): the guard read the sharded parameters as plain tensors and raised at its
    start (".tolist() is not supported for tensor subclasses, got DTensor"), killing the script."""
    script = Path(__file__).parent / "run_scripts" / "fsdp2_clip.py"
    got = torchrun(
        "-m", "gradguard", "run", "--out", str(tmp_path / "run"), "--no-report", str(script), "--nan-step", "6",
        cwd=tmp_path, env=ENV, fresh=[tmp_path / "run"], nproc=1,
    )  # fmt: skip
    assert got.returncode == 0 and "internal error" not in got.stderr, got.stderr
    assert "weights finite: True" in got.stdout
    log = read_run(tmp_path / "run")
    assert [r["step"] for r in log.metrics if r["skipped"]] == [6]


def test_a_loss_code_fault_on_one_rank_is_located_there(tmp_path: Path) -> None:
    """A per-rank ``sum / count`` whose count is 0 on rank 1 only (finite inputs): replays are off
    under DDP, and the verdict was "a lone non-finite step, no op located" naming no rank. Each rank's
    loss-code watch now joins the gather that checks the inputs: the division, on rank 1."""
    _runs(tmp_path, "--labeled-only")
    event = read_run(tmp_path / "run").first_nonfinite()
    assert event is not None and event["step"] == 3, event
    assert (event["op"], event["phase"], event.get("rank")) == ("div", "loss", 1), event
    assert "on rank 1" in event["evidence"]["reason"] and event["source"].endswith("ddp_regression.py:73")


def test_ddp_join_with_uneven_inputs_trains_as_the_plain_run(tmp_path: Path) -> None:
    """`with model.join():` (uneven inputs): a rank that ran out of data only shadows DDP's collectives,
    so the guard's per-step all-reduce had no partner — gloo's "collective mismatch" aborted both ranks,
    under `gradguard run` and with a Guard in code alike. Under Join the guard does not all-reduce."""
    script = Path(__file__).parent / "run_scripts" / "ddp_uneven_join.py"
    plain = torchrun(str(script), cwd=tmp_path, env=ENV)
    assert plain.returncode == 0, plain.stderr[-2000:]
    weights = re.search(r"rank 0 ran 14 steps; weights (\w+)", plain.stdout)
    assert weights is not None, plain.stdout
    run_dir, code_dir = tmp_path / "run", tmp_path / "code"
    guarded = torchrun("-m", "gradguard", "run", "--out", str(run_dir), str(script), cwd=tmp_path, env=ENV)
    in_code = torchrun(str(script), "--guard", str(code_dir), cwd=tmp_path, env=ENV)
    for proc in (guarded, in_code):
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"weights {weights.group(1)}" in proc.stdout  # bit-identical to the plain run
    for folder in (run_dir, code_dir):
        assert len(read_run(folder).metrics) == 14


def test_a_bad_sample_under_ddp_join_is_named_on_its_rank(tmp_path: Path) -> None:
    """Row 300 of rank 0's shard (step 12, after rank 1 ran out of data) holds a NaN: under Join the guard
    gathers nothing, and it dropped rank 0's own answer too — "nonfinite_op … the flags do not name the op",
    an error beside nothing that named the batch."""
    script = Path(__file__).parent / "run_scripts" / "ddp_uneven_join.py"
    code_dir = tmp_path / "code"
    done = torchrun(str(script), "--guard", str(code_dir), "--bad-row", "300", cwd=tmp_path, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    event = next(e for e in read_run(code_dir).events if e["type"] == "nonfinite")
    assert (event["step"], event.get("rank"), event["tensor"]) == (12, 0, "input"), event


def test_a_bad_sample_under_ddp_accumulation_is_named_on_its_rank(tmp_path: Path) -> None:
    """Sample 100 (a NaN feature) is dealt to rank 1, batch 6: step 1, micro-batch 3 of 4. Rank 0's loss-code
    watch saw its DataLoader index the dataset tensor that holds the NaN row (a finite batch came out) and
    answered "a loss input that held nan" first: the verdict named rank 0, "a target or label"."""
    script = Path(__file__).parent / "run_scripts" / "ddp_accumulation.py"
    run_dir = tmp_path / "run"
    done = torchrun(
        "-m", "gradguard", "run", "--out", str(run_dir), str(script), "--bad-sample", "100", cwd=tmp_path, env=ENV
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    event = next(e for e in read_run(run_dir).events if e["type"] == "nonfinite")
    assert (event["step"], event["rank"], event["tensor"]) == (1, 1, "input"), event
    assert "micro-batch 3 of the step's 4" in event["evidence"]["reason"], event
