"""``gradguard run``'s options: every Guard policy, under the guard's own name, with the guard's own
default (an option not given is not passed on)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from gradguard.cli import RUN_GUARD_OPTIONS, build_parser
from gradguard.runlog import read_run

#: Guard parameters that are not a policy of ``run``: its objects, where it logs (``--out``), the
#: capture the runner makes itself.
NOT_RUN_OPTIONS = {"model", "optimizer", "log_dir", "name", "process_group", "capture"}
#: GuardConfig fields that are not settings (derived from one)
DERIVED = {"layers_auto"}

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

TINY = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = torch.randn(32, 4), torch.randn(32, 1)
for step in range(12):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
print(f"loss {loss.item():.6f}")
"""


def _guard_parameters() -> dict[str, inspect.Parameter]:
    from gradguard.guard import Guard

    return dict(inspect.signature(Guard).parameters)


def test_every_guard_policy_is_a_run_option_under_its_own_name() -> None:
    policies = set(_guard_parameters()) - NOT_RUN_OPTIONS
    assert set(RUN_GUARD_OPTIONS) == policies
    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["run"]  # type: ignore[union-attr]
    flags = {a.dest: a.option_strings for a in run._actions}
    for dest in RUN_GUARD_OPTIONS:
        expected = "--no-locate" if dest == "locate" else "--" + dest.replace("_", "-")
        assert expected in flags[dest]


def test_an_option_not_given_keeps_the_guards_default() -> None:
    args = build_parser().parse_args(["run", "train.py", "--lr", "3"])
    given = {dest for dest in RUN_GUARD_OPTIONS if hasattr(args, dest)}
    assert given == {"clip"} and args.clip == "none"  # run's one default of its own: measure only
    assert args.args == ["--lr", "3"]  # the script's own options stay the script's


def _run_actions() -> dict[str, argparse.Action]:
    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["run"]  # type: ignore[union-attr]
    return {a.dest: a for a in run._actions}


def test_every_guard_setting_has_a_run_flag_with_the_guards_default() -> None:
    """Each setting the guard checks (``GuardConfig``) is a ``run`` flag of the same name; the flag
    given the Guard's default parses to that default (a switch turns it over); a default quoted in
    a flag's help is the Guard's. Fails when a setting is added without a flag, or defaults drift."""
    from gradguard._guard.config import GuardConfig

    settings = {f.name for f in dataclasses.fields(GuardConfig)} - DERIVED
    assert settings - set(RUN_GUARD_OPTIONS) == set(), "a Guard setting without a `gradguard run` flag"
    parser, actions = build_parser(), _run_actions()
    defaults = {name: p.default for name, p in _guard_parameters().items()}
    for dest in RUN_GUARD_OPTIONS:
        action, default = actions[dest], defaults[dest]
        quoted = re.search(r"Guard's default: ([\w.]+)", action.help or "")
        assert quoted is None or quoted[1] == str(default), (dest, quoted, default)
        if action.nargs == 0:  # a switch (--no-locate, --monitor-only): given, it turns the default over
            assert action.const is (not default), dest
            continue
        if default is None and action.type is None:  # a path: not given is the default
            continue
        text = "none" if default is None else str(default)
        parsed = getattr(parser.parse_args(["run", action.option_strings[0], text, "x.py"]), dest)
        assert parsed == default, (dest, text, parsed, default)


def test_monitor_only_watches_a_run_and_never_skips(tmp_path: Path) -> None:
    """``--monitor-only`` (then ``--on-nonfinite`` warn): the script's own updates all happen (its
    output is the plain run's), the bad step is still located."""
    script = tmp_path / "nan.py"
    script.write_text(
        TINY.replace(
            "    opt.zero_grad()", "    opt.zero_grad()\n    x[0, 0] = float('nan') if step == 7 else x[0, 0]"
        )
    )
    plain = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=ENV, capture_output=True, text=True
    )
    out = tmp_path / "run"
    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradguard",
            "run",
            "--out",
            str(out),
            "--no-report",
            "--monitor-only",
            str(script),
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert got.returncode == plain.returncode == 0, got.stderr
    assert got.stdout == plain.stdout == "loss nan\n"
    config = json.loads((out / "meta.json").read_text())["config"]
    assert config["monitor_only"] is True and config["on_nonfinite"] == "warn"
    first = read_run(out).first_nonfinite()
    assert first is not None and first["step"] == 7 and first["located_by"] == "replay", first


def test_the_choices_are_the_guards() -> None:
    from gradguard._guard.config import OnExplosion, OnNonFinite, OnSpike

    parser = build_parser()
    for dest, literal in (
        ("on_nonfinite", OnNonFinite),
        ("on_spike", OnSpike),
        ("on_explosion", OnExplosion),
    ):
        args = parser.parse_args(["run", f"--{dest.replace('_', '-')}", typing.get_args(literal)[0], "x.py"])
        assert getattr(args, dest) == typing.get_args(literal)[0]
        run_actions = next(a for a in parser._subparsers._group_actions).choices["run"]._actions  # type: ignore[union-attr]
        action = next(a for a in run_actions if a.dest == dest)
        assert tuple(action.choices) == typing.get_args(literal)


def test_options_reach_every_guard_and_the_run_log(tmp_path: Path) -> None:
    script = tmp_path / "tiny.py"
    script.write_text(TINY)
    out = tmp_path / "run"
    cmd = [
        *("run", "--out", str(out), "--no-report"),
        *("--on-nonfinite", "rollback", "--on-spike", "ignore", "--every", "5", "--layer-every", "2"),
        *("--weight-every", "none", "--snapshot-every", "4", "--lr-backoff", "0.5", "--min-lr", "1e-6"),
        *("--max-rollbacks", "none", "--rollback-window", "50", "--max-consecutive", "3"),
        *("--norm-type", "inf", "--clip", "norm:2"),
        str(script),
    ]
    got = subprocess.run(
        [sys.executable, "-m", "gradguard", *cmd], cwd=tmp_path, env=ENV, capture_output=True, text=True
    )
    assert got.returncode == 0, got.stderr
    config = json.loads((out / "meta.json").read_text())["config"]
    expected = {
        "on_nonfinite": "rollback",
        "on_spike": "ignore",
        "every": 5,
        "layer_every": 2,
        "weight_every": None,
        "snapshot_every": 4,
        "lr_backoff": 0.5,
        "min_lr": 1e-6,
        "max_rollbacks": None,
        "rollback_window": 50,
        "max_consecutive": 3,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["norm_type"] in (float("inf"), "inf", "Infinity")
    assert config["clip"]["kind"] == "norm" and config["clip"]["max_norm"] == 2.0


def test_a_bad_option_value_is_a_usage_error(tmp_path: Path) -> None:
    script = tmp_path / "tiny.py"
    script.write_text(TINY)
    for bad in (["--every", "0"], ["--clip", "bogus:1"], ["--layer-every", "x"]):
        got = subprocess.run(
            [sys.executable, "-m", "gradguard", "run", "--out", str(tmp_path / "r"), *bad, str(script)],
            cwd=tmp_path,
            env=ENV,
            capture_output=True,
            text=True,
        )
        assert got.returncode == 2, (bad, got.stderr)
        assert "gradguard" in got.stderr and "Traceback" not in got.stderr, got.stderr


def test_an_out_that_holds_a_run_log_is_refused_before_the_script_runs(tmp_path: Path) -> None:
    script = tmp_path / "tiny.py"
    script.write_text("print('the script ran')\n" + TINY)

    def run(*flags: str) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable,
            "-m",
            "gradguard",
            "run",
            "--no-report",
            "--out",
            str(tmp_path / "r"),
            *flags,
            str(script),
        ]
        return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)

    first = run()
    assert first.returncode == 0 and "the script ran" in first.stdout, first.stderr
    again = run()
    assert again.returncode == 2 and "the script ran" not in again.stdout  # refused before it ran
    assert "already holds a run log" in again.stderr and "--exist-ok" in again.stderr, again.stderr
    assert "exist_ok=True" not in again.stderr and "Traceback" not in again.stderr
    n = len(read_run(tmp_path / "r").metrics)
    appended = run("--exist-ok")  # a resumed script: its steps follow the first session's in the log
    assert appended.returncode == 0 and "the script ran" in appended.stdout, appended.stderr
    log = read_run(tmp_path / "r")
    assert [r["step"] for r in log.metrics] == list(range(2 * n)) and not log.superseded, log.skipped


def test_an_out_that_cannot_be_written_is_refused_before_the_script_runs(tmp_path: Path) -> None:
    """An ``--out`` below a file, or a file: the script ran unguarded after an "internal error" (exit 0),
    or died at its first clip with gradguard's error."""
    script = tmp_path / "tiny.py"
    script.write_text("print('the script ran')\n" + TINY)
    (tmp_path / "afile").write_text("keep me")
    for out in ("afile", "afile/run"):
        cmd = [sys.executable, "-m", "gradguard", "run", "--no-report", "--out", out, str(script)]
        got = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        assert got.returncode == 2 and "the script ran" not in got.stdout, got.stderr
        assert "is a file" in got.stderr and "Traceback" not in got.stderr, got.stderr
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_guard_whose_log_dir_cannot_be_made_says_so(tmp_path: Path) -> None:
    import pytest
    import torch

    from gradguard import Guard
    from gradguard.errors import GradGuardError

    (tmp_path / "afile").write_text("")
    model = torch.nn.Linear(2, 1)
    with pytest.raises(
        GradGuardError, match=r"cannot write the run log in .*afile/run.*pass a run directory"
    ):
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), log_dir=tmp_path / "afile" / "run")


def test_a_module_of_a_package_runs_with_dash_m_as_python_runs_it(tmp_path: Path) -> None:
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model.py").write_text("from torch import nn\n\n\ndef make():\n    return nn.Linear(4, 1)\n")
    (pkg / "train.py").write_text(
        "import sys\nimport torch\nfrom .model import make\n\n"
        "print('argv', sys.argv[1:], sys.argv[0].endswith('train.py'))\n"
        "model = make()\nopt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "for _ in range(int(sys.argv[2])):\n"
        "    opt.zero_grad()\n    model(torch.randn(8, 4)).pow(2).mean().backward()\n    opt.step()\n"
    )

    def run(*words: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "gradguard", "run", "--no-report", *words]
        return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)

    plain = subprocess.run(
        [sys.executable, "-m", "mypkg.train", "--steps", "5"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    got = run("--out", str(tmp_path / "r"), "-m", "mypkg.train", "--steps", "5")
    assert got.returncode == plain.returncode == 0, got.stderr
    assert got.stdout == plain.stdout == "argv ['--steps', '5'] True\n"
    assert len(read_run(tmp_path / "r").metrics) == 5
    missing = run("-m", "mypkg.nothing")
    assert missing.returncode == 2 and "no module named 'mypkg.nothing'" in missing.stderr
    as_file = run("--out", str(tmp_path / "f"), "mypkg/train.py", "--steps", "5")
    assert as_file.returncode == 1 and "gradguard run -m package.module" in as_file.stderr, as_file.stderr


def _refused(tmp_path: Path, *words: str) -> None:
    """``gradguard run WORDS`` (in this process) exits 2 before the script ran (its stderr: the caller's capsys)."""
    from gradguard.cli import main

    marker = tmp_path / "ran"
    script = tmp_path / "tiny.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n" + TINY)
    code = main(["run", "--out", str(tmp_path / "r"), "--no-report", *words, str(script)])
    assert code == 2 and not marker.exists() and not (tmp_path / "r").exists()


def test_run_refusals_name_the_flags_not_the_python_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Field test: `--monitor-only --clip norm:1` was told to pass `Guard(..., clip=None)`, and `--every 0`
    read "every must be a positive int"."""
    for words, fix in (
        (("--monitor-only", "--clip", "norm:1"), "--clip none"),
        (("--monitor-only", "--on-nonfinite", "skip"), "--on-nonfinite warn"),
        (("--monitor-only", "--on-explosion", "recover"), "--on-explosion warn"),
        (("--monitor-only", "--on-spike", "skip"), "--on-spike warn"),
    ):
        _refused(tmp_path, *words)
        err = " ".join(capsys.readouterr().err.split())
        assert f"got {' '.join(words[1:])}" in err and fix in err and "drop --monitor-only" in err, err
        assert "Guard(" not in err and "monitor_only" not in err and "clip=None" not in err, err
    for words, said in (
        (("--every", "0"), "--every must be a positive int; got 0."),
        (
            ("--max-rollbacks", "0", "--on-nonfinite", "rollback"),
            "--max-rollbacks must be a positive int; got 0.",
        ),
        (("--spike-z", "-1"), "--spike-z must be a finite number > 0; got -1.0."),
    ):
        _refused(tmp_path, *words)
        assert f"gradguard: error: {said}" in capsys.readouterr().err


def test_run_refuses_flags_that_would_be_ignored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Field test: `--lr-backoff 0.5` and `--snapshot-dir snaps` without a rollback policy, and
    `--no-locate --max-replays 5`, were accepted and silently did nothing (no snaps/ written)."""
    for words, said in (
        (("--lr-backoff", "0.5"), "--lr-backoff acts only when gradguard rolls back"),
        (("--snapshot-dir", str(tmp_path / "snaps"), "--on-nonfinite", "raise"), "--snapshot-dir acts only"),
        (("--snapshot-every", "5", "--max-rollbacks", "2"), "--snapshot-every, --max-rollbacks act only"),
        (("--no-locate", "--max-replays", "5"), "--no-locate turns locating off"),
    ):
        _refused(tmp_path, *words)
        err = " ".join(capsys.readouterr().err.split())
        assert said in err, err
        assert ("add --on-nonfinite rollback" in err) != ("--no-locate" in words), err
    assert not (tmp_path / "snaps").exists()


def test_the_rollback_settings_are_one_list_the_guard_owns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The names were written twice (the command line's refusal, the runner's hand-updated guards): the
    guard's config owns them, and `gradguard run` refuses each one given without a rollback policy."""
    from gradguard._guard.config import ROLLBACK_SETTINGS
    from gradguard.integrations.zerocode import ROLLBACK_SETTINGS as read_by_run

    assert read_by_run is ROLLBACK_SETTINGS and set(ROLLBACK_SETTINGS) <= set(_guard_parameters())
    values = {"snapshot_dir": str(tmp_path / "snaps"), "lr_backoff": "0.5", "min_lr": "1e-6"}
    for dest in ROLLBACK_SETTINGS:
        flag = "--" + dest.replace("_", "-")
        _refused(tmp_path, flag, values.get(dest, "5"))
        assert f"{flag} acts only when gradguard rolls back" in " ".join(capsys.readouterr().err.split())


def test_a_launcher_given_as_the_script_is_refused_with_the_command_that_guards_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Field test (distributed, 1d): `gradguard run torchrun --nproc_per_node=2 train.py` ran torchrun's
    workers unguarded and only said "no optimizer step was seen"."""
    from gradguard.cli import main

    torchrun = tmp_path / "bin" / "torchrun"  # a launcher by its path, as `which torchrun` gives it
    torchrun.parent.mkdir()
    torchrun.write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    out = str(tmp_path / "r")
    for words, command in (
        (
            ["--clip", "auto", str(torchrun), "--nproc_per_node=2", "train.py", "--epochs", "1"],
            f"{torchrun} --nproc_per_node=2 -m gradguard run --out {out} --clip auto train.py --epochs 1",
        ),
        (
            ["torchrun", "--standalone", "train.py"],
            f"torchrun --standalone -m gradguard run --out {out} train.py",
        ),
        (
            ["accelerate", "launch", "--num_processes", "2", "train.py"],
            f"accelerate launch --num_processes 2 -m gradguard run --out {out} train.py",
        ),
        (["deepspeed", "train.py"], f"deepspeed --module gradguard run --out {out} train.py"),
        (
            ["python", "train.py", "--lr", "1"],
            f"gradguard run --out {out} train.py --lr 1",
        ),  # the interpreter
    ):
        assert main(["run", "--out", out, *words]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert err.endswith(f": {command}"), err
        assert "launcher" in err or "interpreter" in err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "r").exists()


def test_a_folder_and_a_package_are_run_or_refused_as_python_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Field test: `gradguard run DIR` (DIR/__main__.py, which `python DIR` runs) said "no such script";
    `-m pkg` (a package, no __main__) said "no module named 'pkg'"; `-m train.py` gave no hint."""
    from gradguard.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__main__.py").write_text(TINY)
    assert main(["run", "--out", str(tmp_path / "r"), "--no-report", "app"]) == 0, capsys.readouterr().err
    assert len(read_run(tmp_path / "r").metrics) == 12
    (tmp_path / "data").mkdir()
    (tmp_path / "gg_nomain_pkg").mkdir()
    (tmp_path / "gg_nomain_pkg" / "__init__.py").write_text("")
    marker = tmp_path / "ran"
    (tmp_path / "train.py").write_text(f"open({str(marker)!r}, 'w').close()\n")  # no __main__ guard
    (tmp_path / "Train.ipynb").write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    for words, said in (
        (
            ["Train.ipynb"],
            "'Train.ipynb' is a Jupyter notebook, not a Python script",
        ),  # (ran: NameError 'null')
        (["data"], "'data' is a folder with no __main__.py, not a script; pass the training script in it"),
        (["-m", "gg_nomain_pkg"], "'gg_nomain_pkg' is a package and cannot be directly executed"),
        (
            ["-m", "train.py"],
            "pass -m train (the name without .py), or the file without -m: gradguard run train.py",
        ),
    ):
        capsys.readouterr()
        assert main(["run", "--out", str(tmp_path / "r2"), *words]) == 2
        assert said in " ".join(capsys.readouterr().err.split())
    assert not marker.exists() and not (tmp_path / "r2").exists()  # train.py was not imported to look


CLIPPED = """
import sys
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(int(sys.argv[1])):
    opt.zero_grad()
    nn.functional.mse_loss(model(torch.randn(8, 4)), 100 * torch.randn(8, 1)).backward()
    nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)  # clips every step
    opt.step()
"""


def test_an_appended_run_counts_its_own_clipped_steps_and_keeps_the_first_commands(tmp_path: Path) -> None:
    """--exist-ok after a first run: the summary read "the script called clip_grad_norm_(max_norm=0.1) on 4
    steps; it clipped 10 of them" (the first run's counted too), and meta.json's argv lost the first command."""
    script = tmp_path / "clipped.py"
    script.write_text(CLIPPED)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "gradguard", "run", "--no-report", "--out", str(tmp_path / "r"), *args]
        return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)

    assert run(str(script), "6").returncode == 0
    appended = run("--exist-ok", str(script), "4")
    assert "on 4 steps; it clipped 4 of them" in appended.stderr, appended.stderr
    sessions = read_run(tmp_path / "r", records=False).meta["sessions"]
    assert [s["argv"][1:] for s in sessions] == [["6"], ["4"]], sessions


def test_an_out_holding_files_gradguard_did_not_write_is_refused_before_the_script_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Field test N11 / N12: ``run --out .`` in a project replaced its ``report.html`` and ``findings.json``
    silently; another logger's ``metrics.jsonl`` got "or --exist-ok to append", which mixed the two logs."""
    from gradguard.cli import main

    script = tmp_path / "tiny.py"
    script.write_text("print('the script ran')\n")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "report.html").write_text("<!DOCTYPE html><html><body>42 passed</body></html>\n")
    (proj / "findings.json").write_text('{"audit": "ok"}\n')
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"epoch": 1, "acc": 0.9}\n')
    for out, flags, names in (
        (proj, [], ["report.html", "findings.json"]),
        (other, ["--exist-ok"], ["metrics.jsonl"]),
    ):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert main(["run", "--out", str(out), *flags, str(script)]) == 2
        captured = capsys.readouterr()
        assert "the script ran" not in captured.out and all(n in captured.err for n in names), captured.err
        assert "another tool's" in captured.err and "--exist-ok" not in captured.err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_snapshot_dir_that_cannot_hold_snapshots_is_refused_before_the_script_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Field test N7: ``--snapshot-dir`` a file (or on a read-only file system) killed the script at its
    first step with gradguard's OSError; ``--out`` is checked before the script starts."""
    from gradguard.cli import main

    script = tmp_path / "tiny.py"
    script.write_text("print('the script ran')\n")
    (tmp_path / "afile").write_text("keep")
    for snap, says in (("afile", "is a file, not a folder"), ("afile/snaps", "cannot be created")):
        words = ["run", "--out", str(tmp_path / "r"), "--on-nonfinite", "rollback"]
        words += ["--snapshot-dir", str(tmp_path / snap)]
        assert main([*words, str(script)]) == 2
        captured = capsys.readouterr()
        assert (
            "the script ran" not in captured.out and "--snapshot-dir" in captured.err and says in captured.err
        )
    assert (tmp_path / "afile").read_text() == "keep" and not (tmp_path / "r").exists()


def test_a_ctrl_c_while_the_report_is_written_says_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Field test N22: a second Ctrl-C while ``gradguard run`` wrote the report printed a 16-line traceback
    through cli.py and script.py; one line says the report was not written and the command that writes it."""
    import shlex

    pytest.importorskip("plotly")
    import gradguard.report
    from gradguard.integrations.zerocode import script

    def interrupted(*args: object, **kwargs: object) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(gradguard.report, "write_report", interrupted)
    run = tmp_path / "runs" / "essai 1"
    assert script._write_report(run) is False
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "report not written (interrupted)" in err, err
    assert shlex.split(err.split(": ", 2)[2]) == ["gradguard", "report", str(run)]


def test_a_ctrl_c_while_the_summary_is_made_says_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Field recheck of N22: a second Ctrl-C during the exit summary (it reads the run log) printed 31 lines of
    gradguard's traceback; one line says what was not written and the commands that write it."""
    from gradguard.integrations.zerocode import script

    class Interrupted:
        out = tmp_path / "runs" / "essai 1"

        def summary(self) -> str:
            raise KeyboardInterrupt

    assert script._print_summary(Interrupted()) is False
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "summary and report not written (interrupted)" in err, err
    assert "gradguard diagnose 'PLACEHOLDER'".replace("PLACEHOLDER", str(Interrupted.out)) in err


KNOWN_ARGS = (
    """
import argparse
parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--out", default=None)
args, _ = parser.parse_known_args()  # what it does not know, it leaves over silently
"""
    + TINY
)


def test_a_gradguard_option_after_the_script_is_said_not_applied_with_the_command_that_applies_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gradguard run train.py --lr 0.1 --on-nonfinite rollback`: the option went to the script, whose
    parse_known_args dropped it, and the run went on under the default policy without a word."""
    from gradguard.cli import main

    script = tmp_path / "train.py"
    script.write_text(KNOWN_ARGS)
    out = str(tmp_path / "run")
    code = main(
        [
            "run",
            "--out",
            out,
            "--no-report",
            "--quiet",
            str(script),
            "--lr",
            "0.1",
            "--on-nonfinite",
            "rollback",
        ]
    )
    err = " ".join(capsys.readouterr().err.split())
    assert code == 0, err
    assert read_run(out).meta["config"]["on_nonfinite"] == "skip"  # not applied: it was the script's argument
    command = f"gradguard run --out {out} --no-report --quiet --on-nonfinite rollback {script} --lr 0.1"
    said = (
        "gradguard: warning: --on-nonfinite came after the script, so it went to the script as its own argument, "
        f"and its argparse left it over (parse_known_args): neither the script nor gradguard applied it. "
        f"gradguard's options go before the script: {command}"
    )
    assert said in err, err
    # the script's own --out (its argparse takes it): nothing to say
    assert (
        main(["run", "--out", str(tmp_path / "run2"), "--no-report", "--quiet", str(script), "--out", "res"])
        == 0
    )
    assert "came after the script" not in capsys.readouterr().err
    # a script that reads no command line: said, in case the script takes it some other way
    plain = tmp_path / "plain.py"
    plain.write_text(TINY)
    assert (
        main(["run", "--out", str(tmp_path / "run3"), "--no-report", "--quiet", str(plain), "--every=5"]) == 0
    )
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "--every came after the script" in err and "if the script takes --every itself, ignore this" in err
    ), err
    assert (
        f"before the script: gradguard run --out {tmp_path / 'run3'} --no-report --quiet --every=5 {plain}"
        in err
    )
