"""Argument types shared by every command's parser."""

from __future__ import annotations

import argparse
from pathlib import Path

from meshpos.domain.errors import InputError
from meshpos.domain.hostport import parse_hostport


def path_arg(text: str) -> Path:
    """A path as typed, with ``~`` expanded."""
    return Path(text).expanduser()


def hostport_arg(text: str) -> tuple[str, int]:
    """HOST:PORT, by the one parser (domain.hostport); argparse reports a bad one."""
    try:
        return parse_hostport(text, "the address")
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
