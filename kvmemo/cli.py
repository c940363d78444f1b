"""The ``kvmemo`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = argparse.ArgumentParser(prog="kvmemo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the server")
    args = parser.parse_args(argv)
    if args.command == "serve":
        print("kvmemo serve: the server is not built yet", file=sys.stderr)
        return 1
    return 2
