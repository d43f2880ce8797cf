"""``meshpos cashier-pin``, and the ``--cashier-pin`` option of enrollment: the PIN a seller types
to log in to the cashier app on the terminal's screen (meshpos.terminal.cashier_app)."""

from __future__ import annotations

import argparse
from pathlib import Path

from meshpos.cli import secret_input
from meshpos.cli.args import path_arg as _path
from meshpos.domain.errors import InputError
from meshpos.site.cashierpin import generate_pin, pin_problem, set_cashier_pin
from meshpos.site.nodedir import NodeDir

PIN_HELP = ("the cashier app's PIN (4 to 12 digits): `-` reads it from standard input (one line), no value asks "
            "for it twice without echo; never on the command line. Only its scrypt hash is kept "
            "(NODE_DIR/cashier-pin, 0600)")


def add_pin_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cashier-pin", nargs="?", const=secret_input.ASK, metavar="-", help=PIN_HELP)


def read_checked_pin(value: str | None, option: str) -> str | None:
    """The PIN an enrollment option asks for (None: not given), checked before anything is written."""
    secret_input.refuse_argv(value, option, "PIN")
    if value is None:
        return None
    pin = secret_input.read_pin(value, option)
    problem = pin_problem(pin)
    if problem is not None:
        raise InputError(problem)
    return pin


def save_pin(node_dir: Path, pin: str) -> None:
    set_cashier_pin(NodeDir(node_dir).cashier_pin_path, pin)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "cashier-pin", help="set the PIN that opens the cashier app on this terminal's screen",
        description="Set the cashier PIN of the node in NODE_DIR: sellers type it on the cashier app, the page "
                    "the node serves at / on its terminal API address (http://127.0.0.1:7480/ by default). "
                    "It takes effect at once, also on a running node. Five wrong PINs in a row lock the "
                    "login for a minute (kept across restarts).",
        epilog="examples:\n  meshpos cashier-pin NODE_DIR              asks for the PIN twice, without echo\n"
               "  printf '4831\\n' | meshpos cashier-pin NODE_DIR --pin -\n"
               "  meshpos cashier-pin NODE_DIR --generate   makes a random 6-digit PIN and prints it once",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("node_dir", type=_path, metavar="NODE_DIR")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pin", nargs="?", const=secret_input.ASK, metavar="-",
                   help="`-`: read the PIN from standard input (one line); without a value (the default): "
                        "ask for it twice without echo. Never the PIN itself on the command line")
    g.add_argument("--generate", action="store_true", help="make a random 6-digit PIN and print it (once)")
    p.set_defaults(handler=cmd_cashier_pin)


def cmd_cashier_pin(args: argparse.Namespace) -> int:
    secret_input.refuse_argv(args.pin, "--pin", "PIN")
    NodeDir(args.node_dir).check_exists()
    if args.generate:
        pin = generate_pin()
        save_pin(args.node_dir, pin)
        print(f"cashier PIN of {args.node_dir}: {pin}  (shown once: only its hash is kept)")
        return 0
    typed = read_checked_pin(args.pin if args.pin is not None else secret_input.ASK, "--pin")
    assert typed is not None  # a value was asked for
    save_pin(args.node_dir, typed)
    print(f"cashier PIN of {args.node_dir} set")
    return 0
