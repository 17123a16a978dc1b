"""What the clipping rules share: the steps a threshold clipped, and advice that says whether it was verified.

Not a rule (no ``RULE``): the window that ``over_clipping`` (a fixed threshold) and
``adaptive_clipping`` (an adaptive one) judge, and the evidence they both report; and the two
ways a rule recommends a number:

* :func:`threshold_advice`, the one way to recommend a ``max_norm``: from ``tune.json``
  (:mod:`gradguard.tunelog`, written by ``gradguard tune`` / ``Guard.tune``) when the run directory
  holds one — verified advice — otherwise the rule's estimate, marked unverified, never at or above
  a level the run itself showed to fail at, with the ``gradguard tune`` command line that verifies it;
* :func:`lr_advice`, the one way to recommend a learning rate: the rate ``tune.json`` verified
  (``gradguard tune --lr``) or the rule's estimate, marked unverified, at most half the rate the run
  failed at, with the ``gradguard tune --lr`` command line that verifies it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from typing import Any

from gradguard.diagnose.facts import Facts
from gradguard.diagnose.finding import Finding
from gradguard.diagnose.numbers import Ends, clip_advice, ends, fmt, median, sig, sig_floor
from gradguard.runtable import GROWTH_FACTOR
from gradguard.tunelog import TUNE_FILE, TuneResult

OVERCLIP_RATE = 0.5  # > 50% of steps clipped is aggressive (Tuning Playbook)
STALLED = 0.2  # a loss that fell by less than this fraction of its start did not train (trained())
INIT_GAIN_HIGH = (
    2.0  # a layer's median row RMS norm (std·√fan_in) this large: above He's √2 (Facts.init_gain)
)
INIT_AMPLIFIED = 100.0  # the product of gain / √2 over the layers this large: the init amplifies the signal
_SUMMED = (
    1.5  # micro-batches × the loss's factor this large: the accumulated losses were summed, not averaged
)
LR_JUMP = 2.0  # an LR increase by this factor shortly before the growth (lr_jump)
_LR_LEAP = 10.0  # ... or by this factor from a rate that did not hold (a hand-set schedule)
_JUMP_LOOKBACK = 10  # steps before the onset an LR increase is looked for
UPDATE_RATIO_HIGH = 0.1  # a layer's median ‖Δw‖/‖w‖ (≈1e-3 is the rule of thumb)
UPDATE_RATIO_AIM = 1e-2  # the update/weight ratio a rate estimated from the ratios aims at
# ... after a failure: tune's candidates (2×, ½×, ¼× the estimate) then span ratios 0.06–0.0075 (at 1e-2,
# an SGD MLP at lr 1 was sent to rates that trained too slowly to reach its loss in 200 steps)
_FAILED_AIM = 3e-2
_MIN_STEPS = 10  # fewest thresholded steps to judge
_MIN_DELTAS = 10  # fewest loss changes after clipped (and unclipped) steps to compare them


@dataclasses.dataclass(frozen=True)
class ClipWindow:
    """The healthy steps with a threshold (``rows``), and the last quarter of them (``window``).

    ``rate``: clip rate of the window; ``overall``: of all ``rows``; ``loss``: where the loss of
    ``rows`` started and ended (:class:`~gradguard.diagnose.numbers.Ends`: medians of a tenth of the
    steps; ``loss_start``, ``loss_end``); ``progress``: 1 − its end over its start. Over the window:
    ``threshold`` and ``median_norm`` (medians), ``scale`` (the median of ``threshold / norm``
    capped at 1: the effective learning-rate scale), ``lr`` (median; ``nan`` when not logged).
    """

    rows: list[int]
    window: list[int]
    rate: float
    overall: float
    loss: Ends
    progress: float
    threshold: float
    median_norm: float
    scale: float
    lr: float

    @property
    def loss_start(self) -> float:
        return self.loss.start

    @property
    def loss_end(self) -> float:
        return self.loss.end


def clip_window(f: Facts) -> ClipWindow | None:
    """The clipping window of a run, or ``None`` with fewer than 10 thresholded healthy steps."""
    rows = [i for i in range(f.trouble) if f.ok[i] and math.isfinite(f.thr[i]) and f.thr[i] > 0]
    if len(rows) < _MIN_STEPS:
        return None
    width = max(_MIN_STEPS, min(500, len(rows) // 4))
    window = rows[-width:]
    loss = ends(f.loss_at(rows[0], rows[-1] + 1))
    lrs = [f.lr[i] for i in window if math.isfinite(f.lr[i])]
    return ClipWindow(
        rows=rows,
        window=window,
        rate=sum(f.clipped[i] for i in window) / len(window),
        overall=sum(f.clipped[i] for i in rows) / len(rows),
        loss=loss,
        progress=progress(loss),
        threshold=median([f.thr[i] for i in window]),
        median_norm=median([f.norm[i] for i in window]),
        scale=median([min(1.0, f.thr[i] / f.norm[i]) for i in window if f.norm[i] > 0]),
        lr=median(lrs) if lrs else math.nan,
    )


def progress(loss: Ends) -> float:
    """How far the loss fell, as a share of its start's size: 1 − end / start for a positive start;
    for a loss at or below 0 by design (a negative log-likelihood of a density, an ELBO, a negative
    Pearson) the fall over ``|start|`` (``|end|`` from a start of 0). ``nan`` without finite ends."""
    start, end = loss.start, loss.end
    size = abs(start) or abs(end)
    if not (math.isfinite(start) and math.isfinite(end)) or size == 0:
        return math.nan
    return (start - end) / size


def trained(f: Facts, loss: Ends | None = None) -> Ends | None:
    """Whether the run trained — the one test every rule asks before calling a run a failure: it
    stayed finite to a healthy end (no non-finite step, no climb of the norm) and its loss fell by
    at least :data:`STALLED` of its start. Its loss's :class:`~gradguard.diagnose.numbers.Ends`
    when it did (for the message), ``None`` when it did not.

    ``loss``: the span judged (``over_clipping``: the clipped steps); the whole run by default.
    """
    if f.went_bad or f.healthy.onset_step is not None:
        return None
    if loss is None:
        losses = f.loss_at(0, len(f.rows))
        loss = ends(losses)
        if losses and 0 < losses[0] < loss.start:  # it rose at once (a warm-up to a rate too high): judged
            loss = dataclasses.replace(loss, start=losses[0])  # from before the rise, not from its top
        elif len(losses) >= 3 and median(losses[:3]) > loss.start:  # it fell within its first tenth (least
            loss = dataclasses.replace(loss, start=median(losses[:3]))  # squares: 5e6 → 198): from its start
    fell = progress(loss)
    if at_uniform(f, loss.end):  # it ended where a uniform guess over its classes is: it learned nothing
        return None
    return loss if math.isfinite(fell) and fell >= STALLED else None


def at_uniform(f: Facts, loss: float) -> bool:
    """Whether ``loss`` is ``ln K`` (within 1 %) for a classification loss over K classes the run used
    (:func:`classes_used`): a uniform guess, whatever it fell from (a warm-up written upside down blew the
    loss up to 40 at its first steps, then it settled at ln 4)."""
    return any(abs(loss - math.log(k)) <= 0.01 * math.log(k) for k in classes_used(f))


def classes_used(f: Facts) -> list[int]:
    """The class counts of the run's classification losses (``meta.json`` ``loss_functions``, from
    ``gradguard run``'s loss-code watch); ``[]`` where none is known."""
    noted = f.log.meta.get("loss_functions")
    found = [e.get("classes") for e in noted if isinstance(e, dict)] if isinstance(noted, list) else []
    return [k for k in found if isinstance(k, int) and not isinstance(k, bool) and k >= 2]


def window_evidence(f: Facts, w: ClipWindow) -> dict[str, Any]:
    """Clip rates, the threshold against the norms, the effective learning rate, the loss's progress."""
    thr, med_norm, scale, lr = w.threshold, w.median_norm, w.scale, w.lr
    evidence: dict[str, Any] = {
        "clipper": f.clip_spec,
        "clip_rate_window": round(w.rate, 4),
        "window_steps": [f.steps[w.window[0]], f.steps[w.window[-1]]],
        "clip_rate_overall": round(w.overall, 4),
        "threshold": sig(thr, 4),
        "median_norm": sig(med_norm, 4),
        "median_norm_over_threshold": sig(med_norm / thr, 3) if thr > 0 else None,
        "effective_lr_scale": sig(scale, 3),
        "lr": lr if math.isfinite(lr) else None,
        "effective_lr": sig(lr * scale, 3) if math.isfinite(lr) else None,
        "loss_start": sig(w.loss_start, 4),
        "loss_end": sig(w.loss_end, 4),
        "loss_ends_median_of": w.loss.k,  # loss_start, loss_end: medians of this many steps
        "loss_progress": sig(w.progress, 3),
    }
    evidence.update(_loss_change(f, w))
    evidence.update(f.healthy.evidence())
    return evidence


def _loss_change(f: Facts, w: ClipWindow) -> dict[str, Any]:
    """The mean loss change after clipped vs unclipped steps, where both are common enough."""
    deltas: dict[bool, list[float]] = {True: [], False: []}
    for i, j in zip(w.rows, w.rows[1:]):
        if math.isfinite(f.loss[i]) and math.isfinite(f.loss[j]):
            deltas[f.clipped[i]].append(f.loss[j] - f.loss[i])
    if len(deltas[True]) < _MIN_DELTAS or len(deltas[False]) < _MIN_DELTAS:
        return {}
    return {
        "loss_change_per_clipped_step": sig(statistics.fmean(deltas[True]), 3),
        "loss_change_per_unclipped_step": sig(statistics.fmean(deltas[False]), 3),
    }


# ============================================================================================
# Advice: verified by tune.json, or an estimate that says it is one
# ============================================================================================

SCALE_FREE_OPTIMIZERS = frozenset(
    {"adam", "adamw", "adamax", "nadam", "radam", "sparseadam", "adagrad", "adadelta", "rmsprop", "adafactor"}
    | {"lamb", "lion", "sophia", "adan", "fusedadam", "adam8bit", "adamw8bit", "pagedadamw"}
)
"""Optimizers whose step barely depends on the gradient's scale: clipping the norm does not shrink
their step the way it shrinks SGD's (a clipped Adam run is not "an effective learning rate of lr × scale")."""


def optimizer_class(f: Facts) -> str:
    """The optimizer's class name from ``meta.json`` (``"optimizer": "Adam"`` or ``{"class": "Adam", …}``)."""
    opt = f.log.meta.get("optimizer")
    name = opt.get("class") if isinstance(opt, dict) else opt
    return name if isinstance(name, str) else ""


def scale_free(f: Facts) -> bool:
    """Whether the run's optimizer normalizes its step (Adam and its kin): see :data:`SCALE_FREE_OPTIMIZERS`."""
    return optimizer_class(f).lower() in SCALE_FREE_OPTIMIZERS


def tuned(f: Facts) -> TuneResult | None:
    """The run directory's ``tune.json`` (verified evidence), if it holds one: :attr:`Facts.tuned`,
    read once a diagnosis however many rules ask."""
    return f.tuned


def tune_command(f: Facts, options: str = "") -> str:
    """The ``gradguard tune`` command line that verifies advice for this run (one line to paste).

    The script and its arguments are the run's (``meta.json``'s ``argv``, as ``gradguard run`` and a
    plain ``python train.py`` write it; ``train.py`` when the run does not say, or ran something
    else: :func:`_a_script`); ``--run`` and
    ``options`` (``"--lr auto"``) come before the script, since what follows it is the script's own.
    """
    argv = f.log.meta.get("argv")
    words = [a for a in argv if isinstance(a, str)] if isinstance(argv, list) else []
    script, args = (words[0], words[1:]) if words and _a_script(words[0]) else ("train.py", [])
    named = f.log.meta.get("script")
    if isinstance(named, str) and named:
        script, args = named, []
    line = ["gradguard tune", "--run", _quote(str(f.log.path)), options, _quote(script), *map(_quote, args)]
    return " ".join(w for w in line if w)


def check_with(f: Facts, command: str) -> str:
    """How to check unverified advice before a long run: the ``gradguard tune`` line — which runs the
    script in one process, so a run under torchrun (``meta.json`` ``world_size`` > 1; its script
    needs the ranks: the tune line failed "RANK expected") is checked by a short run under torchrun."""
    if not f.distributed:
        return f"check it trains before a long run with `{command}`"
    world = f.log.meta.get("world_size")
    return (
        f"check it trains in a short run under `torchrun --nproc-per-node {world} -m gradguard run` first "
        f"(gradguard tune runs the script in one process; this run had {world})"
    )


def _a_script(path: str) -> bool:
    """Whether ``argv[0]`` is the user's training script: a ``.py`` file, not a package's
    ``__main__`` (``python -m``) nor an installed launcher (a notebook kernel's, pytest's)."""
    installed = any(part in path for part in ("site-packages", "dist-packages"))
    return path.endswith(".py") and not path.endswith("__main__.py") and not installed


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def failed_levels(f: Facts) -> list[float]:
    """The clip levels the run was clipped to when it failed (went non-finite, or over its climb):
    thresholds the run itself showed not to hold."""
    h = f.healthy
    if h.onset_step is not None and not f.went_bad and f.weights_still:
        return []  # the objective grew its gradients (the weights stayed put): the threshold held every step
    rows = _climb(f) if h.onset_step is not None else range(f.trouble, min(len(f.steps), f.trouble + 1))
    return sorted({f.thr[i] for i in rows if math.isfinite(f.thr[i]) and f.thr[i] > 0})


def exploding_norm(f: Facts) -> float | None:
    """The smallest pre-clip norm of the run's climb (:func:`_climb`): a norm the run showed to be
    exploding at; ``None`` without a climb."""
    climb = [f.norm[i] for i in _climb(f) if f.ok[i] and f.norm[i] > 0]
    return min(climb) if climb else None


def _climb(f: Facts) -> list[int]:
    """The rows of the run's climb: from the onset to the first non-finite step (itself included), or
    in a run that stayed finite while the norm stayed above the climb's line (:data:`~gradguard.runtable.GROWTH_FACTOR` ×
    the healthy median). A finite run's steps after its norm came back down are not the climb: a
    curriculum's harder stage raised the norm 55×, and the levels of its converged end (0.009) read
    "half the lowest level this run failed at: max_norm=0.0044" (accuracy 0.58; 0.987 unclipped)."""
    h = f.healthy
    if h.onset_step is None:
        return []
    rows = list(range(f.index_of(h.onset_step), min(len(f.steps), f.trouble + 1)))
    if f.went_bad:
        return rows
    line = GROWTH_FACTOR * h.p50
    back = next((k for k, i in enumerate(rows) if f.ok[i] and f.norm[i] < line), len(rows))
    return rows[:back]


def threshold_advice(f: Facts, estimate: float | None, why: str) -> dict[str, Any]:
    """The recommendation entries for a global-norm threshold.

    With ``tune.json`` in the run directory (and thresholds among its candidates, not only learning
    rates): its verified threshold (``verified: True``), or — when none of its candidates trained —
    no threshold and the advice to lower the learning rate.
    Otherwise ``estimate`` (from ``why``), lowered below every level the run showed to fail at
    (:func:`failed_levels`, :func:`exploding_norm`), marked ``verified: False`` with the command
    line that verifies it (``tune``); no threshold when nothing below those levels is left.

    Every rule that recommends a ``max_norm`` takes it from here. ``text`` is a clause without its
    final period: the rule puts its own advice around it and ends the sentence.
    """
    result = tuned(f)
    if result is not None and thresholds_tried(result):
        return _verified(f, threshold_part(result))
    command = tune_command(f)
    unsafe = [x for x in (*failed_levels(f), exploding_norm(f)) if x is not None]
    if estimate is not None and unsafe and estimate >= min(unsafe):
        estimate = sig_floor(min(unsafe) / 2)
        why = f"half the lowest level this run failed at ({fmt(min(unsafe))})"
    if estimate is None or not (math.isfinite(estimate) and estimate > 0):
        return {"verified": False, "tune": command, "text": f"Verify a threshold first: {command}"}
    rec = clip_advice(estimate)
    rec.update(
        verified=False,
        tune=command,
        text=f"Try max_norm={estimate:g} ({why}) — unverified: {check_with(f, command)}",
    )
    return rec


def _verified(f: Facts, result: TuneResult) -> dict[str, Any]:
    """Advice from ``tune.json``: the threshold that trained there, with its evidence."""
    rec = result.recommended
    tried = ", ".join(t.label for t in result.trials)
    evidence = {"tuned": {"trials": len(result.trials), "steps": result.steps, "file": TUNE_FILE}}
    if rec is None:
        return {
            "verified": True,
            **evidence,
            "text": f"gradguard tune tried {tried} for {result.steps} steps each and none trained: lower the "
            "learning rate (3–10×), then tune again",
        }
    out: dict[str, Any] = clip_advice(rec.max_norm) if rec.max_norm is not None else {"clip": "none"}
    out.update(evidence)
    if rec.lr is not None:
        out["lr"] = rec.lr
    out["verified"] = True
    out["text"] = (
        f"{result.verdict().rstrip('.')} (gradguard tune, from {tried}; {TUNE_FILE} in the run directory)"
    )
    return out


def thresholds_tried(result: TuneResult) -> bool:
    """Whether ``tune.json`` tried thresholds (not only learning rates under the script's own clipping,
    or without clipping at all)."""
    return any(t.max_norm is not None and not t.own_clip for t in result.trials)


def threshold_part(result: TuneResult) -> TuneResult:
    """The threshold question of ``tune.json``: its candidates at the run's own rate (``lr`` ``None``).

    A ``tune.json`` may answer two questions from the same start (the demo verifies a finding's
    threshold and its learning rate together): thresholds at the run's rate, and rates. Each advice
    reads its own part; a file whose every trial sets a rate (one question: rates, or thresholds ×
    rates) is read whole.
    """
    own_rate = [t for t in result.trials if t.lr is None]
    mixed = own_rate and len(own_rate) < len(result.trials)
    return dataclasses.replace(result, trials=own_rate) if mixed else result


def rate_part(result: TuneResult) -> TuneResult:
    """The learning-rate question of ``tune.json``: its candidates that set a rate (see :func:`threshold_part`)."""
    rates = [t for t in result.trials if t.lr is not None]
    return dataclasses.replace(result, trials=rates) if rates and len(rates) < len(result.trials) else result


# ============================================================================================
# Learning-rate advice: verified by tune.json's rate candidates, or an estimate that says it is one
# ============================================================================================


def failed_lr(f: Facts) -> float | None:
    """The learning rate the run failed at: the last finite one up to where its norm started climbing
    or, without a climb, its first non-finite step; ``None`` when the run logs no learning rate.
    A run that never failed (a finite divergence, a stall): the largest rate it ran at — the
    ``lr=`` a user set (a warm-up's and a decay's peak, OneCycle's ``max_lr``). Its last rate was
    the schedule's end (a cosine's or OneCycle's ~0: "try lr=1e-06" for a run that diverged at 2.9,
    "lr=5e-08" for one whose steps were measured at 1e-3)."""
    h = f.healthy
    end = f.index_of(h.onset_step) if h.onset_step is not None else f.trouble
    rates = [v for v in f.lr[: end + 1] if math.isfinite(v) and v > 0]
    if not rates:
        return None
    return max(rates) if end >= len(f.rows) else rates[-1]


def lr_advice(f: Facts, estimate: float | None, why: str, *, higher: bool = False) -> dict[str, Any]:
    """The recommendation entries for a learning rate: the one way a rule recommends an ``lr``.

    With learning rates among ``tune.json``'s candidates: the rate that trained there
    (``lr_verified: True``), or — when none did — the advice to go below the lowest one tried.
    Otherwise ``estimate`` (from ``why``), kept at most half the rate the run failed at
    (:func:`failed_lr`), marked ``lr_verified: False`` with the ``gradguard tune --lr`` command line
    that verifies it (``lr_tune``: the estimate and its neighbours below that rate as candidates, and
    the run's own rate where the run trained at it, :func:`own_lr`, so tune can answer "keep it").
    ``higher``: the estimate is a higher rate than the run's (a run whose steps were too small to
    train): neither it nor its neighbours are held below the run's rate.
    ``text`` is a sentence without its final period, as :func:`threshold_advice`'s.
    """
    result = tuned(f)
    if result is not None and result.lr_candidates():
        return _verified_lr(f, rate_part(result))
    failed = None if higher else failed_lr(f)
    if estimate is not None and failed is not None and estimate > failed / 2:
        estimate, why = sig(failed / 2, 1), f"half this run's learning rate, {fmt(failed)}"
    if estimate is None or not (math.isfinite(estimate) and estimate > 0):
        command = tune_command(f, "--lr auto")
        return {
            "lr_verified": False,
            "lr_tune": command,
            "text": f"Verify a lower learning rate first: {command}",
        }
    rungs = lr_candidates(f, estimate, higher=higher)
    command = tune_command(f, "--lr " + ",".join(f"{r:g}" for r in rungs))
    return {
        "lr": estimate,
        "lr_verified": False,
        "lr_tune": command,
        "lr_candidates": rungs,  # what the command tries (the demo verifies these in memory)
        "text": f"Try lr={estimate:g} ({why}) — unverified: {check_with(f, command)}",
    }


def own_lr(f: Facts) -> float | None:
    """The run's own learning rate where the run trained at it (:func:`trained`: finite to a healthy
    end, the loss fell by :data:`STALLED` of its start): its last one — a candidate every
    verification of a rate includes, so tune keeps it unless a lower one trains better; ``None``
    where the run failed or stalled at it (or logs no rate). A stalled run's rate is no candidate: a
    few dozen steps cannot show the stall (a post-LN transformer at AdamW 0.03 falls as fast as at
    0.0018 for 30 steps, then stalls at 4.5 bits/char where 0.0018 reaches 3.1)."""
    return None if trained(f) is None else failed_lr(f)


def lr_candidates(f: Facts, estimate: float, *, higher: bool = False) -> list[float]:
    """The rates that verify ``estimate``: it and its neighbours (2×, ½×, ¼×) below the rate the run
    failed at (``higher``: whatever the run's rate), and the run's own rate where the run trained at it (:func:`own_lr`): then tune keeps
    the own rate unless a lower one trains better (:func:`gradguard.tunelog.choose`); low to high."""
    failed, own = None if higher else failed_lr(f), own_lr(f)
    rungs = {r for r in (sig(estimate * 2.0**k, 2) for k in (1, 0, -1, -2)) if failed is None or r < failed}
    return sorted(rungs | ({own} if own is not None else set()))


def update_ratios(f: Facts, start: int, end: int) -> dict[str, float]:
    """Each layer's median update/weight ratio over the healthy steps in rows ``[start, end)``."""
    out: dict[str, float] = {}
    for name in f.layers:
        series = f.layer(name, "update_ratio")
        vals = [
            series[i] for i in range(start, end) if f.ok[i] and math.isfinite(series[i]) and series[i] > 0
        ]
        if vals:
            out[name] = median(vals)
    return out


def ratio_lr(lr: float, ratio: float, aim: float = UPDATE_RATIO_AIM) -> float:
    """The rate that moves a layer whose update/weight ratio is ``ratio`` at ``lr`` by about
    ``aim`` a step (at most half of ``lr``)."""
    return sig(lr * min(0.5, aim / ratio), 1)


def lr_jump(f: Facts, end: int, lookback: int = _JUMP_LOOKBACK) -> tuple[int, float, float] | None:
    """A step change of the LR (≥ 2× from an LR that held) in the ``lookback`` steps before row ``end``
    (the onset of the climb): ``(step, rate before, rate after)``."""
    for i in range(max(1, end - lookback + 1), min(end + 2, len(f.rows))):
        before, prev, now = f.lr[i - 2] if i >= 2 else math.nan, f.lr[i - 1], f.lr[i]
        held = math.isfinite(before) and math.isclose(before, prev, rel_tol=1e-6)
        # ≥ 2× from a rate that held, or ≥ 10× from any (a hand-set warm-up moves every step; its
        # steps multiply the rate by 2 at most after the first)
        jumped = now >= (LR_JUMP if held else _LR_LEAP) * prev
        if prev > 0 and math.isfinite(now) and jumped and (held or i >= 2):
            return f.steps[i], prev, now
        if (
            prev == 0 and held and math.isfinite(now) and now > 0
        ):  # from a rate annealed to 0 (cosine's eta_min=0,
            # then SWALR's 2.5 for 5e-2): the rate that trained is the highest before it, not 0
            trained_at = max((r for r in f.lr[:i] if math.isfinite(r) and r > 0), default=0.0)
            if trained_at > 0 and now >= LR_JUMP * trained_at:
                return f.steps[i], trained_at, now
    return None


def lower_lr(f: Facts, factor: float = 10.0) -> dict[str, Any]:
    """:func:`lr_advice` for "lower the learning rate": ``1/factor`` of the rate the run failed at —
    or lower, where the steps before the failure moved the layers (their median) by ≥
    :data:`UPDATE_RATIO_HIGH` of their weights: the rate that moves them by ~3e-2. Measured on
    failures nobody here wrote: a tenth of lr 5, whose steps moved the layers 6× their norm, still
    diverged where 0.008 trained (the ratio's rate: 0.025, with 0.0125 and 0.006 among tune's
    candidates); a VAE at 0.1 (2.7×): a tenth diverged, 0.001 trained (the ratio's rate)."""
    failed = failed_lr(f)
    if failed is None:
        return lr_advice(f, None, "")
    end = f.index_of(f.healthy.onset_step) if f.healthy.onset_step is not None else f.trouble
    jump = lr_jump(f, end, lookback=end + 1 if f.healthy.onset_step is None else _JUMP_LOOKBACK)
    if jump is not None:  # the rate that held before it jumped trained: a tenth of the jump's rate may not
        return lr_advice(f, sig(jump[1], 2), f"the rate before its jump at step {jump[0]}")
    estimate, why = sig(failed / factor, 1), f"1/{factor:g} of the rate this run failed at, {fmt(failed)}"
    ratios = list(update_ratios(f, 0, end).values())
    moved = median(ratios) if ratios else 0.0
    if moved >= UPDATE_RATIO_HIGH and ratio_lr(failed, moved, _FAILED_AIM) < estimate:
        estimate = ratio_lr(failed, moved, _FAILED_AIM)
        why = (
            f"update/weight ratios near {_FAILED_AIM:g}: at {fmt(failed)} a step moved the layers "
            f"{fmt(moved)} of their weights (median)"
        )
    return lr_advice(f, estimate, why)


def with_lr(rec: dict[str, Any], lr: dict[str, Any]) -> dict[str, Any]:
    """``rec`` (a rule's recommendation) with the entries of :func:`lr_advice`'s ``lr`` but its text.

    ``verified`` and ``tune`` stay the threshold's where ``rec`` recommends one; in a recommendation
    without a threshold they are the learning rate's.
    """
    rec.update({k: v for k, v in lr.items() if k != "text"})
    if "max_norm" not in rec:
        rec["verified"] = lr["lr_verified"]
        if "lr_tune" in lr:
            rec["tune"] = lr["lr_tune"]
    return rec


def either(threshold: str, rate: str) -> str:
    """A threshold's advice and a learning rate's (the ``text`` of :func:`threshold_advice` and of
    :func:`lr_advice`) as the alternatives they are: tune verifies each with the run's other setting
    unchanged, so both at once is a change nobody checked. One sentence, with its period."""
    return f"Either clip the global norm. {threshold}. Or, instead, lower the learning rate. {rate}."


def _verified_lr(f: Facts, result: TuneResult) -> dict[str, Any]:
    """Learning-rate advice from ``tune.json``: the rate that trained there, with its evidence —
    "keep it" (``lr_keep``) when that is the run's own rate (:func:`own_lr`)."""
    rates = result.lr_candidates()
    tried = ", ".join(f"{r:g}" for r in rates)
    evidence = {"tuned": {"trials": len(result.trials), "steps": result.steps, "file": TUNE_FILE}}
    rec = result.recommended
    if rec is None:
        return {
            "lr_verified": True,
            **evidence,
            "text": f"gradguard tune tried learning rates {tried} for {result.steps} steps each and none trained: "
            f"go below {min(rates):g} (or add warm-up), then tune again",
        }
    out: dict[str, Any] = {"lr": rec.lr} if rec.lr is not None else {}  # None: the run's own rate won
    out.update(evidence, lr_verified=True)
    own = own_lr(f)
    if rec.lr is None or (own is not None and math.isclose(rec.lr, own, rel_tol=1e-6)):
        out["lr_keep"] = True
        out["text"] = (
            f"Keep the learning rate: the run's own{'' if own is None else f' (lr={own:g})'} trained best of "
            f"the rates gradguard tune tried ({tried}, {result.steps} steps each; {TUNE_FILE} in the run directory)"
        )
        return out
    out["text"] = (
        f"{result.verdict().rstrip('.')} (gradguard tune, from learning rates {tried}; {TUNE_FILE} in the run directory)"
    )
    return out


def scale_at_start(f: Facts) -> tuple[str, str, dict[str, Any]] | None:
    """Where the loss (:attr:`Facts.start_loss`) or the gradients (:attr:`Facts.start_grad`) were
    already huge at step 0: what the explosion rules say instead of blaming the learning rate —
    ``(cause, fix, evidence)`` — else ``None``. Measured on field scripts: features in raw units
    (~1e4) and a loss summed and multiplied by the accumulation steps exploded at step 1 and read
    "clip at 7e6 (from 1 healthy norm) or lr 3e-8"; neither trained (R² 0.08-0.18), standardizing did (0.96)."""
    loss = f.start_loss
    if loss is not None:
        cause = (
            f"the loss was already {fmt(loss)} at step 0, before any update: the scale of the targets, the "
            "inputs or the initial weights is off by orders of magnitude, which no learning rate fixes"
        )
        fix = (
            "Fix the scale first: standardize the regression targets and the inputs (subtract the mean, "
            "divide by the std; predict in those units), and check the initialization (torch's defaults, "
            "or std ~ 1/sqrt(fan_in)); a loss near 1 at step 0 is the usual start. A lower learning rate or "
            "clipping only delays the overflow"
        )
        return cause, fix, {"start_loss": loss}
    summed = _summed_accumulation(f)
    if summed is not None:
        return summed
    grad = f.start_grad
    if grad is None:
        return None
    init = f.init_gain
    if init is not None and init[0] >= INIT_GAIN_HIGH and init[2] >= INIT_AMPLIFIED:
        gain, layers, amplified = init
        cause = (
            f"the gradient norm was already {fmt(grad)} at step 0, before any update (~0.1-10 is usual), and the "
            f"initial weights amplify the signal: a row of a layer's weights has an RMS norm of {fmt(gain)} (median "
            f"over {layers} layers; He's init gives 1.41, torch's default 0.58), ~{fmt(amplified)}× through the "
            "depth — an initialization too large for this depth, which no learning rate fixes well"
        )
        fix = (
            "Fix the initialization: torch's default init, or nn.init.kaiming_normal_(layer.weight, "
            "nonlinearity='relu') (std = sqrt(2 / fan_in)) for ReLU layers, nn.init.xavier_normal_ for tanh; "
            "for a deep plain stack add normalization (LayerNorm / BatchNorm) or residual connections"
        )
        return (
            cause,
            fix,
            {
                "start_grad_norm": sig(grad, 3),
                "init_gain": sig(gain, 3),
                "init_amplification": sig(amplified, 2),
            },
        )
    evidence: dict[str, Any] = {"start_grad_norm": sig(grad, 3)}
    cause = (
        f"the gradient norm was already {fmt(grad)} at step 0, before any update (~0.1-10 is usual): the scale of "
        "the inputs, the targets or the loss is off by orders of magnitude (features or targets in raw units, a "
        "loss summed where a mean was meant or multiplied by the accumulation steps), which no learning rate "
        "fixes well"
    )
    fix = (
        "Fix the scale first: standardize the inputs and the regression targets (each feature's mean and std, "
        "from the training set), and average the loss (reduction='mean'; divide it by the accumulation steps, "
        "not multiply)"
    )
    return cause, fix, evidence


def _summed_accumulation(f: Facts) -> tuple[str, str, dict[str, Any]] | None:
    """Gradient accumulation whose loss is not divided by its micro-batches (``meta.json`` ``accumulation``,
    from ``gradguard run``: the backward() calls per step and the factor the loss was multiplied by): each
    step applies the sum of k micro-batches' gradients, k× their mean — k× the learning rate. A field
    script over 32 micro-batches exploded and read "clip at 74 or lr 0.005"; clipping at 74 did not train,
    dividing the loss by 32 did (0.21)."""
    noted = f.log.meta.get("accumulation")
    if not isinstance(noted, dict):
        return None
    k, scale = noted.get("micro_batches"), noted.get("loss_scale")
    if not (isinstance(k, int) and k >= 2 and isinstance(scale, (int, float)) and abs(scale) * k >= _SUMMED):
        return None
    cause = (
        f"each optimizer step follows {k} backward() calls whose losses are not divided by {k}: the step "
        f"applies the sum of {k} micro-batches' gradients, {k}× their mean, as if the learning rate were {k}× "
        "larger"
    )
    fix = (
        f"Divide each micro-batch's loss by the accumulation steps before backward() (loss = loss / {k}), "
        f"or lower the learning rate {k}× if the sum is meant"
    )
    return cause, fix, {"micro_batches": k, "loss_scale": scale}


def with_buffers(explain: Callable[[Facts, Any], Finding]) -> Callable[[Facts, Any], Finding]:
    """``explain`` whose finding also says which buffers the bad step's forward made non-finite (the
    guard's ``buffers`` event: BatchNorm's running statistics, written in the forward before any step
    is skipped): skipping kept the weights, not those, and the model's eval output is non-finite."""

    def explained(f: Facts, evidence: Any) -> Finding:
        found = explain(f, evidence)
        said = f.events_of("buffers")
        if not said:
            return found
        names = ", ".join(str(n) for n in (said[0].get("buffers") or [])[:4])
        message = (
            f"{found.message} Step {said[0].get('step')}'s forward also wrote NaN/inf into the buffers {names}: "
            "the weights were kept, these were not — the model's eval output is non-finite from then on."
        )
        rec = dict(found.recommendation)
        rec["text"] = (
            f"{rec.get('text', '')} Restore those buffers: on_nonfinite='rollback' restores them with the weights; "
            "or reload them from a checkpoint (or re-estimate BatchNorm's running statistics on clean data)."
        ).strip()
        return dataclasses.replace(found, message=message, recommendation=rec)

    return explained


def how_to_name_the_op(f: Facts) -> str:
    """How to have gradguard name the op of a step it could not locate: a closure it can replay; under
    torch.distributed (no replays: one rank's would desynchronize the others) one process."""
    if f.distributed:
        return (
            "rerun the failing step in one process (the same checkpoint and batch, e.g. `gradguard run` "
            "without torchrun): replays are off under torch.distributed, where one rank's replay would "
            "desynchronize the others"
        )
    integration = f.log.meta.get("integration")
    if (
        isinstance(integration, str)
        and integration.startswith("transformers")
        and f.log.meta.get("runner") is None
    ):
        return (
            "a Trainer's step takes no closure to replay: run the same script under `gradguard run` (no code "
            "change), which watches the loss code (a custom compute_loss) and names the op, module and line"
        )
    if f.log.meta.get("runner") == "gradguard run":
        return (
            "gradguard run could not replay this step's forward: it saw no single call of the model that made "
            "the loss (a loss computed by another method — model.nll(x, y), model.loss(batch) — or from the "
            "parameters directly; one optimizer over several models; a model called several times in one step). "
            "Compute the loss from one call of the model's forward, or in code pass a closure, "
            "guard.step(closure), so gradguard replays the step op by op and names the op, module and source line"
        )
    return (
        "pass a closure, guard.step(closure), so gradguard replays the failed step op by op and names the "
        "op, module and source line"
    )
