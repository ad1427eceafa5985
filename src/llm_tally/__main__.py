"""The ``llm-tally`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-tally", description="Per-user LLM usage and cost.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a scripted demo against a built-in fake LLM")
    demo.add_argument(
        "--database-url", default=None, help="store usage here (default: a temporary SQLite file)"
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo.run import run_demo

        run_demo(args.database_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
