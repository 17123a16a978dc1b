"""Real multi-process runs (torchrun, gloo, CPU, 2 ranks): every rank makes the same decision.

A NaN written after the all-reduce into one rank's local gradient (DDP), or into one element of one
shard (FSDP2), makes every rank skip the same step, and all ranks stay bit-identical; FSDP2's guarded
global norm equals the single-process norm of the same model and batch, and so do the clipped
gradients. The worker is tests/distributed_worker.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradguard.diagnose import diagnose
from gradguard.runlog import read_run
from torchrun import torchrun

WORKER = Path(__file__).with_name("distributed_worker.py")
BAD_STEP = 3


def launch(mode: str, out: Path) -> list[dict]:
    proc = torchrun(str(WORKER), mode, str(out), timeout=120, fresh=[out])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("mode", ["ddp", "ddp-fused", "fsdp", "fsdp-fused"])
def test_a_nan_on_one_rank_after_the_reduction_makes_every_rank_skip_the_same_step(
    tmp_path: Path, mode: str
) -> None:
    ranks = launch(mode, tmp_path)
    expected = [step == BAD_STEP for step in range(6)]
    for r in ranks:
        assert r["skipped"] == expected
        assert r["sync_free"] == mode.endswith("fused")
        # the skipped step changed nothing
        for a, b in zip(r["params"][BAD_STEP - 1], r["params"][BAD_STEP], strict=True):
            assert torch.equal(a, b)
        assert all(torch.isfinite(p).all() for p in r["params"][-1])
    for step in range(6):  # the ranks stay bit-identical
        for a, b in zip(ranks[0]["params"][step], ranks[1]["params"][step], strict=True):
            assert torch.equal(a, b)
    log = read_run(tmp_path / "run")  # written by rank 0 only
    assert [e["step"] for e in log.events_of("skip")] == [BAD_STEP]
    event = log.first_event("nonfinite")
    assert event["step"] == BAD_STEP and event["kind"] == "nan" and event["phase"] == "backward"
    assert log.meta["world_size"] == 2
    rank1 = tmp_path / "run" / "ranks" / "rank1"
    assert rank1.exists() == (mode == "ddp")  # per-rank logs only when asked (rank_logs=True)
    if mode == "ddp":
        rank1_log = read_run(rank1)
        assert rank1_log.meta["rank"] == 1 and len(rank1_log.metrics) == 6
        assert [e["step"] for e in rank1_log.events_of("skip")] == [BAD_STEP]
    if mode.startswith("fsdp"):
        assert ranks[0]["floats_per_step"] == 4 + 6  # the loss, three flags and six sharded tensors
    else:
        assert ranks[0]["floats_per_step"] == 4


@pytest.mark.parametrize("mode", ["ddp-data", "fsdp-data"])
def test_a_nan_in_one_ranks_batch_is_the_data_of_that_rank(tmp_path: Path, mode: str) -> None:
    """Replays are off across ranks; each rank checks the inputs its step was given, and one gather
    (every rank skips the same step) tells every rank whose batch it was."""
    ranks = launch(mode, tmp_path)
    for r in ranks:
        assert r["skipped"] == [step == BAD_STEP for step in range(6)]
    event = read_run(tmp_path / "run").first_event("nonfinite")
    assert (event["step"], event["phase"], event["tensor"], event["rank"]) == (
        BAD_STEP,
        "data",
        "input",
        1,
    ), event
    assert event["located_by"] == "inputs" and event["evidence"]["ranks"] == [1]
    assert event["evidence"]["input"]["nan"] == 1 and event["evidence"]["reason"].startswith("on rank 1,")
    verdict = next(f for f in diagnose(tmp_path / "run") if f.id == "bad_data")
    assert verdict.severity == "error" and "on rank 1" in verdict.message


def test_a_nan_loss_on_one_rank_with_finite_inputs_names_that_rank(tmp_path: Path) -> None:
    """FSDP2, Guard in code: rank 1's loss code divides by an empty selection's count (0 / 0) at step 3. Every
    rank skipped the step, and the verdict read "a lone non-finite step (no op located)", naming no rank."""
    ranks = launch("fsdp-loss", tmp_path)
    for r in ranks:
        assert r["skipped"] == [step == BAD_STEP for step in range(6)]
    event = read_run(tmp_path / "run").first_event("nonfinite")
    assert (event["step"], event["phase"], event["rank"]) == (BAD_STEP, "loss", 1), event
    verdict = next(f for f in diagnose(tmp_path / "run") if f.id == "bad_data")
    assert "On rank 1 only, the loss was nan" in verdict.message, verdict.message


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_the_guarded_global_norm_and_clipped_gradients_equal_the_single_process_ones(
    tmp_path: Path, mode: str
) -> None:
    ranks = launch(mode, tmp_path)
    log = read_run(tmp_path / "run")
    norm0 = log.metrics[0]["grad_norm"]
    ref = ranks[0]["ref_norm0"]
    assert ref > 0.05 * 4  # the step really clips
    assert abs(norm0 - ref) <= 1e-6 * ref
    assert log.metrics[0]["loss"] == pytest.approx(ranks[0]["ref_loss0"], rel=1e-6)  # the mean over ranks
    for r in ranks:
        for got, want in zip(r["grads0"], ranks[0]["ref_grads0"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
