"""Anomaly handling: capture a step's inputs, locate a non-finite step, arm the next forward, and
write each step's ``nonfinite`` event once.

Healthy steps only keep references (the model's inputs, the RNG state; the closure) and the host
copies of the norms that the flush makes anyway (:attr:`Anomalies.history`, a bounded window). On
a non-finite step the guard asks :meth:`Anomalies.locate` where the first non-finite value was
born: the step is replayed under full instrumentation (exactly with a closure; otherwise the
model's forward from its captured inputs, under the autocast state that forward ran under, and its
backward from the gradient the step sent into the output, loss scale included), or, for an
explosion, the first spiking step and layer are named. When the step cannot be replayed, the model's next forward runs instrumented
(:meth:`Anomalies.arm`), in case the failure recurs.

A replay needs the weights the bad step saw, so it runs before that step's update. Where the guard
skips a bad step, the host decides on it anyway. Under ``on_nonfinite="warn"`` a bad step is
applied: where the caller steps after ``before_step`` the host has read the step already and it is
located before the caller's update; under ``monitor_only`` (a framework's step, a hand-written
update under ``gradguard run``) nothing would be read until the flush, long after the update, so
the guard reads each step's flags (one host read a step, while replays are left:
:attr:`Anomalies.reads_each_step`) and locates a bad step before the caller updates the weights.
A bad step the guard itself applied (``warn`` under ``Guard.step``) is reported, not replayed.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import _distributed, events
from gradguard.locate import Locator, LossWatch, StepCapture, explosion, in_transform, rng_state

__all__ = ["HISTORY", "Anomalies", "flagged_nonfinite"]

HISTORY = 512  #: host copies of the last steps' norms, for telling an explosion from a single bad op
#: Steps (per guard, in all) an armed window over the loss code stays on after a failure that no replay
#: could locate, waiting for it to recur: a bf16 ``log(1 - sigmoid)`` that fails every 10–15 steps is
#: missed by a window of one step. Each such step runs instrumented (host reads: the anomaly path).
ARMED_STEPS = 32
_MAX_LAYERS_IN_EVENT = 20

History = collections.deque[Mapping[str, Any]]  # the flushed records, read only on the anomaly path


def flagged_nonfinite(
    step: int, vals: Mapping[str, Any], layer_norms: Mapping[str, float], policy: str
) -> events.Event:
    """The ``nonfinite`` event of a step from its always-on flags (``located_by="norm"``).

    ``vals``: the step's record columns; ``layer_norms``: the per-layer gradient norms it has.
    """
    bad_layers = [n for n, v in layer_norms.items() if not math.isfinite(v)]
    loss_bad = bool(vals["loss_nonfinite"])
    loss = vals["loss"]
    return events.nonfinite(
        step,
        phase="loss" if loss_bad else "backward",
        tensor="output" if loss_bad else "grad",
        kind=events.kind_of(loss) if loss_bad else ("nan" if vals["grad_nan"] else "inf"),
        located_by="norm",
        layers=bad_layers[:_MAX_LAYERS_IN_EVENT],
        layers_nonfinite=len(bad_layers),
        loss=loss,
        grad_norm=vals["grad_norm"],
        policy=policy,
    )


def weights_nonfinite(step: int, weight_norms: Mapping[str, float], policy: str) -> events.Event | None:
    """The ``nonfinite`` event of weights that went non-finite without a non-finite loss or
    gradient (e.g. behind a tanh), seen in the weight norms of a cadence step; else ``None``."""
    bad = [n for n, v in weight_norms.items() if not math.isfinite(v)]
    if not bad:
        return None
    return events.nonfinite(
        step,
        phase="optimizer",
        module=bad[0],
        tensor="param",
        kind=events.kind_of(weight_norms[bad[0]]),
        located_by="norm",
        layers=bad[:_MAX_LAYERS_IN_EVENT],
        layers_nonfinite=len(bad),
        policy=policy,
    )


class Anomalies:
    """The guard's anomaly handling.

    Args:
        root: the user's root module (its ``named_modules()`` name the modules in the answer).
        params: the guarded parameters (a closure replay checks their gradients).
        capture: the step capture (``None``: ``locate=False``, nothing is captured or replayed);
            replays and instrumentation run its root: ``root`` or a submodule of it (a
            LightningModule's ``self.net``, which its ``training_step`` calls).
        max_replays: replay at most this many anomalous steps.
        can_replay: a replay is allowed (not under torch.distributed: ranks would diverge).
        gather: under torch.distributed, every rank's value of an object (a collective): which
            rank's batch held a non-finite value, checked without a replay.
        applied: the caller applies every step, bad ones included (``monitor_only`` with
            ``on_nonfinite="warn"``): see :attr:`reads_each_step`.
    """

    def __init__(
        self,
        root: nn.Module,
        params: list[nn.Parameter],
        capture: StepCapture | None,
        *,
        max_replays: int,
        can_replay: bool,
        applied: bool = False,
        gather: Callable[[Any], list[Any] | None] | None = None,
    ) -> None:
        self.root = root
        self.called = capture.root if capture is not None else root  # the module the step calls
        self.params = params
        self.capture = capture
        self.max_replays = max_replays
        self.can_replay = can_replay
        self.applied = applied
        self.replays = 0
        self._gather = gather
        self._rank_checks = 0  # steps whose inputs were checked on every rank (at most max_replays)
        self._loss: Tensor | float | None = None  # the step's loss on this rank (begin)
        self.history: History = collections.deque(maxlen=HISTORY)
        self._closure: Callable[[], Any] | None = None
        self._closure_rng: dict[str, Any] | None = None
        self._armed: tuple[Locator, dict[str, Any], int] | None = None
        self._armed_left = ARMED_STEPS  # steps a loss-code window may still stay on, waiting for a recurrence
        self._last_reported = -1  # the last step whose nonfinite event was written

    # ------------------------------------------------------------------ per step
    def run_closure(self, closure: Callable[[], Any]) -> Any:
        """Run the step's closure, keeping it and the RNG state for an exact replay."""
        self._closure, self._closure_rng = closure, rng_state()
        with torch.enable_grad():
            return closure()

    def begin(
        self, loss: Tensor | float | None, step: int
    ) -> tuple[Tensor | float | None, events.Event | None]:
        """At the optimizer step: stop watching the loss code, end an armed window.

        Returns the loss (the zero-code runner's: the tensor the script called ``backward()`` on,
        when none was given) and the located event of a failure that recurred in the armed window.
        """
        watch: LossWatch | None = self.capture.end_step() if self.capture is not None else None
        if loss is None and watch is not None and watch.loss is not None:
            loss = watch.loss
        self._loss = loss  # (this rank's: whose loss went non-finite, on the anomaly path)
        return loss, self.finish_armed(loss, step)

    def end_step(self) -> None:
        """Hold the batch, the closure and the loss no longer than their step."""
        self._closure = None
        self._loss = None
        if self.capture is not None:
            self.capture.release()

    def remember(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Keep the host norms of flushed records (the explosion evidence)."""
        self.history.extend(records)  # (their norms are read out at a bad step: _norms)

    def report_once(self, event: events.Event) -> events.Event | None:
        """``event`` (a step's ``nonfinite`` event) unless that step's was written already."""
        if event["step"] <= self._last_reported:
            return None
        self._last_reported = event["step"]
        return event

    def state_dict(self) -> dict[str, int]:
        """What changes later steps' events: the replays spent, the last step reported."""
        return {"replays": self.replays, "last_reported": self._last_reported}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.replays = int(state["replays"])
        self._last_reported = int(state["last_reported"])

    def close(self, now: int) -> events.Event | None:
        """Remove the capture's hooks; end an armed window (its event, if the failure recurred)."""
        if self.capture is not None:
            self.capture.remove()
        return self.finish_armed(None, now, again=False)

    # ------------------------------------------------------------------ locate
    @property
    def replays_left(self) -> bool:
        """Whether a bad step can still be replayed (a capture, replays allowed and not spent)."""
        return self.capture is not None and self.can_replay and self.replays < self.max_replays

    @property
    def reads_each_step(self) -> bool:
        """Whether the guard reads this step's flags on the host now, to locate a bad step before
        the caller applies it (see the module docstring): only where the caller applies bad steps
        and replays are left (then it is sync-free again)."""
        return self.applied and self.replays_left

    def reported(self, step: int) -> bool:
        return step <= self._last_reported

    def locate(
        self, step: int, loss_bad: bool, pending: Callable[[], Iterable[Mapping[str, Any]]] = list
    ) -> dict[str, Any] | None:
        """Where the first non-finite value of this (skipped, not yet stepped) step was born.

        The anomaly path: host reads and a replay are fine here. Weights are unchanged (the step
        has not been taken), so the replay sees what the failed step saw. ``pending()``: the
        records of the steps before this one that are not flushed yet (read, not flushed: nothing
        is written and nothing can abort here).
        """
        if self.capture is None:
            return None
        exploded = explosion([_norms(rec) for rec in (*self.history, *pending())])
        birth, how = self._replay(loss_bad)
        if birth is None and self._gather is not None:
            birth = self._data_on_ranks()
        located: dict[str, Any] = {}
        if birth is not None:
            how_found = "replay" if not isinstance(birth, _Found) else birth.fields.get("located_by", "watch")
            located = {**birth.event(), "located_by": how_found}
        else:
            if how != "replay":
                located = {"phase": "loss", "located_by": "replay", "evidence": {"reason": how}}
            if exploded is None and self._closure is None and self._armed is None:
                # the next step runs under full instrumentation, in case it recurs: the model's own
                # forward and backward replayed clean, so over the loss code too (its backward: a
                # gradient penalty's sqrt at 0 makes the gradients NaN from a finite loss)
                self.arm(step, loss_code=True)
        if exploded is not None:  # the answer is the explosion, the op where it overflowed is evidence
            return {
                "phase": "backward",
                "module": exploded["module"],
                "op": None,
                "tensor": "grad",
                "source": None,
                "cause": "explosion",
                "located_by": "norm",
                "evidence": {**exploded, "overflow": located or None},
            }
        return located or None

    def _replay(self, loss_bad: bool) -> tuple[Any, str]:
        """Replay the step (the closure, or the captured forward): ``(birth or None, how)``."""
        assert self.capture is not None
        if self.replays >= self.max_replays or not self.can_replay:
            return None, "replay"
        self.replays += 1
        loc = Locator(self.called, names=self.root)
        if self._closure is not None:
            with _eager():
                replayed, _ = loc.replay(self._closure, self._closure_rng, grads=self.params)
            return replayed, "replay"
        if self.capture.inputs is None:
            return None, "replay"
        with _eager():
            found, how = self.capture.replay(loc)
        birth: Any = _Found(found) if isinstance(found, dict) else found
        if loss_bad and how == "replay" and (birth is None or birth.phase == "backward"):
            # the forward comes first: a birth in the model's backward is later than the loss's
            birth, how = None, "the model's output was finite: the loss code made the loss non-finite"
        return birth, how

    def _data_on_ranks(self) -> _Found | None:
        """Under torch.distributed (no replays): each rank checks the inputs its step was given and
        what its loss-code watch saw, and every rank learns whose batch held the non-finite value or
        whose loss code made it (one gather; every rank is here, at the same skipped step). The
        first such rank's answer, with ``rank`` and every bad rank (a per-rank count of 0 in
        ``sum / count`` read "a lone non-finite step, no op located" and named no rank)."""
        if self.capture is None or self._gather is None or self._rank_checks >= self.max_replays:
            return None
        self._rank_checks += 1
        try:
            mine = self.capture.bad_input() or self.capture.loss_watch_answer() or self._own_loss()
        except Exception:  # this rank must still join the gather, or the others wait for it forever
            mine = None
        found = self._gather(mine)
        if found is None:  # no collective now (a DDP Join context): this rank's own answer, if it has one
            found = [None] * _distributed.rank() + [mine]  # (the others' batches unseen: it reads "rank N")
        bad = [(r, f) for r, f in enumerate(found) if isinstance(f, dict)]
        if not bad:
            return None
        rank, fields = bad[0]
        evidence = {**fields["evidence"], "ranks": [r for r, _ in bad]}
        evidence["reason"] = f"on rank {rank}, {evidence['reason']}"
        how = "inputs" if fields.get("phase") == "data" else "watch"
        return _Found({**fields, "rank": rank, "evidence": evidence, "located_by": how})

    def _own_loss(self) -> dict[str, Any] | None:
        """This rank's loss, non-finite where no input and no watched loss code says why (a Guard in code
        does not watch the loss code): the rank is known, the op is not (host read: anomaly path)."""
        loss = self._loss
        value = float(loss.detach().float()) if isinstance(loss, Tensor) else loss
        if not isinstance(value, float) or math.isfinite(value):
            return None
        kind = events.kind_of(value)
        return {
            "phase": "loss",
            "module": None,
            "op": None,
            "tensor": "output",
            "kind": kind,
            "source": None,
            "evidence": {"reason": f"the loss was {kind} on this rank's batch (its inputs were finite)"},
        }

    # ------------------------------------------------------------------ arm the next forward
    def arm(self, step: int, *, loss_code: bool = False) -> None:
        """Instrument the model's next forward call (and, through the autograd-node hooks it leaves,
        that forward's backward), in case the failure recurs.

        The instrumentation is a :class:`TorchFunctionMode`: it is entered in the root's forward
        pre-hook and left in its forward hook, around exactly one forward call, so it never
        outlives that call (an unclosed guard cannot leave it on the mode stack). With
        ``loss_code`` (the failed step's model forward and backward replayed clean: its loss code,
        which ``guard.step(loss)`` cannot replay, made the value) it stays on past the forward,
        over the loss code, its backward and any further forward of the step, until the step
        (:meth:`finish_armed`) or the guard's close. (Not ended inside a later forward: hooks
        removed during a module's call break that call.)
        """
        loc = Locator(self.called, names=self.root)
        state: dict[str, Any] = {}
        capture = self.capture

        def enter(module: nn.Module, args: Any, kwargs: Any) -> None:
            if "ctx" in state or (capture is not None and capture.replaying) or torch.compiler.is_compiling():
                return  # a forward inside the user's compiled region is not instrumented (no graph break)
            if in_transform() is not None:
                return  # a forward inside vmap / grad (torch.func): wrapper tensors, nothing to read

            state["eager"] = _eager()  # a compiled forward of the root runs eagerly under the watch
            state["ctx"] = loc.watch()
            state["ctx"].__enter__()
            loc._pre(module, args, kwargs)  # the watch's own pre-hook joins from the next call
            # registered after the watch's hooks, so it runs after them when this call ends
            state["leave"] = self.called.register_forward_hook(leave, always_call=True)

        def leave(module: nn.Module, args: Any, out: Any) -> None:
            if "ctx" not in state:
                return
            state.pop("leave").remove()
            outs = [t for t in _tensors(out) if t.is_floating_point()]
            state["out"] = outs[0] if outs else None
            if loss_code:
                state["over_loss_code"] = True  # on over the loss code and its backward
                return
            _end_window(state)

        state["handles"] = [self.called.register_forward_pre_hook(enter, with_kwargs=True)]
        state["loss_code"] = loss_code
        self._armed = (loc, state, step)

    def finish_armed(
        self, loss: Tensor | float | None, now: int, *, again: bool = True
    ) -> events.Event | None:
        """End the armed window; if the failure recurred, where it was born (``located_by="hooks"``).
        A window over the loss code whose failure did not recur is armed ``again`` for the next step
        while :data:`ARMED_STEPS` last."""
        if self._armed is None:
            return None
        loc, state, step = self._armed
        self._armed = None
        over_loss_code = bool(state.get("loss_code"))
        _end_window(state)  # (the model never ran, or its forward never left, or the loss code's window)
        target = loss if isinstance(loss, Tensor) else state.get("out")
        birth = loc.answer(target) if target is not None or loc.backward_birth is not None else None
        if birth is None:
            if again and over_loss_code and self._armed_left > 0:
                self._armed_left -= 1
                self.arm(step, loss_code=True)
            return None
        if (
            now > step + 1
        ):  # a window kept on (ARMED_STEPS): a later failure may be another one — its own step's
            return events.nonfinite(
                now,
                **birth.event(),
                located_by="hooks",
                note=f"step {step} failed without a way to replay it; the loss code has been watched since, and "
                f"step {now} failed under the watch",
            )
        return events.nonfinite(
            step,
            **birth.event(),
            located_by="hooks",
            seen_at_step=now,
            note=f"step {step} failed without a way to replay it; the failure recurred at step "
            f"{now}, whose forward ran instrumented",
        )


def _end_window(state: dict[str, Any]) -> None:
    """End an armed window, wherever it is: its hooks removed, the watch left, compiled code compiled again."""
    for h in state.pop("handles", ()):
        h.remove()
    if "leave" in state:
        state.pop("leave").remove()
    if "ctx" in state:
        state.pop("ctx").__exit__(None, None, None)
    if "eager" in state:
        state.pop("eager").__exit__(None, None, None)
    state.pop("over_loss_code", None)


def _eager() -> Any:
    """From now until its ``__exit__``: ``torch.compile``d code runs eagerly (a replay instruments the
    model with hooks and a dispatch mode, which a compiled forward would trace, break on, or fail
    on). Entered on the host only: never inside a compiled region."""
    return torch.compiler.set_stance("force_eager")


def _norms(rec: Mapping[str, Any]) -> tuple[int, float, dict[str, float]]:
    """A record's ``(step, global norm or NaN on a non-finite step, {layer: grad norm})`` (a layer
    without gradients that step, logged as null, is left out)."""
    layers = {
        n: norm
        for n, v in rec.get("layers", {}).items()
        if (norm := v.get("grad_norm", math.nan)) is not None
    }
    return rec["step"], rec["grad_norm"] if not rec["nonfinite"] else math.nan, layers


def _tensors(tree: Any) -> list[Tensor]:
    """The tensors in a module's output (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for x in tree for t in _tensors(x)]
    if isinstance(tree, dict):
        return [t for x in tree.values() for t in _tensors(x)]
    return []


class _Found:
    """A ready event (from the loss watch) that quacks like a :class:`gradguard.locate.Birth`."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.phase = fields["phase"]

    def event(self) -> dict[str, Any]:
        return dict(self.fields)
