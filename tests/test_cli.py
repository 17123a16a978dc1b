"""`gradguard diagnose` and `gradguard report`: output, exit codes, folders of runs, existing files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import guard_runs as G
from gradguard.cli import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, main
from gradguard.runlog import FINDINGS_FILE, REPORT_FILE

FINDING_KEYS = {"id", "severity", "step", "message", "evidence", "recommendation"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    G.healthy(root / "20250101-000001-healthy")
    time.sleep(0.01)
    G.too_high_lr(root / "20250101-000002-too-high-lr")
    return root


@pytest.fixture()
def runs(folder: Path, tmp_path: Path) -> Path:
    """A fresh copy per test (the commands write findings.json and report.html)."""
    return shutil.copytree(folder, tmp_path / "runs")


def test_diagnose_exit_codes(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", str(runs / "20250101-000001-healthy")]) == EXIT_OK == 0
    assert "No findings" in capsys.readouterr().out
    assert main(["diagnose", str(runs / "20250101-000002-too-high-lr")]) == EXIT_FINDINGS == 1
    out = capsys.readouterr().out
    assert "explosion" in out and "max_norm=" in out
    assert (runs / "20250101-000002-too-high-lr" / FINDINGS_FILE).exists()


def test_diagnose_without_a_run_is_a_usage_error_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["diagnose", str(tmp_path / "nope")]) == EXIT_USAGE == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(tmp_path / "nope") in err and "run directory" in err
    (tmp_path / "empty").mkdir()
    assert main(["diagnose", str(tmp_path / "empty")]) == EXIT_USAGE
    assert "no run log" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["diagnose"])  # argparse: missing RUN_DIR
    assert exc.value.code == EXIT_USAGE


def test_diagnose_json_shape(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["diagnose", str(runs / "20250101-000002-too-high-lr"), "--json"])
    assert code == EXIT_FINDINGS
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert {"findings", "first_nonfinite"} <= set(out)
    assert out["findings"] and all(set(f) == FINDING_KEYS for f in out["findings"])
    assert out["findings"][0]["id"] == "explosion"
    assert isinstance(out["findings"][0]["recommendation"]["max_norm"], float)
    first = out["first_nonfinite"]
    assert first["type"] == "nonfinite" and isinstance(first["step"], int)
    assert {"phase", "module", "op", "tensor", "kind", "source", "located_by"} <= set(first)
    on_disk = json.loads((runs / "20250101-000002-too-high-lr" / FINDINGS_FILE).read_text())
    assert on_disk == out["findings"]

    assert main(["diagnose", str(runs / "20250101-000001-healthy"), "--json"]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert out["findings"] == [] and out["first_nonfinite"] is None


def test_diagnose_a_folder_reads_the_newest_run(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", str(runs), "--json", "--no-write"]) == EXIT_FINDINGS
    captured = capsys.readouterr()
    assert json.loads(captured.out)["run"].endswith("20250101-000002-too-high-lr")
    assert "newest of 2 runs" in captured.err
    assert not list(runs.rglob(FINDINGS_FILE))  # --no-write


def test_diagnose_still_answers_where_findings_json_cannot_be_written(
    runs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = runs / "20250101-000002-too-high-lr"
    (run / FINDINGS_FILE).mkdir()  # unwritable even for root (a read-only copy behaves the same)
    assert main(["diagnose", str(run), "--json"]) == EXIT_FINDINGS
    captured = capsys.readouterr()
    assert json.loads(captured.out)["findings"]
    assert "could not write findings.json" in captured.err


def test_report_writes_replaces_and_honours_out(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = runs / "20250101-000002-too-high-lr"
    assert main(["report", str(run)]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"report: {run / REPORT_FILE}" in out and "replaced" not in out
    first = (run / REPORT_FILE).stat().st_mtime_ns
    # an existing report is replaced (atomically), and the command says so
    assert main(["report", str(run)]) == EXIT_OK
    assert "(replaced the existing file)" in capsys.readouterr().out
    assert (run / REPORT_FILE).stat().st_mtime_ns >= first
    assert not list(run.glob(".*.tmp"))
    # -o FILE, in a folder that does not exist yet
    target = tmp_path / "out" / "deep" / "r.html"
    assert main(["report", str(run), "-o", str(target)]) == EXIT_OK
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    capsys.readouterr()
    # -o DIR: DIR/report.html
    assert main(["report", str(run), "-o", str(tmp_path / "out")]) == EXIT_OK
    assert (tmp_path / "out" / REPORT_FILE).exists()
    # a folder of runs: one page in the folder
    assert main(["report", str(runs)]) == EXIT_OK
    page = (runs / REPORT_FILE).read_text(encoding="utf-8")
    assert "20250101-000001-healthy" in page and "20250101-000002-too-high-lr" in page


def test_report_never_replaces_a_file_that_is_not_a_report(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-o`` naming the run's own log or the user's script replaced it with HTML, exit 0."""
    run = runs / "20250101-000002-too-high-lr"
    script = tmp_path / "train.py"
    script.write_text("print('train')\n")
    for target in (run / "metrics.jsonl", script):
        before = target.read_bytes()
        assert main(["report", str(run), "-o", str(target)]) == EXIT_USAGE
        assert "refusing to replace" in capsys.readouterr().err and target.read_bytes() == before


def test_report_refuses_an_out_that_is_not_an_html_file(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Field test: `report RUN -o plot.png` (or `-o myreport`) wrote HTML under that name, exit 0."""
    run = runs / "20250101-000002-too-high-lr"
    for name, ends in (("plot.png", "ends in '.png'"), ("myreport", "has no suffix")):
        assert main(["report", str(run), "-o", str(tmp_path / name)]) == EXIT_USAGE
        err = " ".join(capsys.readouterr().err.split())
        assert ends in err and "pass a file ending in .html" in err, err
        assert not (tmp_path / name).exists() and not (run / REPORT_FILE).exists()
    for name in ("r.HTML", "r.htm"):
        assert main(["report", str(run), "-o", str(tmp_path / name)]) == EXIT_OK
        assert (tmp_path / name).exists()


def test_report_without_a_run_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope")]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == EXIT_USAGE
    assert "no run log" in capsys.readouterr().err
    assert not (tmp_path / "empty" / REPORT_FILE).exists()


def test_python_m_gradguard_diagnose(runs: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gradguard", "diagnose", str(runs / "20250101-000001-healthy"), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["findings"] == []
    helped = subprocess.run(
        [sys.executable, "-m", "gradguard", "--help"], capture_output=True, text=True, check=False
    )
    assert "diagnose" in helped.stdout and "report" in helped.stdout and "demo" in helped.stdout


def test_run_and_demo_report_only_a_missing_torch_as_such(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without torch they say so (tests/test_imports.py); another missing module is not hidden."""
    monkeypatch.setitem(sys.modules, "gradguard.demos", None)  # import gradguard.demos → ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match=r"gradguard\.demos"):
        main(["demo", "rnn", "--out", str(tmp_path / "demo")])


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str]:
    """The exit code of a command that argparse ends, and what it printed (lines joined)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, " ".join((out.out + out.err).split())


def test_help_shows_what_is_optional_the_version_and_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """Field test: `gradguard run` said ARGS was required, there was no --version, `demo --help` had no
    description, and `tune --help` did not give the defaults of --timeout and --out."""
    from gradguard import __version__

    code, text = _help(["run"], capsys)
    assert code == 2 and "required: SCRIPT" in text and "ARGS" not in text.split("error:")[1], text
    for command in ("run", "tune"):
        assert "SCRIPT [ARGS ...]" in _help([command, "--help"], capsys)[1]
    assert _help(["--version"], capsys) == (0, f"gradguard {__version__}")
    code, text = _help(["demo", "--help"], capsys)
    assert code == 0 and "really diverge" in text and "Exit codes" in text
    text = _help(["tune", "--help"], capsys)[1]
    assert "--timeout S give up on a trial after S seconds" in text and "(default: no limit)" in text
    assert "(default: gradguard-runs/<time>-tune-<script>)" in text


def test_diagnose_a_file_of_a_run_reads_that_run(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`gradguard diagnose run/metrics.jsonl` is that run, not "the newest of N runs" beside it."""
    run = runs / "20250101-000001-healthy"
    assert main(["diagnose", str(run / "metrics.jsonl"), "--json", "--no-write"]) == EXIT_OK
    captured = capsys.readouterr()
    assert json.loads(captured.out)["run"].endswith("20250101-000001-healthy")
    assert "newest of" not in captured.err


def test_report_o_never_replaces_the_users_own_html_page(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Field test N13: ``report RUN -o mydash.html`` (the user's hand-written page) said "replaced the
    existing file" though the README promises -o never replaces a file that is not gradguard's report."""
    run = runs / "20250101-000002-too-high-lr"
    mine = tmp_path / "mydash.html"
    page = "<!DOCTYPE html>\n<html><head><title>My dashboard</title></head><body>mine</body></html>\n"
    mine.write_text(page)
    assert main(["report", str(run), "-o", str(mine)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "refusing to replace" in err and "not a report gradguard wrote" in err and mine.read_text() == page
    (run / REPORT_FILE).write_text(page)  # in the run directory too (RUN/report.html, the default)
    assert main(["report", str(run)]) == EXIT_USAGE and (run / REPORT_FILE).read_text() == page


def test_diagnose_of_a_run_still_being_written_writes_no_findings_json(
    runs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Field test K1: a diagnose while the run went on wrote findings.json ("it may still be running"),
    and nothing rewrote it when the run closed: the run directory kept a stale diagnosis."""
    from gradguard.runlog import RunWriter, fcntl

    if fcntl is None:
        pytest.skip("needs fcntl.flock (POSIX)")
    run = runs / "live"
    with RunWriter(run) as w:
        w.write_metrics([{"step": s, "loss": 1.0, "grad_norm": 1.0} for s in range(5)])
        assert main(["diagnose", str(run)]) == EXIT_OK
        captured = capsys.readouterr()
        assert not (run / FINDINGS_FILE).exists()
        assert "findings.json not written" in captured.err and "still being written" in captured.err
        assert "findings: " not in captured.out
    assert main(["diagnose", str(run)]) == EXIT_OK  # closed: written
    assert (run / FINDINGS_FILE).exists() and "findings: " in capsys.readouterr().out


def test_diagnose_names_no_findings_file_it_could_not_write(
    runs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Field test N28: on a read-only run directory, diagnose warned that it could not write findings.json
    and still printed ``findings: RUN/findings.json`` (an older file)."""
    run = runs / "20250101-000002-too-high-lr"
    (run / FINDINGS_FILE).mkdir()  # unwritable even for root (a read-only copy behaves the same)
    assert main(["diagnose", str(run)]) == EXIT_FINDINGS
    captured = capsys.readouterr()
    assert "could not write findings.json" in captured.err
    assert "findings: " not in captured.out and "HTML report: gradguard report" in captured.out


def test_the_commands_diagnose_prints_are_quoted_to_paste(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Field test N27: ``HTML report: gradguard report runs/essai 1 ✓``, unquoted: pasted, it fails."""
    import shlex

    run = shutil.copytree(runs / "20250101-000001-healthy", tmp_path / "essai 1 ✓")
    assert main(["diagnose", str(run)]) == EXIT_OK
    line = next(x for x in capsys.readouterr().out.splitlines() if "HTML report:" in x)
    command = line.split("HTML report: ", 1)[1]
    assert shlex.split(command) == ["gradguard", "report", str(run)], line
