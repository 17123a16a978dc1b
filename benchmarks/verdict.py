"""The verdict a user reads, on the fault corpus (tests/faults/*.py): located, and right?

Each script runs unmodified under ``gradguard run`` (a subprocess, as a user runs it), then
``gradguard diagnose`` reads the run directory. Two answers are checked against the script's own
lines (contract 1 of the corpus):

* **located**: the first ``nonfinite`` event's fields equal the script's ``EXPECTED`` (phase,
  module, op, kind, … as the script lists them; ``{"cause": "explosion"}`` for an explosion);
* **verdict**: the headline finding (the first error, :func:`gradguard.diagnose.headline`) has the
  script's ``VERDICT`` id, its message holds the ``cause`` phrase and its recommendation text holds
  the ``fix`` phrase.

The table is family × (scripts, located, verdict right); ``--verbose`` prints every script's
headline and fix. Run ``OMP_NUM_THREADS=1 python benchmarks/verdict.py`` (about 2 s a script on
one core), ``--json out.json`` for the rows, ``-k NAME`` for the scripts whose name holds NAME.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

FAULTS = Path(__file__).resolve().parent.parent / "tests" / "faults"

FAMILIES: dict[str, str] = {
    "acos_cosine": "op at its numerical edge",
    "bce_log_sigmoid": "op at its numerical edge",
    "ce_all_ignored": "op at its numerical edge",
    "ctc_impossible": "op at its numerical edge",
    "deepsad_inverse": "op at its numerical edge",
    "distance_sqrt_zero": "op at its numerical edge",
    "focal_loss": "op at its numerical edge",
    "hypot_origin": "op at its numerical edge",
    "naive_softmax_overflow": "op at its numerical edge",
    "normalize_zero_row": "op at its numerical edge",
    "pow_fractional_negative": "op at its numerical edge",
    "pow_half_zero": "op at its numerical edge",
    "std_last_batch": "op at its numerical edge",
    "vae_kl_exp": "op at its numerical edge",
    "where_nan_grad": "op at its numerical edge",
    "zero_count": "op at its numerical edge",
    "zero_std": "op at its numerical edge",
    "masked_attention": "fully masked row (module, functional wrapper)",
    "mha_need_weights": "fully masked row (module, functional wrapper)",
    "mha_pooling_empty_doc": "fully masked row (module, functional wrapper)",
    "fp16_overflow": "dtype overflow (half, autocast, GradScaler)",
    "autocast_attention_fp16": "dtype overflow (half, autocast, GradScaler)",
    "autocast_exp_fp16": "dtype overflow (half, autocast, GradScaler)",
    "gradscaler_linear_fp16": "dtype overflow (half, autocast, GradScaler)",
    "custom_function_backward": "custom autograd Function",
    "custom_function_log_compress": "custom autograd Function",
    "data_nan": "tensor entering the step (input, target, label)",
    "target_nan": "tensor entering the step (input, target, label)",
    "soft_label_inf": "tensor entering the step (input, target, label)",
    "rnn_state_carried": "state carried across steps",
    "memory_bank_nan": "state carried across steps",
    "adam_eps_zero": "born inside optimizer.step()",
    "custom_optimizer_zero_norm": "born inside optimizer.step()",
    "gan_two_optimizers": "several optimizers",
    "actor_critic_zero_std": "several optimizers",
    "lr_too_high": "explosion: LR / warm-up",
    "warmup_overflow": "explosion: LR / warm-up",
    "sdpa_high_lr": "explosion: LR / warm-up",
    "rnn_bptt": "explosion: ReLU RNN in float32",
    "relu_rnn_cell": "explosion: ReLU RNN in float32",
    "wgan_no_constraint": "WGAN without a Lipschitz constraint",
}
"""Script → family (the issue's families). A script not listed is grouped by its verdict's id."""


def line_of(script: Path, name: str) -> dict[str, Any] | None:
    """The script's ``NAME = {...}`` line (read, not run), or ``None``."""
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            value = ast.literal_eval(node.value)
            return value if isinstance(value, dict) else None
    return None


def family_of(script: Path, verdict: dict[str, Any] | None) -> str:
    """The script's family: the table above, else its expected headline id."""
    return FAMILIES.get(script.stem) or (f"other: {verdict['id']}" if verdict else "other")


def run_and_diagnose(script: Path, out: Path) -> dict[str, Any]:
    """``gradguard run`` the script into ``out``; the first nonfinite event and the headline."""
    from gradguard.diagnose import diagnose, first_nonfinite, headline

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "gradguard", "run", "--out", str(out), "--no-report", str(script)]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if not (out / "meta.json").exists():
        return {
            "error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"],
            "seconds": seconds,
        }
    findings = diagnose(out)
    top = headline(findings)
    return {
        "event": first_nonfinite(out),
        "headline": top.as_dict() if top is not None else None,
        "ids": [f.id for f in findings],
        "seconds": seconds,
    }


def judge(
    expected: dict[str, Any] | None, verdict: dict[str, Any] | None, got: dict[str, Any]
) -> dict[str, bool]:
    """Whether the run located the fault as ``EXPECTED`` says and gave the ``VERDICT``."""
    event = got.get("event") or {}
    located = bool(expected) and all(event.get(k) == v for k, v in (expected or {}).items())
    top = got.get("headline")
    right = (
        verdict is not None
        and top is not None
        and top["id"] == verdict.get("id")
        and str(verdict.get("cause", "")) in top["message"]
        and str(verdict.get("fix", "")) in str(top["recommendation"].get("text", ""))
    )
    return {"located": located, "verdict": right}


def table(rows: list[dict[str, Any]]) -> str:
    """The family × (scripts, located, verdict right) table, as Markdown."""
    families = Counter(r["family"] for r in rows)
    lines = ["| family | scripts | located | verdict right |", "| --- | ---: | ---: | ---: |"]
    for fam in sorted(families):
        mine = [r for r in rows if r["family"] == fam]
        lines.append(
            f"| {fam} | {len(mine)} | {sum(r['located'] for r in mine)} | {sum(r['verdict'] for r in mine)} |"
        )
    lines.append(
        f"| **all** | **{len(rows)}** | **{sum(r['located'] for r in rows)}** | **{sum(r['verdict'] for r in rows)}** |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only the scripts whose name holds this")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every headline and fix")
    args = parser.parse_args(argv)
    scripts = [p for p in sorted(FAULTS.glob("*.py")) if args.k in p.stem]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for script in scripts:
            expected, verdict = line_of(script, "EXPECTED"), line_of(script, "VERDICT")
            got = run_and_diagnose(script, Path(tmp) / script.stem)
            row = {
                "script": script.stem,
                "family": family_of(script, verdict),
                **judge(expected, verdict, got),
            }
            rows.append({**row, "seconds": round(got["seconds"], 1), "headline": got.get("headline")})
            mark = f"{'L' if row['located'] else '-'}{'V' if row['verdict'] else '-'}"
            print(f"{mark} {script.stem} ({got['seconds']:.1f} s)", file=sys.stderr)
            if args.verbose or not row["verdict"]:
                _show(got, expected, verdict)
    print(table(rows))
    print(f"\n{len(rows)} scripts, {sum(r['seconds'] for r in rows):.0f} s in all")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0 if all(r["located"] and r["verdict"] for r in rows) else 1


def _show(got: dict[str, Any], expected: dict[str, Any] | None, verdict: dict[str, Any] | None) -> None:
    event = got.get("event") or {}
    top = got.get("headline") or {}
    print(f"    expected {expected}", file=sys.stderr)
    print(f"    located  { {k: event.get(k) for k in (expected or {})} }", file=sys.stderr)
    print(f"    want     {verdict}", file=sys.stderr)
    print(f"    headline {top.get('id')}: {top.get('message')}", file=sys.stderr)
    print(
        f"    fix      {top.get('recommendation', {}).get('text')}  (all: {got.get('ids')})", file=sys.stderr
    )
    if "error" in got:
        print(f"    error    {got['error']}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
