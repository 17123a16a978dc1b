"""Non-finite values born inside ``optimizer.step()``: found at the step that wrote them.

A hand-written optimizer that divides by a norm that can be 0, or Adam with ``eps=0`` on a
parameter whose second moment is still 0, writes NaN into the weights *from finite gradients*.
Nothing on that step looks wrong (the loss and gradients were finite); the NaN shows up a step — or
many steps — later, in an op that only passed it on.

Where a bad step is not applied (``on_nonfinite`` ``"skip"``, ``"rollback"``, ``"raise"``), a healthy
step does no device op and no host read here. A weight the optimizer made non-finite makes a later step's loss or gradients non-finite, and the guard flags that step anyway
(on the host at once, or at the flush on the sync-free fused path). Only then, on the anomaly path,
:meth:`OptimizerBirths.at_bad_step` / :meth:`OptimizerBirths.found` read the weights once. The bad
step and every step after the last one taken were not applied, so the weights read are the ones
the last taken step wrote; that step's gradients were finite (it was taken). Non-finite weights
there are a birth in the optimizer: reported at the last taken step — or, when a ``weight_every``
step's update ratio was already non-finite (a weight the forward does not use, such as an
embedding row no batch has reached yet), at that step — with the optimizer's class and the
non-finite parameters. When several steps were taken since the weights were last seen finite and no
update ratio says which wrote the NaN, the event says so (``evidence["steps"]``: the window).

Where a bad step *is* applied (``on_nonfinite="warn"``), its non-finite gradients pass into the
weights, and the weights read later cannot tell a birth from a NaN passed on. There, and only
there, every optimizer step the guard takes is checked as before (:class:`_EachStep`: a step
post-hook measures the weights' L2 norms into a device vector, read at the next flush).

A non-finite value the *script* writes into the weights between steps is not the optimizer's: the
weights' version counters tell (:class:`_Writes`; reading all of them every step would cost ~12 µs
for 202 tensors, so a step reads one: ~1 µs with the two hook calls, measured). Limits: a script
that writes the weights on every step (a clamp) or a rollback since the last flush turns the report
off (no false claim); a script's write into a weight that had no gradient on some steps since the
last flush can be missed (those steps did not move its counter).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradguard import events
from gradguard._distributed import local
from gradguard._guard.runmeta import group_numbers
from gradguard.errors import GradGuardError
from gradguard.record import DECIDED, weight_stats
from gradguard.stats import layer_name, tensor_norms

__all__ = ["OptimizerBirths"]

_MAX_NAMED = 20  # parameters named in the event
_TRIES = 3  # steps whose counters are read whole, looking for the optimizer's bump
Records = Iterable[Mapping[str, Any]]


class OptimizerBirths:
    """Finds the first non-finite value an optimizer step wrote into the weights; reports it once.

    Args:
        optimizer: the guarded optimizer.
        named: the guarded ``(name, parameter)`` pairs (the guard's list: it grows as parameters join).
        active: check at all (not under torch.distributed, where a rank holds shards).
        bad_steps_applied: a step with non-finite gradients is applied (``on_nonfinite="warn"``): then
            every optimizer step is checked (a device op a step); else only the anomaly path reads.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named: Sequence[tuple[str, nn.Parameter]],
        *,
        active: bool = True,
        bad_steps_applied: bool = True,
    ) -> None:
        self.optimizer = optimizer
        self.named = named
        self._done = not active  # a birth was reported (or the weights went non-finite otherwise): stop
        self._each = _EachStep(self) if active and bad_steps_applied else None
        self._seen = -1  # the last step whose record was learned
        self._taken: int | None = None  # the last step taken while the weights were not seen non-finite
        self._taken_since_clean = 0  # steps taken since the weights were last seen finite
        self._clean = -1  # the weights were read finite after this step's update
        self._ratio_bad: int | None = None  # a weight_every step whose update ratio was non-finite
        self._weights_bad = False  # a weight_every step's weight norm was non-finite: the birth is earlier
        self._writes = _Writes(optimizer, named) if active and not bad_steps_applied else None

    # ------------------------------------------------------------------ the guard's calls
    def begin(self, step: int) -> None:
        """The guard's step ``step`` starts (the per-step mode marks the optimizer step that follows)."""
        if self._each is not None and not self._done:
            self._each.begin(step)

    def found(self, records: Records) -> list[events.Event]:
        """At a flush: the ``nonfinite`` event of a birth in the optimizer (a list of one), or ``[]``.

        ``records``: the flushed records. A step the sync-free path skipped (undecided, non-finite)
        is checked here if no later step was taken (the weights are still the ones it saw)."""
        records = list(records)
        if self._each is not None:
            return self._each.found(records)
        last_taken = max((i for i, rec in enumerate(records) if _taken(rec)), default=-1)
        for i, rec in enumerate(records):
            if i > last_taken and rec.get("nonfinite") and not rec.get(DECIDED):
                born = self.at_bad_step(rec["step"], tuple)
                if born or self._done:
                    return born
            self._learn(rec)
        if self._writes is not None:
            self._writes.mark()
        return []

    def at_bad_step(self, step: int, pending: Callable[[], Records]) -> list[events.Event]:
        """A non-finite step that was not applied (``step``, its update not taken): the anomaly path.

        ``pending()``: the records before it not yet flushed (read only when a check is due). Reads
        the weights once (host sync: anomaly path); non-finite weights after the last step taken,
        whose gradients were finite, are that step's birth (see the module docstring)."""
        if self._each is not None or self._done:
            return []
        for rec in pending():
            self._learn(rec)
        if self._taken is None or self._taken <= self._clean:
            return []  # no step taken since the weights were seen finite (or none at all)
        bad = self._nonfinite()  # host sync: anomaly path
        if bad and (self._writes is None or self._writes.outside([name for name, _ in bad])):
            self._done = True  # the script (not the optimizer) wrote it: not a birth; stop
            if self._writes is not None and self._writes.steps > 0:  # (measured: not "cannot be told")
                self.written_outside = frozenset(name for name, _ in bad)
            return []
        if not bad:  # (a non-finite value seen in a weight_every step's record was written over since)
            self._clean, self._taken_since_clean = self._taken, 0
            self._ratio_bad, self._weights_bad = None, False
            return []
        self._done = True  # report the first only: after it the weights stay non-finite
        born = self._ratio_bad if self._ratio_bad is not None else self._taken
        window = (
            None if self._ratio_bad is not None or self._taken_since_clean <= 1 else [self._clean + 1, born]
        )
        names = [name for name, _ in bad]
        return [_event(self, born, names, bad[0][1], window=window)]

    written_outside: frozenset[str] = frozenset()  # parameters the script wrote non-finite between steps

    def attribute(self, event: events.Event) -> events.Event:
        """A located ``nonfinite`` event that found a weight already non-finite before the forward (phase
        ``optimizer``, tensor ``param``): where the version counters said the script wrote that weight
        between optimizer steps, its phase is ``script`` (a weight set or loaded by hand), not the
        optimizer's."""
        details = dict(event.get("evidence") or {})
        if not (
            event.get("phase") == "optimizer"
            and event.get("tensor") == "param"
            and details.get("parameter") in self.written_outside
        ):
            return event
        details["reason"] = (
            "the script wrote it between optimizer steps (its version counter moved more than the optimizer's "
            "steps explain): a weight set, edited or loaded by hand; no optimizer step made it"
        )
        return {**event, "phase": "script", "evidence": details}

    def close(self) -> None:
        """Take the hook off the optimizer (the per-step mode's checks were read by the last flush)."""
        if self._each is not None:
            self._each.close()
        if self._writes is not None:
            self._writes.close()

    # ------------------------------------------------------------------ the anomaly path
    def _learn(self, rec: Mapping[str, Any]) -> None:
        """One record, in step order (each once): the last step taken, and a ``weight_every`` step's
        weight norms (before its update) and update ratios that were already non-finite."""
        step = rec["step"]
        if step <= self._seen:
            return  # learned already
        self._seen = step
        if self._weights_bad or self._ratio_bad is not None:
            return  # the birth is at or before the step kept
        layers = weight_stats(rec)  # {} on most steps: no weight norms there
        if layers and any(_nonfinite(v.get("weight_norm")) for v in layers.values()):
            self._weights_bad = True  # non-finite before this step: the birth is the last step taken
            return
        if not _taken(rec):
            return
        self._taken = step
        self._taken_since_clean += 1
        if not layers:
            return
        if any(_nonfinite(v.get("update_ratio")) for v in layers.values()):
            self._ratio_bad = step  # this update wrote it: the exact step
        else:  # finite before and after this update: the window starts after it
            self._clean, self._taken_since_clean = step, 0

    def _nonfinite(self) -> list[tuple[str, float]]:
        """The guarded parameters holding a non-finite value now, with their L2 norm (host reads)."""
        params = [local(p) for _, p in self.named]  # (FSDP2: this rank's shards)
        with torch.no_grad():
            try:
                norms = tensor_norms(params, 2.0).double().tolist()  # host sync: anomaly path
            except GradGuardError:  # parameters on several devices: one norm each
                norms = [float(tensor_norms([p], 2.0)) for p in params]  # host sync: anomaly path
        # a finite weight above ~1e19 overflows the L2 norm: confirmed on the weight itself
        return [
            (name, x)
            for (name, _), p, x in zip(self.named, params, norms)
            if not math.isfinite(x) and not _finite(p)
        ]


class _Writes:
    """Tells the optimizer's writes into the weights from the script's, without reading every
    weight's version counter on every step.

    Each in-place write bumps a tensor's version counter, and one ``optimizer.step()`` bumps each
    weight's by a fixed amount: measured on the first step that moved the weights (the counters read
    before and after it, once; a fused kernel moves none: its bump is 0, so any move is the
    script's). From then on a step pre- and post-hook read the counter of one
    weight only (one that first step moved), and count the steps that moved it (a step that did nothing — gradients dropped —
    is not counted). The counters are read again at each flush (the reference). On the anomaly
    path, a weight whose counter moved more than ``steps × its bump`` since the reference was
    written by something else: the script (:meth:`outside`). A weight without a bump of its own
    (no gradient on the first step) is given the largest one. Cost a healthy step: two Python hook
    calls and two reads of one counter (~1 µs); one read of every counter per flush."""

    def __init__(self, optimizer: torch.optim.Optimizer, named: Sequence[tuple[str, nn.Parameter]]) -> None:
        self.named = named
        self.steps = 0  # optimizer steps that moved the weights
        self._bump: list[int] = []  # each weight's bump in one step (measured once)
        self._ref: tuple[int, list[int]] | None = None  # (steps, every counter) at the reference
        self._before: list[int] | int | None = None  # the counters before this step (all: the first)
        self._tries = 0  # steps measured whole, looking for one that moves the weights
        self._one: Tensor = named[0][1] if named else torch.empty(0)  # the weight whose counter a step reads
        self._fused = all(group.get("fused") for group in optimizer.param_groups)  # moves no counter
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def _counters(self) -> list[int]:
        return [p._version for _, p in self.named]

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if torch.compiler.is_compiling():  # inside a compiled optimizer step: reading a version counter
            return  # is a graph break; the step is not counted, so the flush's check stays silent
        if self.named:
            self._before = self._one._version if self._ref is not None else self._counters()

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if torch.compiler.is_compiling():  # see _pre
            return
        before, self._before = self._before, None
        if isinstance(before, int):
            self.steps += self._one._version != before
        elif before is not None:
            after = self._counters()
            self._tries += 1
            if after != before or self._fused or self._tries >= _TRIES:  # each weight's bump (0: fused)
                self._bump = [a - b for a, b in zip(after, before)]
                self._one = self.named[max(range(len(self._bump)), key=self._bump.__getitem__)][1]
                self.steps = int(after != before)
                self._ref = (self.steps, after)

    def mark(self) -> None:
        """At a flush: the counters now are the new reference (one read of each)."""
        if self._ref is not None:
            self._ref = (self.steps, self._counters())

    def outside(self, names: Iterable[str]) -> bool:
        """Whether something other than the optimizer wrote one of the parameters ``names`` since
        the reference (``True`` too when that cannot be told: nothing was measured yet)."""
        if self._ref is None:
            return True
        at, (steps, ref) = {name: i for i, (name, _) in enumerate(self.named)}, self._ref
        largest = max(self._bump, default=1)
        for i in (at[name] for name in names if at[name] < len(ref)):  # (joined since: not told)
            bump = self._bump[i] if i < len(self._bump) and self._bump[i] > 0 else largest
            if self.named[i][1]._version - ref[i] > (self.steps - steps) * bump:
                return True
        return False

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _EachStep:
    """The per-step mode (bad steps applied): after every optimizer step the guard takes, a step
    post-hook measures the weights' L2 norms into a device vector (no host read), read at the next
    flush (:meth:`found`, which syncs anyway). The first step whose weights turned non-finite while
    its gradients were finite (its record says so) is the birth.

    Weights written between steps by anything else (the script, a rollback) move their version
    counters: they are checked again before the next optimizer step, so a value written there is
    never blamed on the optimizer (the first step is checked before, too). Cost a healthy step: one
    ``torch._foreach_norm`` over the weights, one ``stack``, two reads of each weight's version."""

    def __init__(self, births: OptimizerBirths) -> None:
        self.births = births
        self._step: int | None = None  # the guard step whose optimizer step comes next
        self._checks: list[tuple[int, int, Tensor, bool]] = []  # (step, n, L2 norm per parameter, after)
        self._versions: list[int] | None = None  # the weights' versions at the last check
        self._bad: set[int] = set()  # flushed steps whose loss or gradients were non-finite
        self._handle: RemovableHandle | None = births.optimizer.register_step_post_hook(self._after_step)

    def begin(self, step: int) -> None:
        """The guard's step ``step`` starts: the optimizer step that follows (if taken) is checked;
        the weights now too, if something other than the optimizer wrote them since the last check."""
        self._step = step
        if self.births.named and self._versions != [p._version for _, p in self.births.named]:
            self._check(step, after=False)

    def _check(self, step: int, *, after: bool) -> None:
        """Measure the weights' L2 norms (a device vector, no host read) and their versions.

        L2: NaN and ±inf propagate, and it is the one norm with a single fast foreach kernel on
        every device (the inf or L1 norm cost 5× more on a CPU)."""
        named = self.births.named
        try:
            with torch.no_grad():  # (no graph: the parameters need no detach)
                norms = tensor_norms([p for _, p in named], 2.0)  # no host read
        except GradGuardError:  # parameters on several devices: not checked
            self.births._done = True
            return
        self._versions = [p._version for _, p in named]
        if not norms.is_meta:
            self._checks.append((step, len(named), norms, after))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if torch.compiler.is_compiling():  # a compiled optimizer step: no version reads inside it
            return
        step, self._step = self._step, None  # once per guard step (LBFGS's line search steps once too)
        if step is None or self.births._done or not self.births.named:
            return
        self._check(step, after=True)

    def found(self, records: Sequence[Mapping[str, Any]]) -> list[events.Event]:
        """At a flush (one host read of the pending checks): the first birth, as a list of one."""
        # a caller's step (before_step) is checked after its record was flushed: keep the bad steps
        self._bad = {s for s in self._bad if self._checks and s >= self._checks[0][0]}
        self._bad |= {r["step"] for r in records if r.get("nonfinite")}
        checks, self._checks = self._checks, []
        births = self.births
        if not checks or births._done:
            return []
        # read right after the monitor's own copy (the device is idle)
        values = torch.cat([v.double() for _, _, v, _ in checks])
        rows = values.tolist()  # host sync: at the flush
        at = 0
        for step, n, _, after in checks:
            row, at = rows[at : at + n], at + n
            bad = [i for i, x in enumerate(row) if not math.isfinite(x)]
            if not bad:
                continue
            births._done = True  # report the first only: after it the weights stay non-finite
            if not after or step in self._bad:
                return []  # written outside the optimizer, or passed on from non-finite gradients
            names = [births.named[i][0] for i in bad if not _finite(births.named[i][1])]
            return [_event(births, step, names, row[bad[0]])] if names else []
        return []

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _event(
    births: OptimizerBirths, step: int, names: list[str], value: float, *, window: list[int] | None = None
) -> events.Event:
    """The ``nonfinite`` event of a birth in the optimizer: which optimizer, which parameters.

    ``window``: the steps taken since the weights were last seen finite, when more than one could
    have written the value (the event is at the last of them)."""
    cls = type(births.optimizer)
    kind = _kind(dict(births.named)[names[0]], value)
    hyper = _hyperparameters(births, names[0])
    custom = not cls.__module__.startswith("torch.")
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    reason = (
        f"inside optimizer.step(): {cls.__name__}.step() wrote {kind} into {names[0]}{more}, whose gradients "
        f"and previous values were finite"
    )
    if window is not None:
        reason += f" (or, if the forward did not use it, a step since step {window[0]}: none was checked)"
    evidence = {
        "reason": reason,
        "optimizer": cls.__name__,
        "custom_optimizer": custom,
        "parameters": names[:_MAX_NAMED],
        "hyperparameters": hyper,
        **({"steps": window} if window is not None else {}),
    }
    return events.nonfinite(
        step,
        phase="optimizer",
        module=layer_name(names[0]),
        tensor="param",
        kind=kind,
        located_by="check",
        optimizer=cls.__name__,
        parameters=names[:_MAX_NAMED],
        parameters_nonfinite=len(names),
        evidence=evidence,
    )


def _hyperparameters(births: OptimizerBirths, name: str) -> dict[str, Any]:
    """The numbers of the parameter group that holds ``name`` (lr, eps, betas…)."""
    param = dict(births.named).get(name)
    group = next((g for g in births.optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        return {}
    searched = {"line_search_fn": group["line_search_fn"]} if "line_search_fn" in group else {}  # (LBFGS)
    return {**group_numbers(group), **searched}


def _taken(rec: Mapping[str, Any]) -> bool:
    """Whether a record's step was applied with finite gradients (its update reached the weights)."""
    return not rec.get("skipped") and not rec.get("nonfinite")


def _nonfinite(value: Any) -> bool:
    """A logged per-layer value that is NaN or ±inf (``None``: not measured that step)."""
    return isinstance(value, float) and not math.isfinite(value)


def _finite(param: Tensor) -> bool:
    """Whether every value of ``param`` is finite now (host read: at a birth only)."""
    with torch.no_grad():
        return bool(torch.isfinite(param).all())


def _kind(param: Tensor, norm: float) -> str:
    """What the parameter holds now: ``nan``, ``inf`` or ``-inf`` (host reads: at a birth only); the
    kind of its norm if it was written again since."""
    with torch.no_grad():
        if bool(torch.isnan(param).any()):
            return "nan"
        if bool((param == -math.inf).any()) and not bool((param == math.inf).any()):
            return "-inf"
    return events.kind_of(norm)
