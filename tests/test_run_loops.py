"""``gradguard run`` on every loop shape: a hand-written update (measured and located, never skipped),
an LBFGS closure (a bad evaluation ends the step with the weights as they were), two optimizers
(each step logs its own loss)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli_runs import ENV, gradguard_run, plain_run
from gradguard.runlog import read_run

HERE = Path(__file__).parent


def _run(tmp_path: Path, script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return gradguard_run(tmp_path, script, *args)


def _plain(tmp_path: Path, script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return plain_run(tmp_path, script, *args)


MANUAL = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    for step in range(8):
        x, y = torch.randn(32, 4), torch.randn(32, 1)
        if step == 3:
            x[5, 1] = float("nan")  # a missing value in the batch
        model.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-0.1)
        print(f"step {step} loss {loss.item():.6f}")
    """
)


def test_a_hand_written_update_is_measured_and_located_but_not_skipped(tmp_path: Path) -> None:
    script = tmp_path / "manual.py"
    script.write_text(MANUAL)
    ref, got = _plain(tmp_path, script), _run(tmp_path, script)
    assert got.returncode == ref.returncode == 0, got.stderr
    assert got.stdout == ref.stdout  # nothing skipped: the NaN reaches the weights, as without gradguard
    assert got.stderr.count("are updated by hand") == 1 and "cannot skip" in got.stderr
    assert "step 3 of model (Sequential) (updated by hand) is not finite" in got.stderr
    log = read_run(tmp_path / "run")
    assert [r["step"] for r in log.metrics] == list(range(8))
    assert log.metrics[2]["loss"] > 0 and not log.metrics[2]["nonfinite"]
    first = log.first_nonfinite()
    assert first is not None and first["step"] == 3 and first["phase"] == "data", first


def test_a_word_lm_hand_update_is_located_at_the_step_its_nan_appears(tmp_path: Path) -> None:
    """word_lm.py (``p.data.add_(p.grad, alpha=-lr)``): batch 5 has every target padded, a 0/0 mean
    loss. The hand-updated model's monitor-only guard locates it at that step, on stderr at once."""
    for name in ("word_lm.py", "word_lm_model.py"):
        (tmp_path / name).write_text((HERE / "run_scripts" / name).read_text())
    args = ("--nan-at", "5", "--epochs", "1")
    ref, got = (
        _plain(tmp_path, tmp_path / "word_lm.py", *args),
        _run(tmp_path, tmp_path / "word_lm.py", *args),
    )
    assert got.returncode == ref.returncode == 0, got.stderr
    assert got.stdout == ref.stdout  # measured only: every update is the script's
    live = "step 5 of RNNModel (updated by hand) is not finite (phase=loss, op=nll_loss"
    assert live in got.stderr, got.stderr
    first = read_run(tmp_path / "run").first_nonfinite()
    assert first is not None and first["step"] == 5, first
    assert (first["phase"], first["op"], first["located_by"]) == ("loss", "nll_loss", "watch"), first
    lines = (tmp_path / "word_lm.py").read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.strip() == "loss = criterion(output, targets)")
    assert first["global_step"] == 5 and first["source"].endswith(f"word_lm.py:{line}"), first
    assert "ignore_index" in first["evidence"]["reason"]


LBFGS = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    for step in range(5):
        batch = x.clone()
        if step == 2:
            batch[0, 0] = float("nan")

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(batch), y)
            loss.backward()
            return loss

        opt.step(closure)
        print(f"step {step} weight {model.weight.sum().item():.6f}")
    """
)


def test_an_lbfgs_step_whose_closure_is_not_finite_leaves_the_weights(tmp_path: Path) -> None:
    script = tmp_path / "lbfgs.py"
    script.write_text(LBFGS)
    ref, got = _plain(tmp_path, script), _run(tmp_path, script)
    assert got.returncode == 0, got.stderr
    weights = [line.split()[-1] for line in got.stdout.splitlines()]
    assert ref.stdout.splitlines()[:2] == got.stdout.splitlines()[:2]  # the same up to the bad step
    assert "nan" in ref.stdout.splitlines()[2]  # plain: the NaN reaches the weights
    assert weights[2] == weights[1] and "nan" not in got.stdout  # guarded: step 2 changed nothing
    log = read_run(tmp_path / "run")
    assert [r["skipped"] for r in log.metrics] == [False, False, True, False, False]
    assert all(r["loss"] > 0 for i, r in enumerate(log.metrics) if i != 2)
    first = log.first_nonfinite()
    assert first is not None and first["step"] == 2 and first["phase"] == "data", first


def test_two_optimizers_each_log_their_own_steps_loss(tmp_path: Path) -> None:
    got = _run(tmp_path, HERE / "run_scripts" / "toy_gan.py", "--niter", "1")
    assert got.returncode == 0, got.stderr
    printed = re.findall(r"Loss_D: (\S+) Loss_G: (\S+)", got.stdout)
    d_log, g_log = read_run(tmp_path / "run"), read_run(tmp_path / "run" / "optimizer1")
    assert "Discriminator" in str(d_log.meta) and "Generator" in str(g_log.meta)
    assert [f"{r['loss']:.4f}" for r in d_log.metrics] == [d for d, _ in printed]  # errD_real + errD_fake
    assert [f"{r['loss']:.4f}" for r in g_log.metrics] == [g for _, g in printed]
    # contract 2: which optimizer each run dir holds, the root's children, one process-wide step count
    assert d_log.meta["optimizer"] == {"index": 0, "class": "Adam", "params": "Discriminator"}
    assert g_log.meta["optimizer"] == {"index": 1, "class": "Adam", "params": "Generator"}
    assert d_log.meta["children"] == ["optimizer1"]
    steps = sorted([r["global_step"] for r in d_log.metrics] + [r["global_step"] for r in g_log.metrics])
    assert steps == list(range(2 * len(printed)))
    assert all(r["global_step"] % 2 == 0 for r in d_log.metrics)  # D steps first, then G, every iteration


SEQUENTIAL_GAN = textwrap.dedent(
    """
    import torch
    from torch import nn


    def main():
        torch.manual_seed(0)
        netG = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        netD = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        optG = torch.optim.Adam(netG.parameters(), lr=1e-3)
        optD = torch.optim.Adam(netD.parameters(), lr=1e-3)
        bce = nn.BCEWithLogitsLoss()
        for step in range(12):
            real = torch.randn(32, 2)
            if step == 6:
                real[3, 0] = float("nan")  # a bad sample reaches the discriminator
            fake = netG(torch.randn(32, 4))
            optD.zero_grad()
            lossD = bce(netD(real), torch.ones(32, 1)) + bce(netD(fake.detach()), torch.zeros(32, 1))
            lossD.backward()
            optD.step()
            optG.zero_grad()
            lossG = bce(netD(fake), torch.ones(32, 1))
            lossG.backward()
            optG.step()


    if __name__ == "__main__":
        main()
    """
)


def test_two_sequential_models_are_named_by_the_scripts_variables(tmp_path: Path) -> None:
    """A GAN of two ``nn.Sequential`` was "Adam on Sequential" twice (live lines, summary,
    diagnose): the name the script gave each model (a local of ``main()``) tells them apart."""
    script = tmp_path / "gan.py"
    script.write_text(SEQUENTIAL_GAN)
    got = _run(tmp_path, script)
    assert got.returncode == 0, got.stderr
    d_log, g_log = read_run(tmp_path / "run"), read_run(tmp_path / "run" / "optimizer1")
    assert d_log.meta["optimizer"]["params"] == "netD (Sequential)"
    assert g_log.meta["optimizer"]["params"] == "netG (Sequential)"
    assert "step 6 of Adam on netD (Sequential) is not finite" in got.stderr, got.stderr
    assert "gradguard: Adam on netG (Sequential):" in got.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "gradguard", "diagnose", str(tmp_path / "run")],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "[Adam over netD (Sequential) (optimizer 0)" in shown.stdout, shown.stdout


SPLIT_MODELS = textwrap.dedent(
    """
    import itertools

    import torch
    from torch import nn

    torch.manual_seed(0)
    encoder, decoder = nn.Linear(4, 8), nn.Linear(8, 4)
    log_scale = nn.Parameter(torch.zeros(4))  # a free parameter, as a policy's log_std
    heads = nn.ModuleDict({"trunk": nn.Linear(4, 8), "out": nn.Linear(8, 1)})  # called piece by piece
    opt = torch.optim.Adam(itertools.chain(encoder.parameters(), decoder.parameters(), [log_scale]), lr=1e-2)
    opt_heads = torch.optim.SGD(heads.parameters(), lr=1e-2)
    for step in range(12):
        x = torch.randn(16, 4)
        if step == 6:
            x[0, 0] = float("nan")  # a bad sample
        recon = decoder(torch.relu(encoder(x))) * log_scale.exp()
        loss = (recon - x).pow(2).mean() + heads["out"](torch.relu(heads["trunk"](x))).pow(2).mean()
        opt.zero_grad()
        opt_heads.zero_grad()
        loss.backward()
        opt.step()
        opt_heads.step()
    print("finite:", all(torch.isfinite(p).all().item() for p in [*encoder.parameters(), *heads.parameters()]))
    """
)


def test_an_optimizer_over_several_models_or_free_parameters_is_guarded(tmp_path: Path) -> None:
    """One optimizer over two models the script calls apart (and a free parameter), another over an
    ``nn.ModuleDict`` called piece by piece: no called model owns their parameters alone. Both were
    left unguarded ("no optimizer step was seen"), the NaN batch reached the weights; each is now
    guarded over the script's own models, named by the script's names."""
    script = tmp_path / "split.py"
    script.write_text(SPLIT_MODELS)
    got = _run(tmp_path, script)
    assert got.returncode == 0 and "finite: True" in got.stdout, got.stderr  # the NaN step was skipped
    first, second = read_run(tmp_path / "run"), read_run(tmp_path / "run" / "optimizer1")
    assert first.meta["optimizer"]["params"] == "encoder, decoder, log_scale"
    assert second.meta["optimizer"]["params"] == "heads (ModuleDict)"
    assert [r["step"] for r in first.metrics if r["skipped"]] == [6]
    assert [r["step"] for r in second.metrics if r["skipped"]] == [6]
    assert "not guarded" not in got.stderr and "no optimizer step was seen" not in got.stderr
    # the union's forward is not replayed: the advice is one a `gradguard run` user can follow
    from gradguard.diagnose import diagnose

    said = [f for f in diagnose(tmp_path / "run") if f.id == "bad_data"]
    assert said and all(
        "gradguard run could not replay this step's forward" in f.recommendation["text"] for f in said
    )


LINE_SEARCH = textwrap.dedent(
    """
    import torch
    from torch import nn


    class LineSearchSGD(torch.optim.Optimizer):  # backtracking (Armijo): the closure is re-evaluated
        def __init__(self, params, lr=1.0):
            super().__init__(params, {"lr": lr})

        def step(self, closure):
            loss = closure()  # loss and gradients
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            grads = [p.grad.clone() for p in params]
            t = self.param_groups[0]["lr"]
            with torch.no_grad():
                for _ in range(10):
                    for p, g in zip(params, grads):
                        p.sub_(t * g)
                    if closure(backward=False) <= loss - 0.5 * t * sum(g.pow(2).sum() for g in grads):
                        break
                    for p, g in zip(params, grads):
                        p.add_(t * g)
                    t /= 2
            return loss


    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    opt = LineSearchSGD(model.parameters())
    for step in range(5):
        def closure(backward=True):
            loss = nn.functional.mse_loss(model(x), y)
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss

        print(f"step {step} loss {opt.step(closure).item():.6f}")
    """
)


def test_a_closure_that_takes_arguments_gets_them(tmp_path: Path) -> None:
    """A line search calls ``closure(backward=False)``: the guarded closure passes it on (it was a
    TypeError at the first step) and the run prints what plain python prints."""
    script = tmp_path / "line_search.py"
    script.write_text(LINE_SEARCH)
    got, ref = _run(tmp_path, script), _plain(tmp_path, script)
    assert got.returncode == ref.returncode == 0, got.stderr
    assert got.stdout == ref.stdout
    assert len(read_run(tmp_path / "run").metrics) == 5


CHANGES_DIRECTORY = textwrap.dedent(
    """
    import json
    import os

    import torch
    from torch import nn

    here = os.path.dirname(__file__)
    os.makedirs("outputs/exp1", exist_ok=True)
    os.chdir("outputs/exp1")  # a Hydra-style run folder
    config = json.load(open(os.path.join(here, "config.json")))
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    for step in range(4):
        loss = model(torch.randn(8, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    print("file is absolute:", os.path.isabs(__file__))
    """
)


def test_a_script_that_changes_directory_keeps_its_file_and_the_run_log_where_it_was_asked(
    tmp_path: Path,
) -> None:
    """``__file__`` is absolute, as ``python script.py`` makes it (a script that changes directory
    and reads a file beside itself crashed), and a relative ``--out`` is the launch directory's (the
    log went into the script's new folder, where ``diagnose run`` could not find it)."""
    (tmp_path / "config.json").write_text('{"lr": 0.1}')
    script = tmp_path / "train.py"
    script.write_text(CHANGES_DIRECTORY)
    cmd = [sys.executable, "-m", "gradguard", "run", "--out", "run", "--no-report", "train.py"]
    got = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0 and "file is absolute: True" in got.stdout, got.stderr
    assert len(read_run(tmp_path / "run").metrics) == 4
    assert not (tmp_path / "outputs" / "exp1" / "run").exists()


NEVER_ZEROED = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    x, y = torch.randn(512, 20), torch.randint(0, 2, (512,))
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    accum, micro = 4, 0
    for epoch in range(6):
        for i in range(0, 512, 16):
            if micro % accum == 0 and micro == 0:  # the bug: zeroes once, never again
                opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i : i + 16]), y[i : i + 16]) / accum
            loss.backward()
            micro += 1
            if micro % accum == 0:
                opt.step()
    """
)


def test_gradients_never_zeroed_between_steps_are_said_and_are_the_verdict(tmp_path: Path) -> None:
    """A gradient-accumulation loop whose zero_grad() sits under the wrong condition: each step applies
    the sum of every gradient so far and the run blows up. The verdict was an explosion with a
    threshold and a lower rate (neither trains); it is the missing zero_grad(), said live once."""
    script = tmp_path / "accumulate.py"
    script.write_text(NEVER_ZEROED)
    got = _run(tmp_path, script)
    said = [line for line in got.stderr.splitlines() if "have not been zeroed" in line]
    assert len(said) == 1 and "since step 0 (steps 1–3" in said[0], got.stderr
    assert read_run(tmp_path / "run").meta["gradients_not_zeroed"] == 1
    shown = subprocess.run(
        [sys.executable, "-m", "gradguard", "diagnose", str(tmp_path / "run")],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert shown.stdout.startswith("verdict: gradients_not_zeroed at step 1"), shown.stdout
    # the climb it drives is not reported again with a threshold's or a rate's advice that cannot fix it
    assert "explosion" not in shown.stdout and "divergence" not in shown.stdout, shown.stdout
    fixed = tmp_path / "fixed.py"  # zeroing after each step: nothing said
    fixed.write_text(NEVER_ZEROED.replace("micro % accum == 0 and micro == 0", "micro % accum == 0"))
    got = subprocess.run(
        [sys.executable, "-m", "gradguard", "run", "--out", str(tmp_path / "fixed"), "--no-report", str(fixed)],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (
        "have not been zeroed" not in got.stderr
        and "gradients_not_zeroed" not in read_run(tmp_path / "fixed").meta
    )


OPTIMIZER_PER_EPOCH = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    for epoch in range(12):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2 * 0.9**epoch)  # a new optimizer each epoch
        for i in range(0, 512, 32):
            loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch} loss {loss.item():.4f}")
    """
)


def test_a_script_that_builds_a_new_optimizer_each_epoch_is_one_run(tmp_path: Path) -> None:
    """Each new optimizer over the same model was a run of its own: a fresh one's first steps on a
    trained model (per-batch losses 2e-4 to 0.6) read as a divergence and an explosion, errors with a
    threshold of 1e-5 advised, on a run that trained. The new optimizer goes on with the run."""
    script = tmp_path / "per_epoch.py"
    script.write_text(OPTIMIZER_PER_EPOCH)
    got, ref = _run(tmp_path, script), _plain(tmp_path, script)
    assert got.returncode == 0 and got.stdout == ref.stdout, got.stderr
    log = read_run(tmp_path / "run")
    assert [r["step"] for r in log.metrics] == list(range(12 * 16))
    assert not (tmp_path / "run" / "optimizer1").exists() and "children" not in log.meta
    assert "gradguard: Adam on model (Sequential): 192 steps" in got.stderr
    from gradguard.diagnose import diagnose, headline

    assert headline(diagnose(tmp_path / "run")) is None


def test_an_optimizer_over_a_model_the_script_replaced_is_said(tmp_path: Path) -> None:
    """The optimizer was built over a model the script then re-created: it steps parameters no called
    model owns, and the trained model never changes. "not guarded" alone did not say why."""
    script = tmp_path / "stale.py"
    script.write_text(
        "import torch\nfrom torch import nn\n\nmodel = nn.Linear(4, 1)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\nmodel = nn.Linear(4, 1)  # re-created\n"
        "for step in range(5):\n    opt.zero_grad()\n    model(torch.randn(8, 4)).pow(2).mean().backward()\n"
        "    opt.step()\n"
    )
    got = _run(tmp_path, script)
    assert got.returncode == 0 and "holds other parameters than that model's" in got.stderr, got.stderr


LOOKAHEAD = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Lookahead(torch.optim.Optimizer):  # wraps a base optimizer over the same parameter groups
        def __init__(self, base, k=3, alpha=0.5):  # as timm's Lookahead builds itself
            super().__init__(base.param_groups, {"lookahead_k": k, "lookahead_alpha": alpha})
            self.base, self.k, self.alpha, self.count = base, k, alpha, 0
            self.param_groups = base.param_groups  # shared with the base
            self.slow = [p.detach().clone() for g in base.param_groups for p in g["params"]]

        def step(self, closure=None):
            self.base.step()
            self.count += 1
            if self.count % self.k == 0:
                with torch.no_grad():
                    for p, s in zip((p for g in self.param_groups for p in g["params"]), self.slow):
                        s.add_(p - s, alpha=self.alpha)
                        p.copy_(s)


    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1))
    for step in range(9):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
    print("done")
    """
)


def test_a_wrapper_optimizer_and_its_base_stepping_together_are_not_taken_for_a_rebuilt_one(
    tmp_path: Path,
) -> None:
    """A Lookahead wrapper steps its base optimizer inside its own step, over the same parameters:
    built together, neither takes over the other's run (a new optimizer over a model whose steps began
    before it was built does: one per epoch)."""
    script = tmp_path / "lookahead.py"
    script.write_text(LOOKAHEAD)
    got = _run(tmp_path, script)
    assert got.returncode == 0 and "done" in got.stdout, got.stderr
    log = read_run(tmp_path / "run")
    assert [r["step"] for r in log.metrics] == list(range(9)), [r["step"] for r in log.metrics]


TWO_CLIPS = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    encoder, decoder = nn.Linear(6, 12), nn.Linear(12, 3)
    opt = torch.optim.SGD([{"params": encoder.parameters()}, {"params": decoder.parameters(), "lr": 0.01}], lr=0.05)
    model = nn.Sequential(encoder, nn.Tanh(), decoder)
    for step in range(6):
        x, y = torch.randn(16, 6) * (1 + step), torch.randn(16, 3)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        n_enc = torch.nn.utils.clip_grad_norm_(encoder.parameters(), 0.5)
        n_dec = torch.nn.utils.clip_grad_norm_(decoder.parameters(), 2.0)
        opt.step()
        print(f"step {step} total {total.item():.6f} enc {n_enc.item():.6f} dec {n_dec.item():.6f}")
    """
)


def test_two_clip_calls_in_one_step_are_both_recorded(tmp_path: Path) -> None:
    script = tmp_path / "two_clips.py"
    script.write_text(TWO_CLIPS)
    ref, got = _plain(tmp_path, script), _run(tmp_path, script)
    assert got.returncode == 0, got.stderr
    assert got.stdout == ref.stdout
    printed = [tuple(map(float, m)) for m in re.findall(r"total (\S+) enc (\S+) dec (\S+)", ref.stdout)]
    log = read_run(tmp_path / "run")
    for rec, (total, enc, dec) in zip(log.metrics, printed, strict=True):
        assert math.isclose(rec["grad_norm"], total, rel_tol=1e-5)  # the whole pre-clip norm, not one group's
        assert math.isclose(rec["threshold"], math.hypot(0.5, 2.0), rel_tol=1e-6)
        assert rec["clip_fraction"] == ((enc > 0.5) + (dec > 2.0)) / 2
        clipped = math.hypot(min(enc, 0.5), min(dec, 2.0))
        assert math.isclose(rec["clip_coef"], clipped / total, rel_tol=1e-4)


FUSED_AMP = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(6):
        x, y = torch.randn(32, 8), torch.randn(32, 1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaled = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        scaler.step(opt)  # no unscale_: the fused kernel unscales inside the step
        scaler.update()
        print(f"step {step} loss {loss.item():.6f} norm {scaled.item() / 1024.0:.6f} w {model[0].weight.sum().item():.6f}")
    """
)


def test_a_fused_optimizer_under_a_grad_scaler_is_measured_unscaled(tmp_path: Path) -> None:
    script = tmp_path / "fused_amp.py"
    script.write_text(FUSED_AMP)
    ref, got = _plain(tmp_path, script), _run(tmp_path, script)
    assert ref.returncode == 0, ref.stderr
    assert got.returncode == 0, got.stderr
    assert got.stdout == ref.stdout  # the same weights: the kernel is told the gradients are unscaled
    printed = re.findall(r"loss (\S+) norm (\S+)", ref.stdout)
    log = read_run(tmp_path / "run")
    assert [f"{r['loss']:.6f}" for r in log.metrics] == [loss for loss, _ in printed]  # unscaled
    for rec, (_, norm) in zip(log.metrics, printed, strict=True):  # the true norm, not 1024 times it
        assert math.isclose(rec["grad_norm"], float(norm), rel_tol=1e-5)
    assert all(r["loss_scale"] == 1024.0 for r in log.metrics)


CAUGHT = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(8):
        x = torch.randn(4, 3 if step == 2 else 2)  # one malformed batch
        try:
            loss = model(x).pow(2).mean()
        except RuntimeError:
            print("skipping batch", step)
            continue
        if step == 5:
            loss = loss * torch.log(torch.zeros(()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print("final weights finite:", all(bool(torch.isfinite(p).all()) for p in model.parameters()))
    """
)


def test_a_forward_that_raises_and_is_caught_leaves_the_run_guarded(tmp_path: Path) -> None:
    """A model that raises on a bad batch (caught by the script: a shape error, an out-of-memory
    retry): torch calls the global forward hook without the kwargs then; the run stays guarded, and
    the later NaN step is skipped and located."""
    script = tmp_path / "caught.py"
    script.write_text(CAUGHT)
    done = _run(tmp_path, script)
    assert done.returncode == 0, done.stderr
    assert "internal error" not in done.stderr, done.stderr
    assert "final weights finite: True" in done.stdout
    run = read_run(tmp_path / "run")
    assert [r["step"] for r in run.metrics if r["skipped"]] == [4]  # the script's 5th optimizer step
    first = run.first_nonfinite()
    assert first is not None and (first["phase"], first["op"]) == ("loss", "log")


EXIT_ON_NAN = textwrap.dedent(
    """
    import math
    import sys

    import torch
    from torch import nn

    def train_one_epoch(model, criterion, optimizer, batches):
        for step, (samples, targets) in enumerate(batches):
            outputs = model(samples)
            loss = criterion(outputs, targets)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                print(f"Loss is {loss_value}, stopping training")
                sys.exit(1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(10)]
    batches[4][0][2, 1] = float("nan")  # a corrupt sample
    train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, batches)
    """
)


def test_a_script_that_exits_on_its_nan_loss_before_backward_has_it_located(tmp_path: Path) -> None:
    """The timm / DeiT / MAE check: a non-finite loss ends the script before ``backward()``, so no
    optimizer step ever sees it. The forward of that step is located at the end all the same (its
    batch held the NaN), and the script's exit status is kept."""
    script = tmp_path / "engine.py"
    script.write_text(EXIT_ON_NAN)
    done = _run(tmp_path, script)
    assert done.returncode == 1 and "Loss is nan, stopping training" in done.stdout, done.stderr
    run = read_run(tmp_path / "run")
    assert len(run.metrics) == 4
    first = run.first_nonfinite()
    assert first is not None and first["step"] == 4, first
    assert first["global_step"] == 4  # the stopped step's own (it was the step before's, 3)
    assert (first["phase"], first["tensor"], first["located_by"]) == ("data", "input", "replay")
    assert "first non-finite value at step 4: phase=data" in done.stderr


TWO_PHASES = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Linear(3, 1)

    def train(optimizer, steps, bad_step=-1):
        for step in range(steps):
            x, y = torch.randn(8, 3), torch.randn(8, 1)
            resid = model(x) - y
            scale = resid.std() if step != bad_step else (resid * 0).std()  # a zero std at bad_step
            loss = (resid / scale).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    train(torch.optim.SGD(model.parameters(), lr=1e-2), 4)  # a warm-up phase
    train(torch.optim.Adam(model.parameters(), lr=1e-2), 12, bad_step=9)  # then a new optimizer
    """
)


def test_the_loss_code_of_a_second_training_phase_is_watched_for_all_its_steps(tmp_path: Path) -> None:
    """The first phase's optimizer never steps again: the loss code's windows it watched for the
    second phase's steps are let go (its budget ran out after 4 steps before): the zero std in
    the second phase's 10th step is named, `div` at its line. The second phase's optimizer (over the
    same model) goes on with the run: its 10th step is the run's 14th."""
    script = tmp_path / "phases.py"
    script.write_text(TWO_PHASES)
    done = _run(tmp_path, script)
    assert done.returncode == 0, done.stderr
    log = read_run(tmp_path / "run")
    first = log.first_nonfinite()
    assert first is not None and first["step"] == 4 + 9, first
    assert (first["op"], first["located_by"]) == ("div", "watch") and first["source"].endswith(
        "phases.py:13"
    ), first
    assert log.meta["optimizer"]["class"] == "Adam" and not (tmp_path / "run" / "optimizer1").exists()
    cmd = [sys.executable, "-m", "gradguard", "diagnose", "--no-write", str(tmp_path / "run")]
    shown = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300).stdout
    assert shown.startswith("verdict: nonfinite_op at step 13") and "`div`" in shown, shown


ACCUMULATION = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    accumulation_steps = 4
    for step in range(6):
        optimizer.zero_grad()
        for micro in range(accumulation_steps):
            x = torch.randn(16, 8)
            y = x.sum(1, keepdim=True)
            if step == 3 and micro == 1:
                x[0, 0] = float("nan")  # a corrupt sample in the step's second micro-batch
            loss = nn.functional.mse_loss(model(x), y) / accumulation_steps
            loss.backward()
        optimizer.step()
    """
)


def test_a_nan_batch_in_an_earlier_micro_batch_of_gradient_accumulation_is_the_data(tmp_path: Path) -> None:
    """Only the step's last forward was replayed: a NaN in its 2nd of 4 micro-batches read as
    `mse_loss` making NaN from finite inputs. The earlier micro-batches' inputs are checked first."""
    script = tmp_path / "accumulate.py"
    script.write_text(ACCUMULATION)
    done = _run(tmp_path, script)
    assert done.returncode == 0, done.stderr
    first = read_run(tmp_path / "run").first_nonfinite()
    assert first is not None and first["step"] == 3, first
    assert (first["phase"], first["tensor"], first["located_by"]) == ("data", "input", "replay"), first
    assert first["evidence"]["micro_batch"] == "2 of 4", first
    assert "gradient accumulation" in first["evidence"]["reason"], first


TWO_VIEWS = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(6):
        x = torch.randn(16, 8)
        if step == 3:
            x[0, 0] = float("nan")  # a corrupt sample
        noisy = x + 0.1 * torch.randn_like(x)
        loss = nn.functional.mse_loss(model(noisy), model(x).detach())  # two views, one loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    """
)


def test_a_nan_in_one_of_two_model_calls_of_one_loss_is_not_called_gradient_accumulation(
    tmp_path: Path,
) -> None:
    """Two views of a batch through the model, one backward(): the NaN input was "micro-batch 1 of the
    step's 2: gradient accumulation", which the script does not do."""
    script = tmp_path / "views.py"
    script.write_text(TWO_VIEWS)
    done = _run(tmp_path, script)
    assert done.returncode == 0, done.stderr
    first = read_run(tmp_path / "run").first_nonfinite()
    assert first is not None and (first["step"], first["phase"]) == (3, "data"), first
    reason = first["evidence"]["reason"]
    assert "accumulation" not in reason and "model call 1 of the step's 2" in reason, reason


DDP_ONE_PROCESS = textwrap.dedent(
    """
    import sys

    import torch
    import torch.distributed as dist
    from torch import nn

    dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(8):
        x, y = torch.randn(16, 8), torch.randn(16, 1)
        if step == 5:
            x[0, 0] = float("nan")
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    dist.destroy_process_group()
    """
)


def test_a_nan_batch_into_a_ddp_wrapped_model_on_one_process_is_the_data(tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 1` (a debugging run): the step is replayed through the DDP wrapper,
    whose modules name themselves (the guard's model is the wrapped one); the NaN is the input's."""
    script = tmp_path / "ddp1.py"
    script.write_text(DDP_ONE_PROCESS)
    done = _run(tmp_path, script, str(tmp_path / "pg"))
    assert done.returncode == 0, done.stderr
    first = read_run(tmp_path / "run").first_nonfinite()
    assert first is not None and first["step"] == 5, first
    assert (first["phase"], first["tensor"], first["located_by"]) == ("data", "input", "replay"), first


PER_SAMPLE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def sample_loss(params, x, t):
        out = functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, t.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    for step in range(12):
        x, t = torch.randn(32, 6), torch.randint(0, 2, (32,))
        params = {k: v.detach() for k, v in model.named_parameters()}
        grads = per_sample(params, x, t)  # DP-SGD: clip each sample's gradient, then average
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
        scale = (1.0 / (norms + 1e-6)).clamp(max=1.0)
        for name, p in model.named_parameters():
            p.grad = (grads[name] * scale.view(-1, *[1] * (grads[name].dim() - 1))).mean(0)
        opt.step()
        opt.zero_grad()
        print(f"step {step} weight {model[0].weight.sum().item():.6f}")
    """
)


def test_per_sample_gradients_with_torch_func_are_guarded_not_dropped(tmp_path: Path) -> None:
    """A forward inside ``vmap(grad(...))`` sees wrapper tensors with no storage: the capture stands
    aside there (it raised, and the run went unguarded with no run log), and the steps are logged."""
    script = tmp_path / "dp_sgd.py"
    script.write_text(PER_SAMPLE)
    ref, got = _plain(tmp_path, script), _run(tmp_path, script)
    assert got.returncode == ref.returncode == 0, got.stderr
    assert got.stdout == ref.stdout
    assert "internal error" not in got.stderr and "nothing was guarded" not in got.stderr, got.stderr
    log = read_run(tmp_path / "run")
    assert [r["step"] for r in log.metrics] == list(range(12))
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in log.metrics)


def test_a_step_clipped_by_norm_then_by_value_is_counted_once(tmp_path: Path) -> None:
    script = tmp_path / "two_clips.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            torch.manual_seed(0)
            model = nn.Linear(4, 1)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for step in range(6):
                opt.zero_grad(set_to_none=False)
                nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)).backward()
                nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
                nn.utils.clip_grad_value_(model.parameters(), clip_value=0.5)
                opt.step()
            """
        )
    )
    got = _run(tmp_path, script)
    assert got.returncode == 0, got.stderr
    bound = [
        r["grad_norm"] > 1.0 for r in read_run(tmp_path / "run").metrics
    ]  # the steps the norm clip bound
    assert 0 < sum(bound) < 6, bound
    calls = "clip_grad_norm_(max_norm=1) and clip_grad_value_(clip_value=0.5)"
    said = f"the script called {calls} on 6 steps; it clipped {sum(bound)} of them"
    assert said in got.stderr, got.stderr


def test_every_distinct_clip_call_of_a_step_is_named_in_the_summary(tmp_path: Path) -> None:
    """A backbone clipped at 1 and a head at 5, one optimizer: the summary read "the script called
    clip_grad_norm_(max_norm=1) on 6 steps", as if one threshold covered the model."""
    script = tmp_path / "two_clips.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            torch.manual_seed(0)
            backbone, head = nn.Linear(4, 8), nn.Linear(8, 1)
            opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.01)
            for step in range(6):
                opt.zero_grad()
                x = torch.randn(8, 4)
                nn.functional.mse_loss(head(torch.relu(backbone(x))), 10 * x.sum(1, keepdim=True)).backward()
                nn.utils.clip_grad_norm_(backbone.parameters(), max_norm=1.0)
                nn.utils.clip_grad_norm_(head.parameters(), max_norm=5.0)
                opt.step()
            """
        )
    )
    got = _run(tmp_path, script)
    assert got.returncode == 0, got.stderr
    said = "the script called clip_grad_norm_(max_norm=1) and clip_grad_norm_(max_norm=5) on 6 steps"
    assert said in got.stderr, got.stderr


def _self_clipping(tmp_path: Path, clips: list[str], steps: int) -> Path:
    """A linear regression under SGD whose script clips its gradients itself (``clips``: the lines it
    runs after ``backward()``) and prints its final weights."""
    script = tmp_path / "self_clipping.py"
    loop = textwrap.dedent(
        f"""
        import torch
        from torch import nn

        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range({steps}):
            opt.zero_grad()
            nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)).backward()
        """
    )
    tail = "    opt.step()\nprint(model.weight.sum().item())\n"
    script.write_text(loop + "".join(f"    {line}\n" for line in clips) + tail)
    return script


def test_a_scripts_clip_at_zero_runs_as_torch_runs_it(tmp_path: Path) -> None:
    """``clip_grad_norm_(params, args.clip)`` with ``--clip 0`` meant as "off": torch takes 0 (it scales
    every gradient to 0); under gradguard run the script stopped with a GradGuardError in its place. A
    negative one, which torch takes too, is not gradguard's to refuse either."""
    clips = [
        "nn.utils.clip_grad_norm_(model.parameters(), 0.0)",
        "nn.utils.clip_grad_norm_(model.parameters(), -1.0)",
    ]
    script = _self_clipping(tmp_path, clips, 3)
    got, plain = _run(tmp_path, script), _plain(tmp_path, script)
    assert got.returncode == 0 and got.stdout == plain.stdout, got.stderr
    assert "clip_grad_norm_(max_norm=0) on 3 steps; it clipped 3 of them" in got.stderr, got.stderr


def test_a_scripts_value_clip_is_said_and_named_in_the_summary(tmp_path: Path) -> None:
    """``clip_grad_value_`` alone: the end of the run said nothing of it, and diagnose's summary read
    "clipping none (clip rate 1)"."""
    script = _self_clipping(tmp_path, ["nn.utils.clip_grad_value_(model.parameters(), clip_value=0.01)"], 6)
    got = _run(tmp_path, script)
    assert got.returncode == 0, got.stderr
    assert (
        "the script called clip_grad_value_(clip_value=0.01) on 6 steps; it clipped 6 of them" in got.stderr
    )
    shown = subprocess.run(
        [sys.executable, "-m", "gradguard", "diagnose", str(tmp_path / "run")],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "the caller's value clip (in the log)" in shown.stdout and "none (clip rate" not in shown.stdout


def test_a_torch_warning_of_the_loss_code_names_the_scripts_line_as_without_gradguard(tmp_path: Path) -> None:
    """``F.mse_loss`` warns of a broadcast (``stacklevel=2``). Called through the loss-code watch it
    warned at gradguard's line, and the "once per location" filter then hid the same warning from the
    script's other line: one warning, in gradguard's file, where Python prints two in the script's."""
    script = tmp_path / "broadcast.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            torch.manual_seed(0)
            model = nn.Linear(4, 1)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            crit = nn.MSELoss()
            for step in range(3):
                x, y = torch.randn(8, 4), torch.randn(8)
                loss = crit(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                check = nn.functional.mse_loss(model(x), y)
            """
        )
    )
    env = {**ENV, "PYTHONWARNINGS": "default"}

    def warned(cmd: list[str]) -> list[str]:
        got = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        return [line.split(": UserWarning")[0] for line in got.stderr.splitlines() if "UserWarning" in line]

    plain = warned([sys.executable, str(script)])
    run = warned(
        [sys.executable, "-m", "gradguard", "run", "--out", str(tmp_path / "run"), "--no-report", str(script)]
    )
    assert len(plain) == 2 and plain[1].endswith("broadcast.py:15"), plain
    assert run == plain
    # and the verdict says it: the loss broadcast (N, 1) against (N,), at the script's line
    from gradguard.diagnose import diagnose

    (found,) = [f for f in diagnose(tmp_path / "run") if f.id == "loss_code_warning"]
    assert found.evidence["warnings"][0]["source"].endswith("broadcast.py:11")
    assert "target size" in found.message and "out.squeeze(-1)" in found.recommendation["text"]


def test_the_guards_stop_ends_its_traceback_at_the_scripts_step_and_names_a_negative_rate(
    tmp_path: Path,
) -> None:
    """The guard's stop (10 skipped steps in a row) printed eight frames of torch's dispatch and of
    gradguard under the script's ``optimizer.step()``; and where a schedule had made the rate
    negative it advised "lower the learning rate or clip harder", which cannot help."""
    script = HERE / "faults" / "lr_schedule_past_its_end.py"
    got = _run(tmp_path, script)
    assert got.returncode == 1
    trace = got.stderr[got.stderr.index("Traceback (most recent call last):") :]
    files = re.findall(r'File "([^"]+)"', trace.split("NonFiniteError")[0])
    assert files and all(f.endswith("lr_schedule_past_its_end.py") for f in files), files
    assert "    optimizer.step()\ngradguard.errors.NonFiniteError" in trace
    assert "The learning rate is negative (lr=-" in trace and "clip harder" not in trace


def test_an_uncaught_error_shows_the_traceback_python_shows_without_gradguards_frames(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text("import torch\n\n\ndef load():\n    raise ValueError('no such shard: 7')\n\n\nload()\n")
    ref, got = _plain(tmp_path, script), _run(tmp_path, script)
    assert got.returncode == ref.returncode == 1

    def traceback_of(stderr: str) -> list[str]:
        lines = stderr[stderr.index("Traceback (most recent call last):") :].splitlines()
        return [line for line in lines if not line.startswith("gradguard")]

    assert traceback_of(got.stderr) == traceback_of(ref.stderr), got.stderr
    assert "runpy" not in got.stderr and "gradguard/integrations" not in got.stderr
    # also after the script changed directory (its relative path then names another file)
    (tmp_path / "exp").mkdir()
    script.write_text("import os\n\nos.chdir('exp')\nraise ValueError('no such shard: 7')\n")
    got = subprocess.run(
        [sys.executable, "-m", "gradguard", "run", "--out", "run2", "--no-report", "crash.py"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert got.returncode == 1 and "runpy" not in got.stderr and "gradguard/integrations" not in got.stderr


def test_a_script_that_does_not_compile_shows_what_python_shows(tmp_path: Path) -> None:
    """A SyntaxError was shown under gradguard's runner frame and runpy's."""
    script = tmp_path / "broken.py"
    script.write_text("import torch\nbatch = (1,\nprint(batch)\n")
    ref, got = _plain(tmp_path, script), _run(tmp_path, script)
    assert got.returncode == ref.returncode == 1
    assert [
        line for line in got.stderr.splitlines() if not line.startswith("gradguard")
    ] == ref.stderr.splitlines()


def test_the_interpreter_passed_as_the_script_is_refused_with_the_fix(tmp_path: Path) -> None:
    """``gradguard run python train.py`` read the interpreter as source: "source code string cannot contain
    null bytes", then "no optimizer step was seen"."""
    script = tmp_path / "train.py"
    script.write_text("print('ran')\n")
    got = _run(tmp_path, Path(sys.executable), str(script))
    assert (
        got.returncode == 2
        and "is the Python interpreter, not a training script" in got.stderr
        and "ran" not in got.stdout
    )


def test_what_the_runner_notes_of_an_optimizer_goes_with_it(tmp_path: Path) -> None:
    """When an optimizer was built (and that it is not guarded) was noted by ``id``: a new optimizer
    that reused a freed one's id read as built when that one was, so it started a run of its own
    (``optimizer1``, the first steps of a fresh run on a trained model) one time in six in the
    per-epoch test above, or inherited "not guarded"."""
    import gc

    import torch
    from torch import nn

    from gradguard.integrations.zerocode import ZeroCode

    model = nn.Linear(4, 2)
    with ZeroCode(out=tmp_path / "run", live=False) as zc:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        stray = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
        zc._unguarded.add(stray)
        assert opt in zc._built_at and stray in zc._unguarded
        del opt, stray
        gc.collect()
        assert len(zc._built_at) == 0 and len(zc._unguarded) == 0


STALE_HEAD = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 100))  # "pretrained", 100 classes
    for p in model[0].parameters():
        p.requires_grad = False  # the backbone is frozen
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)  # built over the old head...
    model[2] = nn.Linear(32, 4)  # ...then the head is replaced for the new task
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    for step in range(60):
        i = (step * 32) % 256
        loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"loss {loss.item():.4f}")
    """
)


def test_a_model_whose_parameters_no_optimizer_steps_is_said_and_diagnosed(tmp_path: Path) -> None:
    """An optimizer built before the head was replaced steps the old head; the new one never changes.
    It read "Net's parameters are updated by hand" and, in diagnose, "stalled at ln K: check the
    signal". Said after a few steps, and the verdict names the parameters that never changed."""
    script = tmp_path / "stale_head.py"
    script.write_text(STALE_HEAD)
    got = _run(tmp_path, script)
    assert got.returncode == 0, got.stderr
    assert "trainable parameters (2.weight, 2.bias) have not changed in 4 steps" in got.stderr
    from gradguard.diagnose import diagnose

    (stalled,) = [f for f in diagnose(tmp_path / "run") if f.id == "stalled"]
    assert "never changed" in stalled.message and "after the model is final" in stalled.recommendation["text"]


def test_a_clip_called_before_backward_is_said_and_is_the_verdict_not_the_rate(tmp_path: Path) -> None:
    """``clip_grad_norm_`` right after ``zero_grad()``: it clips nothing. The runner measured a step at the
    clip (no gradients: norm 0) and another at the optimizer's step — phantom rows — and diagnose read "the
    norm was already clipped at 1 and still exploded: lower the learning rate"."""
    from gradguard.diagnose import diagnose, headline

    script = HERE / "run_scripts" / "returns_forecaster.py"
    ref, got = _plain(tmp_path, script), _run(tmp_path, script)
    assert "mean loss nan" in ref.stdout  # it really explodes (under gradguard: stopped after 10 skips)
    line = next(i for i, s in enumerate(script.read_text().splitlines(), 1) if "clip_grad_norm_(model" in s)
    assert (
        got.stderr.count("runs before loss.backward()") == 1 and f"returns_forecaster.py:{line}" in got.stderr
    )
    log = read_run(tmp_path / "run")
    steps = [r["step"] for r in log.metrics]
    assert steps == list(range(len(steps))) and all(
        r["grad_norm"] != 0 for r in log.metrics
    )  # no phantom rows
    top = headline(diagnose(tmp_path / "run"))
    assert top is not None and top.id == "clip_before_backward", top
    assert (
        "Move clip_grad_norm_(...) between loss.backward() and optimizer.step()" in top.recommendation["text"]
    )
    (tmp_path / "after").mkdir()
    fixed = _run(tmp_path / "after", script, "--clip-where", "after")
    assert (
        fixed.returncode == 0
        and "mean loss nan" not in fixed.stdout
        and "before loss.backward()" not in fixed.stderr
    )
    assert "clip_before_backward" not in read_run(tmp_path / "after" / "run").meta


ZERO_GRAD_BETWEEN = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.randn(2048, 12)
    y = (x[:, :5].argmax(1))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 5))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(2):
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.zero_grad()  # 'tidied up': clears the gradients the next line needs
            optimizer.step()
        print(f"epoch {epoch} loss {loss.item():.4f}")
    """
)


def test_zero_grad_between_backward_and_step_is_the_error_not_a_signal_problem(tmp_path: Path) -> None:
    """Every step saw no gradient; it read "stalled at ln 5 … check the signal … moved by nan"."""
    from gradguard.diagnose import diagnose, headline

    script = tmp_path / "tidy.py"
    script.write_text(ZERO_GRAD_BETWEEN)
    got = _run(tmp_path, script)
    assert got.returncode == 0, got.stderr
    top = headline(diagnose(tmp_path / "run"))
    assert (
        top is not None
        and top.id == "stalled"
        and "128 of its 128 optimizer steps had no gradient" in top.message
    )
    assert "never between backward() and step()" in top.recommendation["text"] and "nan" not in top.message


TORCH_FUNC_SCRIPTS = {
    # per-sample gradients (DP-SGD style) written into .grad, then optimizer.step(); a NaN row at step 5
    "per_sample": textwrap.dedent(
        """
        import torch
        import torch.nn.functional as F
        from torch import nn
        from torch.func import functional_call, grad, vmap

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

        def sample_loss(params, x, y):
            return F.cross_entropy(functional_call(model, params, (x[None],)), y[None])

        per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))
        for step in range(12):
            x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
            if step == 5:
                x[0, 0] = float("nan")
            grads = per_sample_grads({k: v.detach() for k, v in model.named_parameters()}, x, y)
            for name, p in model.named_parameters():
                p.grad = grads[name].mean(0)
            optimizer.step()
            optimizer.zero_grad()
        print("finite", all(bool(torch.isfinite(p).all()) for p in model.parameters()))
        """
    ),
    # model ensembling as the torch.func tutorial does it: stacked weights, a meta-device skeleton
    "ensemble": textwrap.dedent(
        """
        import copy
        import torch
        from torch import nn
        from torch.func import functional_call, stack_module_state

        torch.manual_seed(0)
        members = [nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1)) for _ in range(3)]
        params, buffers = stack_module_state(members)
        skeleton = copy.deepcopy(members[0]).to("meta")
        optimizer = torch.optim.Adam(params.values(), lr=1e-2)
        x, y = torch.randn(3, 64, 2), torch.randn(3, 64, 1)
        for step in range(10):
            out = torch.vmap(lambda p, b, xx: functional_call(skeleton, (p, b), (xx,)))(params, buffers, x)
            loss = ((out - y) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print("loss", round(loss.item(), 6))
        """
    ),
    # a TorchScript model; a NaN row at step 5
    "scripted": textwrap.dedent(
        """
        import torch
        import torch.nn.functional as F
        from torch import nn

        torch.manual_seed(0)
        model = torch.jit.script(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(12):
            x, y = torch.randn(12, 4), torch.randn(12, 1)
            if step == 5:
                x[0, 0] = float("nan")
            loss = F.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print("finite", all(bool(torch.isfinite(p).all()) for p in model.parameters()))
        """
    ),
}


def test_torch_func_and_torchscript_models_run_on_and_a_bad_step_is_skipped(tmp_path: Path) -> None:
    """Per-sample gradients after a skipped NaN step: the next vmap raised inside gradguard's watch and
    killed the script. A TorchScript model: its NaN step stopped the guarding (no hooks on a
    ScriptModule) and reached the weights, "No findings". An ensemble over stacked weights: an internal
    error, 0 steps and "No findings"; now its stacked weights (free tensors with gradients) are guarded as
    they are, the script untouched."""
    for name, code in TORCH_FUNC_SCRIPTS.items():
        script = tmp_path / f"{name}.py"
        script.write_text(code)
        (tmp_path / name).mkdir()
        got = _run(tmp_path / name, script)
        assert got.returncode == 0 and "internal error" not in got.stderr, (name, got.stderr)
        if name == "ensemble":
            assert got.stdout == _plain(tmp_path, script).stdout and "10 steps, 0 skipped" in got.stderr, (
                got.stderr
            )
            continue
        assert got.stdout == "finite True\n", (name, got.stdout)  # the NaN step was skipped
        log = read_run(tmp_path / name / "run")
        assert len(log.metrics) == 12 and [r["step"] for r in log.metrics if r["skipped"]] == [5], name


HAND_UPDATE_BLOWUP = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    lr = 0.01
    for step in range(60):
        x = torch.randn(64, 8)
        y = x[:, :1] * 3
        loss = nn.functional.mse_loss(model(x), y)
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= (lr * 1000 if step >= 30 else lr) * p.grad  # a schedule bug: x1000 from step 30
    print("done", step)
    """
)


def test_a_hand_updated_models_replays_are_not_counted_as_steps(tmp_path: Path) -> None:
    """The replay that locates a non-finite step ran the model and backward() through the runner's
    hooks: each counted as a hand update (one step logged four times, 63 steps for 60)."""
    script = tmp_path / "hand.py"
    script.write_text(HAND_UPDATE_BLOWUP)
    got = _run(tmp_path, script)
    assert got.returncode == 0 and "60 steps measured" in got.stderr, got.stderr
    steps = [r["step"] for r in read_run(tmp_path / "run").metrics]
    assert steps == list(range(60))
    assert any(r["nonfinite"] for r in read_run(tmp_path / "run").metrics)  # (a replay ran)


SUMMED_ACCUMULATION = textwrap.dedent(
    """
    import argparse
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    parser = argparse.ArgumentParser()
    parser.add_argument("--accumulate", type=int, default=16)
    parser.add_argument("--divide", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(4096, 16)
    y = x @ torch.randn(16, 1) + 0.1 * torch.randn(4096, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(2):
        for i, (xb, yb) in enumerate(loader):
            loss = nn.functional.mse_loss(model(xb), yb)
            if args.divide:
                loss = loss / args.accumulate
            loss.backward()
            if (i + 1) % args.accumulate == 0:
                optimizer.step()
                optimizer.zero_grad()
        print(f"epoch {epoch} loss {loss.item():.4f}")
    """
)


def test_accumulated_losses_that_are_summed_not_averaged_are_the_cause(tmp_path: Path) -> None:
    """16 micro-batches a step, the loss not divided: an explosion that read "clip at 74 or lr 0.005"."""
    from gradguard.diagnose import diagnose, headline

    script = tmp_path / "accumulate.py"
    script.write_text(SUMMED_ACCUMULATION)
    _run(tmp_path, script)
    assert read_run(tmp_path / "run").meta["accumulation"] == {"micro_batches": 16, "loss_scale": 1.0}
    top = headline(diagnose(tmp_path / "run"))
    assert top is not None and "16 backward() calls whose losses are not divided by 16" in top.message, top
    assert "loss = loss / 16" in top.recommendation["text"]
    (tmp_path / "divided").mkdir()
    got = _run(tmp_path / "divided", script, "--divide")
    assert got.returncode == 0 and "nan" not in got.stdout
    meta = read_run(tmp_path / "divided" / "run").meta
    assert meta["accumulation"] == {"micro_batches": 16, "loss_scale": 0.0625}
    assert headline(diagnose(tmp_path / "divided" / "run")) is None


COMPLEX = textwrap.dedent(
    """
    import torch

    torch.manual_seed(0)

    class SpectralFilter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lift = torch.nn.Linear(32, 32)
            self.spec = torch.nn.Parameter(torch.ones(17, dtype=torch.cfloat))  # FNO / GFNet style

        def forward(self, x):
            return torch.fft.irfft(torch.fft.rfft(self.lift(x)) * self.spec, n=32)

    model = SpectralFilter()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(20):
        x = torch.randn(8, 32)
        loss = torch.nn.functional.mse_loss(model(x), x.roll(1, -1))
        opt.zero_grad(); loss.backward(); opt.step()
    print("final", round(loss.item(), 6))
    """
)


def test_an_optimizer_over_complex_parameters_is_left_unguarded_and_the_script_runs(tmp_path: Path) -> None:
    """Complex parameters (the guard measures real tensors): the script was killed by the guard's refusal
    ("GradGuardError: parameter 'spec' is complex"), then "no optimizer step was seen"."""
    script = tmp_path / "spectral.py"
    script.write_text(COMPLEX)
    plain, got = _plain(tmp_path, script), _run(tmp_path, script)
    assert (got.returncode, got.stdout) == (0, plain.stdout), got.stderr
    assert "Adam steps complex parameters (torch.complex64, shape (17,))" in got.stderr
    assert "view_as_real" in got.stderr and "no optimizer step was seen" not in got.stderr


CREATE_GRAPH = textwrap.dedent(
    """
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(12):
        x = torch.randn(16, 4)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        loss.backward(create_graph=True)  # a second-order method's gradients (AdaHessian style)
        opt.step()
        for p in model.parameters():
            p.grad = None  # break the reference cycle create_graph makes
    print("final", loss.item())
    """
)


def test_gradients_made_with_create_graph_are_measured_and_the_script_unchanged(tmp_path: Path) -> None:
    """backward(create_graph=True): the measurement's in-place copy of the norms raised "a view was created
    in no_grad mode and is being modified inplace", guarding stopped at step 0 and diagnose read "No findings"."""
    script = tmp_path / "hessian.py"
    script.write_text(CREATE_GRAPH)
    plain, got = _plain(tmp_path, script), _run(tmp_path, script)
    assert (got.returncode, got.stdout) == (0, plain.stdout), got.stderr
    assert "internal error" not in got.stderr, got.stderr
    log = read_run(tmp_path / "run")
    assert len(log.metrics) == 12 and all(r["grad_norm"] > 0 for r in log.metrics)


INPUT_OPTIMISED = textwrap.dedent(
    """
    import sys

    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).eval()
    for p in net.parameters():
        p.requires_grad_(False)  # a frozen, pretrained network
    x = torch.randn(1, 16).requires_grad_()  # the input is what is trained (style transfer, attacks)
    opt = torch.optim.Adam([x], lr=0.05)
    target = torch.tensor([2])
    for step in range(30):
        loss = nn.functional.cross_entropy(net(x), target)
        if step == 10 and "--nan" in sys.argv:
            loss = loss * float("nan")
        opt.zero_grad()
        loss.backward()
        opt.step()
    print("final", round(loss.item(), 6), x.isfinite().all().item())
    """
)


def test_an_optimizer_over_an_input_tensor_of_a_frozen_network_is_guarded(tmp_path: Path) -> None:
    """Adam over a plain tensor (the image of a style transfer) through a frozen network: "internal error …
    optimizer got an empty parameter list" (a hand-update session of the frozen model), then "cannot assign
    'torch.FloatTensor' object to parameter 'x'"; gradguard stopped guarding, no run log."""
    script = tmp_path / "attack.py"
    script.write_text(INPUT_OPTIMISED)
    plain, got = _plain(tmp_path, script), _run(tmp_path, script)
    assert (got.returncode, got.stdout) == (0, plain.stdout), got.stderr
    assert "internal error" not in got.stderr and "Adam on x: 30 steps, 0 skipped" in got.stderr, got.stderr
    bad = gradguard_run(tmp_path, script, "--nan", out=tmp_path / "bad")
    assert "Adam on x: 30 steps, 1 skipped" in bad.stderr and bad.stdout.endswith("True\n"), bad.stderr


ZEROED_BY_HAND = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(10):
        x = torch.randn(32, 4)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        loss.backward()
        opt.step()
        for p in model.parameters():  # zeroed by hand, in place (an old tutorial's way)
            if p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()
    print("final", round(loss.item(), 6))
    """
)


def test_gradients_zeroed_in_place_by_hand_are_not_said_unzeroed(tmp_path: Path) -> None:
    """p.grad.zero_() by hand (no zero_grad() call, the same .grad tensors): said live "SGD's gradients have
    not been zeroed since step 0 … every step applies the sum of all the gradients so far"."""
    script = tmp_path / "manual_zero.py"
    script.write_text(ZEROED_BY_HAND)
    got = _run(tmp_path, script)
    assert got.returncode == 0 and "have not been zeroed" not in got.stderr, got.stderr
    assert "gradients_not_zeroed" not in read_run(tmp_path / "run", records=False).meta
    never = tmp_path / "never.py"
    never.write_text(ZEROED_BY_HAND.replace("p.grad.zero_()", "pass"))
    got = gradguard_run(tmp_path, never, out=tmp_path / "never")
    assert "have not been zeroed since step 0" in got.stderr, got.stderr


def test_a_warning_torch_raises_in_c_names_the_scripts_line_as_without_gradguard(tmp_path: Path) -> None:
    """``torch.tensor(t)`` in the loss code warns from C++ ("To copy construct from a tensor…"): Python names
    the innermost Python frame, which under the loss-code watch was gradguard's locate.py."""
    script = tmp_path / "weighted_ce.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            torch.manual_seed(0)
            model = nn.Linear(4, 3)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            weights = torch.tensor([1.0, 2.0, 1.0])
            for step in range(3):
                x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
                logits = model(x)
                w = torch.tensor(weights)  # (in the loss code, after the model's forward)
                loss = nn.functional.cross_entropy(logits, y, weight=w)
                opt.zero_grad()
                loss.backward()
                opt.step()
            """
        )
    )
    env = {**ENV, "PYTHONWARNINGS": "default"}
    for got in (plain_run(tmp_path, script, env=env), gradguard_run(tmp_path, script, env=env)):
        lines = [line for line in got.stderr.splitlines() if "To copy construct" in line]
        assert lines and all(line.startswith(f"{script}:12: UserWarning") for line in lines), got.stderr


EMA_TEACHER = textwrap.dedent(
    """
    import copy

    import torch
    from torch import nn

    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    decay = 99.6  # the paper's table gives it in percent
    for step in range(30):
        x = torch.randn(64, 16)
        with torch.no_grad():
            target = teacher(x + 0.1 * torch.randn_like(x))
        loss = nn.functional.mse_loss(student(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.mul_(decay).add_(s, alpha=1 - decay)
    """
)


def test_a_target_from_a_hand_updated_teacher_that_blew_up_is_named(tmp_path: Path) -> None:
    """An EMA teacher with decay 99.6 (a percent): its weights grow ~99x a step and its targets go
    non-finite; the verdict read "a tensor entering the loss code … clean the data"."""
    script = tmp_path / "ema.py"
    script.write_text(EMA_TEACHER)
    got = _run(tmp_path, script)
    assert (
        "the model teacher (Sequential), which no optimizer steps, holds non-finite or huge weights"
        in got.stderr
    )
    from gradguard.diagnose import diagnose, headline

    top = headline(diagnose(tmp_path / "run"))
    assert (
        top is not None and top.id == "target_network" and top.message.startswith("teacher (Sequential)")
    ), top
    assert "0.996, not 99.6" in top.recommendation["text"]
    assert {f.id for f in diagnose(tmp_path / "run")}.isdisjoint({"explosion", "divergence", "bad_data"})


REENTRANT = """
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU()) for _ in range(3))
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + checkpoint(block, h, use_reentrant=True)
        return self.out(h)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(12):
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        if step == 7:
            x[2, 1] = float("nan")  # a bad batch
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # (no_grad: the replay starts inside it)
        opt.step()
"""


def test_a_replay_through_a_reentrant_checkpoint_prints_no_torch_warning(tmp_path: Path) -> None:
    """`checkpoint(..., use_reentrant=True)`, a bad batch, the script's clip_grad_norm_: the replay, started
    inside that no_grad function, ran the forward without gradients, and torch printed "None of the inputs
    have requires_grad=True. Gradients will be None" on the user's stderr, which the script never prints."""
    script = tmp_path / "ckpt_train.py"
    script.write_text(REENTRANT)
    env = {
        k: v for k, v in ENV.items() if k != "PYTHONWARNINGS"
    }  # torch's warnings shown, as a user sees them
    plain = plain_run(tmp_path, script, env=env)
    assert plain.returncode == 0 and "requires_grad" not in plain.stderr, plain.stderr
    guarded = gradguard_run(tmp_path, script, env=env)
    assert guarded.returncode == 0, guarded.stderr
    assert "requires_grad" not in guarded.stderr, guarded.stderr
    event = next(e for e in read_run(tmp_path / "run").events if e["type"] == "nonfinite")
    assert (event["step"], event["phase"]) == (7, "data")


DISTILL = """
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
teacher = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
teacher.eval()  # "pretrained"; its parameters keep requires_grad
student = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 10))
opt = torch.optim.Adam(student.parameters(), lr=3e-3)
T = 4.0
for step in range(30):
    x = torch.randn(64, 20)
    t_logits = teacher(x)
    s_logits = student(x)
    loss = F.kl_div(F.log_softmax(s_logits / T, 1), F.softmax(t_logits.detach() / T, 1), reduction="batchmean") * T * T
    opt.zero_grad()
    loss.backward()
    opt.step()
print("done")
"""


def test_a_trainable_teacher_whose_output_is_detached_is_not_updated_by_hand(tmp_path: Path) -> None:
    """Distillation with the teacher left trainable, its output detached: the teacher read "updated by hand",
    "no guarded parameter has a gradient" and "an optimizer built before the model was replaced", and became
    the run's main log (the student's went to optimizer1/)."""
    script = tmp_path / "distill.py"
    script.write_text(DISTILL)
    guarded = gradguard_run(tmp_path, script)
    assert guarded.returncode == 0, guarded.stderr
    for wrong in ("updated by hand", "no guarded parameter has a gradient", "have not changed"):
        assert wrong not in guarded.stderr, guarded.stderr
    log = read_run(tmp_path / "run")
    assert len(log.metrics) == 30 and not (tmp_path / "run" / "optimizer1").exists()
    assert log.meta["optimizer"]["class"] == "Adam", log.meta["optimizer"]


GUARDED_IN_SCRIPT = """
import sys
import torch
from torch import nn

import gradguard

torch.manual_seed(0)
model = nn.Linear(8, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
guard = gradguard.Guard(model, opt, clip="norm:1", log_dir=(sys.argv[1:] or [None])[0])  # no argument: no log
for step in range(12):
    x, y = torch.randn(32, 8), 10 * torch.randn(32, 1)
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    guard.step(loss)
guard.close()
print("weights", float(model.weight.sum()))
"""


def test_a_script_that_guards_its_optimizer_itself_is_left_to_its_guard(tmp_path: Path) -> None:
    """The script's own Guard(clip="norm:1") under `gradguard run --clip norm:5`: the outer log claimed norm:5,
    clip rate 0 and "No findings", recording the inner guard's post-clip norms (0.99999) as pre-clip ones."""
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED_IN_SCRIPT)
    inner = tmp_path / "inner"
    plain = plain_run(tmp_path, script, str(inner))
    guarded = gradguard_run(tmp_path, script, str(tmp_path / "inner2"))
    assert guarded.returncode == 0, guarded.stderr
    assert "the script guards its SGD itself with gradguard.Guard" in guarded.stderr, guarded.stderr
    assert plain.stdout == guarded.stdout  # its own guard clipped, as without gradguard run
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert len(read_run(tmp_path / "inner2").metrics) == 12


def test_a_script_that_guards_itself_is_told_where_its_log_went_not_into_out(tmp_path: Path) -> None:
    """`gradguard run --out X` over a script with its own Guard: X was never made, and nothing said so
    (nor, for a Guard with no log_dir, that there was no log at all)."""
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED_IN_SCRIPT)
    out = tmp_path / "X"
    for args, where in (
        (
            (str(tmp_path / "inner"),),
            f"its run log is {tmp_path / 'inner'} (gradguard diagnose {tmp_path / 'inner'})",
        ),
        ((), "it writes no run log (its log_dir is None: give it one to keep its log)"),
    ):
        guarded = gradguard_run(tmp_path, script, *args, out=out)
        err = " ".join(guarded.stderr.split())
        assert guarded.returncode == 0, err
        assert (
            f"leaves that optimizer to it (its clip, its policy, its log) and writes no log of it into {out}; {where}"
            in err
        )
        assert f"no run log was written into {out}." in err, err
        assert not out.exists()


DROPPED_BATCHES = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Linear(6, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for i in range(12):
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    try:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if i % 3 == 1:
            raise ValueError("a metric failed on this batch")
        opt.step()
        print(f"loss {loss.item():.6f}")
    except ValueError:
        continue
"""


def test_the_loss_of_a_batch_the_script_dropped_is_not_added_to_the_next_steps(tmp_path: Path) -> None:
    """A loop that catches an exception raised after backward() and goes on (zero_grad() at the top of the next
    batch): the dropped batch's loss was summed into the next step's as a micro-batch (logged 2.79 for 0.688)."""
    printed, logged = _printed_and_logged_losses(tmp_path, DROPPED_BATCHES)
    assert len(printed) == len(logged) == 8
    assert logged == pytest.approx(printed, abs=1e-5)


def _printed_and_logged_losses(tmp_path: Path, text: str) -> tuple[list[float], list[float]]:
    """The script ``text`` under ``gradguard run``: the losses it printed (``loss X``), and the run log's."""
    script = tmp_path / "train_losses.py"
    script.write_text(text)
    done = gradguard_run(tmp_path, script)
    assert done.returncode == 0, done.stderr
    printed = [float(m) for m in re.findall(r"loss (\S+)", done.stdout)]
    return printed, [r["loss"] for r in read_run(tmp_path / "run").metrics]


FROZEN_PART = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for i in range(8):
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    model[0].zero_grad()  # the first layer stays frozen this epoch: its gradients cleared before the step
    opt.step()
    print(f"loss {loss.item():.6f}")
"""


def test_gradients_of_part_of_the_model_cleared_before_the_step_keep_the_steps_loss(tmp_path: Path) -> None:
    """The other side of a dropped batch: zero_grad() of a submodule between backward() and step() drops no
    loss (no backward follows before the step)."""
    printed, logged = _printed_and_logged_losses(tmp_path, FROZEN_PART)
    assert logged == pytest.approx(printed, abs=1e-5) and len(logged) == 8
