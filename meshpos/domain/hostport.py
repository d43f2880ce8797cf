"""HOST:PORT as written in node and switch configuration and on the command line: one parser
for both sides (it belongs to neither). Pure."""

from __future__ import annotations

from meshpos.domain.errors import InputError


def parse_hostport(text: object, what: str) -> tuple[str, int]:
    """(host, port); InputError unless ``text`` is a string HOST:PORT whose port is 0-65535 in
    ASCII digits (other digits, such as superscripts or Arabic-Indic ones, are refused)."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be HOST:PORT (a string), got {type(text).__name__}")
    host, sep, port_text = text.rpartition(":")
    if (not sep or not host or not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5
            or not 0 <= int(port_text) <= 65535):
        raise InputError(f"{what} must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port_text)
