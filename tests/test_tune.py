"""Advice verified before it is given (issue 15): ``gradguard.tune``, ``Guard.tune``, ``gradguard tune SCRIPT``,
and diagnose advice that never recommends what the run showed to fail and never calls a run that trained over-clipped."""

from __future__ import annotations

import json
import math
import random
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradguard
from gradguard.cli import main
from gradguard.diagnose import diagnose
from gradguard.errors import GradGuardError
from gradguard.runlog import RunLog, RunWriter
from gradguard.tune import tune
from gradguard.tunelog import TUNE_FILE, Trial, TuneResult, choose, judge, read_tune, write_tune


# ------------------------------------------------------------------------------------------ helpers
def regression(seed: int = 0, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 1))


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)] * 8


def same(a: Any, b: Any) -> bool:
    """Bit-identical nested state (tensors compared with torch.equal, dtype and shape included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def log(norms: Sequence[float], losses: Sequence[float], thr: float | None, **meta: Any) -> RunLog:
    """An in-memory run: one record per norm; ``thr`` a fixed threshold (clip_coef derived)."""
    rows = []
    for s, (g, loss) in enumerate(zip(norms, losses)):
        rec: dict[str, Any] = {"step": s, "loss": loss, "grad_norm": g, "lr": 0.1, "skipped": False}
        if thr is not None:
            rec["threshold"] = thr
            rec["clip_coef"] = min(1.0, thr / g) if math.isfinite(g) and g > 0 else 1.0
        rec["nonfinite"] = not (math.isfinite(g) and math.isfinite(loss))
        rows.append(rec)
    clip = {"kind": "norm", "max_norm": thr} if thr is not None else None
    return RunLog(path=Path("synthetic"), meta={"config": {"clip": clip}, **meta}, metrics=rows, events=[])


def finding(findings: list[Any], rule: str) -> Any:
    return next((f for f in findings if f.id == rule), None)


# ------------------------------------------------------------------------------------------ tune
def test_tune_restores_parameters_optimizer_state_grads_lr_and_rng_bit_for_bit() -> None:
    x, y = regression()
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for xb, yb in batches(x, y)[:3]:  # some optimizer state and running stats to keep
        opt.zero_grad()
        nn.functional.mse_loss(model(xb), yb).backward()
        opt.step()
    model.eval()  # a mode to give back too
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = json.loads(json.dumps(opt.state_dict(), default=lambda t: t.tolist()))
    opt_state = {k: v for k, v in opt.state_dict().items()}
    opt_copy = {
        "state": {i: {k: v.clone() for k, v in s.items()} for i, s in opt_state["state"].items()},
        "param_groups": [dict(g) for g in opt_state["param_groups"]],
    }
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    random.seed(7)
    torch.manual_seed(7)
    rng, py_rng = torch.get_rng_state(), random.getstate()

    result = tune(
        model,
        opt,
        lambda b: nn.functional.mse_loss(model(b[0]) + 0.01 * torch.randn(1), b[1]),  # uses the RNG
        batches(x, y),
        max_norms=[0.01, 1.0, None],
        lrs=[1e-3, 1e-2],
        steps=10,
    )
    assert len(result.trials) == 6
    assert same(weights, model.state_dict())
    assert same(opt_copy, opt.state_dict()) and state == json.loads(
        json.dumps(opt.state_dict(), default=lambda t: t.tolist())
    )
    assert all(same(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert [g["lr"] for g in opt.param_groups] == [1e-2]
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng
    assert not model.training


def test_tune_replays_the_same_batches_and_judges_every_candidate() -> None:
    x, y = regression()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    result = tune(
        model, opt, lambda b: nn.functional.mse_loss(model(b[0]), b[1]), iter(batches(x, y)), steps=20
    )
    starts = {t.loss_start for t in result.trials}
    assert len(starts) == 1  # the first loss is the snapshot's, on the same batch, for every candidate
    assert None in [t.max_norm for t in result.trials] and len(result.trials) >= 5  # the default ladder
    rec = result.recommended
    assert rec is not None and rec.trained and rec.loss_final < rec.loss_start
    assert "Verified:" in result.summary() and rec.label in result.summary()


def rnn_task(seed: int) -> tuple[Any, torch.optim.Optimizer]:
    from gradguard.demos import rnn

    torch.set_num_threads(1)
    sc = rnn.build(seed)
    return sc, torch.optim.SGD(sc.model.parameters(), lr=1.0)


def test_tune_rejects_the_old_advice_that_explodes_and_picks_a_threshold_that_trains() -> None:
    """The rnn demo (SGD lr=1 on an LSTM LM): diagnose used to recommend max_norm=28 from the norm:5
    run, and 28 goes non-finite within ~100 steps. tune sees it explode within 40 steps and picks a
    threshold that then trains 150 steps with no non-finite step and a falling loss."""
    sc, opt = rnn_task(0)
    old_advice = 28.0
    result = tune(
        sc.model,
        opt,
        lambda b: sc.loss_fn(sc.model, b),
        sc.batches(),
        max_norms=[1.75, 3.5, 7.0, 14.0, old_advice],
        steps=40,
        reset=sc.reset,
    )
    old = next(t for t in result.trials if t.max_norm == old_advice)
    assert not old.trained and (old.exploded or old.nonfinite)
    assert result.max_norm is not None and result.max_norm < old_advice
    assert old_advice in result.failed_thresholds()
    # following the verified threshold from the same start: it trains
    from gradguard.demos._common import RunConfig, train

    run = train(sc, RunConfig("x", f"norm:{result.max_norm}", "sgd", 1.0), steps=150)
    assert run.first_nonfinite is None and run.steps == 150
    assert run.final_loss < run.records[0].loss * 0.8


def test_choose_stays_below_a_failure_and_none_when_nothing_trained() -> None:
    def trial(max_norm: float | None, *, ok: bool = True, loss: float = 1.0) -> Trial:
        norms = [10.0] * 20 if ok else [10.0] * 5 + [10.0**k for k in range(2, 17)]
        return judge(max_norm, None, [2.0] + [loss] * 19, norms)

    # an explosion at 4: the loosest candidate at most half of it (was 1.0, two rungs back, which
    # over-clipped the demos: rnn 0.78 trained worse than the recipe, Deep SAD 9.4 stalled)
    assert choose([trial(1.0), trial(2.0), trial(4.0, ok=False)]) == trial(2.0)
    assert choose([trial(1.0), trial(2.0), trial(3.0), trial(4.0, ok=False)]) == trial(2.0)
    assert choose([trial(3.0), trial(4.0, ok=False)]) == trial(3.0)  # nothing that far below: the tightest
    slow = trial(2.0, loss=1.9)  # trained, but its loss fell far less than the best's: not "well"
    assert choose([trial(0.5), trial(1.0), slow, trial(4.0, ok=False)]) == trial(1.0)
    # a looser candidate overshot (finite, no explosion, the loss did not fall): the learning rate
    # is too high for that step, so two rungs back (the adding problem at lr 1: 0.48 stalls)
    stuck = trial(1.0, loss=2.5)
    assert not stuck.trained and not stuck.failed
    assert choose([trial(0.125), trial(0.25), trial(0.5), stuck, trial(2.0, ok=False)]) == trial(0.125)
    # with learning rates at one threshold: at most 0.3× the exploded candidate's rate (RATE_EDGE_RATIO;
    # s12 — was half: a rate half the one that blew up early can cross the edge later, tests/test_tune_lr.py)
    by_lr = [judge(0.5, lr, [2.0] + [1.0] * 19, [1.0] * 20) for lr in (0.25, 0.5)]
    blown = judge(0.5, 1.0, [2.0] * 20, [1.0] * 5 + [10.0**k for k in range(1, 16)])
    assert choose([*by_lr, blown]) == by_lr[0]
    assert choose([trial(1.0), trial(2.0), trial(None)]) == trial(None)  # nothing failed: the loosest
    assert choose([trial(1.0, ok=False), trial(2.0)]) is None  # looser than a failure is not safe
    assert choose([trial(1.0, loss=3.0)]) is None  # the loss did not fall
    diverged = trial(4.0, loss=5.0)  # finite, but the loss rose 2 → 5: the edge, as an explosion is
    assert diverged.diverged and diverged.outcome == "diverged (loss rose)"
    assert choose([trial(0.5), trial(1.0), trial(2.0), diverged]) == trial(0.5)  # two rungs back from 2.0
    # an explosion is judged once it is sustained within the trial: a last-step jump is not one
    assert not judge(1.0, None, [2.0] * 8, [1.0] * 7 + [100.0]).exploded
    assert judge(1.0, None, [2.0] * 8, [1.0] * 4 + [100.0] * 4).exploded
    result = TuneResult([trial(1.0, ok=False)], 20)
    assert result.recommended is None and "None of the 1 candidates trained" in result.verdict()


def test_a_trial_that_timed_out_is_said_so_and_drives_no_advice() -> None:
    """``gradguard tune --timeout``: a trial killed before it recorded a step read "0 steps … loss did not
    fall", counted as a rate that did not train ("lower the learning rate"), and as one that overshot."""
    late = judge(4.0, None, [], [])  # what the script tuner judges a trial its timeout stopped
    assert late.timed_out and not late.trained and late.outcome == "timed out (no step recorded)"
    assert not judge(1.0, None, [math.nan], [1.0]).timed_out  # non-finite at step 0 is judged
    assert Trial.from_dict(json.loads(json.dumps(late.as_dict()))).timed_out  # as tune.json keeps it
    every = TuneResult([late, judge(2.0, None, [], [])], 20, source="script")
    assert every.recommended is None
    assert "2 of the 2 trials timed out" in every.verdict() and "--timeout" in every.verdict()
    assert "learning rate" not in every.verdict()
    assert "timed out (no step recorded)" in every.summary()
    # below an explosion at 8, a timed-out 4 is no overshoot: 2 (within the edge) stays the advice
    fell = [2.0] + [1.0] * 19
    trained = [judge(m, None, fell, [1.0] * 20) for m in (1.0, 2.0)]
    blown = judge(8.0, None, [2.0] * 5 + [math.nan], [1.0] * 6)
    assert choose([*trained, late, blown]) == trained[1]
    some = TuneResult([*trained, late, blown], 20, source="script")
    assert (
        some.verdict().startswith("Verified: max_norm=2") and "1 of the 4 trials timed out" in some.verdict()
    )


def test_cli_tune_refuses_a_timeout_that_is_not_positive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(SystemExit) as e:
            main(["tune", "--timeout", bad, "--out", str(tmp_path / "trials"), str(script)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "argument --timeout" in err and repr(bad) in err, err
    assert not (tmp_path / "trials").exists()  # refused before any trial ran


def test_a_loss_that_fell_by_less_than_its_batch_noise_did_not_train() -> None:
    """A model that only learned the targets' mean: 4.94 → ~4.6 where one batch's loss varies by ~1."""
    rng = random.Random(0)
    noisy = [4.94] + [4.6 + rng.gauss(0.0, 1.0) for _ in range(59)]
    flat = judge(1.0, None, noisy, [1.0] * 60)
    assert flat.loss_final < flat.loss_start and flat.loss_noise > 0.5
    assert not flat.trained and flat.outcome == "loss fell less than its noise"
    learned = judge(1.0, None, [4.94] + [1.0 + rng.gauss(0.0, 0.1) for _ in range(59)], [1.0] * 60)
    assert learned.trained
    assert choose([flat]) is None
    again = Trial.from_dict(json.loads(json.dumps(flat.as_dict())))
    assert again == flat and not again.trained
    old = {k: v for k, v in flat.as_dict().items() if k != "loss_noise"}  # a tune.json written before
    assert Trial.from_dict(old).loss_noise == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 1}, "steps must be an int"),
        ({"max_norms": [-1.0]}, "positive finite"),
        ({"max_norms": []}, "non-empty list"),
        ({"lrs": [None]}, "positive finite"),
        ({"steps": 500}, "fewer than steps"),
    ],
)
def test_tune_refuses_bad_input_clearly(kwargs: dict[str, Any], match: str) -> None:
    x, y = regression()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(GradGuardError, match=match):
        tune(model, opt, lambda b: nn.functional.mse_loss(model(b[0]), b[1]), batches(x, y), **kwargs)
    with pytest.raises(GradGuardError, match="one-element tensor"):
        tune(model, opt, lambda b: 1.0, batches(x, y), max_norms=[1.0], steps=3)  # type: ignore[arg-type,return-value]


def test_guard_tune_writes_tune_json_that_diagnose_quotes_as_verified(tmp_path: Path) -> None:
    x, y = regression()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = batches(x, y)
    with gradguard.Guard(model, opt, clip="norm:0.001", log_dir=tmp_path / "run") as guard:
        for xb, yb in data[:60]:
            loss = nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        result = guard.tune(
            lambda b: nn.functional.mse_loss(model(b[0]), b[1]), data, max_norms=[0.001, 1.0, 5.0]
        )
        assert same(before, model.state_dict()) and result.start_step == 60
    saved = read_tune(tmp_path / "run")
    assert saved is not None and saved.max_norm == result.max_norm is not None
    over = finding(diagnose(tmp_path / "run"), "over_clipping")
    assert over is not None and over.severity == "error"  # 0.001 stalled this run
    assert over.recommendation["verified"] is True and over.recommendation["max_norm"] == result.max_norm
    assert "gradguard tune" in over.recommendation["text"]


# ------------------------------------------------------------------------------------------ diagnose
def test_diagnose_never_recommends_a_threshold_the_run_was_clipped_to_when_it_exploded() -> None:
    n = 80
    norms = [1.0] * 40 + [3.0 * 1.5**k for k in range(n - 41)] + [math.nan]
    losses = [1.0] * (n - 1) + [math.nan]
    for thr in (0.5, 2.0, 50.0):
        findings = diagnose(log(norms, losses, thr))
        assert finding(findings, "over_clipping") is None  # a threshold that did not hold is not too tight
        for f in findings:
            value = f.recommendation.get("max_norm")
            assert value is None or value < thr, (thr, f.id, f.recommendation)
            if value is not None:
                assert f.recommendation["verified"] is False and "gradguard tune" in f.recommendation["text"]
    boom = finding(diagnose(log(norms, losses, None)), "explosion")
    assert boom.recommendation["max_norm"] < 3.0 and boom.recommendation["tune"].startswith("gradguard tune ")


def test_a_run_that_trained_is_never_over_clipped_beyond_an_info() -> None:
    n = 200
    norms = [10.0 * (1 + 0.1 * math.sin(s)) for s in range(n)]
    falling = [5.0 * 0.99**s + 1.0 for s in range(n)]
    over = finding(diagnose(log(norms, falling, 1.0)), "over_clipping")  # every step clipped, loss 6 → 1.7
    assert over is not None and over.severity == "info" and "max_norm" not in over.recommendation
    # an RL-style loss that grows with the episodes: not a stall clipping could cause
    growing = [1.0 + s / 20 for s in range(n)]
    assert finding(diagnose(log(norms, growing, 1.0)), "over_clipping") is None
    # Adam normalizes its step: a stalled loss under clipping is not the clipper's doing
    flat = [1.0 + 0.01 * math.sin(s) for s in range(n)]
    adam = finding(diagnose(log(norms, flat, 1.0, optimizer={"class": "AdamW"})), "over_clipping")
    assert adam is not None and adam.severity == "info"
    # SGD stalled under the clip: still an error, with unverified advice and the command to verify it
    stall = finding(diagnose(log(norms, flat, 1.0, optimizer="SGD")), "over_clipping")
    assert stall.severity == "error" and stall.recommendation["verified"] is False
    assert stall.recommendation["max_norm"] > 1.0 and "gradguard tune" in stall.recommendation["text"]


def test_an_over_clipping_info_quotes_the_threshold_tune_verified(tmp_path: Path) -> None:
    """The info said "verify a looser one first" with the command; once tune.json verified one, the
    same info quotes it (it repeated the unverified text before)."""
    n = 200
    norms = [10.0 * (1 + 0.1 * math.sin(s)) for s in range(n)]
    falling = [5.0 * 0.99**s + 1.0 for s in range(n)]
    with RunWriter(tmp_path / "r") as w:
        w.write_metrics(log(norms, falling, 1.0).metrics)
        w.update_meta(config={"clip": {"kind": "norm", "max_norm": 1.0}})
    tight = judge(1.0, None, [5.0] + [3.0] * 19, [10.0] * 20)
    loose = judge(12.0, None, [5.0] + [0.5] * 19, [10.0] * 20)
    write_tune(tmp_path / "r", TuneResult([tight, loose], 20, "script"))
    over = finding(diagnose(tmp_path / "r"), "over_clipping")
    assert over is not None and over.severity == "info" and over.recommendation["verified"] is True
    assert over.recommendation["max_norm"] == 12.0 and "Verified: max_norm=12" in over.recommendation["text"]


@pytest.mark.parametrize("name", ["rl_episodic", "sparse_embeddings"])
def test_healthy_rl_and_sparse_embedding_runs_under_a_tight_fixed_clip_are_not_over_clipped(
    tmp_path: Path, name: str
) -> None:
    import verdict_runs

    real = verdict_runs.train

    def tight(path: Path, model: nn.Module, opt: Any, loss_of: Any, steps: int, **kw: Any) -> Path:
        return real(path, model, opt, loss_of, steps, clip="norm:0.05", **kw)

    verdict_runs.train = tight  # type: ignore[assignment]
    try:
        run = getattr(verdict_runs, name)(tmp_path / name)
    finally:
        verdict_runs.train = real  # type: ignore[assignment]
    over = finding(diagnose(run), "over_clipping")
    assert over is None or over.severity == "info", over


def test_verified_advice_from_a_tune_json_that_found_nothing_recommends_no_threshold(tmp_path: Path) -> None:
    with RunWriter(tmp_path / "run", {"config": {"clip": None}}) as w:
        w.write_metrics(
            [
                {"step": s, "loss": 1.0, "grad_norm": 1.0 if s < 30 else 10.0 ** (s - 29), "lr": 0.1}
                for s in range(45)
            ]
        )
    failed = judge(0.5, None, [1.0] * 10, [1.0] * 3 + [10.0**k for k in range(1, 8)])
    write_tune(tmp_path / "run", TuneResult([failed], 10))
    boom = finding(diagnose(tmp_path / "run"), "explosion")
    assert boom is not None and "max_norm" not in boom.recommendation
    # the tune.json is quoted ("none trained"); the learning rate it then suggests is itself unverified
    assert boom.recommendation["tuned"]["trials"] == 1 and "none trained" in boom.recommendation["text"]


# ------------------------------------------------------------------------------------------ the CLI
SCRIPT = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = x @ torch.randn(8, 1)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.9)
    for step in range(1000):
        i = (step * 32) % 512
        loss = nn.functional.mse_loss(model(x[i : i + 32]) * 8, y[i : i + 32] * 8)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1000.0)
        optimizer.step()
    """
)


def test_cli_tune_verifies_candidates_on_an_unmodified_script(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    code = main(
        ["tune", "--max-norm", "0.5,none", "--steps", "25", "--out", str(tmp_path / "trials"), str(script)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "candidate" in out and "norm:0.5" in out and "none" in out
    assert "Verified: max_norm=0.5" in out
    saved = read_tune(tmp_path / "trials")
    assert saved is not None and saved.source == "script" and saved.trials[0].steps == 25
    unclipped = saved.trials[1]
    assert unclipped.max_norm is None and (unclipped.nonfinite or unclipped.exploded)


def test_cli_tune_with_run_writes_tune_json_there_and_diagnose_quotes_the_verified_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.replace("torch.nn.utils.clip_grad_norm_(model.parameters(), 1000.0)", "pass"))
    run = tmp_path / "run"
    main(["run", "--out", str(run), "--quiet", "--no-report", str(script)])
    before = finding(diagnose(run), "explosion")
    assert before is not None and before.recommendation["verified"] is False
    # tune's options come before the script (what follows it is the script's own arguments)
    assert before.recommendation["tune"] == f"gradguard tune --run {run} {script}"
    capsys.readouterr()
    code = main(["tune", "--run", str(run), "--max-norm", "0.25,0.5", "--steps", "20", str(script)])
    assert code == 0 and "tune.json written into" in capsys.readouterr().out
    after = finding(diagnose(run), "explosion")
    assert after.recommendation["verified"] is True and after.recommendation["max_norm"] in (0.25, 0.5)


GUARDED_SCRIPT = textwrap.dedent(
    """
    import argparse

    import torch
    from torch import nn

    import gradguard

    parser = argparse.ArgumentParser()
    parser.add_argument("--log-dir", default="runs/mine")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gradguard.Guard(model, optimizer, log_dir=args.log_dir)  # the README's own pattern
    for step in range(40):
        i = (step * 32) % 256
        loss = nn.functional.mse_loss(model(x[i : i + 32]), y[i : i + 32])
        optimizer.zero_grad()
        loss.backward()
        guard.step(loss)
    guard.close()
    """
)


def test_tune_of_a_script_that_guards_itself_into_the_tuned_run_trains_in_every_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tune command diagnose prints repeats the script's own arguments, its ``--log-dir`` too:
    every trial's Guard then found the tuned run's log there and stopped ("took no optimizer step").
    A Guard the script makes writes into the trial's folder; the tuned run is left as it was."""
    script = tmp_path / "train.py"
    script.write_text(GUARDED_SCRIPT)
    run = tmp_path / "run"
    assert (
        main(["run", "--out", str(run), "--quiet", "--no-report", str(script), "--log-dir", str(run / "own")])
        == 0
    )
    before = sorted(p.name for p in (run / "own").iterdir())
    capsys.readouterr()
    code = main(["tune", "--run", str(run / "own"), "--lr", "0.025,0.05", "--steps", "10",
                 "--out", str(tmp_path / "trials"), str(script), "--log-dir", str(run / "own")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "Verified: lr=" in out, out
    assert "took no optimizer step" not in out
    assert sorted(p.name for p in (run / "own").iterdir() if p.name != TUNE_FILE) == before  # left as it was


def test_cli_tune_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", str(tmp_path / "missing.py")]) == 2
    assert "no such script" in capsys.readouterr().err
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    with pytest.raises(SystemExit) as e:
        main(["tune", "--max-norm", "1,abc", str(script)])
    assert e.value.code == 2 and "expected numbers" in capsys.readouterr().err
    assert main(["tune", "--steps", "1", str(script)]) == 2
    assert "--steps must be" in capsys.readouterr().err
    assert main(["tune", "--run", str(tmp_path / "nope"), str(script)]) == 2
    assert not (tmp_path / TUNE_FILE).exists()


def test_a_trial_by_default_runs_past_the_step_where_the_run_went_non_finite(tmp_path: Path) -> None:
    """A run that failed at step 84 is not verified by 30-step trials (a threshold "verified" there
    clipped 0 % of its steps and trained no better)."""
    from gradguard.integrations.tune_script import MAX_DEFAULT_STEPS, STEPS, default_steps

    def failed_at(step: int | None, name: str) -> Path:
        with RunWriter(tmp_path / name) as w:
            w.write_metrics([{"step": s, "loss": 1.0, "grad_norm": 1.0} for s in range(3)])
            if step is not None:
                w.write_event({"type": "nonfinite", "step": step, "phase": "forward", "kind": "nan"})
        return tmp_path / name

    assert default_steps(None) == STEPS
    assert default_steps(failed_at(None, "healthy")) == STEPS
    assert default_steps(failed_at(5, "early")) == STEPS
    assert default_steps(failed_at(84, "late")) == 94
    assert default_steps(failed_at(5000, "very_late")) == MAX_DEFAULT_STEPS


def test_cli_tune_refuses_an_out_that_is_another_runs_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Field test N15: ``tune --out runs/base`` (an existing run) wrote its trials there and replaced that
    run's tune.json, which diagnose reads as the verification of that run's advice."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run = tmp_path / "base"
    with RunWriter(run) as w:
        w.write_metrics([{"step": 0, "loss": 1.0, "grad_norm": 1.0}])
    write_tune(run, TuneResult([], 5, source="script", command="gradguard tune --run base train.py"))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["tune", "--out", str(run), "--max-norm", "1", "--steps", "5", str(script)]) == 2
    err = capsys.readouterr().err
    assert "holds a run log" in err and "tune.json" in err and f"--run {run}" in err and "new --out" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_cli_tune_names_the_run_directory_it_wrote_tune_json_into(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Field test N32: ``tune --run RUN/metrics.jsonl`` said "tune.json written into RUN/metrics.jsonl"."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run = tmp_path / "run"
    main(["run", "--out", str(run), "--quiet", "--no-report", str(script)])
    capsys.readouterr()
    words = ["tune", "--run", str(run / "metrics.jsonl"), "--max-norm", "0.5", "--steps", "5"]
    main([*words, "--out", str(tmp_path / "trials"), str(script)])
    line = next(x for x in capsys.readouterr().out.splitlines() if "tune.json written into" in x)
    assert f"written into {run}:" in line and f"gradguard diagnose {run}`" in line, line
    assert (run / TUNE_FILE).is_file()


def test_cli_tune_of_a_script_that_takes_no_step_shows_what_it_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Field test N30: "took no optimizer step … Its last output: " followed by nothing, though the script
    printed a line (on stdout: only stderr was shown)."""
    script = tmp_path / "evaluate.py"
    script.write_text("import torch\nprint(f'mean prediction {torch.zeros(3).mean().item():.3f}')\n")
    assert main(["tune", "--lr", "1e-3", "--steps", "5", "--out", str(tmp_path / "t"), str(script)]) == 2
    err = capsys.readouterr().err
    assert "took no optimizer step" in err and "mean prediction 0.000" in err, err


CHECKPOINTING_SCRIPT = textwrap.dedent(
    """
    import os

    import torch
    from torch import nn

    x = torch.tensor([[float(v) for v in line.split()] for line in open("data/train.txt")])  # relative read
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    os.makedirs("checkpoints", exist_ok=True)
    for step in range(100):
        loss = (model(x) - 1).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch.save({"step": step}, "checkpoints/last.pt")  # in place, over the user's own checkpoint
        with open("train.log", "a") as f:
            f.write(f"step {step}\\n")
        with open("outputs/new.txt", "w") as f:  # a file below a folder of the user's
            f.write("trial")
    """
)


def test_tune_trials_never_write_over_the_scripts_files_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Field test N14: every trial ran the script in the user's working directory, so a trial overwrote its
    ``checkpoints/last.pt`` (step 96 became step 8), and a script that resumes would have started each
    trial from another state.

    What a careful user expects: the trials may read what the script reads (``data/`` relative to the
    working directory) but write nothing of the user's. Each trial works in ``<trial>/workdir``, a
    copy-on-write view of the working directory (links to the user's files; a write first makes the
    path the trial's own): the user's checkpoint, log and folders are byte for byte as they were, and
    what the trial wrote is in its own folder."""
    from gradguard.integrations.tune_script import WORKDIR, tune_script

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.txt").write_text("1 2\n3 4\n0.5 1\n")
    (project / "checkpoints").mkdir()
    torch.save({"step": 96}, project / "checkpoints" / "last.pt")
    (project / "train.log").write_text("step 96\n")
    (project / "outputs").mkdir()
    (project / "train.py").write_text(CHECKPOINTING_SCRIPT)
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    monkeypatch.chdir(project)
    result = tune_script("train.py", max_norms=[1.0, 5.0], steps=4, out=tmp_path / "trials")
    assert len(result.trials) == 2 and all(t.steps == 4 for t in result.trials)  # the relative read worked
    assert {p: p.read_bytes() for p in project.rglob("*") if p.is_file()} == before
    for trial in sorted((tmp_path / "trials").glob("trial*")):
        work = trial / WORKDIR
        # the trial's own checkpoint and log (the 4th step ends the trial inside optimizer.step())
        assert torch.load(work / "checkpoints" / "last.pt")["step"] == 2
        assert (work / "train.log").read_text() == "step 96\n" + "".join(f"step {s}\n" for s in range(3))
        assert (work / "outputs" / "new.txt").read_text() == "trial"


def test_tune_says_which_files_of_the_working_directory_a_trial_wrote_by_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path built from ``__file__`` (or passed absolute) names the user's own file: the copy-on-write view
    cannot keep it apart (an audit hook cannot move a write), and tune said nothing while every trial wrote
    over the user's checkpoint. Now tune names the files; what the script wrote by relative path stays apart."""
    import os

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.txt").write_text("1 2\n3 4\n0.5 1\n")
    (project / "outputs").mkdir()
    (project / "checkpoints").mkdir()
    mine = project / "checkpoints" / "last.pt"
    torch.save({"step": 96}, mine)
    here = 'os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "last.pt")'
    (project / "train.py").write_text(CHECKPOINTING_SCRIPT.replace('"checkpoints/last.pt"', here))
    monkeypatch.chdir(project)
    main(["tune", "--max-norm", "1,5", "--steps", "4", "--out", str(tmp_path / "trials"), "train.py"])
    err = " ".join(capsys.readouterr().err.split())
    said = f"gradguard: warning: gradguard tune: the trials wrote into your working directory by absolute path: {os.path.realpath(mine)}. "
    assert said in err, err
    assert (
        "train.log" not in err and "new.txt" not in err
    )  # relative writes: the trials' own, in their workdir
    assert torch.load(mine)["step"] == 2  # the last trial's, as the warning says
