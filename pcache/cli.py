"""The ``pcache`` command line (its commands arrive with the component; for now, help)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from objstore.cli import add_common_options, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pcache",
        description="Node cache filesystem: cache workers, FUSE mount and client (commands arrive with the cache).",
    )
    add_common_options(parser)
    parser.add_subparsers(title="commands", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
