"""The ``gradguard`` command line: ``demo`` (more commands arrive with the guard and report)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from gradguard.demos import run_demo

    return run_demo(args.name, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradguard", description="Find, explain and stop exploding gradients and NaN losses."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded scenarios that really diverge")
    demo.add_argument("name", nargs="?", default=None, help="one scenario (default: all)")
    demo.add_argument("--out", default=None, help="folder for the demo's run directories")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
