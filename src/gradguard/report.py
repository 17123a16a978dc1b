"""The HTML report and the terminal summary of a run directory (or of a folder of runs).

:func:`write_report` writes one self-contained HTML file that opens offline (plotly's JavaScript is
inlined): the findings and recommendations at the top, then interactive plots (zoom, hover) of the
loss; the global pre-clip gradient norm on a log scale with the threshold, the clipped and skipped
steps and the recommended threshold; the clip and skip rates; a per-layer gradient-norm heatmap
(layers × steps); weight norms and update/weight ratios per layer; and a timeline of every event.
Runs longer than :data:`MAX_POINTS` steps are downsampled for the plots (each bin keeps its first,
smallest, largest and last value, so spikes survive); events never are.

A folder of runs (e.g. a demo's) gives one page: a table of the runs, then each run's section.

:func:`print_summary` prints the same findings as tables in the terminal (``rich`` when installed).

Needs the ``report`` extra (``pip install 'gradguard[report]'``: plotly, rich); nothing else in
gradguard imports it.

Example:
    >>> from gradguard.report import write_report
    >>> write_report("gradguard-runs/20250101-120000-run")   # doctest: +SKIP
    PosixPath('gradguard-runs/20250101-120000-run/report.html')
"""

from __future__ import annotations

import collections
import html
import json
import math
import os
import sys
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from gradguard.diagnose import (
    Finding,
    diagnose,
    first_nonfinite,
    headline,
    healthy_window,
    recommended_max_norm,
)
from gradguard.errors import GradGuardError
from gradguard.events import nonfinite_where
from gradguard.runlog import (
    REPORT_FILE,
    REPORT_GENERATOR,
    RunLog,
    atomic_write_text,
    find_runs,
    is_gradguard_report,
    is_run_dir,
    read_run,
)
from gradguard.runtable import ClipConfig, RunTable, clip_config
from gradguard.safetext import safe_text

__all__ = ["MAX_POINTS", "MAX_RUNS", "print_summary", "render_html", "write_report"]

MAX_POINTS = 2000
"""Most points per plotted series; longer series are downsampled (events never are)."""
MAX_RUNS = 12
"""Most runs of a folder drawn in full on one page (the others are listed in its table)."""
_HEATMAP_COLUMNS = 400
_HEATMAP_ROWS = 200  # more layers than this: each row is the max over a group of neighbouring layers
_LINES_MAX_LAYERS = 20  # more layers than this: a heatmap instead of one line per layer
_SEVERITY_COLOURS = {"error": "#c62828", "warning": "#ef6c00", "info": "#1565c0"}
_EVENT_SYMBOLS = {
    "nonfinite": "x",
    "skip": "triangle-down",
    "spike": "star",
    "rollback": "square",
    "lr_backoff": "diamond",
    "abort": "x-thin",
    "overflow": "circle",
    "loss_scale_collapse": "hexagram",
}


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError as e:
        raise GradGuardError(
            "the HTML report needs plotly, which is not installed: pip install 'gradguard[report]' "
            "(or pip install plotly)."
        ) from e
    return go


# ============================================================================================
# Series
# ============================================================================================


def _num(x: Any) -> float | None:
    """A finite float, or None (JSON null: a gap in a plot)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _downsample_idx(values: Sequence[float | None], max_points: int = MAX_POINTS) -> list[int]:
    """Indices to plot: all when few; else per bin the first, min, max and last finite value."""
    n = len(values)
    if n <= max_points:
        return list(range(n))
    bins = max(1, max_points // 4)
    keep: set[int] = set()
    for b in range(bins):
        lo, hi = b * n // bins, (b + 1) * n // bins
        if lo >= hi:
            continue
        keep.update((lo, hi - 1))
        finite = [(values[i], i) for i in range(lo, hi) if values[i] is not None]
        if finite:
            keep.add(min(finite)[1])
            keep.add(max(finite)[1])
    return sorted(keep)


class _Series:
    """A run's table (:class:`gradguard.runtable.RunTable`) for plotting: values are finite floats or
    ``None`` (a gap in a plot)."""

    def __init__(self, log: RunLog) -> None:
        self.table = RunTable.from_log(log)
        self.steps = self.table.steps
        self.n = len(self.table)
        self.layers = self.table.layers

    def col(self, key: str) -> list[float | None]:
        return [_num(v) for v in self.table.column(key)]

    def layer_points(self, name: str, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of a layer's positive finite values."""
        rows, values = self.table.layer_values(name, key)
        return [(self.steps[r], v) for r, v in zip(rows, values) if math.isfinite(v) and v > 0]

    def has_layer_key(self, key: str) -> bool:
        return self.table.has_layer_key(key)


def _pick(xs: Sequence[Any], idx: Sequence[int]) -> list[Any]:
    return [xs[i] for i in idx]


def _label(name: str) -> str:
    """A name from the run log as plot text: shown literally (plotly reads a subset of HTML)."""
    return html.escape(safe_text(name)) if name else "(root)"


# ============================================================================================
# Figures
# ============================================================================================

_CONFIG = {"displaylogo": False, "responsive": True}


def _layout(go: Any, title: str, ytitle: str, *, log_y: bool = False, height: int = 340) -> Any:
    return go.Layout(
        title={"text": title, "x": 0.01},
        template="plotly_white",
        height=height,
        margin={"l": 70, "r": 20, "t": 50, "b": 45},
        xaxis={"title": {"text": "step"}},
        yaxis={"title": {"text": ytitle}, "type": "log" if log_y else "linear"},
        legend={"orientation": "h", "y": -0.2},
        hovermode="closest",
    )


def _hline(go: Any, s: Any, y: float, name: str, color: str, dash: str) -> Any:
    """A horizontal reference line across the run's steps."""
    return go.Scatter(
        x=[s.steps[0], s.steps[-1]], y=[y, y], mode="lines", name=name, line={"color": color, "dash": dash}
    )


def _top_markers(go: Any, steps: list[int], y: float | None, name: str, colour: str, symbol: str) -> Any:
    """Markers for steps with no plottable value (non-finite), drawn at the top of the plot."""
    shown = steps[:MAX_POINTS]
    return go.Scatter(
        x=shown,
        y=[y] * len(shown),
        mode="markers",
        name=name,
        marker={"color": colour, "symbol": symbol, "size": 9},
        hovertemplate="step %{x}: " + name + "<extra></extra>",
    )


def _fig_loss(go: Any, s: _Series) -> Any:
    loss = s.col("loss")
    idx = _downsample_idx(loss)
    finite = [v for v in loss if v is not None]
    log_y = bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 1e3
    fig = go.Figure(layout=_layout(go, "Training loss", "loss", log_y=log_y))
    fig.add_trace(go.Scatter(x=_pick(s.steps, idx), y=_pick(loss, idx), mode="lines", name="loss"))
    bad = [step for step, b in zip(s.steps, s.table.nonfinite_loss) if b]
    if bad and finite:
        fig.add_trace(_top_markers(go, bad, max(finite), "non-finite loss", "#c62828", "x"))
    return fig


def _fig_norm(go: Any, s: _Series, log: RunLog, findings: Sequence[Finding]) -> Any:
    norm = s.col("grad_norm")
    thr = s.col("threshold")
    idx = _downsample_idx(norm)
    fig = go.Figure(
        layout=_layout(go, "Global gradient norm (pre-clip), log scale", "‖g‖", log_y=True, height=380)
    )
    fig.add_trace(go.Scatter(x=_pick(s.steps, idx), y=_pick(norm, idx), mode="lines", name="pre-clip norm"))
    if any(t is not None for t in thr):
        tidx = _downsample_idx(thr)
        fig.add_trace(
            go.Scatter(
                x=_pick(s.steps, tidx),
                y=_pick(thr, tidx),
                mode="lines",
                name="threshold",
                line={"color": "#6a1b9a", "dash": "dot"},
            )
        )
    clipped = [i for i in range(s.n) if s.table.clipped[i] and norm[i] is not None]
    if clipped:
        cvals: list[float | None] = [norm[i] for i in clipped]
        keep = _downsample_idx(cvals)
        fig.add_trace(
            go.Scatter(
                x=[s.steps[clipped[k]] for k in keep],
                y=[cvals[k] for k in keep],
                mode="markers",
                name=f"clipped ({len(clipped)} steps)",
                marker={"color": "#ef6c00", "size": 5},
            )
        )
    finite = [v for v in norm if v is not None]
    top = max(finite) if finite else 1.0
    skipped = sorted(
        {e["step"] for e in log.events if e.get("type") == "skip" and isinstance(e.get("step"), int)}
        | {st for st, sk in zip(s.steps, s.table.skipped) if sk}
    )
    if skipped:
        fig.add_trace(
            _top_markers(go, skipped, top, f"skipped ({len(skipped)} steps)", "#c62828", "triangle-down")
        )
    rec = recommended_max_norm(findings)
    if rec is not None and s.n:
        fig.add_trace(_hline(go, s, rec, f"recommended max_norm = {rec:g}", "#2e7d32", "dash"))
    return fig


def _rolling_rate(flags: Sequence[bool | None], width: int) -> list[float | None]:
    out: list[float | None] = []
    total = count = 0
    window: collections.deque[bool | None] = collections.deque()
    for f in flags:
        window.append(f)
        if f is not None:
            total += 1
            count += bool(f)
        if len(window) > width:
            old = window.popleft()
            if old is not None:
                total -= 1
                count -= bool(old)
        out.append(count / total if total else None)
    return out


def _fig_rates(go: Any, s: _Series) -> Any:
    skipped = s.table.skipped
    width = max(10, s.n // 100)
    # the clip rate's own definition (runtable): clipped steps over the steps taken
    clip_flags: list[bool | None] = [None if sk else c for c, sk in zip(s.table.clipped, skipped)]
    clip = _rolling_rate(clip_flags, width)
    skip = _rolling_rate(list(skipped), width)
    idx = _downsample_idx(clip)
    fig = go.Figure(
        layout=_layout(go, f"Clip and skip rate (rolling, {width} steps)", "fraction of steps", height=300)
    )
    fig.update_yaxes(range=[-0.02, 1.02])
    fig.add_trace(go.Scatter(x=_pick(s.steps, idx), y=_pick(clip, idx), mode="lines", name="clipped"))
    fig.add_trace(go.Scatter(x=_pick(s.steps, idx), y=_pick(skip, idx), mode="lines", name="skipped"))
    if s.n:
        fig.add_trace(
            go.Scatter(
                x=[s.steps[0], s.steps[-1]],
                y=[0.5, 0.5],
                mode="lines",
                name="50%: aggressive",
                line={"color": "#9e9e9e", "dash": "dot"},
            )
        )
    return fig


def _bins(n: int, columns: int) -> list[tuple[int, int]]:
    if n <= columns:
        return [(i, i + 1) for i in range(n)]
    return [(b * n // columns, (b + 1) * n // columns) for b in range(columns)]


def _bin_of(bins: Sequence[tuple[int, int]], n: int) -> array[int]:
    """For each of ``n`` positions, the index of its bin."""
    out = array("l", bytes(array("l").itemsize * n))
    for b, (lo, hi) in enumerate(bins):
        out[lo:hi] = array("l", [b]) * (hi - lo)
    return out


def _binned_max(
    rows: Sequence[int], values: Sequence[float], present: Sequence[int], bin_of: array[int], bins: int
) -> list[float | None]:
    """log10 of the largest positive finite value per bin (``None``: none); ``rows`` ⊆ ``present``, both sorted."""
    best: list[float | None] = [None] * bins
    pos = 0
    for row, v in zip(rows, values):
        while pos + 1 < len(present) and present[pos] < row:
            pos += 1
        if math.isfinite(v) and v > 0:
            b = bin_of[pos]
            top = best[b]
            best[b] = v if top is None else max(top, v)
    return [math.log10(v) if v is not None else None for v in best]


def _heatmap(go: Any, s: _Series, key: str, title: str, colour_title: str) -> Any:
    """log10 of ``layers[*][key]`` as layers × steps (the steps that hold per-layer numbers); each
    column is the max over its bin of steps, and beyond :data:`_HEATMAP_ROWS` layers each row the
    max over a group of neighbouring layers (a wide model's page stays small)."""
    present = s.table.layer_rows
    bins = _bins(len(present), _HEATMAP_COLUMNS)
    bin_of = _bin_of(bins, len(present))
    rows_z: list[list[float | None]] = []
    labels: list[str] = []
    for lo, hi in _bins(len(s.layers), _HEATMAP_ROWS):
        group = [
            _binned_max(*s.table.layer_values(name, key), present, bin_of, len(bins))
            for name in s.layers[lo:hi]
        ]
        rows_z.append([max((v for v in column if v is not None), default=None) for column in zip(*group)])
        first, last = _label(s.layers[lo]), _label(s.layers[hi - 1])
        labels.append(first if hi - lo == 1 else f"{first} … {last} ({hi - lo} layers)")
    xs = [s.steps[present[lo]] for lo, _ in bins]
    fig = go.Figure(layout=_layout(go, title, "layer", height=max(300, min(900, 60 + 18 * len(labels)))))
    fig.add_trace(
        go.Heatmap(
            x=xs,
            y=labels,
            z=rows_z,
            colorscale="Viridis",
            colorbar={"title": {"text": colour_title}},
            hovertemplate="step %{x}<br>%{y}<br>log10 = %{z:.2f}<extra></extra>",
        )
    )
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def _layer_lines(go: Any, s: _Series, key: str, title: str, ytitle: str, ref: float | None = None) -> Any:
    if len(s.layers) > _LINES_MAX_LAYERS:
        return _heatmap(go, s, key, title + " (log10)", "log10")
    fig = go.Figure(layout=_layout(go, title, ytitle, log_y=True))
    for name in s.layers:
        pts = s.layer_points(name, key)
        if not pts:
            continue
        vals: list[float | None] = [v for _, v in pts]
        idx = _downsample_idx(vals)
        fig.add_trace(
            go.Scatter(
                x=[pts[i][0] for i in idx],
                y=[pts[i][1] for i in idx],
                mode="lines+markers" if len(pts) < 60 else "lines",
                name=_label(name),
                marker={"size": 4},
            )
        )
    if ref is not None and s.n:
        fig.add_trace(_hline(go, s, ref, f"{ref:g} (typical)", "#9e9e9e", "dot"))
    return fig


def _event_text(e: dict[str, Any]) -> str:
    parts = []
    for k, v in e.items():
        if k in ("type", "step"):
            continue
        text = json.dumps(v, default=str) if not isinstance(v, str) else v
        if len(text) > 120:
            text = text[:117] + "…"
        parts.append(f"{_e(k)}: {_e(text)}")
    return "<br>".join(parts[:14])


def _fig_events(go: Any, log: RunLog) -> Any:
    events = [
        e
        for e in log.events
        if isinstance(e.get("step"), (int, float)) and not isinstance(e.get("step"), bool)
    ]
    types = sorted({str(e.get("type")) for e in events})
    fig = go.Figure(layout=_layout(go, f"Events ({len(events)})", "", height=max(220, 80 + 40 * len(types))))
    for t in types:
        mine = [e for e in events if str(e.get("type")) == t]
        fig.add_trace(
            go.Scatter(
                x=[e["step"] for e in mine],
                y=[t] * len(mine),
                mode="markers",
                name=f"{_e(t)} ({len(mine)})",
                marker={"symbol": _EVENT_SYMBOLS.get(t, "circle"), "size": 10},
                text=[_event_text(e) for e in mine],
                hovertemplate="step %{x}: " + _e(t) + "<br>%{text}<extra></extra>",
            )
        )
    fig.update_yaxes(type="category")
    return fig


def _figures(log: RunLog, findings: Sequence[Finding]) -> list[tuple[str, Any]]:
    go = _plotly()
    s = _Series(log)
    figs: list[tuple[str, Any]] = []
    if s.n:
        figs.append(("loss", _fig_loss(go, s)))
        figs.append(("grad-norm", _fig_norm(go, s, log, findings)))
        figs.append(("clip-rate", _fig_rates(go, s)))
        if s.layers and s.has_layer_key("grad_norm"):
            figs.append(
                (
                    "layer-heatmap",
                    _heatmap(go, s, "grad_norm", "Per-layer gradient norm (log10)", "log10 ‖g‖"),
                )
            )
        if s.has_layer_key("weight_norm"):
            figs.append(("weight-norms", _layer_lines(go, s, "weight_norm", "Weight norm per layer", "‖w‖")))
        if s.has_layer_key("update_ratio"):
            figs.append(
                (
                    "update-ratios",
                    _layer_lines(go, s, "update_ratio", "Update/weight ratio per layer", "‖Δw‖/‖w‖", 1e-3),
                )
            )
    if log.events:
        figs.append(("events", _fig_events(go, log)))
    return figs


# ============================================================================================
# HTML
# ============================================================================================

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#fafafa;color:#212121}
main{max-width:1200px;margin:0 auto;padding:16px 24px}
h1{font-size:1.5em;margin:.4em 0} h2{font-size:1.25em;margin:1.2em 0 .4em;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9em} .meta code{background:#eee;padding:0 3px}
.finding{background:#fff;border-left:6px solid #999;margin:10px 0;padding:8px 14px;box-shadow:0 1px 2px #0002}
.finding .sev{font-weight:700;text-transform:uppercase;font-size:.8em;margin-right:.6em}
.finding .rec{background:#e8f5e9;padding:6px 10px;margin:6px 0}
.finding pre{background:#263238;color:#eceff1;padding:6px 10px;overflow-x:auto;margin:4px 0}
.ok{background:#e8f5e9;padding:8px 14px} .notes{background:#fff8e1;padding:6px 14px;font-size:.9em}
table{border-collapse:collapse;font-size:.9em;background:#fff} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
.plot{background:#fff;margin:12px 0;box-shadow:0 1px 2px #0002}
details summary{cursor:pointer;color:#555}
nav a{margin-right:1em}
"""


def _e(x: Any) -> str:
    """Text for the page: control characters escaped visibly (:func:`gradguard.safetext.safe_text`), then HTML."""
    return html.escape(safe_text(x))


def _value(v: Any) -> str:
    if isinstance(v, float):
        return _e(f"{v:.4g}")
    if isinstance(v, (dict, list)):
        return _e(json.dumps(v, default=str))
    return _e(v)


def _findings_html(findings: Sequence[Finding]) -> str:
    if not findings:
        return '<div class="ok">No findings: the rules saw nothing wrong in this run.</div>'
    out = []
    for f in findings:
        colour = _SEVERITY_COLOURS.get(f.severity, "#999")
        rec = f.recommendation
        rec_html = ""
        if rec.get("text"):
            rec_html += f"<div><b>Recommendation:</b> {_e(rec['text'])}</div>"
        if rec.get("code"):
            rec_html += f"<pre>{_e(rec['code'])}</pre>"
        extra = {k: v for k, v in rec.items() if k not in ("text", "code")}
        if extra:
            rec_html += (
                "<div>"
                + ", ".join(f"<code>{_e(k)}</code> = {_value(v)}" for k, v in extra.items())
                + "</div>"
            )
        evidence = "".join(f"<tr><th>{_e(k)}</th><td>{_value(v)}</td></tr>" for k, v in f.evidence.items())
        out.append(
            f'<div class="finding" data-id="{_e(f.id)}" style="border-left-color:{colour}">'
            f'<span class="sev" style="color:{colour}">{_e(f.severity)}</span><b>{_e(f.id)}</b>'
            f"{' at step ' + _e(f.step) if f.step is not None else ''}"
            f"<p>{_e(f.message)}</p>"
            + (f'<div class="rec">{rec_html}</div>' if rec_html else "")
            + (f"<details><summary>evidence</summary><table>{evidence}</table></details>" if evidence else "")
            + "</div>"
        )
    return "\n".join(out)


def _final_loss(losses: Sequence[float], nonfinite: Sequence[bool]) -> float | None:
    """The mean of the last 20 finite losses; the last loss itself where it is not finite (a run
    that ended non-finite ends so, whatever its last finite losses were). ``nonfinite``: the record
    held a non-finite loss (a NaN in ``losses`` without it: no loss was recorded, ``None``)."""
    recorded = [v for v, bad in zip(losses, nonfinite, strict=True) if bad or math.isfinite(v)]
    if recorded and not math.isfinite(recorded[-1]):
        return recorded[-1]
    tail = [v for v in recorded if math.isfinite(v)][-20:]
    return sum(tail) / len(tail) if tail else None


def _run_facts(log: RunLog, findings: Sequence[Finding]) -> dict[str, Any]:
    """The numbers of a run's one-line summary (terminal and HTML tables)."""
    s = _Series(log)
    rate = s.table.clip_rate
    event = first_nonfinite(log)
    return {
        "run": log.path.name,
        "steps": s.n,
        "last_step": s.steps[-1] if s.steps else None,
        "skipped": sum(s.table.skipped),
        "clip": _clip_name(clip_config(log.meta), s.col("threshold"), rate),
        "clip_rate": rate if math.isfinite(rate) else None,
        "final_loss": _final_loss(s.table.column("loss"), s.table.nonfinite_loss),
        "first_nonfinite": event,
        "findings": [f.id for f in findings],
        "max_norm": recommended_max_norm(findings),
    }


def _clip_name(clip: ClipConfig, thr: Sequence[float | None], rate: float) -> str | None:
    """The clipper as the summary names it: the guard's; else the caller's, as the log holds it (a
    threshold: a norm clip; clipped steps without one: a value clip, whose row holds the fraction of
    elements it clamped — "none (clip rate 1)" contradicted itself)."""
    if clip.kind not in ("", "none"):
        return clip.label
    if any(t is not None for t in thr):
        return "threshold in the log"
    if math.isfinite(rate) and rate > 0:
        return "the caller's value clip (in the log)"
    return "none" if clip.kind == "none" else None


def _where(event: dict[str, Any] | None) -> str:
    if not event:
        return "—"
    lead, at = nonfinite_where(event)
    fields = ", ".join(
        f"{k} {v}" for k in ("phase", "module", "op", "source") if (v := at.get(k)) not in (None, "")
    )
    shown = " ".join(x for x in (lead, fields) if x)
    text = f"step {event.get('step')}" + (f", {shown}" if shown else "")
    if event.get("run_dir"):  # another optimizer's run (its own steps): which one
        text += f" (of {_optimizer_text(event.get('optimizer'))}, in {event['run_dir']}/)"
    return text


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _optimizer_text(info: object) -> str:
    """meta.json's ``optimizer``: a class name, or (under ``gradguard run``) ``{class, params, index}``."""
    if isinstance(info, dict):
        what = f" over {info['params']}" if info.get("params") else ""
        return f"{info.get('class', '?')}{what}"
    return "?" if info is None else str(info)


def _run_section(log: RunLog, findings: Sequence[Finding], anchor: str, *, level: int = 1) -> str:
    facts = _run_facts(log, findings)
    meta = log.meta
    h = healthy_window(log)
    info = [
        ("run directory", str(log.path)),
        (
            "steps recorded",
            f"{facts['steps']} (last step {_fmt(facts['last_step'])}, {facts['skipped']} skipped)",
        ),
        ("model / optimizer", f"{meta.get('model', '?')} / {_optimizer_text(meta.get('optimizer'))}"),
        ("clipping", f"{_fmt(facts['clip'])}, clip rate {_fmt(facts['clip_rate'])}"),
        ("final loss (last 20)", _fmt(facts["final_loss"])),
        ("first non-finite", _where(facts["first_nonfinite"])),
        (
            "healthy pre-clip norms",
            f"steps {_fmt(h.first_step)}–{_fmt(h.last_step)}: p50 {_fmt(h.p50)}, p90 {_fmt(h.p90)}"
            if h.norms
            else "—",
        ),
        ("started", _fmt(meta.get("start_time"))),
        ("torch / gradguard", f"{meta.get('torch_version', '?')} / {meta.get('gradguard_version', '?')}"),
    ]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in info)
    notes = (
        '<div class="notes"><b>Reader notes</b> (lines skipped while reading the log):<ul>'
        + "".join(f"<li>{_e(n)}</li>" for n in log.skipped)
        + "</ul></div>"
        if log.skipped
        else ""
    )
    plots = []
    for name, fig in _figures(log, findings):
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"{anchor}-{name}", config=_CONFIG)
        plots.append(f'<div class="plot" data-plot="{_e(name)}">{div}</div>')
    tag = f"h{level}"
    sub = f"h{level + 1}"
    return (
        f'<section id="{_e(anchor)}"><{tag}>{_e(log.path.name)}</{tag}>'
        f'<table class="meta">{rows}</table>{notes}'
        f"<{sub}>Findings and recommendations</{sub}>{_findings_html(findings)}"
        f"<{sub}>Plots</{sub}>"
        + ("\n".join(plots) if plots else "<p>No step records to plot.</p>")
        + "</section>"
    )


def _page(title: str, body: str) -> str:
    from plotly.offline import get_plotlyjs

    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"{REPORT_GENERATOR}"  # gradguard's page: `report -o` and `run --out` replace it, and no other
        f"<title>{_e(title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{_CSS}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script>'
        f"</head><body><main>{body}"
        '<p class="meta">Written by <code>gradguard report</code>; plots are interactive '
        "(drag to zoom, double-click to reset, hover for values).</p></main></body></html>\n"
    )


def _runs_table(entries: Sequence[tuple[RunLog, list[Finding], str | None]]) -> str:
    head = "<tr><th>run</th><th>steps</th><th>clip</th><th>clip rate</th><th>first non-finite</th><th>final loss</th><th>max_norm rec.</th><th>findings</th></tr>"
    rows = []
    for log, findings, anchor in entries:
        f = _run_facts(log, findings)
        name = f'<a href="#{_e(anchor)}">{_e(f["run"])}</a>' if anchor else _e(f["run"])
        rows.append(
            f"<tr><td>{name}</td><td>{_e(f['steps'])}</td><td>{_e(_fmt(f['clip']))}</td>"
            f"<td>{_e(_fmt(f['clip_rate']))}</td><td>{_e(_where(f['first_nonfinite']))}</td>"
            f"<td>{_e(_fmt(f['final_loss']))}</td><td>{_e(_fmt(f['max_norm']))}</td>"
            f"<td>{_e(', '.join(f['findings']) or '—')}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def render_html(run: RunLog | str | os.PathLike[str], findings: Sequence[Finding] | None = None) -> str:
    """The report page of one run as an HTML string (see :func:`write_report`)."""
    log = run if isinstance(run, RunLog) else read_run(run, records=False)
    found = list(findings) if findings is not None else diagnose(log)
    body = _run_section(log, found, "run")
    return _page(f"gradguard report: {log.path.name}", body)


def _render_folder(folder: Path, runs: Sequence[Path]) -> str:
    ordered = list(reversed(runs))  # find_runs is newest first; a page reads oldest first
    entries: list[tuple[RunLog, list[Finding], str | None]] = []
    for i, path in enumerate(ordered):
        log = read_run(path, records=False)
        shown = i >= len(ordered) - MAX_RUNS
        entries.append((log, diagnose(log), f"run-{i}" if shown else None))
    nav = "".join(f'<a href="#{_e(a)}">{_e(log.path.name)}</a>' for log, _, a in entries if a)
    sections = "\n".join(
        _run_section(log, found, anchor, level=2) for log, found, anchor in entries if anchor is not None
    )
    hidden = sum(1 for _, _, a in entries if a is None)
    note = (
        f"<p>{hidden} older run(s) are listed but not drawn (at most {MAX_RUNS} per page).</p>"
        if hidden
        else ""
    )
    body = (
        f"<h1>gradguard report: {_e(folder.name)} ({len(entries)} runs)</h1>"
        f'<p class="meta">{_e(str(folder))}</p>{_runs_table(entries)}{note}<nav>{nav}</nav>{sections}'
    )
    return _page(f"gradguard report: {folder.name}", body)


def write_report(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write the HTML report of a run directory, or one page for a folder of runs.

    ``run`` may be a run directory (its report) or a folder whose subfolders are runs (one page:
    a table of every run, then each run's findings and plots, the newest :data:`MAX_RUNS` drawn).
    An earlier report at the output path is replaced atomically (the report is derived data; a
    reader never sees half a file); any other file there is refused.

    Args:
        run: a run directory or a folder of runs.
        out: the HTML file (default: ``report.html`` inside ``run``); an existing folder means
            ``<folder>/report.html``. Missing parent folders are created.

    Returns:
        The path written.

    Raises:
        GradGuardError: ``run`` holds no run, ``out`` is neither a folder nor a ``.html`` /
            ``.htm`` file, the file there is not a report gradguard wrote (:func:`refuse_to_replace`),
            or plotly is missing.
    """
    _check_out(out)
    _plotly()
    src = Path(run)
    if src.is_dir() and not is_run_dir(src):
        runs = find_runs(src)
        if not runs:
            read_run(src)  # raises the reader's message: no run here
        text = _render_folder(src, runs) if len(runs) > 1 else render_html(runs[0])
        base = src
    else:
        log = read_run(src, records=False)
        text = render_html(log)
        base = log.path
    target = Path(out) if out is not None else base / REPORT_FILE
    if target.is_dir():
        target = target / REPORT_FILE
    refuse_to_replace(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, text)
    return target


def refuse_to_replace(target: Path) -> None:
    """Refuse to write over ``target`` when it is a file gradguard's report did not write (the user's own
    page, a run's log, a script): an earlier report (:data:`REPORT_GENERATOR` in its head) or an empty
    file is replaced freely."""
    if not target.is_file() or target.stat().st_size == 0 or is_gradguard_report(target):
        return
    raise GradGuardError(
        f"refusing to replace {str(target)!r}: it exists and is not a report gradguard wrote (your own page, a "
        "run's log, a script?); pass -o a new file, e.g. -o report.html, or move that file away first."
    )


def _check_out(out: str | os.PathLike[str] | None) -> None:
    """Refuse an ``out`` that would hold HTML under another kind's name (``-o plot.png``): a file
    must end in ``.html`` / ``.htm``; an existing folder gets its ``report.html``."""
    if out is None or Path(out).is_dir():
        return
    path = Path(out)
    if path.suffix.lower() in (".html", ".htm"):
        return
    ends = f"ends in {path.suffix!r}" if path.suffix else "has no suffix"
    raise GradGuardError(
        f"the report is an HTML page, but the output file {str(out)!r} {ends}: pass a file ending in .html "
        f"(e.g. -o {path.with_suffix('.html')}) or an existing folder (its report.html is written)."
    )


# ============================================================================================
# Terminal
# ============================================================================================


def print_summary(log: RunLog, findings: Sequence[Finding], file: IO[str] | None = None) -> None:
    """Print a run's summary and findings as tables (``rich`` when installed, else plain text).

    Text from the run log (the path, names, ops, source lines, the clipper's label) is shown
    literally: control characters escaped visibly (:func:`gradguard.safetext.safe_text`), no markup.
    """
    stream = file if file is not None else sys.stdout
    for text in _headline_lines(findings):
        print(safe_text(text), file=stream)
    rows = _summary_rows(log, _run_facts(log, findings))
    try:
        import rich  # noqa: F401
    except ImportError:
        _print_plain(rows, log.skipped, findings, stream)
    else:
        _print_rich(rows, log.skipped, findings, stream)


def _headline_lines(findings: Sequence[Finding]) -> list[str]:
    """The verdict first (:func:`gradguard.diagnose.headline`): what went wrong, and the fix."""
    top = headline(findings)
    if top is None:
        return []
    lines = [f"verdict: {top.id} at step {_fmt(top.step)}: {top.message}"]
    text = str(top.recommendation.get("text") or "")
    if text:
        lines.append(
            f"fix: {text[4:].lstrip() if text.lower().startswith('fix:') else text}"
        )  # (not "fix: Fix:")
    return lines


def _summary_rows(log: RunLog, facts: dict[str, Any]) -> list[tuple[str, str]]:
    """The run's summary as ``(label, value)`` lines."""
    return [
        ("run", str(log.path)),
        ("steps", f"{facts['steps']} recorded, {facts['skipped']} skipped"),
        ("clipping", f"{_fmt(facts['clip'])} (clip rate {_fmt(facts['clip_rate'])})"),
        ("final loss (last 20)", _fmt(facts["final_loss"])),
        ("first non-finite", _where(facts["first_nonfinite"])),
    ]


_COLOURS = {"error": "red", "warning": "yellow", "info": "blue"}


def _print_rich(
    rows: Sequence[tuple[str, str]], notes: Sequence[str], findings: Sequence[Finding], stream: IO[str]
) -> None:
    """The summary with ``rich``: every piece of text a :class:`rich.text.Text` (never markup)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    def text(value: Any, style: str = "") -> Text:
        return Text(safe_text(value), style=style)

    console = Console(file=stream, highlight=False, soft_wrap=False, markup=False, emoji=False)
    info = Table(show_header=False, box=None, pad_edge=False)
    info.add_column(style="bold")
    info.add_column()
    for label, value in rows:
        info.add_row(text(label), text(value))
    console.print(info)
    for note in notes:
        console.print(Text.assemble(text("reader:", "yellow"), " ", text(note)))
    if not findings:
        console.print(text("No findings: the rules saw nothing wrong in this run.", "green"))
        return
    table = Table(title="Findings")
    table.add_column("severity", no_wrap=True)
    table.add_column("finding", no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("recommends")
    for f in findings:
        colour = _COLOURS.get(f.severity, "white")
        table.add_row(text(f.severity, colour), text(f.id), text(_fmt(f.step)), text(_short_rec(f)))
    console.print(table)
    for f in findings:
        colour = _COLOURS.get(f.severity, "white")
        console.print(
            Text.assemble(
                text(f.severity.upper(), f"bold {colour}"),
                " ",
                text(f.id, "bold"),
                " ",
                text(f"(step {_fmt(f.step)})"),
            )
        )
        console.print(text(f.message))
        if f.recommendation.get("text"):
            console.print(text(f"→ {f.recommendation['text']}", "green"))
        console.print()


def _short_rec(f: Finding) -> str:
    """The numbers a finding recommends, each marked unverified unless ``gradguard tune`` verified it."""
    rec = f.recommendation
    checked = {"max_norm": rec.get("verified"), "lr": rec.get("lr_verified", rec.get("verified"))}
    numbers = [
        f"{k}={rec[k]:g}" + ("" if checked[k] is not False else " (unverified)")
        for k in ("max_norm", "lr")
        if isinstance(rec.get(k), (int, float)) and not isinstance(rec.get(k), bool)
    ]
    # a threshold or a rate: alternatives, each verified with the run's other setting unchanged
    parts = [" or ".join(numbers)] if numbers else []
    for k in ("on_nonfinite", "dtype", "op"):
        if rec.get(k):
            parts.append(f"{k}={rec[k]}")
    return ", ".join(parts) or "see below"


def _print_plain(
    rows: Sequence[tuple[str, str]], notes: Sequence[str], findings: Sequence[Finding], stream: IO[str]
) -> None:
    """The summary as plain lines, every one through :func:`gradguard.safetext.safe_text`."""

    def line(text: str) -> None:
        print(safe_text(text), file=stream)

    for label, value in rows:
        line(f"{label}: {value}")
    for note in notes:
        line(f"reader: {note}")
    if not findings:
        line("No findings: the rules saw nothing wrong in this run.")
    for f in findings:
        line(f"[{f.severity}] {f.id} (step {_fmt(f.step)}; {_short_rec(f)}): {f.message}")
        if f.recommendation.get("text"):
            line(f"    → {f.recommendation['text']}")
