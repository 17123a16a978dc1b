"""Diagnosis rules on real guarded runs: each rule fires where it should and stays silent on health."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest

import guard_runs as G
import verdict_runs
from gradguard.diagnose import (
    RULES,
    Finding,
    diagnose,
    first_nonfinite,
    healthy_window,
    recommended_max_norm,
    to_json,
)
from gradguard.runlog import FINDINGS_FILE, METRICS_FILE, RunLog, RunWriter, read_run

ISSUE_IDS = {
    "explosion",
    "over_clipping",
    "vanishing",
    "divergence",
    "nonfinite_op",
    "bad_data",
    "lr_too_high",
    "weight_growth",
    "loss_scale_collapse",
    "incomplete_log",  # issue 14: a run not closed, or records lost to failed disk writes
    "unbounded_loss",  # issue 12: a loss with no lower bound (a WGAN critic without its Lipschitz constraint)
    "stalled",  # a finite run that did not train and that no other rule explains (the last resort)
    "weight_decay",  # lr × weight_decay far from 0: the weights multiplied by a factor far from 1 each step
    "gradients_not_zeroed",  # no zero_grad() between optimizer steps (gradguard run sees it)
    "lr_schedule",  # the learning rate went negative, or a schedule collapsed it to nothing mid-run
    "loss_code_warning",  # torch warned in the loss code (gradguard run): a broadcast, an implicit dim
    "custom_backward",  # a custom autograd Function whose backward is not linear in its gradient (gradguard run)
    "loss_weight",  # a term of the loss weighted to outweigh the rest of it (gradguard run)
    "clip_before_backward",  # the script's clip_grad_norm_ called before backward(): it clipped nothing
    "loss_on_probabilities",  # a logits loss given probabilities: a softmax before CrossEntropyLoss
    "optimizer_setting",  # momentum 1, RMSprop alpha 1, Adam with an AdamW config's weight_decay
    "logit_scale",  # logits divided by a temperature of 0.02 or less before a classification loss
    "target_network",  # a model no optimizer steps (a target network, an EMA teacher) whose update blew it up
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    names = [
        "healthy",
        "too_high_lr",
        "lr_jump",
        "over_clipped",
        "nan_in_data",
        "finite_divergence",
        "vanishing",
        "log_of_zero",
        "loss_scale_collapse",
    ]
    return {name: getattr(G, name)(root / name) for name in names}


def ids(findings: list[Finding]) -> set[str]:
    return {f.id for f in findings}


def by_id(findings: list[Finding], rule: str) -> Finding:
    found = [f for f in findings if f.id == rule]
    assert found, f"{rule} did not fire; got {[(f.id, f.message) for f in findings]}"
    return found[0]


def healthy_norms(path: Path) -> list[float]:
    return [r["grad_norm"] for r in read_run(path).metrics if math.isfinite(r["grad_norm"])]


def test_rule_ids_are_the_issues_stable_names() -> None:
    assert set(RULES) == ISSUE_IDS


def test_a_healthy_run_has_no_findings(runs: dict[str, Path]) -> None:
    assert diagnose(runs["healthy"]) == []
    window = healthy_window(runs["healthy"])
    assert window.onset_step is None and window.end_reason == "end"
    assert window.first_step == 0 and window.last_step == G.STEPS - 1


def test_a_too_high_lr_is_an_explosion_with_its_onset_first_layer_and_a_healthy_threshold(
    runs: dict[str, Path],
) -> None:
    findings = diagnose(runs["too_high_lr"])
    assert findings[0].id == "explosion" and findings[0].severity == "error"
    boom = findings[0]
    nonfinite = first_nonfinite(runs["too_high_lr"])
    assert nonfinite is not None
    assert boom.step is not None and boom.step < nonfinite["step"]
    assert boom.evidence["first_nonfinite_step"] == nonfinite["step"]
    assert boom.evidence["peak_over_healthy_median"] >= 10
    assert boom.evidence["first_layer"] in {"0", "2", "4"}
    # the threshold comes from the steps before the climb, not from the climb
    window = healthy_window(runs["too_high_lr"])
    assert window.last_step is not None and window.last_step < boom.step
    max_norm = boom.recommendation["max_norm"]
    assert max_norm == recommended_max_norm(findings)
    assert min(window.norms) <= max_norm <= max(window.norms)
    assert max_norm < boom.evidence["peak_norm"] / 100
    assert {"lr_too_high", "weight_growth"} <= ids(findings)
    assert by_id(findings, "lr_too_high").evidence["update_ratio_median_by_layer"]


def test_an_lr_increase_right_before_the_climb_is_blamed(runs: dict[str, Path]) -> None:
    findings = diagnose(runs["lr_jump"])
    boom = by_id(findings, "explosion")
    assert 60 <= boom.step <= 70
    lr = by_id(findings, "lr_too_high")
    assert lr.evidence["lr_jump_step"] == 60
    assert lr.evidence["lr_before"] == pytest.approx(0.05) and lr.evidence["lr_after"] == pytest.approx(0.4)
    # 60 healthy steps: the threshold is about their 90th percentile, never the climb's
    window = healthy_window(runs["lr_jump"])
    assert window.last_step is not None and window.last_step < 62
    healthy = healthy_norms(runs["healthy"])
    assert min(healthy) <= boom.recommendation["max_norm"] <= max(healthy)


def test_over_clipping_is_diagnosed_and_following_the_recommendation_unstalls_training(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    findings = diagnose(runs["over_clipped"])
    over = by_id(findings, "over_clipping")
    assert over.severity == "error"
    ev = over.evidence
    assert ev["clip_rate_window"] == 1.0 and ev["clip_rate_overall"] == 1.0
    assert ev["threshold"] == 0.01
    assert ev["median_norm_over_threshold"] > 100
    assert ev["effective_lr_scale"] < 0.01
    assert ev["effective_lr"] == pytest.approx(0.05 * ev["effective_lr_scale"], rel=0.01)
    assert ev["loss_progress"] < 0.2  # the loss barely moved
    max_norm = over.recommendation["max_norm"]
    # the recommendation lies within the norms of the same model trained without clipping
    healthy = healthy_norms(runs["healthy"])
    assert min(healthy) <= max_norm <= max(healthy)
    assert max_norm > 0.01
    # and following it unstalls training: ≤ 50% clipped, finite, a loss ≤ 1/5 of the stalled run's
    rerun = G.over_clipped(tmp_path / "rerun", max_norm=max_norm)
    log, stalled = read_run(rerun), read_run(runs["over_clipped"])
    rate = sum(r["grad_norm"] > r["threshold"] for r in log.metrics) / len(log.metrics)
    assert rate <= 0.5
    assert not log.events_of("nonfinite")
    final = sum(r["loss"] for r in log.metrics[-20:]) / 20
    stalled_final = sum(r["loss"] for r in stalled.metrics[-20:]) / 20
    assert final <= stalled_final / 5
    assert "over_clipping" not in ids(diagnose(rerun))


def test_adaptive_clippers_clipping_most_steps_are_not_over_clipping(tmp_path: Path) -> None:
    run = G.train(tmp_path / "autoclip", lr=0.05, clip="autoclip:10")
    log = read_run(run)
    taken = [r for r in log.metrics if math.isfinite(r["threshold"])]
    assert sum(r["grad_norm"] > r["threshold"] for r in taken) / len(taken) > 0.5  # by design
    assert "over_clipping" not in ids(diagnose(run))


def test_a_nan_in_the_input_batch_is_bad_data_not_an_explosion(runs: dict[str, Path]) -> None:
    findings = diagnose(runs["nan_in_data"])
    bad = by_id(findings, "bad_data")
    assert bad.step == 100
    assert 100 in bad.evidence["bad_steps"]
    assert "explosion" not in ids(findings) and "nonfinite_op" not in ids(findings)
    # one bad batch does not end the healthy window: the threshold is the healthy run's
    window = healthy_window(runs["nan_in_data"])
    assert window.end_reason == "end" and window.last_step == G.STEPS - 1


def test_divergence_without_nan_is_reported(runs: dict[str, Path]) -> None:
    log = read_run(runs["finite_divergence"])
    assert all(math.isfinite(r["loss"]) for r in log.metrics)  # finite from start to end...
    findings = diagnose(log)
    div = by_id(findings, "divergence")  # ...and still not healthy
    assert div.severity == "error"
    assert div.evidence["all_finite"] is True
    assert div.evidence["loss_peak"] >= 100 * div.evidence["loss_best"]
    assert "nonfinite_op" not in ids(findings)
    assert "weight_growth" in ids(findings)


def test_vanishing_gradients_toward_the_input(runs: dict[str, Path]) -> None:
    findings = diagnose(runs["vanishing"])
    van = by_id(findings, "vanishing")
    assert van.evidence["orders_of_magnitude"] >= 2
    by_layer = van.evidence["median_grad_norm_by_layer"]
    assert next(iter(by_layer)) == "0" and by_layer["0"] < by_layer["18"] / 100
    assert "vanishing" not in ids(diagnose(runs["healthy"]))


def test_a_log_of_zero_every_step_is_a_nonfinite_op_with_a_fix(runs: dict[str, Path]) -> None:
    findings = diagnose(runs["log_of_zero"])
    op = by_id(findings, "nonfinite_op")
    assert op.severity == "error" and op.step == 30
    assert "explosion" not in ids(findings) and "bad_data" not in ids(findings)
    if op.evidence.get("op"):  # located (replay or hooks): the op and the specific fix
        assert op.evidence["op"] == "log"
        assert "clamp" in op.recommendation["text"]
    else:  # the always-on flags only: how to get the op
        assert "closure" in op.recommendation["text"]


def test_amp_loss_scale_collapse(runs: dict[str, Path]) -> None:
    findings = diagnose(runs["loss_scale_collapse"])
    collapse = by_id(findings, "loss_scale_collapse")
    assert collapse.severity == "error" and collapse.step == 10
    assert collapse.evidence["loss_scale"] == 0.5
    assert collapse.recommendation["dtype"] == "bfloat16"
    assert "explosion" not in ids(findings) and "nonfinite_op" not in ids(findings)


def test_findings_json_is_written_on_request(runs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    run = shutil.copytree(runs["too_high_lr"], tmp_path / "copy")
    findings = diagnose(run)
    assert not (run / FINDINGS_FILE).exists()  # a pure function unless asked
    assert diagnose(run, write=True) == findings
    on_disk = json.loads((run / FINDINGS_FILE).read_text())
    assert on_disk == json.loads(json.dumps([f.as_dict() for f in findings]))
    assert [f["id"] for f in on_disk] == [f.id for f in findings]
    for f in on_disk:
        assert set(f) == {"id", "severity", "step", "message", "evidence", "recommendation"}
    assert not list(run.glob(".*.tmp"))  # the atomic write left no temporary file


def test_a_log_cut_off_mid_line_is_read_and_the_note_reported(runs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    run = shutil.copytree(runs["too_high_lr"], tmp_path / "killed")
    with open(run / METRICS_FILE, "a") as f:
        f.write('{"step": 200, "loss": 1.5, "grad_no')  # a process killed mid-write
    log = read_run(run)
    assert any("cut off" in note for note in log.skipped)
    findings = diagnose(log)
    assert [f.id for f in findings] == [f.id for f in diagnose(runs["too_high_lr"])]
    out = to_json(findings, log)
    assert any("cut off" in note for note in out["reader_notes"])


def test_json_shape(runs: dict[str, Path]) -> None:
    log = read_run(runs["too_high_lr"])
    out = to_json(diagnose(log), log)
    assert out["first_nonfinite"] == log.first_event("nonfinite")
    assert out["first_nonfinite"]["type"] == "nonfinite"
    assert {"step", "phase", "kind", "located_by"} <= set(out["first_nonfinite"])
    healthy = read_run(runs["healthy"])
    assert to_json([], healthy)["first_nonfinite"] is None


def test_records_without_optional_keys_and_an_empty_run(tmp_path: Path) -> None:
    """Logs written by other tools: only step and loss, or nothing at all."""
    with RunWriter(tmp_path / "sparse") as w:
        w.write_metrics([{"step": s, "loss": 1.0 / (s + 1)} for s in range(30)])
    assert diagnose(tmp_path / "sparse") == []
    with RunWriter(tmp_path / "empty"):
        pass
    assert diagnose(tmp_path / "empty") == []


def test_a_100k_step_run_is_diagnosed_quickly(tmp_path: Path) -> None:
    import time

    with RunWriter(tmp_path / "long", {"config": {"clip": "Norm(max_norm=1.0)"}}) as w:
        w.write_metrics(
            [
                {
                    "step": s,
                    "loss": 1.0 + math.sin(s / 50) * 0.1,
                    "grad_norm": 0.5 + 0.2 * math.sin(s * 0.7) + (50.0 if s % 10_000 == 5 else 0.0),
                    "threshold": 1.0,
                    "lr": 0.01,
                    "skipped": False,
                }
                for s in range(100_000)
            ]
        )
    start = time.perf_counter()
    findings = diagnose(tmp_path / "long")
    assert time.perf_counter() - start < 20
    assert "over_clipping" not in ids(findings)


def test_a_norm_that_rises_while_the_loss_keeps_falling_is_not_an_explosion(tmp_path: Path) -> None:
    """Adam's early steps often raise the norm 10-20× while training is fine (the rnn demo's Adam run):
    without a non-finite step, an explosion must show in the loss too."""

    def run(name: str, loss_of: Callable[[int], float]) -> Path:
        with RunWriter(tmp_path / name, {"config": {"clip": "None"}}) as w:
            w.write_metrics(
                [
                    {
                        "step": s,
                        "loss": loss_of(s),
                        "grad_norm": 1.0 if s < 20 else 15.0,
                        "lr": 1e-3,
                        "skipped": False,
                    }
                    for s in range(200)
                ]
            )
        return tmp_path / name

    healthy = run("adam_like", lambda s: 2.0 / (1 + s / 20))
    diverging = run("diverging", lambda s: 0.5 * (1 + s / 10))
    assert "explosion" not in ids(diagnose(healthy))
    assert "explosion" in ids(diagnose(diverging))


def test_adams_early_norm_surge_under_a_clip_that_settles_while_the_loss_falls_is_no_error(
    tmp_path: Path,
) -> None:
    """The rnn demo's ``adam+norm:5`` shape, really trained: Adam raises the norm ~10-20× over its
    first steps, the norm settles and the loss keeps falling. A CI gate must pass it: no error, and
    no advice to lower the learning rate or to clip somewhere else."""
    path = verdict_runs.char_lstm(tmp_path / "adam_clip", optimizer="adam", lr=2e-3, clip="norm:5")
    norms, losses = healthy_norms(path), [r["loss"] for r in read_run(path).metrics]
    assert max(norms) >= 10 * norms[0] and losses[-1] < 0.8 * losses[0]  # the shape: a surge, a falling loss
    findings = diagnose(path)
    assert all(f.severity == "info" for f in findings), [(f.id, f.severity, f.message) for f in findings]
    assert "explosion" not in ids(findings)  # Adam: the threshold bounded nothing that needed bounding


def test_adam_under_a_clip_at_a_learning_rate_far_too_high_is_still_an_explosion_error(
    tmp_path: Path,
) -> None:
    """The opposite: the same model and clip at lr 0.2: the norm climbs to ~1e7 and the loss 50× up."""
    path = verdict_runs.char_lstm(tmp_path / "adam_high_lr", optimizer="adam", lr=0.2, clip="norm:5")
    boom = by_id(diagnose(path), "explosion")
    assert boom.severity == "error" and "settled" not in boom.evidence


TOO_HIGH_LR = """
import argparse
import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=1.0)
args = parser.parse_args()
torch.manual_seed(0)
x = torch.randn(512, 8)
y = x @ torch.randn(8, 1)
model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
for step in range(200):
    i = (step * 32) % 512
    loss = nn.functional.mse_loss(model(x[i : i + 32]), y[i : i + 32])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"final loss {float(loss):.6g}")
"""


def test_the_learning_rate_diagnose_recommends_is_verified_by_the_line_it_prints(tmp_path: Path) -> None:
    """A user's script at lr 1 (too high): diagnose's headline recommends a lower rate, marked unverified,
    with a ``gradguard tune`` line; that line, pasted as printed, verifies a rate; diagnose then quotes
    the verified one, and the script trains at it."""
    import shlex
    import subprocess
    import sys

    from gradguard.cli import main
    from gradguard.diagnose import headline

    script = tmp_path / "train.py"
    script.write_text(TOO_HIGH_LR)
    run = tmp_path / "run"
    main(["run", "--out", str(run), "--quiet", "--no-report", str(script)])
    top = headline(diagnose(run))
    assert top is not None and top.recommendation["lr_verified"] is False and top.recommendation["lr"] < 1.0
    words = shlex.split(top.recommendation["lr_tune"])
    assert words[:2] == ["gradguard", "tune"] and words[-1] == str(script), (
        words
    )  # the script last: its own argv
    assert main(["tune", "--steps", "30", "--out", str(tmp_path / "trials"), *words[2:]]) == 0
    verified = headline(diagnose(run))
    assert verified is not None and verified.id == top.id
    rate = verified.recommendation["lr"]
    assert (
        verified.recommendation["lr_verified"] is True
        and f"Verified: lr={rate:g}" in verified.recommendation["text"]
    )
    assert rate < 1.0 and f"{rate:g}" in words[words.index("--lr") + 1].split(",")
    trained = subprocess.run([sys.executable, str(script), "--lr", str(rate)], capture_output=True, text=True)
    assert float(trained.stdout.split()[-1]) < 0.1, trained.stdout  # following the advice trains


def test_a_surge_that_settles_under_sgd_with_a_fixed_clip_is_info_that_the_clip_held_it() -> None:
    """Where clipping does bound the step (SGD), the surge is an ``info``: the threshold held it, keep it."""
    norms = [1.0] * 20 + [2.0, 5.0, 12.0, 20.0, 8.0] + [3.0] * 175
    metrics = [
        {"step": s, "loss": 2.0 / (1 + s / 20), "grad_norm": g, "threshold": 1.0, "lr": 0.1, "skipped": False}
        for s, g in enumerate(norms)
    ]
    meta = {"config": {"clip": {"kind": "norm", "max_norm": 1.0}}, "optimizer": "SGD"}
    held = by_id(diagnose(RunLog(path=Path("synthetic"), meta=meta, metrics=metrics, events=[])), "explosion")
    assert held.severity == "info" and held.evidence["settled"] is True
    assert "max_norm" not in held.recommendation and "learning rate" not in held.recommendation["text"]
    adam = {**meta, "optimizer": {"class": "Adam"}}
    assert diagnose(RunLog(path=Path("synthetic"), meta=adam, metrics=metrics, events=[])) == []


@pytest.mark.parametrize("kind", ["norm", "agc"])
def test_a_clipper_that_zeroes_every_gradient_is_a_finding_not_a_healthy_run(
    tmp_path: Path, kind: str
) -> None:
    """A threshold of 0 zeroes every gradient while every number stays finite. The spec strings
    `"norm:0"` / `"agc:0"` are refused now; a clipper built directly (or an older run) still can."""
    from gradguard.clip import AGC, Norm

    clipper = Norm(0.0) if kind == "norm" else AGC(0.0)
    findings = diagnose(G.train(tmp_path / "zero", clip=clipper, steps=40))
    over = by_id(findings, "over_clipping")
    assert over.severity == "error" and over.evidence["zeroed_rate"] == 1.0
    assert over.recommendation["max_norm"] > 0


def test_a_run_resumed_past_steps_it_never_flushed_says_they_are_missing(tmp_path: Path) -> None:
    """A crash lost steps 14–19 (flushed every 7); the checkpoint of step 20 resumed the run, which
    then closed: the log is closed, but it still lacks those steps, and the finding says which."""
    with RunWriter(tmp_path / "r") as w:
        w.write_metrics([{"step": s, "loss": 1.0, "grad_norm": 1.0} for s in range(14)])
        w.write_event({"type": "resume", "step": 20, "last_logged_step": 13, "metrics_offset": 0})
        w.write_metrics([{"step": s, "loss": 1.0, "grad_norm": 1.0} for s in range(20, 40)])
    found = by_id(diagnose(tmp_path / "r", write=False), "incomplete_log")
    assert found.severity == "info" and found.evidence["missing_steps"] == [[14, 19]]
    assert "Steps 14–19 are not in the log (6 steps)" in found.message
    with RunWriter(tmp_path / "whole") as w:  # a resume from the last step logged: nothing missing
        w.write_metrics([{"step": s, "loss": 1.0, "grad_norm": 1.0} for s in range(14)])
        w.write_event({"type": "resume", "step": 14, "last_logged_step": 13, "metrics_offset": 0})
        w.write_metrics([{"step": s, "loss": 1.0, "grad_norm": 1.0} for s in range(14, 40)])
    assert "incomplete_log" not in ids(diagnose(tmp_path / "whole", write=False))


@pytest.mark.parametrize("damage", ["cut", "missing"])
def test_a_run_whose_meta_json_cannot_be_read_is_a_partial_verdict_not_no_findings(
    tmp_path: Path, damage: str
) -> None:
    """A copy made while the run wrote meta.json (cut off): the run's settings are unknown to every rule, so a
    healthy-looking log is a warning, not "No findings". A log with no meta.json at all stays quiet."""
    with RunWriter(tmp_path / "r") as w:
        w.write_metrics([{"step": s, "loss": 1.0 / (s + 1), "grad_norm": 1.0} for s in range(40)])
    assert not ids(diagnose(tmp_path / "r", write=False))  # whole: clean
    meta = tmp_path / "r" / "meta.json"
    if damage == "cut":
        meta.write_text(meta.read_text()[:60])
    else:
        meta.unlink()
    if damage == "missing":  # a log written without one (by hand, another tool): nothing says it had settings
        assert "incomplete_log" not in ids(diagnose(tmp_path / "r", write=False))
        return
    found = by_id(diagnose(tmp_path / "r", write=False), "incomplete_log")
    assert found.severity == "warning"
    assert "meta.json: not valid JSON" in found.evidence["meta_unread"]
    assert "this verdict is partial" in found.message
