"""``gradguard run`` logs the loss the script means, sees the script's own clipping, reports a bad
step on stderr as it happens, and writes its summary and report however the script ends."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import gradguard
from gradguard.diagnose import diagnose
from gradguard.runlog import read_run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}


def _script(tmp_path: Path, loop: str, name: str = "train.py", *, head: str | None = None) -> Path:
    """A script: ``HEAD`` (a model, an optimizer, data), then ``loop`` (dedented)."""
    path = tmp_path / name
    path.write_text((HEAD if head is None else head) + textwrap.dedent(loop))
    return path


def _run(tmp_path: Path, script: Path, *options: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gradguard", "run", "--out", str(tmp_path / "run"), *options, str(script)]
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)


def _plain(tmp_path: Path, script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )


HEAD = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
data = [(torch.randn(16, 8), torch.randn(16, 1)) for _ in range(40)]
"""


def test_an_accumulated_step_logs_the_loss_of_all_its_micro_batches(tmp_path: Path) -> None:
    script = _script(
        tmp_path,
        """
        k = 4
        for step in range(6):
            total = 0.0
            for micro in range(k):
                x, y = data[step * k + micro]
                loss = nn.functional.mse_loss(model(x), y) / k
                loss.backward()
                total += loss.item()
            opt.step()
            opt.zero_grad()
            print(f"step {step} loss {total!r}")
        """,
    )
    got = _run(tmp_path, script)
    assert got.returncode == 0, got.stderr
    printed = [float(line.split()[-1]) for line in got.stdout.splitlines()]
    logged = [r["loss"] for r in read_run(tmp_path / "run").metrics]
    assert logged == pytest.approx(printed, rel=1e-6)  # not the last micro-batch's loss / k


def test_a_gradscaler_run_logs_the_unscaled_loss_the_scale_and_its_overflows(tmp_path: Path) -> None:
    script = _script(
        tmp_path,
        """
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        blow = {"on": False}
        model[0].weight.register_hook(lambda g: g * float("inf") if blow["on"] else g)
        for step in range(8):
            x, y = data[step]
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = nn.functional.mse_loss(out.float(), y)
            blow["on"] = step == 3  # a finite loss, infinite gradients: an fp16-style overflow
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            scaler.step(opt)
            scaler.update()
            print(f"step {step} loss {loss.item()!r} scale {scaler.get_scale()}")
        """,
    )
    ref, got = _plain(tmp_path, script), _run(tmp_path, script)
    assert got.returncode == 0, got.stderr
    assert got.stdout == ref.stdout  # the scaler skipped step 3 and halved its scale, as without gradguard
    log = read_run(tmp_path / "run")
    printed = [float(line.split()[3]) for line in got.stdout.splitlines()]
    assert [r["loss"] for r in log.metrics] == pytest.approx(printed, rel=1e-6)  # unscaled
    assert [r["loss_scale"] for r in log.metrics[:4]] == [1024.0] * 4  # the scale the step ran with
    assert log.metrics[3]["amp_overflow"] and log.metrics[3]["skipped"]
    assert not log.events_of("nonfinite")  # an overflow is the scaler's business
    assert [e["step"] for e in log.events_of("skip")] == [3]


def test_a_finite_loss_is_never_logged_as_null_or_zero(tmp_path: Path) -> None:
    script = _script(
        tmp_path,
        """
        for step in range(12):
            x, y = data[step]
            if step in (4, 5, 6):
                x = x.clone()
                x[0, 0] = float("nan")  # three bad batches in a row
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        """,
    )
    got = _run(tmp_path, script)
    assert got.returncode == 0, got.stderr
    for rec in read_run(tmp_path / "run").metrics:
        if rec["step"] in (4, 5, 6):
            assert rec["skipped"] and rec["loss_nonfinite"]
        else:
            assert isinstance(rec["loss"], float) and math.isfinite(rec["loss"]) and rec["loss"] > 0


def test_the_first_bad_step_is_on_stderr_at_once_then_rate_limited(tmp_path: Path) -> None:
    script = _script(
        tmp_path,
        """
        import sys
        for step in range(30):
            x, y = data[step]
            if step >= 10:
                x = x * float("nan")
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            if step == 10:
                print("after the first bad step", file=sys.stderr, flush=True)
        """,
    )
    got = _run(tmp_path, script, "--max-consecutive", "100")
    assert got.returncode == 0, got.stderr
    lines = got.stderr.splitlines()
    live = [i for i, line in enumerate(lines) if "is not finite" in line]
    assert len(live) == 1 and live[0] < lines.index("after the first bad step")  # before the script goes on
    assert "step 10 of SGD on model (Sequential) is not finite (phase=data" in lines[live[0]]
    assert "skipped" in lines[live[0]]


def test_the_scripts_clip_grad_value_is_seen_and_clip_replaces_the_scripts_clip(tmp_path: Path) -> None:
    body = """
        for step in range(6):
            x, y = data[step]
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y) * 100
            loss.backward()
            CLIP
            opt.step()
            print(f"loss {loss.item():.6f}")
        """
    value = _script(
        tmp_path, body.replace("CLIP", "torch.nn.utils.clip_grad_value_(model.parameters(), 0.5)")
    )
    got = _run(tmp_path, value)
    assert got.returncode == 0 and got.stdout == _plain(tmp_path, value).stdout, got.stderr
    fractions = [r["clip_fraction"] for r in read_run(tmp_path / "run").metrics]
    assert all(0 < f < 1 for f in fractions), fractions  # the share of elements the script clamped

    norm = _script(
        tmp_path, body.replace("CLIP", "torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)"), "n.py"
    )
    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradguard",
            "run",
            "--out",
            str(tmp_path / "r2"),
            "--clip",
            "norm:2",
            str(norm),
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert got.returncode == 0, got.stderr
    assert got.stderr.count("replaces the script's own clip_grad_norm_(max_norm=0.5)") == 1
    records = read_run(tmp_path / "r2").metrics
    assert all(r["threshold"] == 2.0 for r in records)  # gradguard's clipper, not the script's
    meta = json.loads((tmp_path / "r2" / "meta.json").read_text())
    assert meta["config"]["clip"]["max_norm"] == 2.0


LONG = """
import sys, time
for step in range(100000):
    x, y = data[step % 40]
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    if step == 20:
        print("ready", flush=True)
    time.sleep(0.002)
"""


def _default_sigint() -> None:
    """In the child: Ctrl-C as in a terminal. A test run started in the background (``make test &``,
    ``nohup … &``) has SIGINT ignored, and a child inherits that: the plain script would not stop
    either."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_killed_run_still_writes_its_summary_and_report_and_dies_by_the_signal(
    tmp_path: Path, signum: int
) -> None:
    script = _script(tmp_path, LONG)
    cmd = [sys.executable, "-m", "gradguard", "run", "--out", str(tmp_path / "run"), str(script)]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signum, err  # as the plain script ends
    assert "gradguard: SGD on model (Sequential):" in err and "report:" in err
    log = read_run(tmp_path / "run")
    assert len(log.metrics) >= 21 and log.meta.get("end_time")  # flushed and closed
    assert (tmp_path / "run" / "report.html").exists()


SWALLOWED = """
import weakref

class Batch:
    pass

def interrupted(ref):  # Ctrl-C arriving while Python runs a weakref callback (torch runs them every step)
    raise KeyboardInterrupt

for step in range(200):
    x, y = data[step % 40]
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    if step == 20:
        batch = Batch()
        ref = weakref.ref(batch, interrupted)
        del batch  # Python prints "Exception ignored in ..." and the loop goes on
print("trained to the end")
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_python_swallows_in_a_callback_stops_the_run_at_the_next_step(
    tmp_path: Path, signum: int
) -> None:
    """The plain script loses such an interrupt (it trains to the end); under ``gradguard run`` the
    next step raises it again, so the run stops as a Ctrl-C / SIGTERM stops it, summary and all."""
    loop = (
        SWALLOWED
        if signum == signal.SIGINT
        else SWALLOWED.replace("raise KeyboardInterrupt", "os.kill(os.getpid(), signal.SIGTERM)").replace(
            "import weakref", "import os, signal, weakref"
        )
    )
    script = _script(tmp_path, loop)
    plain = _plain(tmp_path, script)
    if signum == signal.SIGINT:
        assert plain.returncode == 0 and "trained to the end" in plain.stdout  # lost: the loop went on
    got = _run(tmp_path, script)
    assert got.returncode == -signum, got.stderr[-2000:]
    assert "trained to the end" not in got.stdout
    assert (
        "gradguard: SGD on model (Sequential): 21 steps" in got.stderr
    )  # steps 0-20: stopped before step 21
    assert read_run(tmp_path / "run").meta.get("end_time")


def test_an_uncaught_exception_keeps_exit_code_1_with_the_summary(tmp_path: Path) -> None:
    script = _script(tmp_path, LONG.replace('print("ready", flush=True)', 'raise ValueError("bad config")'))
    got = _run(tmp_path, script)
    assert got.returncode == 1
    assert (
        "ValueError: bad config" in got.stderr
        and "gradguard: SGD on model (Sequential): 21 steps" in got.stderr
    )
    assert (tmp_path / "run" / "report.html").exists()
    # the run's log says how it ended: diagnose does not read a crashed run as a healthy one
    assert read_run(tmp_path / "run").meta["ended_by"] == "ValueError: bad config"
    (said,) = [f for f in diagnose(tmp_path / "run") if f.id == "incomplete_log"]
    assert said.severity == "warning" and "ended early after step 20" in said.message


def test_sys_exit_with_a_message_prints_it_and_exits_1(tmp_path: Path) -> None:
    script = _script(tmp_path, "import sys\nsys.exit('no data found')\n", head="")
    got = _run(tmp_path, script)
    assert got.returncode == 1 and "no data found" in got.stderr


def test_a_gradient_norm_spike_is_on_stderr_by_the_next_flush(tmp_path: Path) -> None:
    script = _script(
        tmp_path,
        """
        for step in range(60):
            x, y = data[step % 40]
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y) * (1000.0 if step == 45 else 1.0)
            loss.backward()
            opt.step()
        """,
    )
    got = _run(tmp_path, script, "--every", "10")
    assert got.returncode == 0, got.stderr
    spikes = [line for line in got.stderr.splitlines() if "gradient norm spike" in line]
    assert len(spikes) == 1 and "at step 45 of SGD on model (Sequential)" in spikes[0], got.stderr
    assert re.search(r"\d+× the median of the steps before", spikes[0]), spikes[0]


def test_a_blip_the_spike_rule_flags_after_a_quiet_start_is_not_said_live(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A healthy run (an EMA-teacher script): the z-score rule flagged 1.14 against ~0.62 (1.8×) right
    after its warm-up; the log keeps the flag, the terminal keeps quiet, as for 3× (healthy runs had
    2.8–3.3× blips said). 6× is said, with its ratio."""
    import torch
    from torch import nn

    from gradguard.integrations.zerocode.live import Live

    model = nn.Linear(2, 1)
    guard = gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    seen = Live(enabled=True).flushed(guard)
    quiet = [{"step": s, "grad_norm": 0.62 + 0.01 * (s % 3), "spike": False} for s in range(26)]
    seen([*quiet, {"step": 26, "grad_norm": 1.136, "spike": True}])
    assert "gradient norm spike" not in capsys.readouterr().err
    seen([{"step": 27, "grad_norm": 1.9, "spike": True}])  # 3×
    assert "gradient norm spike" not in capsys.readouterr().err
    seen([{"step": 28, "grad_norm": 3.8, "spike": True}])
    said = capsys.readouterr().err
    assert "gradient norm spike at step 28 of SGD on Linear: 3.8, 6" in said and "× the median" in said, said


def test_a_norm_after_steps_with_no_gradient_is_not_said_as_a_spike(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A triplet-margin loss met on most batches (gradient exactly 0): an ordinary 0.19 read "gradient norm
    spike … 1.91e+29× the median of the steps before" — a median of 0 gives no scale."""
    import torch
    from torch import nn

    from gradguard.integrations.zerocode.live import Live

    model = nn.Linear(2, 1)
    guard = gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    seen = Live(enabled=True).flushed(guard)
    met = [{"step": s, "grad_norm": 0.0 if s % 7 else 0.2, "spike": False} for s in range(40)]
    seen([*met, {"step": 40, "grad_norm": 0.19, "spike": True}])
    assert "gradient norm spike" not in capsys.readouterr().err


def test_the_live_line_of_an_explosion_says_where_it_overflowed_as_the_summary_does(tmp_path: Path) -> None:
    script = _script(
        tmp_path,
        """
        opt = torch.optim.SGD(model.parameters(), lr=5.0)  # far too high: the norms climb, then overflow
        for step in range(20):
            x, y = data[step % 40]
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y * 10).backward()
            opt.step()
        """,
    )
    got = _run(tmp_path, script, "--max-consecutive", "100")
    live = next(line for line in got.stderr.splitlines() if "is not finite" in line)
    summary = next(line for line in got.stderr.splitlines() if "first non-finite value at step" in line)
    said = re.compile(r"an explosion from step \d+ in layer \S+, overflowing at phase=\w+")
    found = said.search(live)
    assert found is not None, (
        got.stderr
    )  # was "(phase=backward, module=0)": the explosion's layer, not its overflow
    assert found.group(0) in summary, (live, summary)


def test_an_explosion_rolled_back_is_not_said_to_be_non_finite(tmp_path: Path) -> None:
    """Under ``--on-explosion recover`` the guard rolls back a finite step whose norm took off; the
    live line said "step 34 … is not finite: skipped", of a step whose every value was finite."""
    script = _script(
        tmp_path,
        """
        x = torch.randn(256, 8)
        y = x @ torch.randn(8, 1)
        net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        sgd = torch.optim.SGD(net.parameters(), lr=0.05)
        for step in range(60):
            i = (step * 32) % 256
            if step == 30:
                sgd.param_groups[0]["lr"] = 3.0  # the rate jumps: the norm takes off, finite
            loss = nn.functional.mse_loss(net(x[i : i + 32]), y[i : i + 32])
            sgd.zero_grad()
            loss.backward()
            sgd.step()
        """,
    )
    got = _run(tmp_path, script, "--no-report", "--on-explosion", "recover")
    assert got.returncode == 0, got.stderr
    assert "was not taken: its gradient norm took off (on_explosion='recover')" in got.stderr
    assert "is not finite" not in got.stderr


def test_a_nan_loss_with_finite_gradients_is_said_non_finite(tmp_path: Path) -> None:
    """A loss made NaN by a term with no gradient (``kl_div`` of a negative target: its ``t·log t``):
    the gradients are finite, and the first version of the explosion line said "was not taken: its
    gradient norm took off … its values were finite" of a NaN loss."""
    script = _script(
        tmp_path,
        """
        for step in range(4):
            x, y = data[step]
            loss = nn.functional.mse_loss(model(x), y)
            if step == 2:
                loss = loss + torch.tensor(float("nan"))  # a term without gradient
            opt.zero_grad()
            loss.backward()
            opt.step()
        """,
    )
    got = _run(tmp_path, script, "--no-report")
    assert got.returncode == 0, got.stderr
    assert (
        "step 2 of SGD on model (Sequential) is not finite" in got.stderr
        and "was not taken" not in got.stderr
    )
