"""The training loop shared by the embedded scenarios, written the way a user writes it.

A scenario (:class:`Scenario`) is a model, an optimizer factory, a deterministic batch stream,
a loss and a task metric. :func:`train` runs the plain loop::

    optimizer.zero_grad(set_to_none=True)
    loss = scenario.loss_fn(model, batch)      # forward + loss
    loss.backward()
    outcome = update(loss)                     # [clip] + optimizer.step()  ← the seam

``update`` is the seam where a :class:`gradguard.Guard` replaces "clip + optimizer.step()": any
callable ``update(loss) -> StepOutcome`` works. The default, :class:`ClipThenStep`, measures the
pre-clip global norm, clips with a :mod:`gradguard.clip` clipper and steps — unless the loss or
the norm is non-finite: then the loop records that step and stops *before* stepping, so the
weights are those of the last finite step.

Every step reads its numbers on the host (the demos run on a CPU and want a per-step table);
the library's hot path does not.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.clip import Clipper, NormClipper, coefficient, from_spec, scale_
from gradguard.runtable import clip_rate
from gradguard.stats import grads_of, tensor_norms, total_norm

__all__ = [
    "ClipThenStep",
    "RunConfig",
    "RunResult",
    "Scenario",
    "StepOutcome",
    "StepRecord",
    "healthy_median",
    "roc_auc",
    "train",
]


@dataclass(frozen=True)
class RunConfig:
    """One way to train a scenario: a clip spec and an optimizer.

    Attributes:
        name: label for tables (``"none"``, ``"norm:5"``, ``"adam+norm:5"``…).
        clip: a :func:`gradguard.clip.from_spec` spec (``"norm:5"``, ``"auto"``, ``"none"``…) or a clipper.
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 weight decay passed to the optimizer.
        on_nonfinite: the :class:`gradguard.Guard` policy when the demo runs it guarded.
        stop_at_nonfinite: end the run at its first non-finite step (what an unguarded loop
            meets: the next ``optimizer.step()`` would write NaN into the weights); otherwise
            the guard's skip keeps it going.
        recommend_from: the demo takes this configuration's clip threshold from
            :func:`gradguard.diagnose.diagnose` of an earlier run — the first configuration named
            here whose diagnosis recommends one — after verifying it with :func:`gradguard.tune.tune`
            (the threshold tune recommends is the one followed; ``clip`` is then ignored).
        note: one line for the demo's output.
    """

    name: str
    clip: str | Clipper | None = "none"
    optimizer: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    on_nonfinite: str = "skip"
    stop_at_nonfinite: bool = False
    recommend_from: tuple[str, ...] = ()
    note: str = ""

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")


@dataclass
class Scenario:
    """A training problem that really diverges under some configurations.

    Attributes:
        name: ``"rnn"`` or ``"deepsad"``.
        seed: the seed it was built with (weights, data order).
        model: the module to train (trained in place by :func:`train`).
        batches: a fresh deterministic batch iterator each call.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` (forward + loss; may keep state, e.g. an
            RNN's hidden state carried between truncated-BPTT segments).
        evaluate: ``evaluate(model) -> {metric: value}`` on held-out data (no gradients).
        metric: the headline key of ``evaluate``'s result (``"bpc"``, ``"roc_auc"``).
        higher_is_better: for the headline metric.
        baseline: reference numbers (e.g. the unigram bits per character).
        configs: the configurations the demo runs, in order.
        steps: default number of optimizer steps.
        loss_unit: how to read the recorded loss (e.g. "nats/char").
        info: hyper-parameters, for the run log and the report.
    """

    name: str
    seed: int
    model: nn.Module
    batches: Callable[[], Iterator[Any]]
    loss_fn: Callable[[nn.Module, Any], Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    metric: str
    higher_is_better: bool
    baseline: dict[str, float]
    configs: list[RunConfig]
    steps: int
    loss_unit: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    reset: Callable[[], None] = lambda: None

    def make_optimizer(self, config: RunConfig) -> torch.optim.Optimizer:
        """The optimizer factory: ``config``'s optimizer over this scenario's model."""
        return config.make_optimizer(self.model.parameters())


@dataclass(frozen=True)
class StepOutcome:
    """What the update did: pre-clip global norm, threshold (``inf``: none), whether it stepped,
    and whether the loop should end (``stop``: e.g. a guard that gave up after repeated skips)."""

    grad_norm: float
    threshold: float = math.inf
    clipped: bool = False
    stepped: bool = True
    stop: bool = False


@dataclass(frozen=True)
class StepRecord:
    """One step of :func:`train`: its loss, pre-clip norm and threshold, whether the update clipped it
    and whether it was taken (a non-finite step is recorded but not taken)."""

    step: int
    loss: float
    grad_norm: float
    threshold: float
    clipped: bool
    stepped: bool

    def as_record(self) -> dict[str, Any]:
        """This step in the run log's record fields (:mod:`gradguard.record`), for :mod:`gradguard.runtable`."""
        return {
            "step": self.step,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "threshold": self.threshold,
            "clip_fraction": 1.0 if self.clipped else 0.0,  # one unit, the global norm: clipped or not
            "skipped": not self.stepped,
        }


class ClipThenStep:
    """The default update: measure the pre-clip norm, clip (if a clipper is given), ``optimizer.step()``.

    Stops short of ``optimizer.step()`` when the loss or the norm is non-finite (the loop ends
    there). Stateful clippers (``zclip``, ``auto``, ``autoclip``) see each step's norm once.
    """

    def __init__(self, clipper: Clipper | None, optimizer: torch.optim.Optimizer, params: list[Tensor]):
        self.clipper = clipper
        self.optimizer = optimizer
        self.params = params

    def __call__(self, loss: Tensor) -> StepOutcome:
        grads = grads_of(self.params)
        norm_t = total_norm(tensor_norms(grads))
        threshold = math.inf
        clipped = False
        if isinstance(self.clipper, NormClipper):
            tau = self.clipper.threshold(norm_t)  # observes the norm (stateful clippers) and gives τ
            coef = coefficient(norm_t, tau)
            scale_(grads, coef)
            threshold = float(tau)
            clipped = bool(coef < 1.0)
        elif self.clipper is not None:  # value / AGC / per-layer: clip, report the global pre-clip norm
            self.clipper(self.params, norm=norm_t)
            clipped = bool(total_norm(tensor_norms(grads)) < norm_t * 0.999)
        norm = float(norm_t)
        if not (math.isfinite(norm) and math.isfinite(float(loss.detach()))):
            return StepOutcome(norm, threshold, clipped, stepped=False)
        self.optimizer.step()
        return StepOutcome(norm, threshold, clipped, stepped=True)


@dataclass
class RunResult:
    scenario: str
    config: RunConfig
    seed: int
    records: list[StepRecord]
    first_nonfinite: int | None
    metrics: dict[str, float]
    wall_s: float
    stopped: str  # "steps" | "nonfinite" | "time" | "aborted"

    @property
    def steps(self) -> int:
        """Optimizer steps taken (a non-finite step is recorded but not taken)."""
        return sum(r.stepped for r in self.records)

    @property
    def clip_rate(self) -> float:
        """The run table's clip rate (:func:`gradguard.runtable.clip_rate`; ``nan`` when no step was taken)."""
        return clip_rate(r.as_record() for r in self.records)

    @property
    def final_loss(self) -> float:
        """Mean recorded loss over the last 20 finite steps (nan when none)."""
        finite = [r.loss for r in self.records if math.isfinite(r.loss)]
        return statistics.fmean(finite[-20:]) if finite else math.nan

    def norms(self) -> list[float]:
        return [r.grad_norm for r in self.records]

    def row(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "config": self.config.name,
            "seed": self.seed,
            "steps": self.steps,
            "first_nonfinite": self.first_nonfinite,
            "final_loss": self.final_loss,
            **self.metrics,
            "clip_rate": self.clip_rate,
            "wall_s": self.wall_s,
        }


def train(
    scenario: Scenario,
    config: RunConfig,
    *,
    step_hook: Callable[[StepRecord], None] | None = None,
    steps: int | None = None,
    time_budget_s: float | None = None,
    update: Callable[[Tensor], StepOutcome] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    stop_on_nonfinite: bool = True,
) -> RunResult:
    """Train ``scenario.model`` in place with ``config``; stop at the first non-finite loss or norm.

    Args:
        scenario: from a scenario's ``build(seed)``.
        config: clip spec and optimizer.
        step_hook: called with each :class:`StepRecord` (logging, a monitor).
        steps: optimizer steps (default ``scenario.steps``).
        time_budget_s: stop after this many seconds of training (evaluation not counted).
        update: replaces "clip + optimizer.step()": ``update(loss) -> StepOutcome`` (a guard).
            When given, pass the ``optimizer`` it steps, or the loop makes one from ``config``.
        optimizer: the optimizer to use (default: ``scenario.make_optimizer(config)``).
        stop_on_nonfinite: stop at the first non-finite loss or norm (``False``: record it and go
            on, for an ``update`` that skips such steps, as a guard does).
    """
    model = scenario.model
    n_steps = scenario.steps if steps is None else steps
    opt = optimizer if optimizer is not None else scenario.make_optimizer(config)
    if update is None:
        update = ClipThenStep(from_spec(config.clip), opt, [p for p in model.parameters() if p.requires_grad])
    scenario.reset()
    model.train()
    records: list[StepRecord] = []
    first_nonfinite: int | None = None
    stopped = "steps"
    start = time.perf_counter()
    for step, batch in zip(range(n_steps), scenario.batches()):
        opt.zero_grad(set_to_none=True)
        loss = scenario.loss_fn(model, batch)
        loss.backward()
        out = update(loss)
        rec = StepRecord(step, float(loss.detach()), out.grad_norm, out.threshold, out.clipped, out.stepped)
        records.append(rec)
        if step_hook is not None:
            step_hook(rec)
        if out.stop:
            stopped = "aborted"
            if first_nonfinite is None and not (math.isfinite(rec.loss) and math.isfinite(rec.grad_norm)):
                first_nonfinite = step
            break
        if not (math.isfinite(rec.loss) and math.isfinite(rec.grad_norm)):
            if first_nonfinite is None:
                first_nonfinite = step
            if stop_on_nonfinite:
                stopped = "nonfinite"
                break
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            stopped = "time"
            break
    wall = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        metrics = scenario.evaluate(model)
    return RunResult(scenario.name, config, scenario.seed, records, first_nonfinite, metrics, wall, stopped)


def healthy_median(norms: list[float], k: int = 10) -> float:
    """A threshold from the healthy start of a run: the median of its first finite norms.

    Takes the norms before the first non-finite one, and of those the first ``min(k, ⌈n/2⌉)``
    (the second half of a run that diverged is the explosion, not the healthy scale).
    """
    finite: list[float] = []
    for n in norms:
        if not math.isfinite(n):
            break
        finite.append(n)
    if not finite:
        raise ValueError("no finite gradient norm to recommend a threshold from")
    head = finite[: max(1, min(k, (len(finite) + 1) // 2))]
    return float(statistics.median(head))


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); nan if scores are not finite."""
    s = scores.detach().double().flatten()
    y = labels.flatten().bool()
    if not bool(torch.isfinite(s).all()):
        return math.nan
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse = torch.unique(s, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)
