"""Embedded scenarios that really diverge (filled in by the demo work)."""

from __future__ import annotations


def run_demo(name: str | None = None, out: str | None = None) -> int:
    """Run the embedded scenarios; returns a process exit code."""
    print("gradguard demo: no scenarios yet")
    return 0
