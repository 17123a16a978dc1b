"""Verified learning-rate advice (issue 15): ``gradguard tune SCRIPT --lr``, ``gradguard.tune.tune(lrs=...)``,
the learning-rate axis of :func:`gradguard.tunelog.choose`, and what ``tune.json`` holds for diagnose.

The script under test, ``tests/tune_scripts/too_high_lr.py``, is a user's script at a learning rate
too high for it (plain SGD at 1: non-finite within a few steps): the verified rate is one it trains at
when the user follows the advice."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradguard.cli import main
from gradguard.integrations import tune_script as ts
from gradguard.runlog import RunWriter
from gradguard.tune import tune
from gradguard.tunelog import TUNE_FILE, Trial, TuneResult, choose, judge, ladder, read_tune, write_tune

SCRIPT = Path(__file__).parent / "tune_scripts" / "too_high_lr.py"


def final_loss(*args: str) -> float:
    """The script's final loss, run as a user runs it (``python too_high_lr.py --lr X``)."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True, timeout=300
    )
    return float(done.stdout.strip().split()[-1])


def trial(lr: float, *, ok: bool = True, loss: float = 1.0, own: bool = True) -> Trial:
    norms = [10.0] * 20 if ok else [10.0] * 5 + [10.0**k for k in range(2, 17)]
    return judge(None, lr, [2.0] + [loss] * 19, norms, own_clip=own)


# ------------------------------------------------------------------------------------------ the pick rule
def test_choose_on_the_learning_rate_axis_stays_at_most_0_3_of_the_rate_that_failed() -> None:
    rates = [trial(lr) for lr in (0.03, 0.06, 0.12)]
    blown = trial(0.25, ok=False)
    assert choose([*rates, blown, trial(1.0, ok=False)]) == rates[1]  # 0.06 ≤ 0.3 × 0.25 < 0.12
    assert choose([*rates, trial(0.5, ok=False)]) == rates[2]  # 0.12 ≤ 0.15
    assert choose([trial(0.03), trial(0.06), trial(0.125), trial(0.2, ok=False)]) == trial(0.06)
    # unclipped candidates alike: the rate decides, not the (unbounded) step
    unclipped = [trial(lr, own=False) for lr in (0.06, 0.12, 0.25)]
    assert choose([*unclipped, trial(0.4, ok=False, own=False)]) == unclipped[1]  # 0.12 ≤ 0.3 × 0.4 < 0.25
    # past the valley (AdamW at 0.03 on the transformer: its loss fell, clearly less than at 0.015's):
    # an overshoot, so two rungs back from the highest rate that trained well below it
    rungs = [trial(0.004, loss=1.2), trial(0.008, loss=1.0), trial(0.015, loss=0.95)]
    past = trial(0.03, loss=1.4)
    assert past.trained and not past.failed
    assert choose([*rungs, past]) == rungs[0]
    assert choose(rungs) == rungs[2]  # nothing past the valley, nothing failed: the highest
    # a higher rate that only overshot (finite, the loss did not fall): two rungs back as well
    stuck = trial(0.03, loss=2.5)
    assert (
        not stuck.trained and not stuck.failed and choose([*rungs, stuck, trial(0.06, ok=False)]) == rungs[0]
    )
    assert choose([trial(1.0, ok=False)]) is None


def test_tune_json_holds_the_verified_rate_and_reads_back(tmp_path: Path) -> None:
    result = TuneResult([trial(0.06), trial(0.12), trial(0.5, ok=False)], 20, source="script")
    assert result.lr == 0.12 and result.max_norm is None and result.lr_candidates() == [0.06, 0.12, 0.5]
    assert result.recommended is not None and result.recommended.label == "lr=0.12"
    assert result.verdict().startswith("Verified: lr=0.12 (the script's own clipping) trained for 20 steps")
    write_tune(tmp_path, result)
    saved = json.loads((tmp_path / TUNE_FILE).read_text())
    # the fields diagnose already read stay; the rate is added at the top level and in the trials
    assert {"version", "source", "steps", "start_step", "command", "trials", "recommended", "verdict"} <= set(
        saved
    )
    assert saved["recommended_lr"] == 0.12 and saved["lr_candidates"] == [0.06, 0.12, 0.5]
    assert saved["recommended"]["lr"] == 0.12 and saved["recommended"]["own_clip"] is True
    back = read_tune(tmp_path)
    assert back is not None and back.lr == 0.12 and all(t.own_clip for t in back.trials)
    # a threshold-only tune.json: no rates, and old files (no own_clip) read as before
    plain = TuneResult([judge(1.0, None, [2.0] + [1.0] * 19, [10.0] * 20)], 20)
    assert plain.lr is None and plain.as_dict()["recommended_lr"] is None and plain.lr_candidates() == []
    old = plain.as_dict()
    del old["trials"][0]["own_clip"]
    assert TuneResult.from_dict(old).trials[0].own_clip is False


# ------------------------------------------------------------------------------------------ in memory
def test_in_memory_tune_over_learning_rates_verifies_a_rate_that_trains() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = x @ torch.randn(8, 1)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    data = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 512, 32)] * 3
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    result = tune(
        model,
        opt,
        lambda b: nn.functional.mse_loss(model(b[0]), b[1]),
        data,
        lrs=[1.0, 0.25, 0.12, 0.06],
        steps=40,
    )
    # rates only: every trial unclipped (no threshold ladder), the rate the candidate
    assert [t.max_norm for t in result.trials] == [None] * 4
    assert [t.lr for t in result.trials] == [1.0, 0.25, 0.12, 0.06]
    assert result.trials[0].failed and result.trials[1].failed and result.lr == 0.06  # ≤ 0.3 × 0.25
    assert opt.param_groups[0]["lr"] == 1.0 and all(
        torch.equal(weights[k], v) for k, v in model.state_dict().items()
    )
    # followed: the verified rate trains the same model from the same start for longer
    opt = torch.optim.SGD(model.parameters(), lr=result.lr)
    for b in data:
        loss = nn.functional.mse_loss(model(b[0]), b[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = float(loss.detach())
    assert math.isfinite(final) and final < 0.2


# ------------------------------------------------------------------------------------------ the script tuner
class FakeJob(ts._Job):
    """A tuning whose trials are judged from a rule instead of a process (the candidate logic only)."""

    calls: list[tuple[Any, float | None]]  # (max_norm, lr) of each trial, in order

    def trial(self, k: int, max_norm: Any, lr: float | None = None) -> Trial:
        self.calls.append((max_norm, lr))
        run_dir = self.folder / ts._name(k, max_norm, lr)
        with RunWriter(run_dir, {"config": {}}) as w:
            w.write_metrics([{"step": 0, "loss": 1.0, "grad_norm": 1.0, "lr": 0.8}])
        return judge(None, lr, [2.0] + [1.0] * 19, [1.0] * 20, own_clip=max_norm == ts._OWN)


def test_lr_auto_halves_down_from_the_rate_of_the_run_or_of_a_probe(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunWriter(run, {"config": {}}) as w:  # a warm-up to 0.5: the top is the largest rate
        w.write_metrics([{"step": s, "loss": 1.0, "grad_norm": 1.0, "lr": 0.05 * (s + 1)} for s in range(10)])
    job = FakeJob(SCRIPT, [], 20, tmp_path / "a", None)
    job.calls = []
    trials = ts._lr_trials(job, None, "auto", run)
    assert [t.lr for t in trials] == ladder(0.5, ts.LR_RUNGS) and all(t.own_clip for t in trials)
    # no run: the script as it is (own rate 0.8, read from its run directory) is the top rung
    job = FakeJob(SCRIPT, [], 20, tmp_path / "b", None)
    job.calls = []
    trials = ts._lr_trials(job, [1.0, None], "auto", None)
    assert job.calls[0] == (ts._OWN, None) and trials[0].lr == 0.8 and trials[0].own_clip
    below = ladder(0.8, ts.LR_RUNGS)[:-1]
    assert [c[1] for c in job.calls[1:]] == below * 2  # each threshold at each lower rate
    assert [c[0] for c in job.calls[1:]] == [1.0] * len(below) + [None] * len(below)


def test_cli_tune_lr_verifies_a_rate_the_too_high_script_then_trains_at(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    with RunWriter(run, {"config": {}, "script": str(SCRIPT)}) as w:
        w.write_metrics([{"step": s, "loss": 1.0, "grad_norm": 1.0, "lr": 1.0} for s in range(5)])
    code = main(
        [
            "tune",
            "--lr",
            "1,0.25,0.06",
            "--steps",
            "30",
            "--out",
            str(tmp_path / "trials"),
            "--run",
            str(run),
            str(SCRIPT),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "lr=1 " in out and "Verified: lr=0.06 (the script's own clipping)" in out
    saved = json.loads((run / TUNE_FILE).read_text())
    assert (
        saved["recommended_lr"] == 0.06
        and saved["command"] == f"gradguard tune --run {run} --lr 1,0.25,0.06 {SCRIPT}"
    )
    top = saved["trials"][0]
    assert top["lr"] == 1.0 and top["own_clip"] and (top["exploded"] or top["nonfinite"])
    # the trials ran the script at the candidate rate, with its own clipping kept (measured, not replaced)
    meta = json.loads((tmp_path / "trials" / "trial02-own-lr-0.06" / "meta.json").read_text())
    assert meta["config"]["clip"] in (None, "none") or meta["config"]["clip"].get("kind") in (None, "none")
    # the advice followed: the script at the verified rate trains; at its own rate it does not
    assert final_loss("--lr", "0.06") < 0.1
    assert not final_loss("--lr", "1") < 0.1


def test_cli_tune_lr_refuses_bad_rates(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0,1", "none", "1,x"):
        with pytest.raises(SystemExit) as e:
            main(["tune", "--lr", bad, str(SCRIPT)])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "every learning rate must be a positive finite number" in err and "expected learning rates" in err
    with pytest.raises(Exception, match="positive finite"):
        ts.tune_script(str(SCRIPT), lrs=[0.1, -1.0])


def test_cli_tune_reads_a_negative_number_as_a_value_and_refuses_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--lr -1e-3`` was argparse's "expected one argument" (a word starting with a minus read as a flag)."""
    for flag, bad, what in (
        ("--lr", "-1e-3", "every learning rate"),
        ("--lr", "1e-3,-1e-4", "every learning rate"),
        ("--max-norm", "-1e-1", "every threshold"),
        ("--timeout", "-1e3", "the timeout"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["tune", flag, bad, str(SCRIPT)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "expected one argument" not in err, err
        assert f"argument {flag}: {what} must be a positive finite number, got '{bad.split(',')[-1]}'" in err


def test_the_rate_and_the_threshold_tunings_of_one_run_keep_each_other(tmp_path: Path) -> None:
    """diagnose prints a `gradguard tune` command for a threshold and one for the rates; the second
    run of either kept only its own trials in the run's tune.json, so diagnose asked for the first
    again. Each keeps the other question's trials now (a threshold's run at the script's own rate)."""
    thresholds = TuneResult([Trial(4.0, None, 10, 5.0, 1.0, 1.0, False, False, None, 0.5, 9.0)], 10, "script")
    rates = TuneResult([trial(0.01), trial(0.02)], 10, "script")
    both = ts.with_other_question(thresholds, rates)
    assert [(t.max_norm, t.lr) for t in both.trials] == [(4.0, None), (None, 0.01), (None, 0.02)]
    again = ts.with_other_question(
        both, TuneResult([Trial(8.0, None, 10, 5.0, 1.0, 1.0, False, False, None, 0.5, 9.0)], 10, "script")
    )
    assert [(t.max_norm, t.lr) for t in again.trials] == [
        (None, 0.01),
        (None, 0.02),
        (8.0, None),
    ]  # a new threshold replaces the old
    assert ts.with_other_question(None, rates) is rates
    assert (
        ts.with_other_question(TuneResult(thresholds.trials, 10, "memory"), rates) is rates
    )  # another tuner's file


HAND_SET_RATE = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(40):
    for group in opt.param_groups:
        group["lr"] = 0.05 * min(1.0, (step + 1) / 10)  # a warm-up written by hand: the script sets the rate
    x = torch.randn(32, 4)
    loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


def test_candidate_rates_the_script_overwrites_are_not_verified(tmp_path: Path) -> None:
    """A script that sets param_group['lr'] every step: the four trials of `gradguard tune --lr` ran at its
    rate, bit-identical, and tune printed "Verified: lr=0.4 … trained", which diagnose then quoted."""
    script = tmp_path / "hand_rate.py"
    script.write_text(HAND_SET_RATE)
    result = ts.tune_script(str(script), lrs=[0.01, 0.1], steps=12, out=tmp_path / "tune")
    assert result.recommended is None and all(t.lr_ignored for t in result.trials), result.trials
    assert "sets the learning rate itself" in result.verdict() and "never took effect" in result.verdict()
