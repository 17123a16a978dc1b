"""The HTML report and the terminal summary: self-contained, downsampled, rendered in real Chromium."""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest

import guard_runs as G
from gradguard.diagnose import diagnose
from gradguard.errors import GradGuardError
from gradguard.events import nonfinite_where
from gradguard.report import MAX_POINTS, _figures, print_summary, render_html, write_report
from gradguard.runlog import REPORT_FILE, RunWriter, read_run

pytest.importorskip("plotly", reason="the report extra (plotly) is not installed: pip install '.[report]'")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-like folder holding several run directories."""
    root = tmp_path_factory.mktemp("demo")
    G.healthy(root / "20250101-000001-healthy")
    G.too_high_lr(root / "20250101-000002-too-high-lr")
    G.over_clipped(root / "20250101-000003-over-clipped")
    return root


def test_the_report_is_one_self_contained_file_with_the_findings_first(runs: Path, tmp_path: Path) -> None:
    run = shutil.copytree(runs / "20250101-000002-too-high-lr", tmp_path / "run")
    path = write_report(run)
    assert path == run / REPORT_FILE
    text = path.read_text(encoding="utf-8")
    # offline: plotly's JavaScript inlined, nothing fetched
    assert "Plotly" in text and len(text) > 1_000_000
    assert not re.search(r"<script[^>]+src=", text)
    assert not re.search(r"<link[^>]+href=\"?https?:", text)
    # findings and recommendations before the first plot
    first_plot = text.index('class="plot"')
    assert text.index('data-id="explosion"') < first_plot
    assert text.index("Recommendation:") < first_plot
    for plot in (
        "loss",
        "grad-norm",
        "clip-rate",
        "layer-heatmap",
        "weight-norms",
        "update-ratios",
        "events",
    ):
        assert f'data-plot="{plot}"' in text, plot
    assert not list(run.glob(".*.tmp"))


def test_the_norm_plot_marks_threshold_clipped_and_skipped_steps(runs: Path) -> None:
    over = read_run(runs / "20250101-000003-over-clipped")
    figs = dict(_figures(over, diagnose(over)))
    names = [t.name for t in figs["grad-norm"].data]
    assert figs["grad-norm"].layout.yaxis.type == "log"
    assert "threshold" in names
    assert any(n.startswith("clipped (200 steps)") for n in names)
    assert any(n.startswith("recommended max_norm") for n in names)
    boom = read_run(runs / "20250101-000002-too-high-lr")
    names = [t.name for t in dict(_figures(boom, diagnose(boom)))["grad-norm"].data]
    assert any(n.startswith("skipped (") for n in names)


def test_a_100k_step_run_is_downsampled_for_plots_but_every_event_is_kept(tmp_path: Path) -> None:
    n, spike_at = 100_000, 77_777
    with RunWriter(
        tmp_path / "long", {"layers": ["enc", "dec"], "config": {"clip": "Norm(max_norm=2.0)"}}
    ) as w:
        w.write_metrics(
            [
                {
                    "step": s,
                    "loss": 2.0 / (1 + s / 1000),
                    "grad_norm": 1e4 if s == spike_at else 1.0 + 0.5 * math.sin(s),
                    "threshold": 2.0,
                    "skipped": False,
                    "layers": {"enc": {"grad_norm": 0.5}, "dec": {"grad_norm": 0.8}},
                }
                for s in range(n)
            ]
        )
        w.write_events([{"type": "spike", "step": s, "grad_norm": 9.0} for s in range(0, n, 333)])
    log = read_run(tmp_path / "long")
    figs = dict(_figures(log, diagnose(log)))
    for name in ("loss", "grad-norm", "clip-rate"):
        for trace in figs[name].data:
            assert len(trace.x) <= MAX_POINTS, (name, trace.name, len(trace.x))
    norm = figs["grad-norm"].data[0]
    assert spike_at in list(norm.x) and max(norm.y) == 1e4  # the spike survives downsampling
    assert len(figs["layer-heatmap"].data[0].x) <= 400
    events = figs["events"].data
    assert sum(len(t.x) for t in events) == len(range(0, n, 333))  # events: never downsampled
    html = render_html(log)
    assert len(html) < 12_000_000


def test_a_folder_of_runs_gives_one_page_with_every_run(runs: Path, tmp_path: Path) -> None:
    out = write_report(runs, tmp_path / "page.html")
    text = out.read_text(encoding="utf-8")
    for name in ("20250101-000001-healthy", "20250101-000002-too-high-lr", "20250101-000003-over-clipped"):
        assert name in text
    assert text.count("<section") == 3
    assert text.count('href="#run-') == 6  # the table and the navigation link each run
    assert text.index("20250101-000001-healthy") < text.index("20250101-000003-over-clipped")
    assert text.count("* plotly.js v") == 1  # the library inlined once for every plot of the page
    assert text.count("Plotly.newPlot") >= 3 * 6


def test_a_path_without_a_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GradGuardError, match="does not exist"):
        write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GradGuardError, match="no run log"):
        write_report(tmp_path / "empty")


def test_the_summary_marks_every_recommended_number_that_was_not_verified() -> None:
    """The "recommends" column: a threshold or a learning rate that ``gradguard tune`` did not verify
    says so; a verified one does not; a threshold and a rate are alternatives (each verified with the
    run's other setting unchanged), so they read "… or …"."""
    from gradguard.diagnose import Finding
    from gradguard.report import _short_rec

    estimate = {"max_norm": 0.5, "verified": False, "lr": 0.01, "lr_verified": False, "text": "t"}
    checked = {"max_norm": 0.25, "verified": True, "lr": 0.02, "lr_verified": True, "text": "t"}
    only_lr = {"lr": 0.03, "verified": False, "text": "t"}  # a recommendation of a rate alone
    shown = [
        _short_rec(Finding("explosion", "error", 3, "m", {}, rec)) for rec in (estimate, checked, only_lr)
    ]
    assert shown == [
        "max_norm=0.5 (unverified) or lr=0.01 (unverified)",
        "max_norm=0.25 or lr=0.02",
        "lr=0.03 (unverified)",
    ]


def test_the_terminal_summary(runs: Path) -> None:
    log = read_run(runs / "20250101-000002-too-high-lr")
    buf = io.StringIO()
    print_summary(log, diagnose(log), file=buf)
    text = buf.getvalue()
    assert "explosion" in text and "max_norm=" in text and "first non-finite" in text
    buf = io.StringIO()
    healthy = read_run(runs / "20250101-000001-healthy")
    print_summary(healthy, [], file=buf)
    assert "No findings" in buf.getvalue()


def test_a_run_that_ends_non_finite_shows_its_final_loss_as_such(tmp_path: Path) -> None:
    """Monitor-only (the steps were taken): the losses of the last steps are NaN, and the summary's
    final loss says so, not the mean of the last finite ones."""
    rows = [{"step": s, "loss": 2.0 - s / 100, "grad_norm": 1.0} for s in range(30)]
    rows += [{"step": s, "loss": math.nan, "grad_norm": math.nan, "nonfinite": True} for s in range(30, 40)]
    with RunWriter(tmp_path / "r") as w:
        w.write_metrics(rows)
    log = read_run(tmp_path / "r")
    buf = io.StringIO()
    print_summary(log, diagnose(log), file=buf)
    assert re.search(r"final loss \(last 20\)\s+nan", buf.getvalue()), buf.getvalue()
    with RunWriter(tmp_path / "ok") as w:  # one NaN step that training went on from: the finite mean
        w.write_metrics(
            [*rows[:30], {**rows[30], "step": 30}, *({**r, "step": 31 + i} for i, r in enumerate(rows[:5]))]
        )
    buf = io.StringIO()
    print_summary(read_run(tmp_path / "ok"), [], file=buf)
    assert re.search(r"final loss \(last 20\)\s+1\.83", buf.getvalue()), buf.getvalue()


def test_an_explosions_first_non_finite_shows_where_it_overflowed(tmp_path: Path) -> None:
    """The explosion's event names its layer (phase backward, no op); the summary shows that and
    where the values overflowed (the located op, in the event's evidence), not 'phase backward'."""
    with RunWriter(tmp_path / "r") as w:
        w.write_metrics([{"step": s, "loss": 1.0, "grad_norm": 1.0 * 10**s} for s in range(8)])
        overflow = {
            "phase": "loss",
            "op": "exp",
            "tensor": "output",
            "source": "train.py:19",
            "located_by": "watch",
        }
        w.write_event(
            {"type": "nonfinite", "step": 7, "phase": "backward", "module": "0", "op": None, "tensor": "grad",
             "kind": "inf", "located_by": "norm", "cause": "explosion",
             "evidence": {"cause": "explosion", "first_spike_step": 6, "module": "0", "overflow": overflow}}
        )  # fmt: skip
    buf = io.StringIO()
    print_summary(read_run(tmp_path / "r"), [], file=buf)
    text = " ".join(buf.getvalue().split())
    assert (
        "step 7, an explosion from step 6 in layer 0, overflowing at phase loss, op exp, source train.py:19"
        in text
    )
    bare = {
        "cause": "explosion",
        "module": None,
        "evidence": {"overflow": overflow},
    }  # no spike step, no layer
    assert nonfinite_where(bare) == ("an explosion, overflowing at", overflow)  # never "step None"


# ------------------------------------------------------------------------------------------
# A real browser
# ------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    """Debian's chromium (``make browser`` installs it; the ``test`` target depends on it)."""
    return CHROMIUM if os.path.exists(CHROMIUM) else None


def _png_colours(data: bytes) -> int:
    """Distinct pixel colours in a sample of an 8-bit RGB/RGBA PNG (enough to tell a blank page)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * bpp
    colours: set[bytes] = set()
    prev = bytearray(stride)
    for y in range(height):
        filt = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if filt == 1:
                line[i] = (line[i] + a) & 0xFF
            elif filt == 2:
                line[i] = (line[i] + b) & 0xFF
            elif filt == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif filt == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        if y % 7 == 0:
            colours.update(bytes(line[i : i + 3]) for i in range(0, stride, bpp * 3))
        prev = line
    return len(colours)


def test_the_report_renders_in_headless_chromium(runs: Path, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    chromium = _chromium()
    if chromium is None:
        pytest.skip(
            f"Debian chromium is not at {CHROMIUM} and `make browser` could not install it "
            "(it needs root and the Debian mirrors: apt-get install chromium)"
        )
    page_path = write_report(runs, tmp_path / "report.html")
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri())
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
            page.wait_for_load_state("load")
            plots = page.locator(".js-plotly-plot")
            count = plots.count()
            assert count == page.locator("div.plot").count() >= 3 * 6
            with_svg = page.evaluate(
                "Array.from(document.querySelectorAll('.js-plotly-plot'))"
                ".filter(d => d.querySelector('svg.main-svg')).length"
            )
            assert with_svg == count
            # lines really drawn: the scatter traces have path data with many points
            longest = page.evaluate(
                "Math.max(...Array.from(document.querySelectorAll('.js-plotly-plot path.js-line'))"
                ".map(p => (p.getAttribute('d') || '').length))"
            )
            assert longest > 500
            assert page.locator('.finding[data-id="explosion"]').count() == 1
            shot = tmp_path / "report.png"
            page.locator("div.plot").nth(1).screenshot(path=str(shot))
            full = tmp_path / "page.png"
            page.screenshot(path=str(full), full_page=False)
        finally:
            browser.close()
    assert errors == []
    for png in (shot, full):
        data = png.read_bytes()
        assert len(data) > 10_000
        assert _png_colours(data) > 20, png


def test_a_run_with_no_loss_recorded_shows_no_final_loss(tmp_path: Path) -> None:
    """Per-sample gradients set by hand (no backward, no loss given): a dash, not ``nan``."""
    with RunWriter(tmp_path / "r") as w:
        w.write_metrics([{"step": s, "loss": None, "grad_norm": 1.0} for s in range(5)])
    buf = io.StringIO()
    print_summary(read_run(tmp_path / "r"), [], file=buf)
    assert re.search(r"final loss \(last 20\)\s+—", buf.getvalue()), buf.getvalue()


def test_write_report_marks_its_page_and_never_replaces_a_page_it_did_not_write(
    runs: Path, tmp_path: Path
) -> None:
    """Field test N13: ``gradguard report RUN -o mydash.html`` replaced the user's own page ("replaced the
    existing file"): any file that started as HTML passed for a report. gradguard's page carries a mark."""
    from gradguard.runlog import REPORT_GENERATOR, is_gradguard_report

    run = next(p for p in runs.iterdir() if p.is_dir())
    mine = tmp_path / "mydash.html"
    page = "<!DOCTYPE html>\n<html><head><title>My dashboard</title></head><body>mine</body></html>\n"
    mine.write_text(page)
    with pytest.raises(GradGuardError, match="refusing to replace"):
        write_report(run, mine)
    assert mine.read_text() == page
    written = write_report(run, tmp_path / "r.html")
    assert REPORT_GENERATOR in written.read_text(encoding="utf-8")[:4096] and is_gradguard_report(written)
    assert write_report(run, written) == written  # an earlier report is replaced
