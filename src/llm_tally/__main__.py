"""The ``llm-tally`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-tally", description="Per-user LLM usage and cost.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="serve a demo app whose users call a built-in fake LLM, with /llm-usage"
    )
    demo.add_argument(
        "--database-url", default=None, help="store usage here (default: a temporary SQLite file)"
    )
    demo.add_argument(
        "--host", default="127.0.0.1", help="interface to serve on (default: %(default)s)"
    )
    demo.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0: any)")
    demo.add_argument("--once", action="store_true", help="play the scripted users, print, exit")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo.run import run_demo

        run_demo(args.database_url, host=args.host, port=args.port, once=args.once)
    return 0


if __name__ == "__main__":
    sys.exit(main())
