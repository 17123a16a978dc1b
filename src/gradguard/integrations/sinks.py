"""TensorBoard and Weights & Biases sinks: copies of the guard's records, at its flush cadence.

A sink is a callable that receives the host records of each flush; :func:`attach` connects it to a
:class:`~gradguard.Guard`. Values leave the device only when the guard flushes (every ``every``
steps), so a sink costs no host sync. The run directory stays the source of truth: a sink writes
what the run log already holds, as dashboard scalars.

Per step, under ``prefix`` (``"gradguard/"``): ``loss``, ``grad_norm`` (pre-clip), ``grad_norm_clipped``
(what the optimizer stepped with), ``clip_coef``, ``threshold``, ``lr``, the flags ``skipped``,
``nonfinite``, ``spike``, ``amp_overflow`` (0/1) and, with ``layers=True``,
``layers/<name>/grad_norm`` (and ``weight_norm`` / ``update_ratio`` on the steps that measure them).
Per flush: ``clip_rate`` (fraction of the steps taken that norm clipping scaled down) and
``skipped_steps`` (running total). TensorBoard and W&B drop NaN/inf points from their plots: the
``nonfinite`` flag still shows where they were.

Example:
    >>> import torch, gradguard, tempfile
    >>> from gradguard.integrations.sinks import TensorBoardSink, attach
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> guard = gradguard.Guard(model, opt, clip="norm:1", every=10)
    >>> sink = TensorBoardSink(tempfile.mkdtemp())
    >>> handle = attach(guard, sink)
    >>> for _ in range(20):
    ...     opt.zero_grad(set_to_none=True)
    ...     loss = model(torch.randn(8, 4)).pow(2).mean()
    ...     loss.backward()
    ...     _ = guard.step(loss)
    >>> guard.close(); sink.close()
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from gradguard.errors import GradGuardError
from gradguard.guard import Guard
from gradguard.integrations._common import ListenerHandle, add_flush_listener, clip_rate, scalars_of

__all__ = ["Sink", "TensorBoardSink", "WandbSink", "attach"]


class Sink:
    """Base class: ``sink(records)`` at each flush; :meth:`close` at the end.

    Subclasses implement :meth:`write` (``(name, value)`` pairs of one step) and may override
    :meth:`close`.
    """

    def __init__(self, *, prefix: str = "gradguard/", layers: bool = True) -> None:
        self.prefix = prefix
        self.layers = layers
        self.skipped_steps = 0

    def __call__(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        for rec in records:
            self.write(rec["step"], [(self.prefix + k, v) for k, v in scalars_of(rec, layers=self.layers)])
        self.skipped_steps += sum(bool(r.get("skipped")) for r in records)
        summary = [(self.prefix + "skipped_steps", float(self.skipped_steps))]
        rate = clip_rate(records)
        if rate == rate:  # not NaN: some step was taken
            summary.append((self.prefix + "clip_rate", rate))
        self.write(records[-1]["step"], summary)

    def write(self, step: int, scalars: Sequence[tuple[str, float]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release what the sink holds."""


class TensorBoardSink(Sink):
    """Scalars for TensorBoard, through :class:`torch.utils.tensorboard.SummaryWriter`.

    Args:
        log_dir: the TensorBoard directory (``tensorboard --logdir`` it), or pass ``writer``.
        writer: an existing ``SummaryWriter`` (yours, or a framework's); the sink does not close it.
        prefix: the tag prefix.
        layers: also write per-layer norms.

    Needs ``pip install "gradguard[tensorboard]"``.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        writer: Any = None,
        prefix: str = "gradguard/",
        layers: bool = True,
    ) -> None:
        super().__init__(prefix=prefix, layers=layers)
        if (log_dir is None) == (writer is None):
            raise GradGuardError(
                "TensorBoardSink needs exactly one of log_dir (a directory) or writer (a SummaryWriter); "
                f"got log_dir={log_dir!r}, writer={writer!r}."
            )
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise GradGuardError(
                    'TensorBoardSink needs the tensorboard package: pip install "gradguard[tensorboard]".'
                ) from e
            writer = SummaryWriter(log_dir=os.fspath(log_dir))  # type: ignore[arg-type]
            self._owned = True
        else:
            self._owned = False
        self.writer = writer

    def write(self, step: int, scalars: Sequence[tuple[str, float]]) -> None:
        for name, value in scalars:
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        if self._owned:
            self.writer.close()


class WandbSink(Sink):
    """Scalars for Weights & Biases, on their own x-axis ``<prefix>step`` (the guard's step).

    Logging on a custom step metric (``wandb.define_metric``) keeps W&B's own step counter free
    for the user's and the frameworks' logging, which W&B requires to only increase.

    Args:
        run: a ``wandb`` run; ``None``: the active run (``wandb.run``), or a new one from
            ``wandb.init(**init_kwargs)`` (then the sink finishes it in :meth:`close`).
        prefix: the key prefix.
        layers: also log per-layer norms.
        init_kwargs: passed to ``wandb.init`` when a run is created (e.g. ``project=...``,
            ``mode="offline"``, ``dir=...``).

    Needs ``pip install "gradguard[wandb]"``.
    """

    def __init__(
        self, run: Any = None, *, prefix: str = "gradguard/", layers: bool = True, **init_kwargs: Any
    ):
        super().__init__(prefix=prefix, layers=layers)
        try:
            import wandb
        except ImportError as e:
            raise GradGuardError('WandbSink needs the wandb package: pip install "gradguard[wandb]".') from e
        self._owned = False
        if run is None:
            run = wandb.run
        if run is None:
            run = wandb.init(**init_kwargs)
            self._owned = True
        elif init_kwargs:
            raise GradGuardError(
                f"WandbSink got init arguments {sorted(init_kwargs)} but also a run to log to; pass one or the other."
            )
        self.run = run
        self.step_key = prefix + "step"
        run.define_metric(self.step_key)
        run.define_metric(prefix + "*", step_metric=self.step_key)

    def write(self, step: int, scalars: Sequence[tuple[str, float]]) -> None:
        self.run.log({self.step_key: step, **dict(scalars)})

    def close(self) -> None:
        if self._owned:
            self.run.finish()


def attach(guard: Guard, *sinks: Any) -> list[ListenerHandle]:
    """Send the records of every flush of ``guard`` to each sink (any callable taking the records).

    Returns:
        One handle per sink; ``handle.remove()`` detaches it. Close the sinks yourself after
        ``guard.close()`` (which makes the last flush).
    """
    if not sinks:
        raise GradGuardError(
            "attach(guard, *sinks) needs at least one sink, e.g. TensorBoardSink('runs/tb')."
        )
    return [add_flush_listener(guard, sink) for sink in sinks]
