"""Subcommands of the later components (run, switch, uplink, devices, inspection)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pass
