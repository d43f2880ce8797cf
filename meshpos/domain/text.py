"""Plain-text rendering shared by everything that shows data to a person: one cell escaper, one
table layout. Pure functions; writing the text somewhere is the caller's business (the CLI)."""

from __future__ import annotations

from typing import Any, Sequence


def shown(value: Any) -> str:
    """A cell as a terminal may print it: control, bidirectional and other non-printable
    characters (a signed entry can carry any) written as escapes, so none acts on the terminal."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[shown(h) for h in headers]] + [[shown(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def duration(seconds: float, compact: bool = False) -> str:
    """``95 s``, ``12 min``, ``3 h 05 min`` (``compact``: ``95s``, ``12m``, ``3h05``, for table cells)."""
    s = int(seconds)
    if s < 120:
        return f"{s}s" if compact else f"{s} s"
    if s < 7200:
        return f"{s // 60}m" if compact else f"{s // 60} min"
    return f"{s // 3600}h{s % 3600 // 60:02d}" if compact else f"{s // 3600} h {s % 3600 // 60:02d} min"
