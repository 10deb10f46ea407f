"""The ``forgetkern`` command line. Every argument is checked by one validation layer
(:mod:`forgetkern._args`) before a command runs: a bad one prints one line
(``forgetkern <command>: error: ...``) and exits with status 2, having written nothing."""
from __future__ import annotations

import argparse
import json
import sys

from . import _bench
from ._args import Parser, UsageError
from ._info import info
from .cache import cli as _cache_cli
from .demo import run as _demo


def _cmd_info(args) -> int:
    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        width = max(len(k) for k in data)
        for key, value in data.items():
            print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="forgetkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, GPU and available backends")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(func=_cmd_info)
    _bench.add_parser(sub)
    _demo.add_parser(sub)
    _cache_cli.add_parser(sub)
    return parser


def main(argv=None) -> int:
    """Run one command; an input error prints one line to stderr and raises :class:`UsageError`
    (``SystemExit`` with status 2)."""
    parser = build_parser()
    command = None
    try:
        args = parser.parse_args(argv)
        command = f"forgetkern {args.command}"
        return args.func(args)
    except UsageError as exc:
        print(f"{exc.prog or command or 'forgetkern'}: error: {exc}", file=sys.stderr)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
