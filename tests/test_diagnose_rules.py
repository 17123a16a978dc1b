"""Each diagnose rule on synthetic columns, the registry that orders them, and adding a rule.

The runs here are written by hand (a few columns each), so every rule is checked on exactly the
signal it reads; tests/test_diagnose.py checks the same rules on real guarded runs.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gradguard.diagnose import RULES, Finding, diagnose, rules
from gradguard.diagnose.facts import Facts
from gradguard.diagnose.rules import REGISTRY, Entry, Rule, Seen, _clipping, entry, evaluate, order
from gradguard.errors import GradGuardError
from gradguard.runlog import RunLog, RunWriter

NAN = math.nan


def run(
    norms: Sequence[float],
    *,
    loss: Sequence[float] | None = None,
    clip: Any = None,
    events: Sequence[dict[str, Any]] = (),
    **columns: Sequence[Any],
) -> RunLog:
    """An in-memory run: one record per norm, with ``loss`` (default: falling) and any other column.

    A column named ``layer__<name>__<field>`` goes to ``layers[name][field]``.
    """
    losses = loss if loss is not None else [2.0 / (1 + s / 10) for s in range(len(norms))]
    metrics: list[dict[str, Any]] = []
    for s, g in enumerate(norms):
        rec: dict[str, Any] = {"step": s, "loss": losses[s], "grad_norm": g, "skipped": False, "lr": 0.1}
        for key, values in columns.items():
            if key.startswith("layer__"):
                _, name, field = key.split("__")
                rec.setdefault("layers", {}).setdefault(name, {})[field] = values[s]
            else:
                rec[key] = values[s]
        rec["nonfinite"] = not (math.isfinite(g) and math.isfinite(rec["loss"]))
        metrics.append(rec)
    meta = {"config": {"clip": clip}} if clip is not None else {}
    return RunLog(path=Path("synthetic"), meta=meta, metrics=metrics, events=list(events))


def conclude(log: RunLog, name: str) -> Finding | None:
    """One rule on its own: detect → evidence, explain → finding, after the rules it ``needs``."""
    f = Facts(log)
    by_name = {e.rule.name: e for e in REGISTRY}
    done: dict[str, tuple[Any, Finding | None]] = {}
    for rule_name in [*by_name[name].needs, name]:
        e = by_name[rule_name]
        evidence = e.rule.detect(f, Seen(done, e.needs))
        done[rule_name] = (evidence, None if evidence is None else e.rule.explain(f, evidence))
    return done[name][1]


def ids(findings: list[Finding]) -> list[str]:
    return [f.id for f in findings]


CLIMB = [1.0] * 30 + [3.0 * 2.0**k for k in range(12)] + [NAN]


# ----------------------------------------------------------------------------- explosion
def test_explosion_names_the_onset_the_first_layer_and_the_first_nonfinite_step() -> None:
    n = len(CLIMB)
    lead = [1.0] * 30 + [30.0 * 2.0**k for k in range(12)] + [NAN]
    log = run(CLIMB, loss=[1.0] * (n - 1) + [NAN], layer__a__grad_norm=[0.5] * n, layer__b__grad_norm=lead)
    boom = conclude(log, "explosion")
    assert boom is not None and boom.severity == "error" and boom.step == 30
    assert boom.evidence["first_layer"] == "b" and boom.evidence["first_nonfinite_step"] == n - 1
    assert boom.evidence["healthy_steps"] == [0, 29] and boom.recommendation["max_norm"] == 1.0


def test_an_explosion_from_a_loss_already_huge_at_step_0_blames_the_scale_not_the_rate() -> None:
    """Targets in raw dollars, or weights initialised 100× too large: the loss is ~1e11 before any
    update, and a lower learning rate only delays the overflow. The same climb from a loss of 2 is
    the learning rate's (no scale note)."""
    n = len(CLIMB)
    huge = conclude(run(CLIMB, loss=[9.07e10] + [1e11] * (n - 2) + [NAN]), "explosion")
    assert huge is not None and huge.evidence["start_loss"] == 9.07e10
    assert "the loss was already 9.07e+10 at step 0, before any update" in huge.message, huge.message
    assert huge.recommendation["text"].startswith("Fix the scale first: standardize the regression targets")
    usual = conclude(run(CLIMB, loss=[2.0] * (n - 1) + [NAN]), "explosion")
    assert usual is not None and "start_loss" not in usual.evidence and "scale" not in usual.message


def test_a_norm_rising_while_the_loss_falls_is_an_explosion_only_under_a_fixed_threshold() -> None:
    norms = [1.0] * 20 + [15.0] * 180
    assert conclude(run(norms, clip="None"), "explosion") is None
    caught = conclude(run(norms, clip={"kind": "norm", "max_norm": 1.0}, threshold=[1.0] * 200), "explosion")
    assert caught is not None and caught.severity == "info"


def test_under_adam_a_clipped_rise_with_a_falling_loss_is_no_explosion_under_sgd_an_info() -> None:
    """A fixed threshold catching a rise while the loss falls: under SGD it bounded the step (an
    ``info``: settled → "held", still climbing → an explosion); Adam normalizes its step, so the
    threshold bounded nothing that harmed it: no finding, settled or not. A loss that did not fall
    makes the same rise a warning (a CI gate passes it; a person looks)."""
    n = 200
    clip = {"kind": "norm", "max_norm": 1.0}
    settled = [1.0] * 20 + [2.0, 6.0, 15.0, 25.0, 9.0] + [3.0] * (n - 25)
    climbing = [1.0] * 20 + [3.0 * 1.02**s for s in range(n - 20)]
    for norms, held in ((settled, True), (climbing, False)):
        sgd = run(norms, clip=clip, threshold=[1.0] * n)
        found = conclude(sgd, "explosion")
        assert found is not None and found.severity == "info" and found.evidence.get("settled", False) is held
        adam = RunLog(
            path=Path("synthetic"), meta={**sgd.meta, "optimizer": "AdamW"}, metrics=sgd.metrics, events=[]
        )
        assert conclude(adam, "explosion") is None
    flat = run(climbing, clip=clip, threshold=[1.0] * n, loss=[1.0 + 0.01 * math.sin(s) for s in range(n)])
    assert getattr(conclude(flat, "explosion"), "severity", None) == "warning"


# ----------------------------------------------------------------------------- over-clipping
def test_a_fixed_threshold_clipping_every_step_is_over_clipping() -> None:
    n = 60
    log = run(
        [1.0] * n,
        loss=[1.0] * n,
        clip={"kind": "norm", "max_norm": 0.1},
        threshold=[0.1] * n,
        clip_coef=[0.1] * n,
    )
    over = conclude(log, "over_clipping")
    assert over is not None and over.severity == "error"
    assert over.evidence["clip_rate_window"] == 1.0 and over.evidence["effective_lr_scale"] == 0.1
    assert over.recommendation["max_norm"] >= 1.0
    # another tool's log (a threshold, no coefficient), clipping 40% of the steps: not over-clipping
    some = [2.0 if s % 5 < 2 else 0.05 for s in range(n)]
    assert conclude(run(some, loss=[1.0] * n, threshold=[0.1] * n), "over_clipping") is None
    # a word LM clipped at 0.25 on every step, its loss still falling (5.3 → 4.6, 13 %: short of the 20 %
    # "trained" bar): a threshold that slows training, a warning — not an error, not a stall
    slow = [5.34 - 0.7 * s / n for s in range(n)]
    clipped = run(
        [1.0] * n, loss=slow, clip={"kind": "norm", "max_norm": 0.1}, threshold=[0.1] * n, clip_coef=[0.1] * n
    )
    slower = conclude(clipped, "over_clipping")
    assert slower is not None and slower.severity == "warning" and "still falling" in slower.message
    assert "stall" not in slower.message


def test_an_adaptive_clipper_is_over_clipping_only_when_the_loss_stalls_in_a_healthy_run() -> None:
    n = 60
    kw: dict[str, Any] = {"clip": {"kind": "autoclip", "percentile": 10.0}, "clip_coef": [0.5] * n}
    kw["threshold"] = [0.5 + 0.01 * (s % 3) for s in range(n)]
    stalled = conclude(run([1.0] * n, loss=[1.0] * n, **kw), "adaptive_clipping")
    assert stalled is not None and stalled.id == "over_clipping" and stalled.severity == "warning"
    assert conclude(run([1.0] * n, **kw), "adaptive_clipping") is None  # the loss fell: by design
    assert (
        conclude(run([1.0] * (n - 1) + [NAN], loss=[1.0] * n, **kw), "adaptive_clipping") is None
    )  # went bad
    # a norm that rose 20× while the loss stalled: on its own the rule fires, but an explosion
    # explains the stall and the rule gives way to it (the registry: yields_to explosion)
    rose = run([1.0] * 30 + [20.0] * (n - 30), loss=[1.0] * n, **kw)
    assert conclude(rose, "adaptive_clipping") is not None
    assert ids(diagnose(rose)) == ["explosion"]


@pytest.mark.parametrize(
    ("clip", "column"),
    [
        ({"kind": "norm", "max_norm": 0.0}, {"clip_coef": 0.0, "threshold": 0.0, "clip_fraction": 1.0}),
        ({"kind": "agc", "clip_factor": 0.0, "eps": 1e-3}, {"clip_coef": NAN, "clip_fraction": 1.0}),
        ({"kind": "value", "clip_value": 0.0}, {"clip_coef": NAN, "clip_fraction": 1.0}),
    ],
    ids=["norm:0", "agc:0", "value:0"],
)
def test_a_clipper_that_zeroes_every_gradient_is_over_clipping(
    tmp_path: Path, clip: dict, column: dict
) -> None:
    """A synthetic run directory of ``clip="norm:0"`` / ``"agc:0"``: every number finite, no step moved."""
    n = 200
    with RunWriter(tmp_path / "zero", {"config": {"clip": clip, "clip_repr": "the clipper"}}) as w:
        w.write_metrics(
            [{"step": s, "loss": 2.3, "grad_norm": 1.5, "skipped": False, **column} for s in range(n)]
        )
    findings = diagnose(tmp_path / "zero")
    assert ids(findings) == ["over_clipping"]
    zero = findings[0]
    assert zero.severity == "error" and zero.step == 0 and "zero" in zero.message
    assert zero.evidence["zeroed_rate"] == 1.0 and zero.recommendation["max_norm"] == 1.5


def test_an_agc_that_clips_every_unit_with_a_positive_factor_is_not_zeroing() -> None:
    n = 50
    log = run(
        [1.0] * n, clip={"kind": "agc", "clip_factor": 0.01}, clip_coef=[NAN] * n, clip_fraction=[1.0] * n
    )
    assert conclude(log, "zeroed_gradients") is None
    assert Facts(log).table.clip_rate == 1.0  # but the clipping is visible in the clip rate


def test_the_callers_own_clip_is_the_runs_clipper_where_the_guard_clipped_nothing() -> None:
    """Under ``gradguard run`` the guard clips nothing (``config.clip`` None) and the script's own
    ``clip_grad_norm_(model.parameters(), 0.01)`` fills every record's threshold: judged as a fixed
    threshold (an SGD run stalled under it is over-clipped), named as the caller's. Thresholds on a few
    steps only (``on_spike="clip"`` capping spikes) are not a clipper."""
    n = 200
    flat = [1.0 + 0.01 * math.sin(s) for s in range(n)]
    script = run([1.0] * n, loss=flat, clip="None", threshold=[0.01] * n, clip_coef=[0.01] * n)
    facts = Facts(script)
    assert facts.clip_kind == "fixed" and "clip_grad_norm_" in str(facts.clip_spec)
    assert conclude(script, "over_clipping") is not None
    spikes = [0.5 if s % 50 == 7 else NAN for s in range(n)]
    assert Facts(run([1.0] * n, loss=flat, clip="None", threshold=spikes)).clip_kind == "none"


# ----------------------------------------------------------------------------- divergence
def test_a_finite_loss_climbing_by_orders_of_magnitude_is_divergence() -> None:
    loss = [1.0 - 0.01 * s for s in range(20)] + [0.8 * 3.0**k for k in range(20)]
    div = conclude(run([1.0] * 40, loss=loss), "divergence")
    assert div is not None and div.severity == "error" and div.evidence["all_finite"] is True
    assert div.evidence["loss_peak"] >= 100 * div.evidence["loss_best"]
    then_nan = run([1.0] * 40 + [NAN], loss=[*loss, NAN])
    assert conclude(then_nan, "divergence") is None  # the explosion tells that story


def test_a_divergence_from_a_loss_already_huge_at_step_0_names_the_scale_first() -> None:
    """Regression targets in raw dollars: 1.5e11 at step 0, 2e14 after one update. The scale is the
    fix a user needs first (the explosion rules said so; divergence blamed the learning rate)."""
    loss = [1.5e11, 2.09e14, 1.5e14] + [1e14 * 3.0**k for k in range(1, 10)]
    div = conclude(run([1.0] * len(loss), loss=loss), "divergence")
    assert div is not None and div.evidence["start_loss"] == 1.5e11
    assert "already 1.5e+11 at step 0" in div.message
    assert div.recommendation["text"].startswith("Fix the scale first: standardize the regression targets")
    small = conclude(run([1.0] * len(loss), loss=[x / 1e11 for x in loss]), "divergence")
    assert (
        small is not None
        and "start_loss" not in small.evidence
        and "scale" not in small.recommendation["text"]
    )


def test_the_divergence_message_quotes_the_loss_the_run_started_at_not_a_rolling_median() -> None:
    """The climb is judged on a rolling median, but the numbers a user reads are the log's own: a
    run that starts at 3.84 and jumps to ~400 started at 3.84 (the rolling median there is 351)."""
    loss = [3.84, 400.0, 351.0] + [351.0 * 3.0**k for k in range(1, 12)]
    div = conclude(run([1.0] * len(loss), loss=loss), "divergence")
    assert div is not None
    assert "3.84 (step 0, the start of the run)" in div.message and "351" not in div.message, div.message
    assert div.evidence["loss_start"] == 3.84 and div.evidence["loss_start_step"] == 0
    assert div.evidence["loss_peak"] == pytest.approx(max(loss), rel=1e-3)  # a loss the log holds
    later = [5.0, 4.0, 3.0, 3.5, 3.2] + [3.0 * 3.0**k for k in range(1, 12)]
    div = conclude(run([1.0] * len(later), loss=later), "divergence")
    assert (
        div is not None and "its lowest 3 (step 2; it was 5 at the start of the run, step 0)" in div.message
    )


def test_a_loss_that_climbs_in_its_first_steps_and_stays_there_is_divergence() -> None:
    """A far too high learning rate: the loss climbs 2.8 → 8,144 in three steps, then stays in the
    thousands. The first rolling median (289) holds the climb itself, so the run's first loss is
    its start; the message names the step the loss itself crossed. A first loss that is only low
    (46× under the rest) and a run that only plateaus are not divergence."""
    loss = [2.8354, 289.08, 2015.3, 8144.1, 3916.2] + [2000.0 + 500.0 * (k % 3) for k in range(40)]
    div = conclude(run([1.0] * len(loss), loss=loss), "divergence")
    assert div is not None and div.step == 1, div
    assert "from step 1 the loss climbed from its lowest 2.84 (step 0, the start of the run)" in div.message
    assert div.evidence["loss_peak"] == pytest.approx(8144.1, rel=1e-3)
    low_first = [0.05] + [2.3 + 0.1 * (k % 4) for k in range(40)]
    assert conclude(run([1.0] * len(low_first), loss=low_first), "divergence") is None
    plateau = [2.3, 2.2, 2.4] + [2.3 + 0.1 * (k % 4) for k in range(40)]
    assert conclude(run([1.0] * len(plateau), loss=plateau), "divergence") is None


def test_the_unbounded_loss_message_quotes_the_first_loss_and_labels_the_median() -> None:
    loss = [3.84, 2.0, 1.0, 0.5, 0.2] + [-(10.0**k) for k in range(1, 9)] + [NAN]
    found = conclude(run([1.0] * (len(loss) - 1) + [NAN], loss=loss), "unbounded_loss")
    assert found is not None
    assert "from 3.84 at the start of the run (step 0)" in found.message, found.message
    assert "first 5 losses (their median)" in found.message
    assert found.evidence["loss_start"] == 3.84 and found.evidence["loss_start_median"] == 1.0


# ----------------------------------------------------------------------------- advice: one owner
def _advice_case(path: Path, rule: str) -> Path:
    """A run directory where ``rule`` recommends a ``max_norm`` (every number written by hand)."""
    n, meta, events = 60, {}, []
    rows: list[dict[str, Any]] = [{"step": s, "loss": 1.0, "grad_norm": 1.0, "lr": 0.1} for s in range(n)]
    if rule == "adaptive_clipping":  # AutoClip clips every step and the loss stalls
        meta = {"config": {"clip": {"kind": "autoclip", "percentile": 10.0}}}
        for s, r in enumerate(rows):
            r.update(clip_coef=0.5, threshold=0.5 + 0.01 * (s % 3))
    elif rule == "zeroed_gradients":  # clip="norm:0"
        meta = {"config": {"clip": {"kind": "norm", "max_norm": 0.0}}}
        for r in rows:
            r.update(clip_coef=0.0, threshold=0.0, clip_fraction=1.0)
    elif rule == "divergence":  # the norm and the loss climb, finite to the end
        for s, r in enumerate(rows[20:]):
            r.update(grad_norm=2.0 ** (s + 1), loss=0.8 * 3.0**s)
    else:  # sudden_growth: an update 1,680× the weights, then a NaN born in a linear layer
        for s, r in enumerate(rows[:-1]):
            ratio = 1680.0 if s == n - 2 else 1e-3
            r["layers"] = {"rec": {"grad_norm": 1.0, "weight_norm": 7.0, "update_ratio": ratio}}
        rows[-1].update(loss=NAN, grad_norm=NAN, nonfinite=True, skipped=True)
        event = {"type": "nonfinite", "step": n - 1, "phase": "forward", "module": "rec", "op": "linear"}
        events = [{**event, "kind": "inf", "evidence": {"reason": "linear produced inf"}}]
    with RunWriter(path, meta) as w:
        w.write_metrics(rows)
        w.write_events(events)
    return path


@pytest.mark.parametrize("rule", ["adaptive_clipping", "zeroed_gradients", "divergence", "sudden_growth"])
def test_every_threshold_a_rule_recommends_is_verified_or_marked_unverified(
    tmp_path: Path, rule: str
) -> None:
    """One owner for "what max_norm to recommend" (``_clipping.threshold_advice``): an estimate is
    marked unverified with the ``gradguard tune`` line that checks it; with ``tune.json`` in the run
    directory, every rule quotes the threshold it verified instead."""
    from gradguard.tunelog import TuneResult, judge, write_tune

    path = _advice_case(tmp_path / rule, rule)
    finding = next(f for f in diagnose(path) if _by(f, rule))
    rec = finding.recommendation
    assert (
        rec["verified"] is False and rec["tune"].startswith("gradguard tune ") and rec["tune"] in rec["text"]
    )
    assert 0 < rec["max_norm"] < 2.0 and rec["clip"] == f"norm:{rec['max_norm']:g}", rec
    assert rec["text"].endswith(".") and not rec["text"].endswith("..")
    falling, flat = [1.0 - 0.02 * k for k in range(10)], [1.0] * 10
    trained = judge(0.25, None, falling, flat)
    exploded = judge(0.5, None, falling, [1.0] * 3 + [10.0**k for k in range(1, 8)])
    write_tune(path, TuneResult([trained, exploded], 10))
    verified = next(f for f in diagnose(path) if f.id == finding.id and f.step == finding.step)
    assert verified.recommendation["verified"] is True and verified.recommendation["max_norm"] == 0.25
    assert "gradguard tune" in verified.recommendation["text"]


def test_tune_json_is_read_once_a_diagnosis_however_many_rules_quote_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Facts.tuned`` owns the run directory's ``tune.json``: the explosion and the divergence both
    quote its verified threshold and learning rate, from one read (each rule's advice read it again)."""
    import gradguard.diagnose.facts as facts_module
    from gradguard.tunelog import TuneResult, judge, read_tune, write_tune

    path = _advice_case(tmp_path / "run", "divergence")
    falling, flat = [1.0 - 0.02 * k for k in range(10)], [1.0] * 10
    write_tune(path, TuneResult([judge(0.25, None, falling, flat)], 10))
    reads: list[Path] = []
    monkeypatch.setattr(facts_module, "read_tune", lambda p: reads.append(p) or read_tune(p))
    findings = diagnose(path)
    verified = [f for f in findings if f.recommendation.get("verified") is True]
    assert {f.id for f in verified} >= {"explosion", "divergence"}, [
        (f.id, f.recommendation) for f in findings
    ]
    assert reads == [path]


def test_a_loss_a_clipping_message_quotes_as_start_and_end_is_labelled_as_medians() -> None:
    """Over-clipping's "the loss went A → B" are medians of a tenth of the steps: the message says so."""
    losses = [1.0 - 0.001 * s for s in range(100)]
    log = run([10.0] * 100, loss=losses, threshold=[0.01] * 100, clip_coef=[0.001] * 100)
    log.meta.update(optimizer="SGD", config={"clip": {"kind": "norm", "max_norm": 0.01}})
    found = conclude(log, "over_clipping")
    assert found is not None and "(medians of the first and last 10 steps)" in found.message, found
    assert found.evidence["loss_ends_median_of"] == 10


def _by(finding: Finding, rule: str) -> bool:
    """Whether ``finding`` is the one ``rule`` reports (several rules share a finding id)."""
    if rule == "zeroed_gradients":
        return "zeroed_rate" in finding.evidence
    if rule == "adaptive_clipping":
        return finding.id == "over_clipping" and "zeroed_rate" not in finding.evidence
    if rule == "sudden_growth":
        return finding.id == "explosion" and "birth" in finding.evidence
    return finding.id == rule


# ----------------------------------------------------------------------------- non-finite
LOG_EVENT = {
    "type": "nonfinite",
    "step": 30,
    "phase": "loss",
    "op": "log",
    "kind": "-inf",
    "located_by": "replay",
    "evidence": {"reason": "log of 0"},
}


def test_a_located_nonfinite_op_gets_its_fix_from_the_op_table() -> None:
    norms = [1.0] * 30 + [NAN] * 10
    op = conclude(run(norms, events=[LOG_EVENT]), "nonfinite_op")
    assert op is not None and op.step == 30 and "`log`" in op.message and "log of 0" in op.message
    assert "clamp" in op.recommendation["text"] and op.recommendation["on_nonfinite"] == "skip"
    flags_only = conclude(run(norms), "nonfinite_op")
    assert flags_only is not None and "closure" in flags_only.recommendation["text"]


def test_the_nonfinite_op_gives_way_to_an_explosion_error() -> None:
    event = {
        **LOG_EVENT,
        "step": len(CLIMB) - 1,
        "op": "linear",
        "evidence": {"reason": "a value above the dtype's max"},
    }
    findings = diagnose(run(CLIMB, events=[event]))
    assert "explosion" in ids(findings) and "nonfinite_op" not in ids(findings)


def test_a_loss_that_jumps_with_new_data_and_falls_again_is_not_a_divergence() -> None:
    """A curriculum (sequence length 2 → 8 → 32): the loss fell to 0.02, jumped ×2000 in one step at the
    next stage, after a step of usual size (the weights barely moved), and fell back to 0.3: it read
    "Divergence … lower the rate 10×". The same jump after a step whose norm had climbed 20×, or one that
    never came back down, stays a divergence."""
    n = 200
    loss = [1.0 / (1 + s) + 0.02 for s in range(100)] + [150.0 / (1 + 3 * s) + 0.3 for s in range(n - 100)]
    norms = [1.0] * n
    assert conclude(run(norms, loss=loss), "divergence") is None
    stormy = [*norms[:99], 20.0, *norms[100:]]  # the step before the jump was itself huge: the model's doing
    assert conclude(run(stormy, loss=loss), "divergence") is not None
    stays = [*loss[:100], *[150.0 + s for s in range(n - 100)]]  # it never came back down
    assert conclude(run(norms, loss=stays), "divergence") is not None


def test_a_few_heavy_batches_in_a_row_at_a_floor_are_not_a_divergence() -> None:
    """A Huber regression on Cauchy noise: at a floor of ~0.4, five heavy batches in a row (87, 2.2, 40,
    98, 60) lift the rolling median over the line once, and the loss goes on as before (drifting up by a
    hair, so it is not "fell back to a tenth of its peak" either): it read "Divergence" on one seed, and
    nothing on another. A climb that stays up is one."""
    n = 200
    floor = [5.0 / (1 + s) + 0.4 for s in range(40)] + [0.4 + 0.001 * s for s in range(n - 40)]
    heavy = [*floor[:120], 87.0, 2.2, 40.0, 98.0, 60.0, *floor[125:]]
    assert conclude(run([1.0] * n, loss=heavy), "divergence") is None
    stays = [*floor[:120], *[87.0 + s for s in range(n - 120)]]
    assert conclude(run([1.0] * n, loss=stays), "divergence") is not None


def test_a_curriculums_harder_stage_raising_norm_and_loss_that_then_fall_is_not_an_explosion() -> None:
    """Stage 1 (easy) trains to a loss near 0; at step 200 harder data raise the norm 20× and the loss to
    2, and both come down over the next stage. Over the whole run the loss rose (its first tenth was
    stage 1's), and it read "Gradient explosion … max_norm=0.0044 (half the lowest level this run failed
    at)" — a level from the converged end, at which the run reached accuracy 0.58 instead of 0.987."""
    n = 500
    norms = [0.05] * 200 + [0.05 + 0.95 * math.exp(-k / 100) for k in range(n - 200)]
    loss = [0.1 / (1 + s / 20) for s in range(200)] + [0.3 + 1.7 * math.exp(-k / 60) for k in range(n - 200)]
    log = run(norms, loss=loss)
    assert conclude(log, "explosion") is None
    assert _clipping.exploding_norm(Facts(log)) >= 3 * 0.05  # the climb, not the stage's converged end


def test_an_overflow_in_a_run_huge_from_its_first_step_is_a_finding_not_no_findings() -> None:
    """MAML with an inner rate of 0.3: the loss was 3.7e35 at step 0 and steps overflowed from step 31 (events
    with cause "explosion"); the explosion rule has no healthy norms to grow from, nonfinite_op stood down for
    the explosion cause, and the run read "No findings"."""
    n = 60
    loss = [3.7e35] + [1e23 * (1 + s % 5) for s in range(1, n)]
    norms = [2.4e38] + [3e25 * (1 + s % 5) for s in range(1, n)]
    for s in (31, 32, 33, 34):  # (in a row: not a lone bad batch)
        loss[s], norms[s] = math.inf, math.inf
    boom = {"type": "nonfinite", "step": 31, "phase": "loss", "kind": "inf", "cause": "explosion",
            "located_by": "norm"}  # fmt: skip
    found = diagnose(run(norms, loss=loss, events=[boom]))
    assert found and found[0].severity == "error", [(f.id, f.message) for f in found]
    assert "already 3.7e+35 at step 0" in found[0].message, found[0].message


def test_a_run_non_finite_before_its_loss_could_fall_is_not_an_unbounded_objective() -> None:
    """REINFORCE normalising one 1-step episode's returns by their std (NaN at step 0, located at `std`): the
    policy loss, ~0 at first, then drifts negative as such losses do; it read "Unbounded loss … BCE targets …
    WGAN critic" (an error leading the std finding away)."""
    n = 120
    loss = [math.nan, math.nan] + [-1e-4 * s if s < 8 else -0.04 * s for s in range(n - 2)]  # (~0 at first)
    norms = [math.nan, math.nan] + [1.0 + 0.5 * s for s in range(n - 2)]
    for s in range(10, n, 3):
        loss[s], norms[s] = math.nan, math.nan
    std = {"type": "nonfinite", "step": 0, "phase": "loss", "op": "std", "kind": "nan", "source": "pg.py:86",
           "located_by": "watch", "evidence": {"reason": "std produced nan from finite inputs"}}  # fmt: skip
    found = diagnose(run(norms, loss=loss, events=[std], layer__a__weight_norm=[1.0 + s for s in range(n)]))
    assert found and found[0].id == "nonfinite_op", [(f.id, f.severity) for f in found]
    assert "unbounded_loss" not in [f.id for f in found]


def test_bad_data_from_a_data_event_or_a_lone_nonfinite_step() -> None:
    norms = [1.0] * 50 + [NAN] + [1.0] * 49
    data = {"type": "nonfinite", "step": 50, "phase": "data", "kind": "nan", "tensor": "input"}
    confirmed = diagnose(run(norms, events=[data]))
    assert ids(confirmed) == ["bad_data"] and confirmed[0].severity == "error"
    lone = diagnose(run(norms))
    assert (
        ids(lone) == ["bad_data"] and lone[0].severity == "warning" and lone[0].evidence["bad_steps"] == [50]
    )
    assert "usual cause is a bad batch" in lone[0].message
    assert "guard.step(closure)" in lone[0].recommendation["text"]
    ddp = run(norms)
    ddp.meta["world_size"] = 2  # no replays across ranks: the closure would not help
    text = diagnose(ddp)[0].recommendation["text"]
    assert "guard.step(closure)" not in text and "rerun the failing step in one process" in text, text
    hf = run(norms)  # a Trainer's step takes no closure: gradguard run watches its compute_loss
    hf.meta["integration"] = "transformers.GradGuardTrainer"
    assert "run the same script under `gradguard run`" in diagnose(hf)[0].recommendation["text"]
    union = run(norms)  # gradguard run, whose step it could not replay: no closure to pass there either
    union.meta["runner"] = "gradguard run"
    said = diagnose(union)[0].recommendation["text"]
    assert "gradguard run could not replay" in said and "model.nll(x, y)" in said, said


def test_isolated_nonfinite_steps_that_recur_are_counted_all_not_a_lone_step() -> None:
    """Six isolated non-finite steps, the last at the run's end (no step after it to show training went
    on: not "lone"), read "a lone non-finite step (5 in all)": they are six, a failure that recurs."""
    bad = (88, 101, 114, 117, 125, 127)
    norms = [NAN if s in bad else 1.0 for s in range(128)]
    found = conclude(run(norms), "bad_data")
    assert found is not None and found.evidence["nonfinite_steps"] == 6
    assert found.message.startswith("Step 88: 6 non-finite steps (88, 101, 114, 117, 125, 127), none located")
    assert "a lone non-finite step" not in found.message and "recurs" in found.message
    one = conclude(run([1.0] * 50 + [NAN] + [1.0] * 49), "bad_data")
    assert one is not None and one.message.startswith("Step 50: a lone non-finite step (no op located)")


def test_a_lookup_table_the_loss_code_indexes_is_named_not_a_target() -> None:
    """A logQ correction `log_q[items]` from item counts with zeros: -inf in 853 of 3000 entries; it read "a
    tensor entering the loss code (a target or label) … drop or repair samples"."""
    table = {"shape": [3000], "dtype": "float32", "nan": 0, "posinf": 0, "neginf": 853}
    event = {"type": "nonfinite", "step": 0, "phase": "data", "tensor": "loss input", "kind": "-inf",
             "source": "train.py:57", "located_by": "watch",
             "evidence": {"consumer": "index", "argument": 0, "input": table}}  # fmt: skip
    found = conclude(run([NAN] * 10, loss=[NAN] * 10, events=[event]), "bad_data")
    assert found is not None and "a table the loss code looks values up in" in found.message, found
    assert (
        "-inf in 853 of its 3000 entries" in found.message
        and "torch.log(counts + 1)" in found.recommendation["text"]
    )


def test_a_buffer_non_finite_before_the_first_step_was_built_so_not_written_by_a_batch() -> None:
    """A causal mask built as triu(ones) * -inf (0 * -inf = NaN below the diagonal): it read "find what wrote it —
    a running statistic a bad batch updated … reset it from a good checkpoint", which rebuilt the same NaN."""
    held = {"type": "nonfinite", "step": 0, "phase": "forward", "tensor": "buffer", "kind": "nan",
            "module": "attn", "located_by": "replay", "evidence": {"buffer": "attn.mask"}}  # fmt: skip
    log = run([NAN] * 10, loss=[NAN] * 10, events=[held])
    log.meta["nonfinite_buffers_at_start"] = ["attn.mask"]
    found = conclude(log, "nonfinite_op")
    assert found is not None and "'attn.mask', non-finite before the first step" in found.message, found
    assert "torch.full((n, n), float('-inf')).triu(1)" in found.recommendation["text"]


def test_every_batch_bad_from_the_first_step_is_the_preprocessing_not_a_few_samples() -> None:
    """A standardization over a constant column (std 0) makes every batch NaN: "drop the bad samples"
    would drop them all. Three bad batches among healthy ones stay the samples' fault."""
    data = [
        {"type": "nonfinite", "step": s, "phase": "data", "kind": "nan", "tensor": "input"} for s in range(9)
    ]
    every = conclude(run([NAN] * 10, loss=[NAN] * 10, events=data), "bad_data")
    assert every is not None and every.evidence["every_batch"] is True
    assert "the preprocessing makes them" in every.message
    assert every.recommendation["text"].startswith("Fix the preprocessing, not the samples")
    some = [1.0] * 20 + [NAN] + [1.0] * 20
    few = conclude(run(some, events=[{**data[0], "step": 20}]), "bad_data")
    assert (
        few is not None
        and "every_batch" not in few.evidence
        and "drop or repair" in few.recommendation["text"]
    )


def test_a_bad_batch_after_the_replays_ran_out_is_counted_with_the_others_not_an_op() -> None:
    """max_replays=3 located three bad batches as data; the fourth only has the flags. It is one
    more of them (counted in bad_data), not a separate error asking for a closure."""
    bad = {10, 30, 50, 70}
    norms = [NAN if s in bad else 1.0 for s in range(90)]
    data = [{"type": "nonfinite", "step": s, "phase": "data", "kind": "nan", "tensor": "input",
             "located_by": "replay"} for s in (10, 30, 50)]  # fmt: skip
    flags = {
        "type": "nonfinite",
        "step": 70,
        "phase": "loss",
        "tensor": "output",
        "kind": "nan",
        "located_by": "norm",
    }
    found = diagnose(run(norms, events=[*data, flags]))
    assert ids(found) == ["bad_data"], [(f.id, f.message) for f in found]
    assert (
        found[0].evidence["unreplayed_steps"] == 1
        and "1 later non-finite step(s) not replayed" in found[0].message
    )


def test_a_lone_step_whose_replayed_model_output_was_finite_points_at_the_loss_code() -> None:
    """guard.step(loss) cannot replay the loss code; its replay of the model found the output on that
    batch finite: the inputs were fine, the loss code (or a target) is where to look."""
    norms = [1.0] * 50 + [NAN] + [1.0] * 49
    reason = "the model's output was finite: the loss code made the loss or its gradient non-finite"
    replayed = {"type": "nonfinite", "step": 50, "phase": "loss", "tensor": "output", "kind": "inf",
                "located_by": "replay", "evidence": {"reason": reason}}  # fmt: skip
    lone = diagnose(run(norms, events=[replayed]))
    assert ids(lone) == ["bad_data"] and lone[0].evidence["model_output_finite"] is True
    assert "the model's output on that batch was finite: the loss code made it non-finite" in lone[0].message
    assert "torch.isfinite(y)" in lone[0].recommendation["text"]


# ----------------------------------------------------------------------------- learning rate, weights, layers
def test_update_ratios_far_above_1e_3_are_a_learning_rate_too_high() -> None:
    """In a run that did not train (the loss flat): a warning, and a lower rate to verify."""
    n = 60
    ratios = {"layer__fc__update_ratio": [0.3] * n, "layer__out__update_ratio": [1e-3] * n}
    high = conclude(run([1.0] * n, loss=[1.0] * n, **ratios), "lr_too_high")
    assert high is not None and high.evidence["update_ratio_median_by_layer"]["fc"] == 0.3
    assert high.severity == "warning" and high.recommendation["lr"] < 0.1
    # the run stalled at its rate: no candidate (a few dozen steps of tune cannot show a stall; a
    # post-LN transformer at AdamW 0.03 "trained" 30 steps as well as 0.0018, then stalled)
    assert 0.1 not in high.recommendation["lr_candidates"]
    assert conclude(run([1.0] * n, layer__fc__update_ratio=[1e-3] * n), "lr_too_high") is None


@pytest.mark.parametrize("ratio", [0.11, 0.3, 2.0])
def test_high_update_ratios_in_a_run_that_trained_are_info_with_no_lower_rate_advised(ratio: float) -> None:
    """Issue 15: advice never turns a run that trained into a failed one. The rnn demo's ``norm:5``
    recipe (lr 1, decoder ratio ~0.11, loss 132 → 59) trains better than the lower rate ``lr_too_high``
    used to send it to: the same "trained" test as ``over_clipping`` (falling loss, finite, no climb)
    makes it an info with no ``lr`` and no lower rate sent to tune's few dozen steps to verify."""
    n = 80
    loss = [3.0 * 0.98**s + 0.01 * (s % 3) for s in range(n)]
    clipped = run([8.0] * n, loss=loss, clip={"kind": "norm", "max_norm": 5.0},
                  threshold=[5.0] * n, layer__decoder__update_ratio=[ratio] * n)  # fmt: skip
    lr = conclude(clipped, "lr_too_high")
    assert lr is not None and lr.severity == "info", lr
    assert "not a failure" in lr.message and "medians of the first and last" in lr.message
    rec = lr.recommendation
    assert not {"lr", "lr_verified", "lr_candidates", "max_norm"} & set(rec), rec
    assert rec["text"].startswith("Keep the learning rate that trained (lr=0.1)")
    stalled = conclude(
        run([8.0] * n, loss=[3.0] * n, layer__decoder__update_ratio=[ratio] * n), "lr_too_high"
    )
    assert stalled is not None and stalled.severity == "warning" and stalled.recommendation["lr"] < 0.1


def test_an_explosion_and_its_high_update_ratios_advise_one_rate_from_the_ratios() -> None:
    """A far too high rate moved the layers 2× their weights a step, then the norm exploded: a tenth
    of the rate still diverges (SGD at lr 5: 0.5 went NaN; 0.02 trained). Both findings advise the
    rate the ratios give, one tune command."""
    n = len(CLIMB)
    log = run(CLIMB, loss=[1.0] * (n - 1) + [NAN], lr=[5.0] * n, layer__fc__update_ratio=[2.0] * n)
    boom, high = conclude(log, "explosion"), conclude(log, "lr_too_high")
    assert boom is not None and high is not None
    assert (
        boom.recommendation["lr"] == high.recommendation["lr"] == 0.07
    )  # 5 × 3e-2 / 2 (one figure), not 0.5
    assert boom.recommendation["lr_tune"] == high.recommendation["lr_tune"]


def test_a_stalled_runs_own_rate_is_no_candidate_and_tune_picks_among_the_lower(tmp_path: Path) -> None:
    """Where ``lr_too_high`` advises a rate, the run stalled at its own: the run itself is longer
    evidence than tune's few dozen steps, which cannot show a stall (a post-LN transformer at AdamW
    0.03 fell as fast as at 0.0018 for 30 steps, tune "verified" 0.03, and 0.03 stalled at 4.5
    bits/char over the run where 0.0018 reached 3.1). The candidates are lower rates only; tune's
    verdict (``tunelog.choose``) picks among them."""
    from gradguard.tunelog import TuneResult, judge, write_tune

    n = 80
    path = tmp_path / "run"
    rows = [
        {
            "step": s,
            "loss": 3.0 - 0.001 * s,
            "grad_norm": 1.0,
            "lr": 0.4,
            "layers": {"fc": {"update_ratio": 0.3}},
        }
        for s in range(n)
    ]
    with RunWriter(path) as w:
        w.write_metrics(rows)
    rec = next(f for f in diagnose(path) if f.id == "lr_too_high").recommendation
    rates = rec["lr_candidates"]
    assert max(rates) < 0.4 and len(rates) >= 3, rates
    flat = [1.0] * 10

    def falls(by: float) -> list[float]:
        return [1.0 - by * k / 9 for k in range(10)]

    write_tune(path, TuneResult([judge(None, r, falls(0.5), flat, own_clip=True) for r in rates], 10))
    verified = next(f for f in diagnose(path) if f.id == "lr_too_high").recommendation
    assert verified["lr_verified"] is True and verified["lr"] == max(rates) and "lr_keep" not in verified


def _exploded_run(path: Path) -> Path:
    """Unclipped at lr 0.4: 40 healthy steps, then the norm climbs 2× a step to non-finite."""
    norms = [1.0 + 0.05 * (s % 3) for s in range(40)] + [2.0**k for k in range(1, 30)] + [NAN]
    rows = [
        {"step": s, "loss": 1.0 if math.isfinite(g) else NAN, "grad_norm": g, "lr": 0.4,
         "nonfinite": not math.isfinite(g), "skipped": not math.isfinite(g)}
        for s, g in enumerate(norms)
    ]  # fmt: skip
    with RunWriter(path) as w:
        w.write_metrics(rows)
    return path


def test_an_explosion_s_threshold_and_learning_rate_are_either_or(tmp_path: Path) -> None:
    """``explosion`` recommends a ``max_norm`` and an ``lr``; tune verifies each with the other setting
    unchanged, so they are alternatives, not one combined change: the text says "either … or"."""
    from gradguard.tunelog import TuneResult, judge, write_tune

    path = _exploded_run(tmp_path / "run")
    rec = next(f for f in diagnose(path) if f.id == "explosion").recommendation
    assert "max_norm" in rec and "lr" in rec, rec
    text = rec["text"]
    assert (
        text.startswith("Either clip the global norm. Try max_norm=")
        and ". Or, instead, lower the learning rate. Try lr=" in text
    )
    assert text.index("max_norm=") < text.index("Or, instead") < text.index("lr=")
    falling, flat = [1.0 - 0.02 * k for k in range(10)], [1.0] * 10
    exploded = [1.0] * 3 + [10.0**k for k in range(1, 8)]
    trials = [judge(m, None, falling, flat) for m in (0.5, 1.0)] + [judge(2.0, None, falling, exploded)]
    trials += [judge(None, r, falling, flat, own_clip=True) for r in (0.01, 0.02)]
    write_tune(path, TuneResult(trials, 10))
    verified = next(f for f in diagnose(path) if f.id == "explosion").recommendation
    assert verified["verified"] is True and verified["lr_verified"] is True, verified
    assert verified["text"].startswith("Either clip the global norm. Verified: max_norm=")
    assert ". Or, instead, lower the learning rate. Verified: lr=" in verified["text"]


def test_an_lr_jump_right_before_the_climb_is_blamed() -> None:
    lr = [0.05] * 28 + [0.4] * (len(CLIMB) - 28)
    jump = conclude(run(CLIMB, lr=lr), "lr_too_high")
    assert jump is not None and jump.evidence["lr_jump_step"] == 28 and jump.recommendation["lr"] == 0.05


def test_an_lr_jump_from_a_rate_annealed_to_zero_advises_the_rate_that_trained() -> None:
    """SWA: cosine annealing to eta_min=0, then SWALR at 2.5 (meant 5e-2). A jump from 0 was no jump (the
    ratio to 0 is not a number): it read "explosion: max_norm=0.034 or lr=0.2" with no word of the schedule."""
    lr = [0.1] * 16 + [0.0] * 12 + [2.5] * (len(CLIMB) - 28)
    jump = conclude(run(CLIMB, lr=lr), "lr_too_high")
    assert jump is not None and jump.evidence["lr_jump_step"] == 28 and jump.recommendation["lr"] == 0.1
    assert "rose from 0 to 2.5 at step 28 (it had trained at up to 0.1" in jump.message, jump.message


def test_a_param_group_added_at_a_far_higher_rate_right_before_the_climb_is_named() -> None:
    """A gradual unfreeze whose per-layer decay was typed 0.026 for 2.6: the group added at step 27 steps at
    4.44 against the logged (group 0's) 0.003; it read "lower the rate to 0.0003 or clip at 0.27"."""
    lr = [0.003] * len(CLIMB)
    added = {
        "type": "layers",
        "step": 27,
        "parameters": ["blocks.1.weight"],
        "added": ["blocks.1"],
        "lr": 4.44,
    }
    log = run(CLIMB, lr=lr, events=[added])
    boom, high = conclude(log, "explosion"), conclude(log, "lr_too_high")
    assert high is not None and high.evidence["joined_step"] == 27, high
    assert "in a param group at lr 4.44, 1.48e+03× the logged rate 0.003" in high.message, high.message
    assert boom is not None and "param group added right before the climb" in boom.recommendation["text"]
    quiet = run(CLIMB, lr=lr, events=[{**added, "lr": 0.003}])  # a group at the same rate: not it
    assert (
        conclude(quiet, "lr_too_high") is None or "param group" not in conclude(quiet, "lr_too_high").message
    )


def test_an_explosion_a_schedule_drove_advises_the_schedules_fix_and_the_rate_before_it() -> None:
    """A LambdaLR that triples the rate every step from step 28 (0.05 → 0.4 and on): "a tenth of the
    rate the run failed at" was a rate above the script's own, and a threshold does not hold a rate
    that keeps growing. The explosion names the schedule and advises the rate before its jump, the
    same rate and tune command as lr_too_high."""
    lr = [0.05] * 28 + [0.05 * 3.0 ** (s - 27) for s in range(28, len(CLIMB))]
    log = run(CLIMB, lr=lr)
    boom, jump = conclude(log, "explosion"), conclude(log, "lr_too_high")
    assert boom is not None and jump is not None and boom.severity == "error"
    assert "the learning rate rose from 0.05 to 0.15 at step 28" in boom.message
    assert boom.recommendation["text"].startswith(
        "The learning-rate schedule drove it: lower the learning rate"
    )
    assert boom.recommendation["lr"] == jump.recommendation["lr"] == 0.05
    assert boom.recommendation["lr_tune"] == jump.recommendation["lr_tune"]
    assert "max_norm" not in boom.recommendation


def _lr_case(path: Path, rule: str) -> Path:
    """A run directory at lr 0.4 that fails the way ``rule`` reports: after a jump from 0.05
    (``lr_too_high``), a finite climb of the loss (``divergence``), a climb while clipped at 0.5
    (``explosion``: clipped and still exploded)."""
    rows: list[dict[str, Any]] = []
    for s, g in enumerate(CLIMB):
        rows.append({"step": s, "loss": 1.0 if math.isfinite(g) else NAN, "grad_norm": g, "lr": 0.4})
        if rule == "lr_too_high" and s < 28:
            rows[-1]["lr"] = 0.05
        if rule == "explosion":
            rows[-1].update(threshold=0.5, clip_coef=min(1.0, 0.5 / g) if math.isfinite(g) else NAN)
    if rule == "divergence":  # finite to the end, the loss 3× a step
        rows = [{**r, "grad_norm": 1.0, "loss": 0.8 * 3.0 ** max(0, s - 20)} for s, r in enumerate(rows[:-1])]
    meta = {"config": {"clip": {"kind": "norm", "max_norm": 0.5}}} if rule == "explosion" else {}
    with RunWriter(path, meta) as w:
        w.write_metrics(rows)
    return path


@pytest.mark.parametrize("rule", ["lr_too_high", "divergence", "explosion"])
def test_every_learning_rate_a_rule_recommends_is_verified_or_marked_unverified(
    tmp_path: Path, rule: str
) -> None:
    """One owner for "what learning rate to recommend" (``_clipping.lr_advice``): an estimate below the
    rate the run failed at, marked unverified with the ``gradguard tune --lr`` line that checks it and
    its neighbours; with learning-rate candidates in ``tune.json``, the rate that trained there."""
    from gradguard.tunelog import TuneResult, judge, write_tune

    path = _lr_case(tmp_path / rule, rule)
    rec = next(f for f in diagnose(path) if f.id == rule).recommendation
    assert rec["lr_verified"] is False and rec["lr"] < 0.4 and "--lr " in rec["lr_tune"], rec
    assert rec["lr_tune"] in rec["text"] and f"Try lr={rec['lr']:g}" in rec["text"]
    assert all(float(x) < 0.4 for x in rec["lr_tune"].split("--lr ")[1].split()[0].split(","))
    if "max_norm" not in rec:  # the learning rate is the whole recommendation
        assert rec["verified"] is False and rec["tune"] == rec["lr_tune"]
    falling, flat = [1.0 - 0.02 * k for k in range(10)], [1.0] * 10
    exploded = [1.0] * 3 + [10.0**k for k in range(1, 8)]
    trials = [
        judge(None, 0.05, falling, flat),
        judge(None, 0.1, falling, flat),
        judge(None, 0.2, falling, exploded),
    ]
    result = TuneResult(trials, 10)
    assert result.lr is not None and result.lr < 0.2  # tunelog.choose: below the rate that exploded
    write_tune(path, result)
    verified = next(f for f in diagnose(path) if f.id == rule).recommendation
    assert verified["lr_verified"] is True and verified["lr"] == result.lr and "lr_tune" not in verified
    assert (
        f"Verified: no clipping at lr={result.lr:g}" in verified["text"]
        and "learning rates 0.05, 0.1, 0.2" in verified["text"]
    )
    if "max_norm" in verified:  # tune.json tried learning rates only: the threshold is still an estimate
        assert verified["verified"] is False


def test_learning_rates_tune_json_says_none_trained_are_not_recommended(tmp_path: Path) -> None:
    from gradguard.tunelog import TuneResult, judge, write_tune

    path = _lr_case(tmp_path / "run", "lr_too_high")
    exploded = [1.0] * 3 + [10.0**k for k in range(1, 8)]
    write_tune(path, TuneResult([judge(None, lr, [1.0] * 10, exploded) for lr in (0.01, 0.02)], 10))
    rec = next(f for f in diagnose(path) if f.id == "lr_too_high").recommendation
    assert rec["lr_verified"] is True and "lr" not in rec and "go below 0.01" in rec["text"]


def test_weights_growing_tenfold_are_weight_growth() -> None:
    n = 40
    grown = conclude(run([1.0] * n, layer__fc__weight_norm=[1.0 + s for s in range(n)]), "weight_growth")
    assert grown is not None and grown.evidence["layer"] == "fc" and grown.step == 9
    assert conclude(run([1.0] * n, layer__fc__weight_norm=[1.0] * n), "weight_growth") is None


def test_a_first_step_that_scrambled_the_weights_of_a_run_that_stalled_is_lr_too_high() -> None:
    """AdamW at 0.03 on a post-LN transformer: step 0 moves the layers 0.3–1.5× their norm, the later
    updates are weight decay alone (3e-4), the loss stalls near uniform and the gradients of the
    wrecked layers look vanishing. The rate is the finding, not the architecture."""
    n, names = 120, ["emb", "enc", "mid", "head"]
    stalled = [3.25, 2.95, 3.5] + [2.8 + 0.05 * (s % 3) for s in range(n - 3)]
    cols = {f"layer__{m}__grad_norm": [10.0 ** (i - 4)] * n for i, m in enumerate(names)}
    first = {
        f"layer__{m}__update_ratio": [r] + [NAN] * 49 + [3e-4] + [NAN] * (n - 51)
        for m, r in zip(names, (0.3, 0.4, 0.8, 1.5))
    }
    log = run([1.0] * n, loss=stalled, **cols, **first)
    high = conclude(log, "lr_too_high")
    assert high is not None and high.severity == "warning" and high.step == 0
    assert (
        "step 0 moved the layers by 0.6 of their weight norm" in high.message and "stalled at" in high.message
    )
    assert high.recommendation["lr"] == pytest.approx(0.002)  # 0.1 × 1e-2 / 0.6, unverified
    found = {f.id for f in evaluate(Facts(log), REGISTRY)}
    assert "lr_too_high" in found and "vanishing" not in found
    trained = run([1.0] * n, **cols, **first)  # the same first step in a run whose loss fell: no finding
    assert conclude(trained, "lr_too_high") is None and "vanishing" in {
        f.id for f in evaluate(Facts(trained), REGISTRY)
    }


def _flat(n: int, level: float = 2.0) -> list[float]:
    """A loss that bounces around ``level`` (2.0: no class count's chance level) without falling."""
    return [level + 0.2 * ((s * 7) % 5 - 2) / 2 for s in range(n)]


def test_a_finite_run_that_did_not_train_with_large_steps_is_stalled_and_told_a_lower_rate() -> None:
    """The finding of last resort: no other rule explains a run that stayed at its start."""
    n = 120
    log = run(
        [1.0] * n, loss=_flat(n), layer__fc__update_ratio=[0.01] * n, layer__out__update_ratio=[0.01] * n
    )
    found = evaluate(Facts(log), REGISTRY)
    assert [f.id for f in found] == ["stalled"], [(f.id, f.message) for f in found]
    stalled = found[0]
    assert (
        stalled.severity == "warning" and "did not train" in stalled.message and "too high" in stalled.message
    )
    assert stalled.recommendation["lr"] == pytest.approx(0.01)  # 0.1 × 1e-3 / 0.01
    assert stalled.recommendation["lr_verified"] is False
    assert max(stalled.recommendation["lr_candidates"]) < 0.1  # the run's own rate stalled: no candidate
    # 80 % label noise: the loss fell 2.41 → 2.14 at once and settled at that floor (0.4 % above it), under
    # the same large steps; "the learning rate is too high", followed (4e-3), left it where it was
    floor = [2.41 - 0.27 * min(1.0, s / 20) + 0.01 * (s % 3) for s in range(n)]
    ratios = {"layer__fc__update_ratio": [0.01] * n, "layer__out__update_ratio": [0.01] * n}
    settled = conclude(run([1.0] * n, loss=floor, **ratios), "stalled")
    assert settled is not None and settled.severity == "info" and "a floor" in settled.message, settled


def test_a_run_whose_steps_were_too_small_to_train_is_told_a_higher_rate() -> None:
    n = 120
    stalled = conclude(run([1.0] * n, loss=_flat(n), layer__fc__update_ratio=[1e-6] * n), "stalled")
    assert stalled is not None and "too low" in stalled.message
    assert stalled.recommendation["lr"] == pytest.approx(100.0)  # 0.1 × 1e-3 / 1e-6
    assert stalled.recommendation["text"].startswith("Raise the learning rate")
    assert min(stalled.recommendation["lr_candidates"]) > 0.1


def test_a_run_stalled_at_the_loss_of_a_uniform_prediction_is_said_whatever_the_rate() -> None:
    """A vanilla RNN on a copy task over a gap it cannot carry: the loss sits at ln 8, the cross-entropy
    of a uniform guess over 8 symbols, at typical update ratios (no rate to blame): "No findings" was
    the answer. Not at 2.0, which is no class count's chance level."""
    n = 120
    at_chance = [math.log(8) + 0.002 * ((s * 7) % 5 - 2) for s in range(n)]
    stalled = conclude(run([1.0] * n, loss=at_chance, layer__rnn__update_ratio=[2e-3] * n), "stalled")
    assert stalled is not None and stalled.evidence["chance_classes"] == 8
    assert "ln 8 = 2.08" in stalled.message and "uniform prediction over 8 classes" in stalled.message
    assert "lr" not in stalled.recommendation and "LSTM/GRU" in stalled.recommendation["text"]
    assert conclude(run([1.0] * n, loss=_flat(n), layer__rnn__update_ratio=[2e-3] * n), "stalled") is None
    # labels shuffled apart from their inputs (Adam 1e-3, steps 3.5× the usual): the signal, not the rate;
    # steps ten times the usual at chance: the rate
    shuffled = conclude(run([1.0] * n, loss=at_chance, layer__fc__update_ratio=[3.5e-3] * n), "stalled")
    assert shuffled is not None and "lr" not in shuffled.recommendation
    assert "each input paired with its own label" in shuffled.recommendation["text"]
    bouncing = conclude(run([1.0] * n, loss=at_chance, layer__fc__update_ratio=[2e-2] * n), "stalled")
    assert bouncing is not None and bouncing.recommendation["lr"] < 0.1


@pytest.mark.parametrize(
    "case",
    ["typical_ratios", "trained", "trained_fast", "still_learning", "short", "explains_itself"],
)
def test_a_run_is_called_stalled_only_when_it_did_not_train_and_nothing_else_explains_it(case: str) -> None:
    """Not a run at typical update ratios (a fine-tune already at its floor looks the same), one whose
    loss fell (however early: 2.3 → 0.1 within five steps, then flat), one still falling slowly in
    its second half, a run too short to tell, nor one another rule explains (``lr_too_high``)."""
    n, ratio = 120, 0.01
    loss = _flat(n)
    if case == "typical_ratios":
        ratio = 1e-3
    elif case == "trained":
        loss = [2.3 * 0.98**s for s in range(n)]
    elif case == "trained_fast":
        loss = [2.3, 1.5, 0.8, 0.3] + [0.1 + 0.01 * (s % 3) for s in range(n - 4)]
    elif case == "still_learning":
        loss = [2.3 - 0.003 * s + 0.02 * (s % 2) for s in range(n)]  # 15 % over the run, still falling
    elif case == "short":
        n, loss = 40, loss[:40]
    elif case == "explains_itself":
        ratio = 0.3  # far above 1e-3: lr_too_high's warning, which stalled gives way to
    log = run([1.0] * n, loss=loss, layer__fc__update_ratio=[ratio] * n)
    found = {f.id for f in evaluate(Facts(log), REGISTRY)}
    assert "stalled" not in found, found
    assert ("lr_too_high" in found) == (case == "explains_itself")


def test_a_nan_born_in_the_optimizer_at_a_nan_learning_rate_blames_the_schedule() -> None:
    """A warm-up that divides by warmup_steps=0 gives lr NaN at step 0; SGD writes NaN into every
    weight. The event's hyperparameters were read after the script set the rate again (0.05): "check
    the hyperparameters … else lower the learning rate" was the fix. The rate the run logged at that
    step says what it was."""
    n = 6
    event = {
        "type": "nonfinite", "step": 0, "phase": "optimizer", "module": "0", "tensor": "param", "kind": "nan",
        "located_by": "check", "optimizer": "SGD", "parameters": ["0.weight"],
        "evidence": {"optimizer": "SGD", "hyperparameters": {"lr": 0.05, "momentum": 0.9}},
    }  # fmt: skip
    log = run([NAN] * n, loss=[NAN] * n, lr=[NAN] + [0.05] * (n - 1), events=[event])
    found = conclude(log, "nonfinite_op")
    assert found is not None and "the learning rate itself was nan" in found.recommendation["text"]
    fine = run([NAN] * n, loss=[NAN] * n, lr=[0.05] * n, events=[event])
    assert "learning rate itself" not in conclude(fine, "nonfinite_op").recommendation["text"]
    # L-BFGS at lr 1 without a line search on minibatches: "an eps of 0 … else lower the rate" (it has no eps;
    # 10× lower still diverged); with strong Wolfe, the general fix
    for search, said in ((None, "line_search_fn='strong_wolfe'"), ("strong_wolfe", "check LBFGS.step()")):
        hyper = {"lr": 1.0, "history_size": 10, "line_search_fn": search}
        lbfgs = {**event, "optimizer": "LBFGS", "evidence": {"optimizer": "LBFGS", "hyperparameters": hyper}}
        found = conclude(run([NAN] * n, loss=[NAN] * n, lr=[1.0] * n, events=[lbfgs]), "nonfinite_op")
        assert found is not None and said in found.recommendation["text"], (search, found)


def test_grad_norms_decaying_toward_the_input_are_vanishing() -> None:
    n = 40
    cols = {f"layer__{i}__grad_norm": [10.0 ** (i - 4)] * n for i in range(5)}
    van = conclude(run([1.0] * n, **cols), "vanishing")
    assert van is not None and van.evidence["orders_of_magnitude"] == 4.0
    flat = {f"layer__{i}__grad_norm": [1.0] * n for i in range(5)}
    assert conclude(run([1.0] * n, **flat), "vanishing") is None
    # PPO's separate policy and value towers: the value loss's gradients 500× the policy's is no chain
    towers = {"pi.0": 0.06, "pi.2": 0.07, "v.0": 25.0, "v.2": 31.0}
    cols = {f"layer__{name}__grad_norm": [g] * n for name, g in towers.items()}
    assert conclude(run([1.0] * n, **cols), "vanishing") is None
    chain = {"enc.0": 0.01, "enc.2": 0.1, "dec.0": 1.0, "dec.2": 10.0}  # an encoder into a decoder: one chain
    cols = {f"layer__{name}__grad_norm": [g] * n for name, g in chain.items()}
    assert conclude(run([1.0] * n, **cols), "vanishing") is not None


def test_a_scale_collapse_in_a_bfloat16_run_is_the_nonfinite_ops_not_float16s_range() -> None:
    """A GradScaler kept beside bf16 autocast halved its scale at each step of a recurring log(0): it read
    "float16 cannot hold these gradients … Train in bfloat16" to a run already in bfloat16."""
    scale = [2.0 ** (10 - s) for s in range(12)]
    located = {"type": "nonfinite", "step": 2, "phase": "loss", "op": "log", "kind": "-inf", "located_by": "hooks",
               "evidence": {"reason": "log of 0", "inputs": [{"dtype": "bfloat16", "zeros": 1}]}}  # fmt: skip
    found = conclude(run([1.0] * 12, loss_scale=scale, events=[located]), "loss_scale_collapse")
    assert found is not None and found.severity == "warning"
    assert "computes in bfloat16" in found.message and "Train in bfloat16" not in found.recommendation["text"]
    fp16 = {**located, "evidence": {"reason": "log of 0", "inputs": [{"dtype": "float16", "zeros": 1}]}}
    same = conclude(run([1.0] * 12, loss_scale=scale, events=[fp16]), "loss_scale_collapse")
    assert same is not None and "Train in bfloat16" in same.recommendation["text"]


def test_a_loss_scale_below_one_is_a_collapse() -> None:
    scale = [2.0**8 / 2**s for s in range(12)]
    collapse = conclude(run([1.0] * 12, loss_scale=scale), "loss_scale_collapse")
    assert collapse is not None and collapse.step == 9 and collapse.recommendation["dtype"] == "bfloat16"
    assert conclude(run([1.0] * 12, loss_scale=[256.0] * 12), "loss_scale_collapse") is None


# ----------------------------------------------------------------------------- the registry
def test_the_registry_is_the_one_list_of_rules() -> None:
    assert RULES == rules.finding_ids() == tuple(dict.fromkeys(e.rule.id for e in REGISTRY))
    names = [e.rule.name for e in order(REGISTRY)]
    for e in REGISTRY:  # a rule runs after the rules it reads or gives way to
        assert all(names.index(n) < names.index(e.rule.name) for n in e.after)


def test_a_rule_reading_an_undeclared_rule_is_refused_and_bad_registries_are_named() -> None:
    def nosy(f: Facts, seen: Seen) -> None:
        seen.evidence("bad_data")

    with pytest.raises(GradGuardError, match="needs=\\('bad_data',\\)"):
        evaluate(Facts(run([1.0] * 5)), [entry("bad_data"), Entry(Rule("nosy", nosy, lambda f, e: e))])
    with pytest.raises(GradGuardError, match="unregistered"):
        order([entry("nonfinite_op", needs=("bad_data",))])
    a = Rule("a", lambda f, s: None, lambda f, e: e)
    b = Rule("b", lambda f, s: None, lambda f, e: e)
    with pytest.raises(GradGuardError, match="wait for each other"):
        order([Entry(a, needs=("b",)), Entry(b, needs=("a",))])


def test_adding_a_rule_is_one_new_file_and_one_registry_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test-local rule: its own module (detect → evidence, explain → finding), registered with one
    line that also says, as data, that it gives way to an explosion."""
    package = tmp_path / "my_rules"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "loss_plateau.py").write_text(
        textwrap.dedent(
            '''
            """``loss_plateau``: the loss did not move at all over the run."""
            from gradguard.diagnose import Finding
            from gradguard.diagnose.rules import Rule


            def detect(f, seen):
                losses = f.loss_at(0, len(f.rows))
                return losses[0] if len(losses) >= 20 and max(losses) == min(losses) else None


            def explain(f, loss):
                return Finding("loss_plateau", "warning", f.steps[0], f"The loss stayed at {loss:g}.", {"loss": loss})


            RULE = Rule("loss_plateau", detect, explain)
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = [*REGISTRY, entry("my_rules.loss_plateau", yields_to={"explosion": ("error", "warning")})]
    monkeypatch.setattr(rules, "REGISTRY", registry)

    plateau = diagnose(run([1.0] * 30, loss=[0.7] * 30))
    assert ids(plateau) == ["loss_plateau"] and plateau[0].evidence == {"loss": 0.7}
    assert "loss_plateau" not in ids(diagnose(run([1.0] * 30)))  # the loss fell
    exploded = diagnose(run([*CLIMB[:-1], 1e12], loss=[0.7] * len(CLIMB)))
    assert "explosion" in ids(exploded) and "loss_plateau" not in ids(exploded)  # it gave way


def test_the_meta_notes_of_gradguard_run_are_errors_only_in_a_run_that_did_not_train() -> None:
    """``loss_on_probabilities``, ``clip_before_backward``, ``custom_backward``, ``loss_weight``: what
    ``gradguard run`` noted is an error (and the headline) where the loss never fell, a warning or nothing
    where it trained."""
    notes = {
        "loss_on_probabilities": [{"op": "cross_entropy", "source": "train.py:41"}],
        "clip_before_backward": {"call": "clip_grad_norm_(max_norm=1)", "source": "train.py:41"},
        "nonlinear_backward": [{"function": "Swish.backward", "source": "train.py:20", "deviation": 0.5}],
        "loss_terms": {
            "source": "train.py:49",
            "terms": [
                {"value": 0.7, "weight": None, "op": "mean", "source": "train.py:46"},
                {"value": 60.0, "weight": 1e4, "op": "mean", "source": "train.py:48"},
            ],
        },
    }
    rule_of = {
        "loss_on_probabilities": "loss_on_probabilities",
        "clip_before_backward": "clip_before_backward",
        "nonlinear_backward": "custom_backward",
        "loss_terms": "loss_weight",
    }
    flat = [4.6 + 0.001 * (s % 3) for s in range(200)]
    for key, note in notes.items():
        stuck = run([1.0] * 200, loss=flat)
        stuck.meta[key] = note
        found = diagnose(stuck)
        assert found and found[0].id == rule_of[key] and found[0].severity == "error", (key, found)
        trained = run([1.0] * 200)
        trained.meta[key] = note
        after = [f for f in diagnose(trained) if f.id == rule_of[key]]
        expected = {"loss_on_probabilities": ["warning"], "clip_before_backward": ["warning"]}.get(key, [])
        assert [f.severity for f in after] == expected, (key, after)


def test_a_loss_that_blew_up_at_once_and_settled_above_its_first_value_did_not_train() -> None:
    """A GPT-2 from scratch at AdamW lr 1.0 (HF Trainer): step 0 moved the layers 50× their norm, the
    loss went 4.67 → 25–60 and settled near 5.6. The first tenth's median (38) read as its start, so
    the run "trained" (38 → 5.6) and no lr_too_high was said; and a rate from the decayed schedule's
    last value was quoted (3e-6 for the 2e-4 the first step's rate gives)."""
    loss = [4.67, 25.4, 33.8, 59.7, 54.0, 43.1] + [5.6 + 0.1 * (s % 3) for s in range(54)]
    ratios = [50.0] + [1e-3] * 59
    log = run([1.0] * 60, loss=loss, layer__a__update_ratio=ratios, layer__b__update_ratio=ratios)
    for r, lr in zip(log.metrics, [1.0 - s / 60 for s in range(60)], strict=True):
        r["lr"] = lr
    found = conclude(log, "lr_too_high")
    assert found is not None and "scrambles the initial weights" in found.message, found
    assert "from 4.67 at step 0" in found.message and found.recommendation["lr"] == 0.0002


def test_a_loss_that_rose_at_the_start_and_came_back_to_its_first_value_did_not_train() -> None:
    """A tiny GPT-2 at AdamW lr 0.5 with a 5-step warm-up (HF Trainer): the loss went 4.05 → 6.4 and
    back to 4.04 (the healthy run reaches 3.64). The first steps' median (5.85, below 2× the first loss)
    read as its start: "High update ratios, not a failure … Keep the learning rate that trained"."""
    loss = [4.05, 4.6, 5.4, 6.4, 6.3, 6.1, 5.9, 5.85, 5.7, 5.6] + [4.04 + 0.01 * (s % 3) for s in range(140)]
    ratios = [0.23] * 150
    log = run([1.0] * 150, loss=loss, layer__a__update_ratio=ratios, layer__b__update_ratio=ratios)
    found = conclude(log, "lr_too_high")
    assert found is not None and found.severity == "warning", found


def test_a_lone_loss_code_failure_under_gradguard_run_does_not_advise_gradguard_run() -> None:
    """A DQN's NaN reward at update 300 under `gradguard run`: the advice was "run the script under
    `gradguard run`, which watches the loss code" — the run it was reading."""
    norms = [1.0] * 300 + [NAN] + [1.0] * 40
    event = {"type": "nonfinite", "step": 300, "phase": "loss", "tensor": "output", "located_by": "replay"}
    for runner, says in ((None, "run the script under `gradguard run`"), ("gradguard run", "named no op")):
        log = run(norms, events=[event])
        if runner is not None:
            log.meta["runner"] = runner
        found = conclude(log, "bad_data")
        assert found is not None and says in found.recommendation["text"], (runner, found)
        assert "rewards" in found.recommendation["text"]


def test_a_script_that_stopped_itself_is_not_told_to_fix_a_traceback() -> None:
    """A script that caught Ctrl-C and called sys.exit(130) printed no traceback."""
    for ended, says in (("SystemExit: 130", "Run it to the end"), ("ValueError: bad shard", "traceback")):
        log = run([1.0] * 40)
        log.meta.update(start_time="2026-01-01T00:00:00Z", end_time="2026-01-01T00:01:00Z", ended_by=ended)
        found = conclude(log, "incomplete_log")
        assert found is not None and says in found.recommendation["text"], (ended, found)
    # sys.exit(1) after all 400 steps (a CI gate on its own metric) read "ended early … run it to the end"
    log = run([1.0] * 40)
    log.meta.update(
        start_time="2026-01-01T00:00:00Z", end_time="2026-01-01T00:01:00Z", ended_by="SystemExit: 1"
    )
    found = conclude(log, "incomplete_log")
    assert (
        found is not None
        and found.severity == "info"
        and "exited with sys.exit(1) after step 39" in found.message
    )
    assert "ended early" not in found.message and "Run it to the end" not in found.recommendation["text"]


def test_a_loss_sits_at_ln_k_only_where_its_loss_function_has_k_classes() -> None:
    """An InfoNCE over 256 candidates resting at 4.03 read "ln 56, a uniform guess over 56 classes"; a
    GAN's BCE at 1.1, "ln 3"."""
    flat = [math.log(56) + 0.001 * (s % 3) for s in range(200)]
    ratios = [1e-6] * 200  # (tiny steps: stalled either way)
    cases = [
        (None, 56),  # no record of the loss functions (in code, Lightning): as before
        ([{"op": "cross_entropy", "source": "t.py:3", "classes": 56}], 56),
        ([{"op": "cross_entropy", "source": "t.py:3", "classes": 256}], None),
        ([{"op": "binary_cross_entropy_with_logits", "source": "t.py:3", "classes": None}], None),
    ]
    for noted, classes in cases:
        log = run([1.0] * 200, loss=flat, layer__a__update_ratio=ratios)
        if noted is not None:
            log.meta["loss_functions"] = noted
        found = conclude(log, "stalled")  # (over 256 classes it fell from ln 256: not stalled at all)
        said = found.evidence.get("chance_classes") if found is not None else None
        assert said == classes and (found is not None or classes is None), (noted, found)


def test_a_huge_first_gradient_from_an_oversized_init_names_the_init_not_the_inputs() -> None:
    """A 20-layer ReLU MLP initialised with std 0.2 at width 128 (standardized inputs): "the scale of the
    inputs is off: standardize", which it was; He's init trains it (accuracy 1.0)."""
    norms = [9.8e4, 3e8, 1e14, 3e23, NAN]
    for std, cause in ((0.2, "initial weights amplify the signal"), (1 / math.sqrt(3 * 128), "scale of")):
        weight_norm = std * 128  # ‖W‖ of a 128×128 matrix of that std
        columns = {f"layer__l{i}__weight_norm": [weight_norm] * 5 for i in range(20)}
        log = run(norms, loss=[2.3] * 4 + [NAN], **columns)
        log.meta["parameters"] = {f"l{i}.weight": [128, 128] for i in range(20)}
        found = conclude(log, "explosion")
        assert found is not None and cause in found.message, (std, found.message)
        assert ("kaiming_normal_" in found.recommendation["text"]) == (std == 0.2)


def test_an_optimizer_setting_outside_its_range_is_the_cause_of_a_failed_run() -> None:
    """SGD momentum 1.0 (NaN by epoch 2: "clip at 0.88 or lr 0.05"), RMSprop alpha 1.0 ("lr=1e-09"), Adam
    given an AdamW config's weight_decay=1 (at chance: "lr_too_high … lr=4e-5"); not in a run that trained."""
    cases = [
        ("SGD", {"lr": 0.1, "momentum": 1.0}, "momentum=1", CLIMB),
        ("RMSprop", {"lr": 0.01, "alpha": 1.0}, "alpha=1", CLIMB),
        ("Adam", {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 1.0}, "weight_decay=1", None),
    ]
    for name, group, setting, norms in cases:
        stuck = norms is None
        log = run(norms or [1.0] * 200, loss=[1.6 + 0.001 * (s % 3) for s in range(200)] if stuck else None)
        log.meta.update(optimizer={"class": name}, optimizer_groups=[group])
        top = diagnose(log)[0]
        assert top.id == "optimizer_setting" and setting in top.message, (name, top)
        assert top.severity == ("warning" if stuck else "error")
        assert not {"lr_too_high", "explosion", "vanishing"} & {f.id for f in diagnose(log)}, name
    healthy = run([1.0] * 200)
    healthy.meta.update(optimizer={"class": "Adam"}, optimizer_groups=[{"lr": 1e-3, "weight_decay": 0.5}])
    assert "optimizer_setting" not in {f.id for f in diagnose(healthy)}


def test_a_classifier_whose_loss_fell_from_ln_k_before_its_first_records_trained() -> None:
    """A healthy InfoNCE over 256 candidates: 5.5 → 4.9 in its first 5 steps, then its floor near 4.1
    (set by the augmentations): "did not train … lower the rate" was a false alarm."""
    loss = [4.9, 4.85, 4.8, 4.75, 4.7] + [4.14 + 0.01 * (s % 3) for s in range(195)]
    ratios = [2e-2] * 200  # (large steps: the rate would be blamed)
    for classes, stalled in ((256, False), (None, True)):
        log = run([1.0] * 200, loss=loss, layer__a__update_ratio=ratios)
        log.meta["optimizer"] = {"class": "SGD"}
        if classes is not None:
            log.meta["loss_functions"] = [{"op": "cross_entropy", "source": "t.py:9", "classes": classes}]
        assert (conclude(log, "stalled") is not None) == stalled, classes


def test_a_warm_up_written_upside_down_is_named_with_its_schedule() -> None:
    """LambdaLR(warmup / (step + 1)): step 0 at 100× the base rate, the loss blown up to 40 and back to ln 4.
    It read "trained" (the first tenth's median 2.55 → 1.39) with only a weight_growth warning."""
    loss = [1.383, 6.9, 1.7, 39.9, 1.97, 2.56, 1.44, 11.5, 2.0, 1.6, 1.5, 1.45] + [math.log(4)] * 116
    ratios = [0.455] + [1e-3] * 127
    log = run([1.0] * 128, loss=loss, layer__a__update_ratio=ratios, layer__b__update_ratio=ratios)
    for r, s in zip(log.metrics, range(128), strict=True):
        r["lr"] = 5.0 / (s + 1)
    log.meta["optimizer_groups"] = [{"lr": 5.0, "momentum": 0.9, "initial_lr": 0.05}]
    for classes in (None, 4):  # (without the loss functions too: it ended at its first loss, 1.383)
        if classes is not None:
            log.meta["loss_functions"] = [{"op": "cross_entropy", "source": "t.py:9", "classes": classes}]
        found = conclude(log, "lr_too_high")
        assert found is not None and "100× its base rate 0.05" in found.message, found
        assert "warm-up rises to it" in found.recommendation["text"] and "lr" not in found.recommendation


def test_logits_divided_by_a_tiny_temperature_are_named_in_a_run_that_did_not_train() -> None:
    """An InfoNCE at temperature 0.001 sat at ln 255 and read "lr_too_high … lr=3e-4"."""
    noted = [
        {
            "op": "cross_entropy",
            "source": "t.py:42",
            "classes": 256,
            "logit_scale": 1000.0,
            "scaled_at": "t.py:38",
        }
    ]
    stuck = run([1.0] * 200, loss=[5.534] * 200, layer__a__update_ratio=[0.5] + [1e-3] * 199)
    stuck.meta["loss_functions"] = noted
    found = diagnose(stuck)
    assert found[0].id == "logit_scale" and "temperature of 0.001" in found[0].message, found
    assert "lr_too_high" not in {f.id for f in found}
    healthy = run([1.0] * 200)
    healthy.meta["loss_functions"] = noted
    assert "logit_scale" not in {f.id for f in diagnose(healthy)}


def test_a_birth_inside_adam_over_float16_weights_names_the_eps_that_rounds_to_zero() -> None:
    """``model.half()`` with Adam's default eps=1e-8 (0 in float16): "an eps of 0 or a tiny one"."""
    event = {
        "type": "nonfinite", "step": 0, "phase": "optimizer", "tensor": "parameter", "kind": "inf",
        "evidence": {"optimizer": "Adam", "hyperparameters": {"lr": 1e-3, "eps": 1e-8}, "parameters": ["gru.weight_ih_l0"]},
    }  # fmt: skip
    for dtype, says in (("float16", "rounds to 0"), ("float32", "eps of 0 or a tiny one")):
        log = run([1.0, NAN, NAN], events=[event])
        log.meta["parameter_dtype"] = dtype
        found = conclude(log, "nonfinite_op")
        assert found is not None and says in found.recommendation["text"], (dtype, found)


def test_an_unbounded_loss_that_started_at_minus_ln_k_names_the_sign_first() -> None:
    """A hand-written NLL without its minus sign: -2.05 (≈ -ln 8) at step 0, then -2e12 and NaN."""
    for first, sign in ((-2.05, True), (0.01, False)):
        losses = [first * 2.0 ** (s / 3) if first < 0 else first - (2.0 ** (s / 3) - 1) for s in range(59)]
        log = run([1.0] * 59 + [NAN], loss=[*losses, NAN])
        found = conclude(log, "unbounded_loss")
        assert found is not None and ("check its sign first" in found.recommendation["text"]) == sign, (
            first,
            found,
        )


def test_layers_whose_gradient_was_always_zero_are_the_stalls_cause() -> None:
    """A TF keep_prob=1.0 given to nn.Dropout(p): every activation dropped, the layers before it at a gradient
    of exactly 0 ("stalled … check the signal", generic); every weight initialised to 0 ("lr_too_high … moved
    the layers 1.36e10 of their weight norm … try lr=4e-14")."""
    flat = [math.log(10) + 0.001 * (s % 3) for s in range(200)]
    for weight, says in ((5.0, "Dropout(p) takes the probability to DROP"), (0.0, "away from 0")):
        log = run(
            [1.0] * 200,
            loss=flat,
            layer__a__grad_norm=[0.0] * 200,
            layer__a__weight_norm=[weight] * 200,
            layer__a__update_ratio=[1.36e10 if weight == 0 else 1e-3] + [0.0] * 199,
            layer__head__grad_norm=[0.5] * 200,
            layer__head__weight_norm=[1.0] * 200,
            layer__head__update_ratio=[1e-3] * 200,
        )
        found = diagnose(log)
        assert found and found[0].id == "stalled" and found[0].severity == "error", found
        assert (
            "'a' were exactly 0 on every step" in found[0].message and says in found[0].recommendation["text"]
        )
        assert "lr_too_high" not in {f.id for f in found}


def test_a_layer_of_only_a_bias_whose_gradient_is_zero_by_construction_is_not_cut_off() -> None:
    """A hinge GAN critic under spectral_norm: 'net.4' holds only the output bias (the weight moved to
    'net.4.parametrizations.weight'), whose gradient is −1 + 1 = 0 while every sample is inside the margin;
    it read "stalled (error): … exactly 0 on every step … a Dropout(p=1.0)"."""
    flat = [2.0 + 0.001 * (s % 3) for s in range(200)]
    log = run(
        [1.0] * 200,
        loss=flat,
        **{"layer__net.4__grad_norm": [0.0] * 200, "layer__net.4__weight_norm": [0.3] * 200},
        **{"layer__net.2__grad_norm": [0.5] * 200, "layer__net.2__weight_norm": [4.0] * 200},
    )
    log.meta["parameters"] = {"net.4.bias": [1], "net.4.parametrizations.weight.original": [1, 64],
                              "net.2.weight": [64, 64], "net.2.bias": [64]}  # fmt: skip
    found = conclude(log, "stalled")
    assert found is None or "exactly 0 on every step" not in found.message, found
    log.meta["parameters"]["net.4.weight"] = [1, 64]  # a layer with a weight matrix: cut off indeed
    cut = conclude(log, "stalled")
    assert cut is not None and "'net.4' were exactly 0 on every step" in cut.message, cut


def test_a_run_that_converged_in_its_first_steps_or_whose_loss_is_negative_trained() -> None:
    """Full-batch least squares (reduction='sum') reaches its noise floor at step 2 (5e6 → 198): it read
    "stalled: steps tiny" and "lr_too_high: try lr=9e-09". A mixture density network's NLL falls −1.2 → −2.4:
    over_clipping read "no loss was recorded"."""
    from gradguard.diagnose.rules._clipping import trained

    n = 100
    floor = [5e6, 4e4, 350.0] + [198.0 + 0.5 * (s % 3) for s in range(n - 3)]
    log = run([1.0] * n, loss=floor)
    assert trained(Facts(log)) is not None
    assert conclude(log, "stalled") is None
    negative = [-1.2 - 1.2 * s / n for s in range(n)]
    assert trained(Facts(run([1.0] * n, loss=negative))) is not None
    at_chance = [20.0, 5.0, 2.4] + [math.log(10) + 0.001 * (s % 3) for s in range(n - 3)]
    still = conclude(run([1.0] * n, loss=at_chance, layer__a__grad_norm=[0.0] * n,
                         layer__b__grad_norm=[0.5] * n), "stalled")  # fmt: skip
    assert still is not None  # a fast fall that ends at a uniform guess is no training


def test_a_clip_that_held_every_step_while_the_objective_grew_is_over_clipping() -> None:
    """A PINN whose boundary-loss weight grows ×1.5 every epoch, clipped at 0.12 (the advice gradguard gave): every
    step clipped, the pre-clip norm climbing 400× with the weights still, the loss 50 → 41, and "No findings" —
    a norm climb excluded over_clipping, and the climb's level counted as a threshold "that failed"."""
    n = 1000
    norms = [10.0] * 724 + [10.0 * 1.022 ** (s - 723) for s in range(724, n)]
    loss = [50.0 - 9.0 * s / n for s in range(n)]
    log = run(norms, loss=loss, threshold=[0.12] * n, clip_coef=[0.12 / g for g in norms],
              layer__a__weight_norm=[3.0] * n, layer__a__grad_norm=norms)  # fmt: skip
    log.meta["config"] = {"clip": {"kind": "norm", "max_norm": 0.12}}
    found = conclude(log, "over_clipping")
    assert found is not None and "the loss itself grew its gradients" in found.message, found
    assert found.recommendation["max_norm"] > 0.12, found.recommendation


def test_an_mse_above_its_targets_variance_says_the_output_cannot_reach_them() -> None:
    """A sigmoid head on targets in [0, 100]: MSE 2945 against a variance of 541 — "No findings"."""
    log = run([1.0] * 400, loss=[3355 - s for s in range(20)] + [2945 + (s % 3) for s in range(380)])
    log.meta["loss_functions"] = [
        {"op": "mse_loss", "source": "t.py:39", "classes": None, "target_variance": 541.3}
    ]
    found = conclude(log, "stalled")
    assert found is not None and "worse than predicting their mean" in found.message
    assert "drop a sigmoid / tanh head" in found.recommendation["text"]


def test_a_loss_divided_by_the_dataset_size_is_named_not_only_the_rate() -> None:
    """``mse_loss(...) / n_train``: steps 1e4× too small, "the learning rate is too low, try lr=9"."""
    flat = [9.9e-5 + 1e-7 * (s % 3) for s in range(200)]
    for meta, named in (
        ({"loss_scale": {"factor": 1e-4, "source": "t.py:39"}}, True),
        ({"loss_scale": {"factor": 0.25, "source": "t.py:39"}}, False),  # (not ≤ 1e-2)
        (
            {"loss_scale": {"factor": 1 / 128, "source": "t.py:39"}, "accumulation": {"micro_batches": 128}},
            False,
        ),
    ):
        log = run([1.0] * 200, loss=flat, layer__a__update_ratio=[1e-6] * 200)
        log.meta.update(meta)
        found = conclude(log, "stalled")
        assert found is not None and ("Remove the factor" in found.recommendation["text"]) == named, (
            meta,
            found,
        )


def test_a_run_whose_guarding_stopped_on_an_internal_error_is_not_a_clean_run(tmp_path: Path) -> None:
    """gradguard run stopped guarding at step 0 (its own error); the script went on unguarded and diagnose
    read "No findings: the rules saw nothing wrong in this run" on 0 steps."""
    stopped = {"where": "loss.backward()", "error": "RuntimeError: boom", "after_steps": 0}
    with RunWriter(tmp_path / "run", meta={"guarding_stopped": stopped}) as w:
        w.write_metrics([])
    found = [f for f in diagnose(tmp_path / "run") if f.id == "incomplete_log"]
    assert found and found[0].severity == "error", found
    assert "stopped guarding after 0 step(s)" in found[0].message and "RuntimeError: boom" in found[0].message


def test_a_small_layer_that_grows_in_a_run_that_trained_is_not_a_warning(tmp_path: Path) -> None:
    """A CRF's transitions initialised at 0.1 grew 0.49 → 6.7 while the NLL fell 42 → 1.3: it read
    "WARNING weight_growth … lower the LR, add weight decay" on the run that had been fixed."""
    rows = [
        {
            "step": s,
            "loss": 2.0 * 0.99**s,
            "grad_norm": 1.0 + 0.01 * (s % 3),
            "layers": {"crf": {"weight_norm": 0.5 * 1.03**s}, "proj": {"weight_norm": 3.0}},
        }
        for s in range(120)
    ]
    with RunWriter(tmp_path / "run") as w:
        w.write_metrics(rows)
    found = [f for f in diagnose(tmp_path / "run") if f.id == "weight_growth"]
    assert [f.severity for f in found] == ["info"], found


def test_a_divergence_after_a_jump_of_the_rate_advises_the_rate_before_it() -> None:
    """A GAN's discriminator at Adam 1e-3 for 64 steps, then 2 (a ×2000 jump at an epoch boundary): its
    loss climbed to 3e5 with the norm flat (Adam). The divergence advised "lr=0.2 (1/10 of the rate this
    run failed at)", 200× the rate that trained; lr_too_high called the jump "a warm-up that never stops"."""
    n = 120
    loss = [0.7 - 0.001 * s for s in range(64)] + [0.64 * 1.25 ** (s - 63) for s in range(64, n)]
    lr = [1e-3] * 64 + [2.0] * (n - 64)
    log = run([1.0] * n, loss=loss, lr=lr, layer__d__update_ratio=[1e-3] * 64 + [0.3] * (n - 64))
    diverged = conclude(log, "divergence")
    assert diverged is not None and diverged.recommendation["lr"] == 0.001, diverged
    assert "the rate before its jump at step 64" in diverged.recommendation["text"]
    high = conclude(log, "lr_too_high")
    assert (
        high is not None and "rose from 0.001 to 2 at step 64, right before the loss climbed" in high.message
    )


def test_a_run_under_torchrun_that_trained_clipped_is_not_told_to_run_gradguard_tune() -> None:
    """DDP, every step clipped, the loss fell: the info advised `gradguard tune --run … ddp_train.py`, which
    fails in one process ("environment variable RANK expected")."""
    n = 120
    falling = [2.0 / (1 + s / 10) for s in range(n)]
    log = run(
        [1.0] * n,
        loss=falling,
        clip={"kind": "norm", "max_norm": 0.1},
        threshold=[0.1] * n,
        clip_coef=[0.1] * n,
    )
    log.meta["world_size"] = 2
    found = conclude(log, "over_clipping")
    assert found is not None and found.severity == "info", found
    assert (
        "gradguard tune --run" not in found.recommendation["text"]
        and "torchrun" in found.recommendation["text"]
    )


def test_a_jump_of_a_hand_set_rate_that_moved_every_step_is_named() -> None:
    """A warm-up written by hand (param_group['lr'] set every step, rising 1e-4 → 2.45e-3), then a typo
    multiplies it 1000× at step 60: the climb read "1/10 of the rate this run failed at" (lr=0.2, 80× the
    rate that trained) and "add warm-up"; the jump was not seen (no rate held before it)."""
    n = 110
    lr = [2.45e-3 * min(1.0, (s + 1) / 100) for s in range(60)] + [
        2.45 * min(1.0, (s + 1) / 100) for s in range(60, n)
    ]
    norms = [1.0] * 61 + [3.0 * 1.5 ** (s - 61) for s in range(61, n)]
    log = run(norms, lr=lr)
    high = conclude(log, "lr_too_high")
    assert high is not None and "at step 60" in high.message, high
    assert high.recommendation["lr"] == pytest.approx(0.0015, rel=0.01), high.recommendation


def test_a_division_by_the_target_is_told_to_mask_not_to_add_eps() -> None:
    """MAPE on days with 0 sales: "divide by y.clamp_min(eps)" left a finite run that predicted ~0 (val MAPE
    0.995, against 0.109 with those days masked)."""
    from gradguard import optable

    _, fix = optable.advice("div", "division by zero")
    assert "mask those samples (y != 0)" in fix and "WAPE" in fix


def test_a_zero_a_low_precision_dtype_rounded_to_is_said_with_the_ops_own_fix() -> None:
    """A bf16 `log(1 - sigmoid(x))`: p rounds to exactly 1, 1 - p to 0 (finite in float32). The reason
    says so; the fix stays the op's (logsigmoid), not "autocast to bfloat16" (the overflow fix, which
    the word "bfloat16" in the reason used to pick)."""
    from gradguard import optable

    held = {"shape": [64], "dtype": "bfloat16", "nan": 0, "zeros": 2, "negative": 0, "min": 0.0, "max": 0.73}
    why = optable.reason("log", [held], "-inf")
    assert why.startswith("log of 0 — a bfloat16 input, whose 8-bit mantissa rounds"), why
    _, fix = optable.advice("log", why)
    assert "F.logsigmoid" in fix and "autocast to bfloat16" not in fix
    assert optable.reason("log", [{**held, "dtype": "float32"}], "-inf") == "log of 0"
    underflow = {**held, "underflow": True}  # exp(-200) is 0: not a rounding of near-equal values
    assert "mantissa" not in optable.reason("log", [underflow], "-inf")


def test_linear_algebra_ops_get_their_own_fix_as_a_nan_or_as_the_exception_that_ended_the_run() -> None:
    """A Glow flow's logdet of a weight whose determinant turned negative read "clamp_min(eps), log-space"
    (which a matrix cannot take); a GP whose noise went negative ended in linalg.cholesky's LinAlgError and
    read only "fix what ended it" beside an explosion's clip advice (which left the same crash)."""
    from gradguard import optable

    _, fix = optable.advice("logdet", "logdet produced nan from finite inputs")
    assert "slogdet" in fix
    log = run([1.0] * 12)
    log.meta.update(start_time="2026-01-01T00:00:00", end_time="2026-01-01T00:01:00", ended_by=(
        "_LinAlgError: linalg.cholesky: The factorization could not be completed because the input is not "
        "positive-definite (the leading minor of order 7 is not positive-definite)."))  # fmt: skip
    found = conclude(log, "incomplete_log")
    assert found is not None and "softplus(raw) + 1e-4" in found.recommendation["text"], found
    assert (
        found.severity == "error"
    )  # a numerical failure ended the run (it exited 0 beside an explosion warning)
    assert "positive-definite).." not in found.message


def test_a_penalty_added_with_a_negative_weight_is_named_by_its_sign() -> None:
    """A commitment loss weighted −0.25 (for 0.25): the loss maximises a distance; it read "explosion: clip at
    4.7 or lower the rate", both of which failed."""
    terms = {
        "source": "vq.py:69",
        "terms": [
            {"value": 0.47, "weight": None, "op": "mse_loss", "source": "vq.py:67"},
            {"value": 0.009, "weight": -0.25, "op": "mse_loss", "source": "vq.py:68"},
        ],
    }
    norms = [1.0] * 56 + [3.0 * 2.0 ** (s - 56) for s in range(56, 80)]
    log = run(norms, loss=[0.5] * 80)
    log.meta["loss_terms"] = terms
    found = conclude(log, "loss_weight")
    assert (
        found is not None
        and found.severity == "error"
        and "subtracts a term that is never negative" in found.message
    )
    assert "a typo for 0.25" in found.recommendation["text"], found.recommendation
    log.meta["loss_terms"] = {**terms, "terms": [terms["terms"][0], {**terms["terms"][1], "op": "mean"}]}
    assert conclude(log, "loss_weight") is None  # a negative weight on a term of any sign (an entropy bonus)


def test_a_layer_of_parameters_set_on_the_root_module_is_named_by_them() -> None:
    """A learned temperature (``self.temperature = nn.Parameter(...)`` on the model itself) that grew 27×
    read "the weights of layer (the root module) grew"; the log's parameter names say which it was."""
    n = 60
    log = run([1.0] * n, layer____weight_norm=[1.0 + 0.5 * s for s in range(n)])
    log.meta["parameters"] = {"temperature": [], "fc.weight": [10, 4], "fc.bias": [10]}
    found = conclude(log, "weight_growth")
    assert found is not None and "'temperature' (on the root module)" in found.message, found
    # at chance for 1,300 steps while the temperature drifted to 27: "lower the LR" left it drifting (10× lower:
    # T = 6.2, acc 0.22); a bounded parametrization is the fix
    stuck = run([1.0] * n, loss=[2.485] * n, layer____weight_norm=[1.0 + 0.5 * s for s in range(n)])
    stuck.meta["parameters"] = {"temperature": [], "fc.weight": [12, 4], "fc.bias": [12]}
    found = conclude(stuck, "weight_growth")
    assert found is not None and "learned scalar with no bound" in found.recommendation["text"], found


def test_a_climb_from_the_first_steps_advises_the_rate_before_a_threshold() -> None:
    """FSDP2 char-LM at SGD lr 5: the norm climbed from step 2 and the advice led with "clip at 3.2 (from 2
    healthy norms)", which, followed, ended at loss 1,359; lr 0.5 trained."""
    norms = [3.2, 3.3, 3.1, 40.0, 900.0, 2e4, 5e5, NAN, NAN, NAN]
    found = conclude(run(norms, loss=[4.3, 4.2, 4.2, 9.0, 50.0, 400.0, 3e3, NAN, NAN, NAN]), "explosion")
    assert found is not None and found.recommendation["text"].startswith("Lower the learning rate first"), (
        found
    )
    assert "max_norm" in found.recommendation and "lr" in found.recommendation


def test_a_loss_falling_by_orders_of_magnitude_without_a_floor_is_unbounded_with_weights_that_only_moved() -> (
    None
):
    """An energy-based model whose Langevin sampler climbs the energy: the negative samples run off, the
    loss falls from -0.015 to -5e9 while the layers grow 3× (not the 10× of a runaway): "No findings"."""
    n = 200
    loss = [-0.015 * 10 ** (11 * s / (n - 1)) for s in range(n)]
    found = conclude(run([1.0] * n, loss=loss, layer__a__weight_norm=[1.0 + 2.0 * s / n for s in range(n)]),
                     "unbounded_loss")  # fmt: skip
    assert found is not None and "energy-based model" in found.recommendation["text"], found
    assert (
        "added with the wrong sign" in found.recommendation["text"]
    )  # (a MAP prior: its weights doubled each epoch)
    healthy = [-0.7 - 1.6 * s / n for s in range(n)]  # a flow's NLL: -0.7 to -2.3, the layers moved too
    assert conclude(run([1.0] * n, loss=healthy, layer__a__weight_norm=[1.0 + 2.0 * s / n for s in range(n)]),
                    "unbounded_loss") is None  # fmt: skip
