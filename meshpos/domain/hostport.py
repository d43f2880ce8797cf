"""HOST:PORT as written in node and switch configuration and on the command line: one parser
for both sides (it belongs to neither). Pure."""

from __future__ import annotations

from meshpos.domain.errors import InputError


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InputError(f"{what} must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port_text)
