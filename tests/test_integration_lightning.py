"""The Lightning callback against a real ``lightning.Trainer`` (CPU, tiny model, a few dozen steps)."""

from __future__ import annotations

import importlib.util
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402

from gradguard import runlog  # noqa: E402
from gradguard.diagnose import diagnose  # noqa: E402
from gradguard.diagnose.facts import Facts  # noqa: E402
from gradguard.errors import GradGuardError  # noqa: E402
from gradguard.integrations.lightning import GradGuard  # noqa: E402
from gradguard.runtable import clipped  # noqa: E402

NAN_STEP = 5
STEPS_PER_EPOCH = 8


@pytest.fixture(autouse=True)
def _quiet_and_single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared 2-core machine
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        yield
    torch.set_num_threads(threads)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(STEPS_PER_EPOCH * 4, 8, generator=g), torch.randn(STEPS_PER_EPOCH * 4, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


class Tiny(L.LightningModule):
    """8 → 16 → 1 MLP; a NaN loss at optimizer step ``nan_step``; keeps weights and Adam state after each batch."""

    def __init__(self, fused: bool = False, nan_step: int | None = NAN_STEP, manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.fused, self.nan_step = fused, nan_step
        self.automatic_optimization = not manual
        self.after: list[tuple[list[torch.Tensor], dict[str, torch.Tensor]]] = []

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.global_step == self.nan_step:
            loss = loss * math.nan
        return loss

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self._loss(batch)
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self._loss(batch))
        opt.step()
        return None

    def on_train_batch_end(self, *args) -> None:
        opt = self.optimizers().optimizer
        first = next(self.parameters())
        state = {k: v.clone() for k, v in opt.state[first].items()}
        self.after.append(([p.detach().clone() for p in self.parameters()], state))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1, fused=self.fused)


def _trainer(tmp_path, callbacks, max_epochs=2, **kw) -> L.Trainer:
    kw.setdefault("logger", CSVLogger(tmp_path / "logs"))
    return L.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kw,
    )


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _has_report() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("gradguard.report", "plotly"))


@pytest.mark.parametrize(
    ("fused", "precision", "manual"),
    [
        (False, "32-true", False),
        (True, "32-true", False),
        (True, "16-mixed", False),
        (False, "32-true", True),
    ],
    ids=["adamw", "fused", "fused-16mixed", "manual"],
)
def test_nan_step_is_skipped_bit_identical(tmp_path, fused, precision, manual):
    model = Tiny(fused=fused, manual=manual)
    cb = GradGuard(clip="norm:0.5", every=4)
    trainer = _trainer(tmp_path, [cb], precision=precision)
    trainer.fit(model, _data())

    assert trainer.global_step == 2 * STEPS_PER_EPOCH
    weights, state = zip(*model.after)
    # the step with the NaN loss never happened: weights and AdamW state (step, moments) unchanged
    assert _same(weights[NAN_STEP], weights[NAN_STEP - 1])
    assert _same(list(state[NAN_STEP].values()), list(state[NAN_STEP - 1].values()))
    assert int(state[NAN_STEP]["step"]) == NAN_STEP
    # every other step moved the weights
    assert not _same(weights[NAN_STEP + 1], weights[NAN_STEP])
    assert all(torch.isfinite(w).all() for w in weights[-1])

    run = runlog.read_run(cb.run_dir)
    assert len(run.metrics) == 2 * STEPS_PER_EPOCH
    first = run.first_event("nonfinite")
    assert first is not None and first["step"] == NAN_STEP and first["kind"] == "nan"
    assert [e["step"] for e in run.events_of("skip")] == [NAN_STEP]
    assert cb.run_dir.parent == tmp_path / "logs" / "lightning_logs" / "version_0"
    if _has_report():  # the report extra is installed: the fit ends with report.html
        assert (cb.run_dir / "report.html").is_file()
    # the same numbers went to the module's logger (CSVLogger) at the flush cadence
    header = (cb.run_dir.parent / "metrics.csv").read_text().splitlines()[0]
    assert "gradguard/grad_norm" in header and "gradguard/clip_rate" in header


class Scheduled(Tiny):
    """Tiny with an LR decayed linearly every step; records the LR each step uses."""

    def __init__(self, nan_step: int | None = NAN_STEP) -> None:
        super().__init__(nan_step=nan_step)
        self.lrs: list[float] = []

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.lrs.append(self.optimizers().param_groups[0]["lr"])

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 64)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def test_a_skipped_step_does_not_advance_the_lr_schedule(tmp_path):
    """Lightning steps its scheduler after every batch; after the skipped step the callback holds it:
    the LR is the plain run's one step behind, the schedule of a run that never took that step."""
    plain = Scheduled(nan_step=None)
    _trainer(tmp_path / "plain", []).fit(plain, _data())
    guarded = Scheduled()
    trainer = _trainer(tmp_path / "guarded", [GradGuard(clip="none", every=4)])
    trainer.fit(guarded, _data())
    assert len(plain.lrs) == len(guarded.lrs) == 2 * STEPS_PER_EPOCH
    assert guarded.lrs == plain.lrs[: NAN_STEP + 1] + plain.lrs[NAN_STEP:-1]
    assert guarded.lrs[NAN_STEP + 1] == guarded.lrs[NAN_STEP] > plain.lrs[NAN_STEP + 1]
    # nothing of gradguard stays in the Trainer: its scheduler is the module's own again
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert (
        type(scheduler) is torch.optim.lr_scheduler.LambdaLR
        and scheduler.last_epoch == 2 * STEPS_PER_EPOCH - 1
    )


def test_clipping_matches_norm_and_logs_post_clip(tmp_path):
    model = Tiny(nan_step=None)
    cb = GradGuard(clip="norm:0.05", every=16)
    _trainer(tmp_path, [cb], max_epochs=1).fit(model, _data())
    run = runlog.read_run(cb.run_dir)
    clipped = [r for r in run.metrics if r["clip_coef"] < 1]
    assert clipped, "threshold 0.05 should clip this model's gradients"
    for r in clipped:
        assert r["grad_norm"] * r["clip_coef"] <= 0.05 * (1 + 1e-5)


def test_refuses_to_clip_twice(tmp_path):
    trainer = _trainer(tmp_path, [GradGuard()], gradient_clip_val=1.0)
    with pytest.raises(GradGuardError, match=r"gradient_clip_val=1\.0.*monitor_only=True"):
        trainer.fit(Tiny(), _data())


def test_an_unknown_guard_option_is_refused_when_the_callback_is_built():
    """GradGuard(spike={...}) was taken silently and failed as Guard's bare TypeError when fit started."""
    with pytest.raises(
        GradGuardError, match=r"GradGuard: unknown gradguard option 'spike'.*; the options are .*on_spike, "
    ):
        GradGuard(spike={"version": 1})
    with pytest.raises(
        GradGuardError, match=r"unknown gradguard option 'spike_zz' \(did you mean 'spike_z'\?\)"
    ):
        GradGuard(spike_zz=3.0)
    with pytest.raises(GradGuardError, match=r"GradGuard sets 'optimizer' itself"):
        GradGuard(optimizer=None)


def test_a_second_gradguard_in_one_trainer_is_refused_with_gradguards_reason(tmp_path):
    """Two GradGuard callbacks ended in Lightning's own error about a duplicate callback.state_key."""
    guard = GradGuard()
    for callbacks in ([GradGuard(), GradGuard()], [guard, guard]):
        with pytest.raises(
            GradGuardError, match=r"the Trainer has 2 GradGuard callbacks; one GradGuard guards every"
        ):
            _trainer(tmp_path, callbacks)
    trainer = _trainer(tmp_path, [GradGuard()], max_epochs=1)
    trainer.callbacks.append(GradGuard())  # after Lightning's check of the callbacks: refused when fit starts
    with pytest.raises(GradGuardError, match=r"the Trainer has 2 GradGuard callbacks"):
        trainer.fit(Tiny(nan_step=None), _data())
    assert GradGuard().state_key == "GradGuard"  # the checkpoint key stays Lightning's default


class ClipsByHand(Tiny):
    """Manual optimization that clips in its training_step, as Lightning's GAN examples do."""

    clip_val = 5.0

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self._loss(batch))
        self.clip_gradients(opt, gradient_clip_val=self.clip_val, gradient_clip_algorithm="norm")
        opt.step()
        return None


def test_manual_optimization_that_clips_by_hand_is_refused_not_clipped_twice(tmp_path):
    """GradGuard()'s default clip="auto" clipped on top of the module's self.clip_gradients(opt, 5.0), silently
    (the automatic path refuses Trainer(gradient_clip_val=...))."""
    trainer = _trainer(tmp_path, [GradGuard()], max_epochs=1)
    with pytest.raises(GradGuardError, match=r"gradient_clip_val=5\.0.*GradGuard\(clip='norm:5'\)"):
        trainer.fit(ClipsByHand(manual=True, nan_step=None), _data())
    measured = ClipsByHand(manual=True, nan_step=None)
    _trainer(tmp_path / "m", [GradGuard(monitor_only=True)], max_epochs=1).fit(measured, _data())
    assert measured.after and "clip_gradients" not in measured.__dict__  # trained; the module left as it was


class ClipsTight(ClipsByHand):
    """Manual optimization whose own clip binds on most steps (0.05)."""

    clip_val = 0.05


def test_monitoring_manual_optimization_that_clips_by_hand_logs_the_norms_before_its_clip(tmp_path):
    """``on_before_optimizer_step`` runs inside ``opt.step()``, after the module's ``self.clip_gradients``: the
    log held the clipped norms (none above the threshold) with each clip's coefficient on the row before."""
    callback = GradGuard(monitor_only=True)
    module = ClipsTight(manual=True, nan_step=None)
    _trainer(tmp_path, [callback], max_epochs=1).fit(module, _data())
    rows = [r for r in runlog.read_run(callback.run_dir).metrics if r["threshold"] == pytest.approx(0.05)]
    assert len(rows) == STEPS_PER_EPOCH and "clip_gradients" not in module.__dict__
    clipped = [r for r in rows if r["clip_coef"] < 1]
    assert clipped and max(r["grad_norm"] for r in rows) > 0.05  # the norms before the clip
    assert all(r["grad_norm"] * r["clip_coef"] == pytest.approx(0.05, rel=1e-4) for r in clipped)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_refusing_to_clip_twice_names_the_clip_spec_that_does_what_lightning_did(tmp_path, algorithm):
    trainer = _trainer(tmp_path, [GradGuard()], gradient_clip_val=0.5, gradient_clip_algorithm=algorithm)
    with pytest.raises(GradGuardError, match=rf"GradGuard\(clip='{algorithm}:0.5'\) does what Lightning did"):
        trainer.fit(Tiny(), _data())


def test_detect_anomaly_stopping_the_fit_still_logs_the_step_it_stopped_at(tmp_path):
    """Trainer(detect_anomaly=True) raises in the NaN step's backward, before the optimizer step the
    callback measures: the log had only the healthy steps and diagnose said "No findings". The
    stopped step's forward is now located and logged (as at the end of a plain script), and the
    run's meta says how it ended."""

    class NanBatch(Tiny):
        def _loss(self, batch):
            x, y = batch
            if self.global_step == NAN_STEP:
                x = x.clone()
                x[0, 0] = math.nan  # a bad sample
            return nn.functional.mse_loss(self.net(x), y)

    cb = GradGuard(on_nonfinite="skip")
    with pytest.raises(RuntimeError, match="returned nan"):
        _trainer(tmp_path, [cb], detect_anomaly=True).fit(NanBatch(), _data())
    run = runlog.read_run(cb.run_dir)
    assert len(run.metrics) == NAN_STEP  # the healthy steps before it
    event = run.first_nonfinite()
    assert event is not None and (event["step"], event["phase"]) == (NAN_STEP, "data"), event
    assert run.meta["ended_by"].startswith("RuntimeError")
    found = {f.id for f in diagnose(cb.run_dir)}
    assert {"bad_data", "incomplete_log"} <= found, found


def test_fast_dev_run_twice_writes_two_runs(tmp_path, monkeypatch):
    """fast_dev_run puts in a DummyLogger whose folder is the same on every run: the second run
    found the first one's log there and refused to start."""
    monkeypatch.chdir(tmp_path)
    dirs = []
    for _ in range(2):
        cb = GradGuard()
        L.Trainer(fast_dev_run=3, callbacks=[cb], accelerator="cpu", enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path).fit(Tiny(nan_step=None), _data())  # fmt: skip
        dirs.append(cb.run_dir)
    assert dirs[0] != dirs[1] and all(len(runlog.read_run(d).metrics) == 3 for d in dirs)


@pytest.mark.parametrize("how", ["monitor_only", "clip_none"])
def test_monitor_only_leaves_training_unchanged(tmp_path, how):
    """Lightning clips and steps; gradguard measures the pre-clip norm and changes nothing. With
    clip="none" (gradguard guards, Lightning clips) the log said "clipping none (clip rate 0)" while
    Lightning clipped most steps."""
    plain = Tiny(nan_step=None)
    _trainer(tmp_path / "a", [], gradient_clip_val=0.05, max_epochs=1).fit(plain, _data())
    watched = Tiny(nan_step=None)
    cb = GradGuard(monitor_only=True, every=4) if how == "monitor_only" else GradGuard(clip="none", every=4)
    _trainer(tmp_path / "b", [cb], gradient_clip_val=0.05, max_epochs=1).fit(watched, _data())
    assert _same(plain.after[-1][0], watched.after[-1][0])
    run = runlog.read_run(cb.run_dir)
    assert max(r["grad_norm"] for r in run.metrics) > 0.05  # pre-clip norms: Lightning clipped after
    ratios = [
        v["update_ratio"] for r in run.metrics for v in r.get("layers", {}).values() if "update_ratio" in v
    ]
    assert ratios and min(ratios) > 0  # measured after Lightning's own step, not before it
    # Lightning's clip is the run's clipper in the log (as under `gradguard run`): its threshold,
    # and a coefficient that is torch's min(1, 0.05 / (norm + 1e-6)) of the pre-clip norm
    assert all(r["threshold"] == pytest.approx(0.05) for r in run.metrics)
    for r in run.metrics:
        assert r["clip_coef"] == pytest.approx(min(1.0, 0.05 / (r["grad_norm"] + 1e-6)), rel=1e-5)
    assert Facts(run).clip_kind == "fixed" and any(clipped(r) for r in run.metrics)
    with pytest.raises(GradGuardError, match=r"monitor_only=True\) only measures"):
        GradGuard(monitor_only=True, clip="norm:1")
    with pytest.raises(GradGuardError, match="'warn' or 'raise'"):
        GradGuard(monitor_only=True, on_nonfinite="skip")


def test_fused_16mixed_clip_where_lightning_refuses(tmp_path):
    """Lightning refuses gradient_clip_val for a fused optimizer under AMP; the callback clips it."""
    trainer = _trainer(tmp_path / "lightning", [], gradient_clip_val=0.05, precision="16-mixed", max_epochs=1)
    with pytest.raises(RuntimeError, match="fused"):
        trainer.fit(Tiny(fused=True, nan_step=None), _data())
    cb = GradGuard(clip="norm:0.05", every=4)
    _trainer(tmp_path / "gg", [cb], precision="16-mixed", max_epochs=1).fit(
        Tiny(fused=True, nan_step=None), _data()
    )
    run = runlog.read_run(cb.run_dir)
    assert sum(r["clip_coef"] < 1 for r in run.metrics) > 0


def test_checkpoint_resume_continues_exactly(tmp_path):
    """fit 1 epoch → checkpoint → new Trainer and callback resume to 3 epochs == 3 epochs straight."""
    spec = dict(clip="zclip", every=5, spike_z=3.0)
    straight = Tiny(nan_step=None)
    cb_straight = GradGuard(**spec)
    _trainer(tmp_path / "straight", [cb_straight], max_epochs=4).fit(straight, _data())

    first = Tiny(nan_step=None)
    trainer = _trainer(tmp_path / "first", [GradGuard(**spec)], max_epochs=1)
    trainer.fit(first, _data())
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"]
    assert any(k.startswith("GradGuard") for k in saved)

    resumed = Tiny(nan_step=None)
    cb_resumed = GradGuard(**spec)
    _trainer(tmp_path / "resumed", [cb_resumed], max_epochs=4).fit(resumed, _data(), ckpt_path=ckpt)

    assert _same(resumed.after[-1][0], straight.after[-1][0])
    a, b = cb_straight.state_dict()["guards"][0], cb_resumed.state_dict()["guards"][0]
    assert a["step_count"] == b["step_count"] == 4 * STEPS_PER_EPOCH
    assert a["clipper"].keys() == b["clipper"].keys()
    for key, value in a["clipper"].items():  # the ZClip statistics continued, not restarted
        other = b["clipper"][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    # the resumed fit took 24 steps, fewer than ZClip's 25 warm-up steps: a restarted clipper would
    # still be warming up; this one counts the 8 steps before the checkpoint too
    assert float(b["clipper"]["stats"][2]) == 25


class Watched(Tiny):
    """Tiny, plus what the step's later hooks see: the module's own ``on_before_optimizer_step``
    (Lightning's ``grad_norm`` logging recipe) and step pre/post hooks on the optimizer."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.seen: list[dict[str, torch.Tensor]] = []  # grad_norm(self) in on_before_optimizer_step, per step
        self.fired: list[tuple[int, int]] = []  # (pre, post) hook calls so far, after each batch
        self._calls = [0, 0]

    def on_before_optimizer_step(self, optimizer) -> None:
        self.seen.append(grad_norm(self, norm_type=2))

    def on_train_batch_end(self, *args) -> None:
        super().on_train_batch_end(*args)
        self.fired.append((self._calls[0], self._calls[1]))

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        opt.register_step_pre_hook(lambda *a: self._count(0))
        opt.register_step_post_hook(lambda *a: self._count(1))
        return opt

    def _count(self, i: int) -> None:
        self._calls[i] += 1


def _fp16_scaler() -> dict:
    """A real fp16 GradScaler on the CPU (Lightning's own "16-mixed" turns into bf16 there)."""
    return {"plugins": [MixedPrecision("16-mixed", "cpu")]}


@pytest.mark.parametrize(
    ("fused", "manual", "amp"),
    [(False, False, {}), (True, False, {}), (False, True, {}), (False, False, "fp16"), (True, False, "fp16")],
    ids=["adamw", "fused", "manual", "adamw-fp16-scaler", "fused-fp16-scaler"],
)
def test_later_hooks_see_the_step_and_step_hooks_fire_once(tmp_path, fused, manual, amp):
    """The module's on_before_optimizer_step sees the (unscaled, clipped) gradients the optimizer
    steps with; the optimizer's step pre/post hooks fire once per step taken, never on a skipped one;
    a skipped step leaves parameters and optimizer state untouched."""
    model = Watched(fused=fused, manual=manual)
    cb = GradGuard(clip="norm:0.5", every=4)
    trainer = _trainer(tmp_path, [cb], **(_fp16_scaler() if amp else {}))
    trainer.fit(model, _data())

    steps = 2 * STEPS_PER_EPOCH
    run = runlog.read_run(cb.run_dir)
    skipped = [bool(r["skipped"]) for r in run.metrics]
    assert len(skipped) == len(model.seen) == len(model.fired) == trainer.global_step == steps
    assert skipped[NAN_STEP]
    # the hooks fired exactly once for each step taken
    fired = [(b[0] - a[0], b[1] - a[1]) for a, b in zip([(0, 0), *model.fired], model.fired)]
    assert fired == [(0, 0) if s else (1, 1) for s in skipped]
    assert model.fired[-1] == (steps - sum(skipped),) * 2
    # the module's own hook saw this step's gradients: the norm the optimizer stepped with (unscaled)
    for i, (norms, rec) in enumerate(zip(model.seen, run.metrics)):
        assert norms, f"step {i}: the module's on_before_optimizer_step saw no gradients"
        if not rec["skipped"]:
            total = float(norms["grad_2.0_norm_total"])
            assert total == pytest.approx(rec["grad_norm"] * rec["clip_coef"], rel=1e-3, abs=1e-6), i
    # every skipped step left the weights and the optimizer state (AdamW's step and moments) as they were
    weights, state = zip(*model.after)
    for i in (i for i, s in enumerate(skipped) if s and i > 0):
        assert _same(weights[i], weights[i - 1]), i
        assert _same(list(state[i].values()), list(state[i - 1].values())), i
    assert int(state[-1]["step"]) == steps - sum(skipped)


def test_monitor_only_step_hooks_fire_once(tmp_path):
    model = Watched(nan_step=None)
    cb = GradGuard(monitor_only=True, every=4)
    _trainer(tmp_path, [cb], gradient_clip_val=0.05, max_epochs=1).fit(model, _data())
    assert model.fired[-1] == (STEPS_PER_EPOCH, STEPS_PER_EPOCH)
    assert all(model.seen)
    assert len(runlog.read_run(cb.run_dir).metrics) == STEPS_PER_EPOCH


def test_update_ratio_measures_the_frameworks_step(tmp_path):
    cb = GradGuard(clip="norm:0.5", every=4, weight_every=1)
    _trainer(tmp_path, [cb], max_epochs=1).fit(Tiny(nan_step=None), _data())
    ratios = [r["layers"]["net.0"]["update_ratio"] for r in runlog.read_run(cb.run_dir).metrics]
    assert len(ratios) == STEPS_PER_EPOCH and all(r > 0 for r in ratios), ratios


class GAN(L.LightningModule):
    """A GAN the way Lightning's examples write one: manual optimization, the discriminator's step
    then the generator's; the generator's loss (optimizer 0) is NaN at batch ``nan_batch``."""

    def __init__(self, nan_batch: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.nan_batch = nan_batch
        self.G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.D = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        real = torch.cat(batch, dim=1)[:, :8]
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 4)
        fake = self.G(z).detach()
        loss_d = nn.functional.softplus(-self.D(real)).mean() + nn.functional.softplus(self.D(fake)).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        loss_g = nn.functional.softplus(-self.D(self.G(z))).mean()
        if batch_idx == self.nan_batch:
            loss_g = loss_g * math.nan
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()

    def configure_optimizers(self):
        return [
            torch.optim.Adam(self.G.parameters(), lr=1e-3),
            torch.optim.Adam(self.D.parameters(), lr=1e-3),
        ]


class ClipsTheCritic(GAN):
    """The GAN clipping its discriminator's gradients only (before ``opt_d.step()``)."""

    def training_step(self, batch, batch_idx):
        real = torch.cat(batch, dim=1)[:, :8]
        _, opt_d = self.optimizers()
        loss_d = nn.functional.softplus(-self.D(real)).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        self.clip_gradients(opt_d, gradient_clip_val=1.0)
        opt_d.step()


def test_refusing_a_manual_clip_of_one_optimizer_of_several_says_gradguard_would_clip_them_all(tmp_path):
    """ "GradGuard(clip='norm:1') does what it did" — but it clips the generator's steps too."""
    with pytest.raises(GradGuardError, match=r"it clips all 2 optimizers' steps, where the call clipped one"):
        _trainer(tmp_path, [GradGuard(clip="norm:1")], max_epochs=1).fit(ClipsTheCritic(), _data())


def test_several_optimizers_are_one_run_that_diagnose_reads_whole(tmp_path):
    """The layout of ``gradguard run``: the first optimizer's log in the run directory, the others'
    in its optimizer<k>/, global steps in every record: diagnose on ``run_dir`` names the
    generator (optimizer 0), which failed, not the newest run (the discriminator's)."""
    from gradguard.diagnose import diagnose, first_nonfinite

    cb = GradGuard(clip="none", every=4)
    _trainer(tmp_path, [cb], max_epochs=1).fit(GAN(nan_batch=5), _data())

    root = cb.run_dir
    run = runlog.read_run(root)
    assert run.meta["children"] == ["optimizer1"]
    assert run.meta["optimizer"] == {"index": 0, "class": "Adam", "params": "GAN.G"}
    assert runlog.read_run(root / "optimizer1").meta["optimizer"]["params"] == "GAN.D"
    # the discriminator steps first: global steps 0, 2, 4, … are its, 1, 3, 5, … the generator's
    assert [r["global_step"] for r in run.metrics] == list(range(1, 2 * STEPS_PER_EPOCH, 2))
    first = first_nonfinite(root)
    assert first is not None and first["step"] == 5 and first["global_step"] == 11
    top = diagnose(root, write=False)[0]  # a lone NaN loss: a warning, the failing optimizer's first
    assert top.step == 5 and "(optimizer 0), global step 11" in top.message, top.message


class NetOnly(Tiny):
    """``training_step`` calls ``self.net(x)``; the LightningModule defines no ``forward``."""


def test_a_nan_in_the_batch_is_located_in_the_data_when_training_step_calls_a_submodule(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(STEPS_PER_EPOCH * 4, 8, generator=g), torch.randn(STEPS_PER_EPOCH * 4, 1, generator=g)
    x[3 * 4 + 1, 2] = math.nan  # a NaN in batch 3
    cb = GradGuard(clip="none", every=4)
    _trainer(tmp_path, [cb], max_epochs=1).fit(
        NetOnly(nan_step=None), DataLoader(TensorDataset(x, y), batch_size=4)
    )

    first = runlog.read_run(cb.run_dir).first_nonfinite()
    assert first is not None and first["step"] == 3
    assert (first["phase"], first["tensor"], first["located_by"]) == ("data", "input", "replay")
