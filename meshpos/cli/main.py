"""``meshpos``: one program, several roles. Every error reaches the person here,
as one line and an exit code (meshpos.domain.errors), never as a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from meshpos import __version__
from meshpos.domain.errors import MeshposError
from meshpos.domain.text import shown
from meshpos.infra.logfmt import configure_logging
from meshpos.cli import commands

log = logging.getLogger("meshpos")

ENROLL_STEPS = {"request": "enroll-request", "sign": "enroll-sign", "install": "enroll-install"}


def _switch(argv: list[str]) -> int:
    from meshpos.cli.switch_cmd import main_switch
    return main_switch(argv)


def _acquirer_sim(argv: list[str]) -> int:
    from meshpos.cli.acquirer_cmd import main_acquirer_sim
    return main_acquirer_sim(argv)


# Commands with a parser of their own: `meshpos switch ...`, `meshpos acquirer-sim ...`.
PASSTHROUGH: dict[str, Callable[[list[str]], int]] = {"switch": _switch, "acquirer-sim": _acquirer_sim}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshpos",
        description="Offline card payments for events: every terminal of a site holds the whole "
                    "site's signed sales, and any node with an uplink forwards them all.",
        epilog="Run `meshpos COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"meshpos {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if len(args_list) >= 2 and args_list[0] == "enroll" and args_list[1] in ENROLL_STEPS:
        args_list = [ENROLL_STEPS[args_list[1]]] + args_list[2:]
    if args_list and args_list[0] in PASSTHROUGH:
        configure_logging(logging.INFO)
        try:
            return PASSTHROUGH[args_list[0]](args_list[1:])
        except MeshposError as exc:
            print(f"meshpos: error: {shown(exc)}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            return 130
    parser = build_parser()
    args = parser.parse_args(args_list)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    configure_logging(level)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except MeshposError as exc:
        print(f"meshpos: error: {shown(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("meshpos: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def path_arg(text: str) -> Path:
    return Path(text).expanduser()


if __name__ == "__main__":
    raise SystemExit(main())
