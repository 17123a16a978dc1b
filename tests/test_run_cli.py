"""``gradguard run``'s options: every Guard policy, under the guard's own name, with the guard's own
default (an option not given is not passed on)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

from gradguard.cli import RUN_GUARD_OPTIONS, build_parser

#: Guard parameters that are not a policy of ``run``: its objects, where it logs (``--out``), the
#: integrations' own switches.
NOT_RUN_OPTIONS = {"model", "optimizer", "log_dir", "name", "process_group", "capture", "monitor_only"}

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


def test_the_choices_are_the_guards() -> None:
    from gradguard._guard.config import OnNonFinite, OnSpike

    parser = build_parser()
    for dest, literal in (("on_nonfinite", OnNonFinite), ("on_spike", OnSpike)):
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
