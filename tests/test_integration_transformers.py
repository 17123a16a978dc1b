"""The Hugging Face integration against a real ``transformers.Trainer``.

A tiny randomly initialised GPT-2 built from a config (nothing is downloaded), CPU, two dozen steps,
a NaN or an inf injected at a known step.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gradguard import runlog  # noqa: E402
from gradguard.clip import Norm  # noqa: E402
from gradguard.errors import GradGuardError  # noqa: E402
from gradguard.integrations.transformers import (  # noqa: E402
    CHECKPOINT_FILE,
    GradGuardCallback,
    GradGuardTrainer,
)

STEPS = 24
BAD_STEP = 10


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def _data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 64, (16,), generator=g) for _ in range(32)]
    return [{"input_ids": r, "labels": r} for r in rows]


def _args(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        warmup_steps=4,
        lr_scheduler_type="linear",
        logging_steps=4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


class Recorder(TrainerCallback):
    """Weights and learning rate after every optimizer step (after the scheduler stepped)."""

    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []
        self.lrs: list[float] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.weights.append([p.detach().clone() for p in model.parameters()])
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))


def _nan_loss_at(trainer: Trainer, model: torch.nn.Module, step: int) -> None:
    def hook(module, inputs, out):
        if module.training and trainer.state.global_step == step:
            out.loss = out.loss * math.nan
        return out

    model.register_forward_hook(hook)


def _inf_grad_at(trainer: Trainer, model: GPT2LMHeadModel, step: int) -> None:
    weight = model.transformer.h[0].mlp.c_fc.weight
    weight.register_hook(lambda g: g + math.inf if trainer.state.global_step == step else g)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_nan_step_skipped_and_lr_schedule_holds(tmp_path, optim):
    model, rec = _model(), Recorder()
    trainer = GradGuardTrainer(
        model=model, args=_args(tmp_path, optim=optim), train_dataset=_data(), callbacks=[rec]
    )
    _nan_loss_at(trainer, model, BAD_STEP)
    trainer.train()
    assert trainer.guard is not None and trainer.guard.fused == (optim == "adamw_torch_fused")

    # the NaN step never happened: same weights, and the LR scheduler did not advance
    assert _same(rec.weights[BAD_STEP], rec.weights[BAD_STEP - 1])
    assert not _same(rec.weights[BAD_STEP + 1], rec.weights[BAD_STEP])
    assert rec.lrs[BAD_STEP] == rec.lrs[BAD_STEP - 1]
    assert rec.lrs[BAD_STEP + 1] < rec.lrs[BAD_STEP]  # linear decay goes on after it
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the plain schedule stepped 24 times; this one 23 (the lr_scheduler's own counter)
    assert trainer.lr_scheduler.scheduler.last_epoch == STEPS - 1

    # the schedule is that of a run that never took the bad step: the plain one, a step behind
    plain = Recorder()
    Trainer(
        model=_model(), args=_args(tmp_path / "plain", optim=optim), train_dataset=_data(), callbacks=[plain]
    ).train()
    assert rec.lrs == plain.lrs[:BAD_STEP] + plain.lrs[BAD_STEP - 1 : STEPS - 1]

    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logs) == STEPS // 4
    assert {"grad_norm", "grad_norm_clipped", "clip_rate", "skipped_steps"} <= logs[-1].keys()
    assert logs[-1]["skipped_steps"] == 1
    run = runlog.read_run(trainer.guard.run_dir)
    assert run.path.parent == tmp_path / "gradguard-runs"
    assert len(run.metrics) == STEPS
    first = run.first_event("nonfinite")
    # the hook on the model's output wrote the NaN (a NaN number the code multiplied in): the forward's,
    # at that op, not an unlocated loss
    assert (
        first is not None
        and first["step"] == BAD_STEP
        and (first["phase"], first["op"]) == ("forward", "mul")
    )
    assert run.meta["integration"] == "transformers.GradGuardTrainer"


def test_default_clip_is_max_grad_norm_and_logs_pre_and_post(tmp_path):
    trainer = GradGuardTrainer(model=_model(), args=_args(tmp_path, max_grad_norm=0.2), train_dataset=_data())
    assert trainer.args.max_grad_norm == 0.0  # the Trainer's own clipping is off
    trainer.train()
    assert isinstance(trainer.guard.clipper, Norm) and trainer.guard.clipper.max_norm == 0.2
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert all(h["grad_norm"] > 0.2 for h in logs)  # pre-clip
    assert all(h["grad_norm_clipped"] == pytest.approx(0.2, rel=1e-4) for h in logs)  # post-clip
    assert all(h["clip_rate"] == 1.0 for h in logs)


def test_inf_gradient_seen_as_inf_not_nan(tmp_path):
    """The Trainer's clip_grad_norm_ turns an inf gradient into NaN before a callback sees it."""
    model = _model()
    trainer = GradGuardTrainer(
        model=model, args=_args(tmp_path / "mixin", max_steps=6), train_dataset=_data()
    )
    _inf_grad_at(trainer, model, 3)
    trainer.train()
    event = runlog.read_run(trainer.guard.run_dir).first_event("nonfinite")
    assert event["step"] == 3 and event["kind"] == "inf" and event["layers"] == ["transformer.h.0.mlp.c_fc"]
    assert all(torch.isfinite(p).all() for p in model.parameters())

    model = _model()
    cb = GradGuardCallback()
    plain = Trainer(
        model=model, args=_args(tmp_path / "cb", max_steps=6), train_dataset=_data(), callbacks=[cb]
    )
    _inf_grad_at(plain, model, 3)
    plain.train()
    event = runlog.read_run(cb.guard.run_dir).first_event("nonfinite")
    assert event["step"] == 3 and event["kind"] == "nan"  # what clip_grad_norm_ made of the inf


def test_callback_only_monitors(tmp_path):
    plain, rec_plain = _model(), Recorder()
    Trainer(model=plain, args=_args(tmp_path / "a"), train_dataset=_data(), callbacks=[rec_plain]).train()
    watched, rec_watched, cb = _model(), Recorder(), GradGuardCallback(every=8)
    Trainer(
        model=watched, args=_args(tmp_path / "b"), train_dataset=_data(), callbacks=[rec_watched, cb]
    ).train()
    assert _same(rec_plain.weights[-1], rec_watched.weights[-1])  # the run did not change
    run = runlog.read_run(cb.guard.run_dir)
    assert len(run.metrics) == STEPS
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in run.metrics)  # from the model's output
    assert all(r["grad_norm"] <= 1.0 + 1e-4 for r in run.metrics)  # after the Trainer's max_grad_norm=1 clip
    assert "clip_grad_norm_(max_norm=1)" in run.meta["measured"]


def test_callback_logs_the_steps_loss_under_gradient_accumulation(tmp_path):
    """gradient_accumulation_steps=2: the Trainer passes the step's token count to the model
    (num_items_in_batch), so each micro-batch's loss is its share of the step's; the callback took their
    mean and logged half the loss (2.03 against the Trainer's 4.05), off by the accumulation for any rule
    that reads the loss's level (ln K)."""
    first = []
    for name, batch, steps in (("one", 8, 1), ("two", 4, 2)):
        cb = GradGuardCallback(every=1)
        args = _args(
            tmp_path / name, max_steps=2, per_device_train_batch_size=batch, gradient_accumulation_steps=steps
        )
        Trainer(model=_model(), args=args, train_dataset=_data(), callbacks=[cb]).train()
        first.append(runlog.read_run(cb.guard.run_dir).metrics[0]["loss"])
    assert first[1] == pytest.approx(first[0], rel=2e-3), first  # (dropout draws differ)


def test_resume_continues_the_guard_exactly(tmp_path):
    """train 24 steps saving at 12; a new trainer resumed from checkpoint-12 ends where the first did."""
    spec = {"clip": "zclip", "spike_z": 3.0}
    args = dict(save_strategy="steps", save_steps=12, max_steps=STEPS, max_grad_norm=0.0)
    straight = GradGuardTrainer(
        model=_model(), args=_args(tmp_path / "a", **args), train_dataset=_data(), gradguard=dict(spec)
    )
    straight.train()
    ckpt = tmp_path / "a" / "checkpoint-12"
    assert (ckpt / CHECKPOINT_FILE).is_file()

    resumed = GradGuardTrainer(
        model=_model(), args=_args(tmp_path / "a", **args), train_dataset=_data(), gradguard=dict(spec)
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    a, b = straight.guard.state_dict(), resumed.guard.state_dict()
    assert a["step_count"] == b["step_count"] == STEPS
    assert torch.equal(a["clipper"]["stats"], b["clipper"]["stats"])
    # 12 steps after the resume, fewer than ZClip's 25 warm-up steps: the statistics came from the checkpoint
    assert float(b["clipper"]["stats"][2]) == STEPS
    # the resumed run appended to the run log its checkpoint named: steps 12..23 again, the reader
    # keeps the latest record of each step (the first attempt's are superseded)
    assert resumed.guard.run_dir == straight.guard.run_dir
    run = runlog.read_run(resumed.guard.run_dir)
    assert len(run.metrics) + len(run.superseded) == STEPS + 12
    assert [r["step"] for r in run.metrics] == list(range(STEPS))


def test_configuration_is_checked(tmp_path):
    with pytest.warns(UserWarning, match=r"max_grad_norm=1 is not applied.*clip='auto'"):
        GradGuardTrainer(
            model=_model(), args=_args(tmp_path), train_dataset=_data(), gradguard={"clip": "auto"}
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradGuardTrainer(
            model=_model(),
            args=_args(tmp_path, max_grad_norm=0.0),
            train_dataset=_data(),
            gradguard={"clip": "auto"},
        )
    with pytest.raises(GradGuardError, match="clip spec"):
        GradGuardTrainer(
            model=_model(), args=_args(tmp_path), train_dataset=_data(), gradguard={"clip": "norm:x"}
        )
    with pytest.raises(GradGuardError, match=r"only monitors.*GradGuardTrainer"):
        GradGuardCallback(clip="norm:1")
    with pytest.raises(GradGuardError, match="'warn' or 'raise'"):
        GradGuardCallback(on_nonfinite="skip")
    # field test: "dictionary update sequence element #0 …" and Guard's bare TypeError at train()
    with pytest.raises(GradGuardError, match=r"gradguard= takes a dict .*got str 'skip'"):
        GradGuardTrainer(model=_model(), args=_args(tmp_path), train_dataset=_data(), gradguard="skip")
    with pytest.raises(
        GradGuardError, match=r"unknown gradguard option 'on_nonfinte' \(did you mean 'on_nonfinite'\?\)"
    ):
        GradGuardTrainer(
            model=_model(), args=_args(tmp_path), train_dataset=_data(), gradguard={"on_nonfinte": "skip"}
        )
    with pytest.raises(GradGuardError, match="unknown gradguard option 'evrey'"):
        GradGuardCallback(evrey=10)


class StepWatch(TrainerCallback):
    """What a user's callback and the optimizer's step hooks see, per optimizer step."""

    def __init__(self) -> None:
        self.pre_step_grads: list[int] = []  # parameters with a gradient in on_pre_optimizer_step
        self.post_step_grads: list[int] = []  # ... in on_optimizer_step
        self.fired: list[tuple[int, int]] = []  # (pre, post) step-hook calls so far, at each step end
        self.states: list[dict[str, torch.Tensor]] = []  # the first parameter's optimizer state
        self.weights: list[list[torch.Tensor]] = []
        self._calls = [0, 0]
        self._hooked = False

    def hook(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_pre_hook(lambda *a: self._count(0))
        optimizer.register_step_post_hook(lambda *a: self._count(1))
        self._hooked = True

    def _count(self, i: int) -> None:
        self._calls[i] += 1

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if not self._hooked:  # the optimizer the Trainer made (inside Accelerate's wrapper)
            self.hook(optimizer.optimizer)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.pre_step_grads.append(sum(p.grad is not None for p in model.parameters()))

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.post_step_grads.append(sum(p.grad is not None for p in model.parameters()))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.fired.append((self._calls[0], self._calls[1]))
        first = next(model.parameters())
        self.states.append({k: v.clone() for k, v in optimizer.optimizer.state[first].items()})
        self.weights.append([p.detach().clone() for p in model.parameters()])


@pytest.mark.parametrize("made_by", ["trainer", "user"])
@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_callbacks_see_gradients_and_step_hooks_fire_once(tmp_path, optim, made_by):
    """A user's on_pre_optimizer_step / on_optimizer_step see the step's gradients; the optimizer's
    step pre/post hooks fire once per step taken, never on a skipped one; a skipped step leaves
    parameters and optimizer state untouched."""
    model, watch = _model(), StepWatch()
    optimizers: tuple = (None, None)
    if made_by == "user":  # hooks registered before the Trainer sees the optimizer
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=optim.endswith("fused"))
        watch.hook(opt)
        optimizers = (opt, None)
    trainer = GradGuardTrainer(
        model=model,
        args=_args(tmp_path, optim=optim),
        train_dataset=_data(),
        callbacks=[watch],
        optimizers=optimizers,
    )
    _nan_loss_at(trainer, model, BAD_STEP)
    trainer.train()

    n_params = len(list(model.parameters()))
    skipped = [bool(r["skipped"]) for r in runlog.read_run(trainer.guard.run_dir).metrics]
    assert len(skipped) == len(watch.fired) == STEPS and skipped.count(True) == 1 and skipped[BAD_STEP]
    # every callback of every step, the skipped one too, saw the gradients
    assert watch.pre_step_grads == watch.post_step_grads == [n_params] * STEPS
    # the step hooks fired exactly once for each step taken
    fired = [(b[0] - a[0], b[1] - a[1]) for a, b in zip([(0, 0), *watch.fired], watch.fired)]
    assert fired == [(0, 0) if s else (1, 1) for s in skipped]
    assert watch.fired[-1] == (STEPS - 1, STEPS - 1)
    # the skipped step left the weights and AdamW's state (step, moments) as they were
    assert _same(watch.weights[BAD_STEP], watch.weights[BAD_STEP - 1])
    assert _same(list(watch.states[BAD_STEP].values()), list(watch.states[BAD_STEP - 1].values()))
    assert int(watch.states[-1]["step"]) == STEPS - 1


def test_callback_monitor_step_hooks_fire_once(tmp_path):
    watch, cb = StepWatch(), GradGuardCallback(every=8)
    Trainer(model=_model(), args=_args(tmp_path), train_dataset=_data(), callbacks=[watch, cb]).train()
    assert watch.fired[-1] == (STEPS, STEPS)
    assert len(runlog.read_run(cb.guard.run_dir).metrics) == STEPS


class _OwnOptimizer(GradGuardTrainer):
    """A subclass that makes its optimizer without ``super().create_optimizer()``: the gate comes later,
    after Accelerate's fp16 wrapper has taken hold of the optimizer's step."""

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        return self.optimizer


@pytest.mark.parametrize("trainer_cls", [GradGuardTrainer, _OwnOptimizer], ids=["gated-early", "gated-late"])
def test_skip_through_accelerate_grad_scaler(tmp_path, trainer_cls):
    """Under fp16 Accelerate steps through GradScaler.step with the step it captured at prepare();
    a step the guard skips (a NaN loss with finite gradients: no overflow for the scaler) is not taken."""
    model, watch = _model(), StepWatch()
    trainer = trainer_cls(
        model=model, args=_args(tmp_path, fp16=True), train_dataset=_data(), callbacks=[watch]
    )
    # Accelerate has no GradScaler on the CPU: give it the one it makes on a GPU
    trainer.accelerator.scaler, trainer.accelerator.native_amp = torch.amp.GradScaler("cpu"), True

    def nan_loss(module, inputs, out):
        if module.training and trainer.state.global_step == BAD_STEP:
            out.loss = out.loss + math.nan  # the loss is NaN, its gradients are not
        return out

    model.register_forward_hook(nan_loss)
    trainer.train()
    assert trainer.optimizer.scaler is trainer.accelerator.scaler  # Accelerate's fp16 wrapper stepped
    run = runlog.read_run(trainer.guard.run_dir)
    assert [r["step"] for r in run.metrics if r["skipped"]] == [BAD_STEP]
    assert max(r["grad_norm"] for r in run.metrics) < 100  # measured unscaled
    assert _same(watch.weights[BAD_STEP], watch.weights[BAD_STEP - 1])
    assert watch.fired[-1] == (STEPS - 1, STEPS - 1)
    assert trainer.accelerator.scaler.get_scale() == 2.0**16  # no overflow: the scale never dropped


def test_update_ratio_measures_the_trainers_step(tmp_path):
    trainer = GradGuardTrainer(
        model=_model(),
        args=_args(tmp_path, max_steps=6, warmup_steps=0),  # no warm-up: step 0 moves the weights too
        train_dataset=_data(),
        gradguard={"weight_every": 1},
    )
    trainer.train()
    metrics = runlog.read_run(trainer.guard.run_dir).metrics
    ratios = [r["layers"]["transformer.h.0.mlp.c_fc"]["update_ratio"] for r in metrics]
    assert len(ratios) == 6 and all(r > 0 for r in ratios), ratios
