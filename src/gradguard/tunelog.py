"""What ``gradguard tune`` found, and how a trial is judged: the one definition of "this candidate trained".

A **trial** trains one candidate (a global-norm ``max_norm``, ``None`` for no clipping, and/or a
learning rate) for a few dozen steps from the same starting state on the same batches. Its
outcome (:func:`judge`) is read from its losses and pre-clip norms only, so the in-memory tuner
(:func:`gradguard.tune.tune`, torch) and the script tuner (``gradguard tune SCRIPT``, one run
directory per trial) judge alike:

* **non-finite**: a loss or a norm was NaN/±inf (the trial ends there);
* **exploded**: the norm climbed the way :func:`gradguard.runtable.climb_onset` defines an
  explosion (a sustained 3× rise that reaches 10× the norms before it) — the same definition
  ``gradguard diagnose`` and the guard's locator use;
* **diverged**: finite, but the loss rose by more than its own first value (a learning rate too
  high for the step the threshold allows: finite is not healthy);
* **trained**: none of these, and the loss fell: the mean of the last quarter of the trial's losses
  is below its first loss (taken before any update, the same for every candidate) by more than the
  batch-to-batch spread of those last losses (their standard deviation: one batch's loss, as the
  first is, varies that much). A model that only learned the targets' mean from a start a little
  above it falls by less than that spread.

The **recommendation** (:func:`choose`): order the candidates from tight to loose (``max_norm``,
then learning rate); the **edge** is the tightest one that went non-finite, exploded or diverged.
Candidates tighter than the edge that trained are safe; among them, those that trained *well*
(their loss fell by at least :data:`WELL` of the best one's fall) qualify, and the recommendation
is the loosest of them, kept below the edge by a margin that depends on how the looser candidates
failed (measured with ``benchmarks/advice.py`` and the demos, seeds 0–2):

* **they exploded or went non-finite** (the norm took off): the edge is a gradient-norm edge, and
  the loosest candidate at most half its step (``max_norm`` × learning rate, :data:`EDGE_RATIO`)
  holds. rnn demo (LSTM LM, SGD lr 1): 6.2 explodes within 10 steps, 3.1 trains all 500 steps
  (2.76 bits/char, better than the recipe's ``norm:5`` at 2.99, where the old two-halvings margin
  gave 0.78 at 3.25); Deep SAD demo: 150 explodes, 38 trains to a loss of 0.005 where 9.4 (the
  old margin) stalls at 3.7.
* **one looser than the chosen overshot** (finite, no explosion, the loss rose or did not fall):
  the learning rate is too high for steps of that size, and the loosest survivors below it only
  oscillate; :data:`MARGIN` halvings below the loosest candidate that trained well. Adding problem
  at lr 1: 0.48 and 0.24 "train" for 60 steps with losses as low as any but stall over 1,500 steps
  (0.12–0.21, target 0.08), while 0.12 reaches it.

With no edge: the loosest candidate that trained well. One rung further back when the chosen
candidate's own norm had started to climb. Not simply the lowest loss after a few dozen steps:
that short horizon favours tight thresholds that then over-clip the long run (Deep SAD: 2.3 has
the lowest 60-step loss, 38 the lowest after 400). ``None`` when no candidate trained.

**Learning rates** are candidates the same way: at one threshold (or with none, or with the
training script's own clipping, :attr:`Trial.own_clip`) the candidates order by rate and the same
rule picks, kept at most :data:`RATE_EDGE_RATIO` (not half) of a rate that failed, with one more
kind of overshoot: a rate **past the valley** (above the rate whose loss fell most, and falling at
least :data:`PAST_VALLEY` less) counts as the edge, as a loss that did not fall does — two rungs
back (:func:`_past_valley`). Past the valley a rate still lowers the loss for a
few dozen steps, then stalls: without this the highest rate that "trained" was the too-high rate
itself (AdamW at 0.03 on ``benchmarks/transformer_lr.py``). A grid of thresholds × rates is ordered
by threshold first, then rate.

``tune.json`` in a run directory (:data:`TUNE_FILE`, :func:`write_tune`, :func:`read_tune`) holds a
:class:`TuneResult`: ``gradguard diagnose`` then quotes verified advice instead of an unverified
estimate. Its fields: ``version``, ``source``, ``steps``, ``start_step``, ``command``, ``trials``
(each :meth:`Trial.as_dict`, with ``max_norm``, ``lr``, ``own_clip``, ``outcome``…),
``recommended`` (the chosen trial, or ``null``), ``verdict`` (one sentence), ``lr_candidates`` (the
rates tried; empty when only thresholds were) and ``recommended_lr`` (the chosen trial's rate, or ``null``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradguard.errors import GradGuardError
from gradguard.runlog import atomic_write_json
from gradguard.runtable import SUSTAIN, climb_onset

__all__ = [
    "TUNE_FILE",
    "Trial",
    "TuneResult",
    "candidates_around",
    "choose",
    "explosion_onset",
    "judge",
    "ladder",
    "read_tune",
    "spec",
    "write_tune",
]

WELL = 0.5
"""A candidate trained well when its loss fell by at least this fraction of the best candidate's fall."""
EDGE_RATIO = 0.55
"""The largest step (``max_norm`` × lr) allowed, as a fraction of the step of a looser candidate that
failed: half, with room for the ladder's two-significant-digit rounding."""
RATE_EDGE_RATIO = 0.3
"""The largest learning rate allowed, as a fraction of a higher rate that failed at the same threshold: two
halvings (with room for rounding). Half is not enough for a rate: the loss surface sharpens as training goes
on (Cohen et al. 2021), so a rate half the one that blew up in the first dozens of steps can cross the edge
later (``benchmarks/transformer_lr.py``, SGD: 1 goes non-finite at step 13; 0.5 trains 60 steps, then misses
the target over 400 on one seed of three; 0.25 reaches it on all three)."""
MARGIN = 2
PAST_VALLEY = 0.1
"""A learning rate above the one whose loss fell most, whose loss fell at least this fraction less, is past
the valley: it overshoots (two rungs back, :data:`MARGIN`)."""
"""Rungs (halvings) back from the loosest candidate that trained well when a looser one overshot."""
TUNE_FILE = "tune.json"
"""The file ``gradguard tune`` / :meth:`gradguard.Guard.tune` write into a run directory."""
_VERSION = 1


def spec(max_norm: float | None) -> str:
    """A threshold as a clip spec: ``norm:5`` or ``none``."""
    return "none" if max_norm is None else f"norm:{max_norm:g}"


@dataclasses.dataclass(frozen=True)
class Trial:
    """One candidate's evidence.

    Attributes:
        max_norm: the global-norm threshold tried (``None``: no clipping).
        lr: the learning rate tried (``None``: the optimizer's own).
        steps: steps trained (fewer than planned when the trial went non-finite; 0 when it timed out).
        loss_start: the first loss (before any update; the same for every candidate).
        loss_final: the mean of the last quarter of the finite losses.
        loss_min: the smallest finite loss.
        exploded: the pre-clip norm climbed as :func:`gradguard.runtable.climb_onset` defines it.
        nonfinite: a loss or norm was non-finite; ``nonfinite_step`` the first such step.
        clip_rate: the fraction of steps the threshold clipped.
        peak_norm: the largest finite pre-clip norm.
        climbing: the norm started a sustained 3× climb (short of an explosion).
        own_clip: the trial kept the training script's own clipping (``gradguard tune SCRIPT --lr``
            without ``--max-norm``): only its learning rate was a candidate.
        loss_noise: the standard deviation of the last quarter's losses (0 with fewer than two).
    """

    max_norm: float | None
    lr: float | None
    steps: int
    loss_start: float
    loss_final: float
    loss_min: float
    exploded: bool
    nonfinite: bool
    nonfinite_step: int | None
    clip_rate: float
    peak_norm: float
    climbing: bool = False
    own_clip: bool = False
    loss_noise: float = 0.0
    lr_used: float | None = None  # the rate the trial's first step ran at (its log's)
    lr_ignored: bool = False  # the script set its own rate: the candidate never took effect

    @property
    def judged(self) -> bool:
        """Evidence about its candidate: not timed out, and its rate took effect."""
        return not (self.timed_out or self.lr_ignored)

    @property
    def trained(self) -> bool:
        """Finite, no explosion, and the loss fell by more than its batch-to-batch spread."""
        return not (self.nonfinite or self.exploded) and self.loss_final < self.loss_start - self.loss_noise

    @property
    def diverged(self) -> bool:
        """Finite, but the loss rose by more than its first value's magnitude."""
        return not self.nonfinite and self.loss_final - self.loss_start > abs(self.loss_start)

    @property
    def timed_out(self) -> bool:
        """No step recorded and none non-finite: the script tuner's trial stopped by its timeout
        (``gradguard tune --timeout``) before it was judged. It says nothing about its candidate."""
        return self.steps == 0 and not self.nonfinite

    @property
    def failed(self) -> bool:
        """Non-finite, exploded or diverged: looser candidates than this one are not safe."""
        return self.nonfinite or self.exploded or self.diverged

    @property
    def label(self) -> str:
        """``norm:5``, ``none``, ``norm:5 lr=0.1``, ``lr=0.1`` (the script's own clipping)."""
        lr = "" if self.lr is None else f"lr={self.lr:g}"
        if self.own_clip:
            return lr or "as is"
        return spec(self.max_norm) + (f" {lr}" if lr else "")

    @property
    def outcome(self) -> str:
        """``trained``, ``non-finite at step N``, ``exploded``, ``loss did not fall`` or ``timed out``."""
        if self.timed_out:
            return "timed out (no step recorded)"
        if self.lr_ignored:
            return "its rate never took effect (the script sets its own)"
        if self.nonfinite:
            return f"non-finite at step {self.nonfinite_step}"
        if self.exploded:
            return "exploded"
        if self.diverged:
            return "diverged (loss rose)"
        if self.trained:
            return "trained"
        return "loss fell less than its noise" if self.loss_final < self.loss_start else "loss did not fall"

    def as_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "trained": self.trained,
            "diverged": self.diverged,
            "outcome": self.outcome,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Trial:
        step = d.get("nonfinite_step")
        return cls(
            max_norm=_number_or_none(d.get("max_norm")),
            lr=_number_or_none(d.get("lr")),
            steps=int(d.get("steps") or 0),
            loss_start=_float_or(d.get("loss_start")),
            loss_final=_float_or(d.get("loss_final")),
            loss_min=_float_or(d.get("loss_min")),
            exploded=bool(d.get("exploded")),
            nonfinite=bool(d.get("nonfinite")),
            nonfinite_step=step if isinstance(step, int) else None,
            clip_rate=_float_or(d.get("clip_rate")),
            peak_norm=_float_or(d.get("peak_norm")),
            climbing=bool(d.get("climbing")),
            own_clip=bool(d.get("own_clip")),
            loss_noise=0.0 if math.isnan(noise := _float_or(d.get("loss_noise"))) else noise,
            lr_used=_number_or_none(d.get("lr_used")),
            lr_ignored=bool(d.get("lr_ignored")),
        )


def _number_or_none(x: Any) -> float | None:
    return None if x is None else _float_or(x)


def _float_or(x: Any) -> float:
    if isinstance(x, str):  # runlog writes non-finite floats as "nan" / "inf"
        return float(x)
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def explosion_onset(norms: Sequence[float]) -> int | None:
    """Where a trial's finite positive ``norms`` started to explode (:func:`gradguard.runtable.climb_onset`),
    counted once the climb was sustained within the trial (its next values seen): a trial stopped
    there is judged as the whole trial would be."""
    k = climb_onset(norms, ends_in_trouble=False)
    return k if k is not None and k + SUSTAIN < len(norms) else None


def judge(
    max_norm: float | None,
    lr: float | None,
    losses: Sequence[float],
    norms: Sequence[float],
    *,
    own_clip: bool = False,
) -> Trial:
    """A trial's :class:`Trial` from its per-step losses and pre-clip global norms (see the module
    docstring); ``own_clip``: the trial kept the script's own clipping (a learning-rate candidate)."""
    if len(losses) != len(norms):
        raise GradGuardError(
            f"a trial needs one norm per loss; got {len(losses)} losses and {len(norms)} norms."
        )
    bad = next(
        (i for i, (x, g) in enumerate(zip(losses, norms)) if not (math.isfinite(x) and math.isfinite(g))),
        None,
    )
    end = len(losses) if bad is None else bad
    finite_losses, finite_norms = list(losses[:end]), [g for g in norms[:end] if g > 0]
    tail = finite_losses[-max(1, len(finite_losses) // 4) :] if finite_losses else []
    clipped = [g > max_norm for g in norms[:end]] if max_norm is not None else []
    return Trial(
        max_norm=max_norm,
        lr=lr,
        steps=end,
        loss_start=finite_losses[0] if finite_losses else math.nan,
        loss_final=statistics.fmean(tail) if tail else math.nan,
        loss_min=min(finite_losses) if finite_losses else math.nan,
        exploded=explosion_onset(finite_norms) is not None,
        climbing=climb_onset(finite_norms, ends_in_trouble=True) is not None,
        nonfinite=bad is not None,
        nonfinite_step=bad,
        clip_rate=sum(clipped) / len(clipped) if clipped else 0.0,
        peak_norm=max(finite_norms, default=math.nan),
        own_clip=own_clip,
        loss_noise=statistics.stdev(tail) if len(tail) > 1 else 0.0,
    )


def _looseness(t: Trial) -> tuple[float, float]:
    """Order candidates from tight to loose: the threshold (none = ∞), then the learning rate."""
    return (math.inf if t.max_norm is None else t.max_norm, t.lr if t.lr is not None else 0.0)


def _step(t: Trial) -> float:
    """The largest update a candidate allows, up to the optimizer's scaling: ``max_norm`` × lr."""
    return (math.inf if t.max_norm is None else t.max_norm) * (1.0 if t.lr is None else t.lr)


def _within_edge(t: Trial, edge: Trial) -> bool:
    """Whether ``t`` is far enough below the failed ``edge``: at the same threshold (or none, or the
    script's own) its rate at most :data:`RATE_EDGE_RATIO` of the edge's; else its step at most
    :data:`EDGE_RATIO` of the edge's."""
    if (t.max_norm, t.own_clip) == (edge.max_norm, edge.own_clip) and t.lr != edge.lr:
        return (t.lr or 1.0) <= RATE_EDGE_RATIO * (edge.lr or 1.0)
    return _step(t) <= EDGE_RATIO * _step(edge)


def _well(safe: Sequence[Trial]) -> list[Trial]:
    """The candidates whose loss fell by at least :data:`WELL` of the best fall among ``safe``."""
    fall = max(t.loss_start - t.loss_final for t in safe)
    return [t for t in safe if t.loss_start - t.loss_final >= WELL * fall]


def _back(well: Sequence[Trial], rungs: int) -> Trial:
    return well[max(0, len(well) - 1 - rungs)]


def _overshoots(t: Trial) -> bool:
    """Finite, no explosion, and the loss did not fall (or rose): every step bounded, and still too
    large — the learning rate overshoots at that step size. (A loss that fell by less than its noise
    did not train, but it did not overshoot either: Deep SAD's 75, next to the 150 that exploded,
    is bounded by the edge's rule — at most half its step — not two rungs back, which over-clips.)"""
    return not (t.exploded or t.nonfinite) and not t.loss_final < t.loss_start


def choose(trials: Sequence[Trial]) -> Trial | None:
    """The verified recommendation (see the module docstring); ``None`` when no trial trained.
    A trial that timed out is no evidence either way: it is left out."""
    trials = [t for t in trials if t.judged]
    past = _past_valley(trials)  # learning rates past the valley count as overshooting
    ordered = sorted(trials, key=_looseness)
    k = next((i for i, t in enumerate(ordered) if t.failed or id(t) in past), len(ordered))
    safe = [t for t in ordered[:k] if t.trained]
    if not safe:
        return None
    well = _well(safe)
    looser = [t for t in ordered if _looseness(t) > _looseness(well[-1])]
    if k < len(ordered) and any(_overshoots(t) or id(t) in past for t in looser):
        return _back(well, MARGIN)
    if k < len(ordered):
        safe = [t for t in safe if _within_edge(t, ordered[k])] or safe[:1]
    well = _well(safe)
    return _back(well, int(well[-1].climbing))


def _rates_only(trials: Sequence[Trial]) -> bool:
    """Whether the candidates differ by learning rate alone (one threshold, or none, or the script's own)."""
    return len({t.lr for t in trials}) > 1 and len({(t.max_norm, t.own_clip) for t in trials}) == 1


def _past_valley(trials: Sequence[Trial]) -> set[int]:
    """Rate candidates past the LR finder's valley (ids): trained, at a higher rate than the one whose
    loss fell most (below the first failure), yet fell at least :data:`PAST_VALLEY` less than it — a rate
    that still lowers the loss for a few dozen steps and then stalls (``benchmarks/transformer_lr.py``:
    AdamW at 0.03 falls 4.8 → 3.2 nats in 60 steps where 0.0075 reaches 2.56, and ends at the unigram
    entropy after 400). Empty unless the candidates differ by rate alone."""
    if not _rates_only(trials):
        return set()
    ordered = sorted(trials, key=lambda t: t.lr or 0.0)
    k = next((i for i, t in enumerate(ordered) if t.failed), len(ordered))
    trained = [t for t in ordered[:k] if t.trained]
    if not trained:
        return set()
    best = max(trained, key=lambda t: t.loss_start - t.loss_final)
    most = best.loss_start - best.loss_final
    return {
        id(t)
        for t in trained
        if (t.lr or 0.0) > (best.lr or 0.0) and t.loss_start - t.loss_final < (1 - PAST_VALLEY) * most
    }


def ladder(top: float, rungs: int = 12) -> list[float]:
    """``rungs`` candidate thresholds halving down from ``top`` (two significant digits), tight to loose."""
    if not (math.isfinite(top) and top > 0):
        raise GradGuardError(f"a ladder of thresholds needs a positive finite top, got {top!r}.")
    return sorted({float(f"{top * 0.5**k:.2g}") for k in range(rungs)})


def candidates_around(norm: float) -> list[float]:
    """Candidate thresholds from 4× down to 1/512× a healthy pre-clip ``norm`` (a ladder of halvings:
    a stable threshold at a high learning rate is often far below the norm)."""
    if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not (math.isfinite(norm) and norm > 0):
        raise GradGuardError(
            f"candidate thresholds need a positive finite gradient norm, got {norm!r}; pass max_norms."
        )
    return ladder(4 * norm)


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """What a tuning found: every trial and the verified recommendation.

    Attributes:
        trials: one per candidate, in the order tried.
        steps: the step budget of each trial.
        source: ``"memory"`` (:func:`gradguard.tune.tune`) or ``"script"`` (``gradguard tune SCRIPT``).
        start_step: the step of the run the trials started from (``None``: a fresh start).
        command: the command that reproduces it (the script tuner), or ``""``.
    """

    trials: list[Trial]
    steps: int
    source: str = "memory"
    start_step: int | None = None
    command: str = ""

    @property
    def recommended(self) -> Trial | None:
        """The verified recommendation (:func:`choose`), or ``None``: none of the candidates trained."""
        return choose(self.trials)

    @property
    def max_norm(self) -> float | None:
        """The recommended threshold (``None``: no clipping recommended, or nothing trained)."""
        rec = self.recommended
        return None if rec is None else rec.max_norm

    @property
    def lr(self) -> float | None:
        """The recommended learning rate (``None``: learning rates were not candidates, or nothing trained)."""
        rec = self.recommended
        return None if rec is None else rec.lr

    def lr_candidates(self) -> list[float]:
        """The learning rates tried (empty when only thresholds were candidates)."""
        return sorted({t.lr for t in self.trials if t.lr is not None})

    def failed_thresholds(self) -> list[float]:
        """The thresholds that went non-finite or exploded."""
        return sorted(
            t.max_norm for t in self.trials if t.max_norm is not None and (t.nonfinite or t.exploded)
        )

    def summary(self) -> str:
        """The trials as a text table, then the verdict."""
        head = [
            "candidate",
            "steps",
            "first loss",
            "final loss",
            "min loss",
            "clipped",
            "peak norm",
            "outcome",
        ]
        body = [
            [
                t.label,
                str(t.steps),
                f"{t.loss_start:.4g}",
                f"{t.loss_final:.4g}",
                f"{t.loss_min:.4g}",
                f"{t.clip_rate:.0%}",
                f"{t.peak_norm:.3g}",
                t.outcome,
            ]
            for t in self.trials
        ]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
        lines.insert(1, "  ".join("─" * w for w in widths))
        return "\n".join([*lines, self.verdict()])

    def verdict(self) -> str:
        """One sentence: the verified recommendation, or that none of the candidates trained."""
        rec = self.recommended
        late = self._timed_out()
        if rec is None:
            ran = sum(t.judged for t in self.trials)
            if not ran:
                return late
            return (
                f"None of the {ran} candidates trained in {self.steps} steps (each went non-finite, "
                "exploded, diverged or its loss did not fall): lower the learning rate, then tune again."
            ) + (f" {late}" if late else "")
        what = "no clipping" if rec.max_norm is None else f"max_norm={rec.max_norm:g}"
        lr = "" if rec.lr is None else f" at lr={rec.lr:g}"
        if rec.own_clip:  # only the learning rate was a candidate
            what, lr = (
                ("the script as is" if rec.lr is None else f"lr={rec.lr:g}"),
                " (the script's own clipping)",
            )
        return (
            f"Verified: {what}{lr} trained for {rec.steps} steps (loss {rec.loss_start:.4g} → {rec.loss_final:.4g}, "
            f"clipped {rec.clip_rate:.0%}, no explosion, no non-finite step)."
        ) + (f" {late}" if late else "")

    def _timed_out(self) -> str:
        """The sentence on the trials that timed out, or whose rate never took effect (not judged), or ``""``."""
        late = sum(t.timed_out for t in self.trials)
        ignored = sum(t.lr_ignored for t in self.trials)
        if ignored:
            return (
                f"The script sets the learning rate itself (every trial ran at lr={self.trials[-1].lr_used:g}, whatever "
                f"the candidate): the {ignored} candidate rates never took effect, so none was verified. Change the "
                "rate where the script sets it (its param_group['lr'] = … or its schedule), then run it."
            )
        if not late:
            return ""
        return (
            f"{late} of the {len(self.trials)} trials timed out before they recorded a step, so they were not "
            "judged: raise the timeout (gradguard tune --timeout S; none by default), then tune again."
        )

    def as_dict(self) -> dict[str, Any]:
        rec = self.recommended
        return {
            "version": _VERSION,
            "source": self.source,
            "steps": self.steps,
            "start_step": self.start_step,
            "command": self.command,
            "trials": [t.as_dict() for t in self.trials],
            "recommended": None if rec is None else rec.as_dict(),
            "verdict": self.verdict(),
            "lr_candidates": self.lr_candidates(),
            "recommended_lr": None if rec is None else rec.lr,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TuneResult:
        if (
            not isinstance(d, Mapping)
            or d.get("version") != _VERSION
            or not isinstance(d.get("trials"), list)
        ):
            raise GradGuardError(f"not a {TUNE_FILE} this gradguard reads (version {_VERSION} with trials).")
        return cls(
            trials=[Trial.from_dict(t) for t in d["trials"]],
            steps=int(d.get("steps", 0)),
            source=str(d.get("source", "memory")),
            start_step=d.get("start_step"),
            command=str(d.get("command", "")),
        )


def write_tune(run_dir: str | Path, result: TuneResult) -> Path:
    """Write ``tune.json`` into ``run_dir`` (atomically); its path."""
    path = Path(run_dir) / TUNE_FILE
    atomic_write_json(path, result.as_dict())
    return path


def read_tune(run_dir: str | Path) -> TuneResult | None:
    """The :class:`TuneResult` in ``run_dir/tune.json``; ``None`` when there is none or it is unreadable."""
    import json

    path = Path(run_dir) / TUNE_FILE
    try:
        return TuneResult.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError, GradGuardError):
        return None
