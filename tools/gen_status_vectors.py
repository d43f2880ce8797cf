#!/usr/bin/env python3
"""Write protocols/vectors/status-short.json: the short-id tables of a status (protocols/link.md,
"Short ids (status format 3)"), with the bytes and the reading each one gives against a roster.
Every byte string and reading below is written by hand; the script refuses to write the file if
the implementation disagrees with one. Run it only when the format changes on purpose."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from meshpos.status.shortids import ShortIds
from meshpos.wire.envelope import b64d, b64e
from meshpos.wire.shortids import HELD, LINKS, ShortTable

OUT = Path(__file__).resolve().parents[1] / "protocols" / "vectors" / "status-short.json"

# Two members share their first 4 bytes (4a1f09c2): the narrowest width with a prefix each is 5.
ROSTER = ["00000000000000a1", "4a1f09c2d3e4b5a6", "4a1f09c2ffffffff", "c0ffee0000000001"]

TABLES: list[dict[str, Any]] = [
    {"name": "held at the roster's width: 130 and 7 (LEB128 82 01 and 07)", "field": "held_short", "width": 5,
     "values": {"00000000000000a1": 130, "4a1f09c2d3e4b5a6": 7},
     "bytes_hex": "05" "0000000000" "8201" "4a1f09c2d3" "07",
     "reads": {"00000000000000a1": 130, "4a1f09c2d3e4b5a6": 7}, "problems": 0},
    {"name": "links: value = RTT ms + 1, 0 = not measured", "field": "links_short", "width": 5,
     "values": {"4a1f09c2ffffffff": 13, "c0ffee0000000001": 0},
     "bytes_hex": "05" "4a1f09c2ff" "0d" "c0ffee0000" "00",
     "reads": {"4a1f09c2ffffffff": 13, "c0ffee0000000001": 0}, "problems": 0},
    {"name": "width 4 from a node that did not know 4a1f09c2ffffffff: that prefix names two members here, "
             "its record is left out", "field": "held_short", "width": 4,
     "values": {"4a1f09c2d3e4b5a6": 7, "c0ffee0000000001": 1},
     "bytes_hex": "04" "4a1f09c2" "07" "c0ffee00" "01",
     "reads": {"c0ffee0000000001": 1}, "problems": 1},
    {"name": "a prefix that names no member (a certificate not received yet) is left out", "field": "links_short",
     "width": 5, "values": {"deadbeef00000000": 2, "00000000000000a1": 1},
     "bytes_hex": "05" "0000000000" "01" "deadbeef00" "02",
     "reads": {"00000000000000a1": 1}, "problems": 1},
    {"name": "no record: the empty text", "field": "held_short", "width": 5, "values": {},
     "bytes_hex": "", "reads": {}, "problems": 0},
]

INVALID: list[dict[str, Any]] = [
    {"name": "width below 4", "field": "held_short", "bytes_hex": "03000000" "01", "why": "id width 3"},
    {"name": "width above 8", "field": "held_short", "bytes_hex": "09" + "00" * 9 + "01", "why": "id width 9"},
    {"name": "a width and no record", "field": "links_short", "bytes_hex": "04", "why": "a width and no record"},
    {"name": "record cut short", "field": "held_short", "bytes_hex": "04" "000000", "why": "cut short"},
    {"name": "number cut short", "field": "held_short", "bytes_hex": "04" "00000001" "85", "why": "cut short"},
    {"name": "one node named twice", "field": "links_short", "bytes_hex": "04" "00000001" "01" "00000001" "02",
     "why": "not strictly ascending"},
    {"name": "not sorted", "field": "held_short", "bytes_hex": "04" "00000002" "01" "00000001" "01",
     "why": "not strictly ascending"},
    {"name": "non-minimal LEB128", "field": "held_short", "bytes_hex": "04" "00000001" "8100",
     "why": "not minimal"},
    {"name": "held mark 0", "field": "held_short", "bytes_hex": "04" "00000001" "00", "why": "out of 1..9007199254740992"},
    {"name": "number of more than 8 bytes", "field": "links_short", "bytes_hex": "04" "00000001" + "ff" * 8 + "01",
     "why": "too long"},
    {"name": "padded base64", "field": "held_short", "text": "BAAAAAEB=", "why": "not canonical base64url"},
    {"name": "not a string", "field": "links_short", "text": 5, "why": "not a base64url string"},
]


def main() -> None:
    ids = ShortIds(SimpleNamespace(identities={n: SimpleNamespace(role="terminal") for n in ROSTER}))  # type: ignore[arg-type]
    width = ids.width()
    assert width == 5, width
    for case in TABLES:
        fmt = {"links_short": LINKS, "held_short": HELD}[case["field"]]
        text = fmt.encode(ShortTable.of(case["width"], case["values"]))
        assert text == (b64e(bytes.fromhex(case["bytes_hex"])) if case["bytes_hex"] else ""), (case["name"], text)
        problems: list[str] = []
        assert ids.names(fmt.decode(text), problems) == case["reads"], case["name"]
        assert len(problems) == case["problems"], (case["name"], problems)
        case["text"] = text
    for case in INVALID:
        fmt = {"links_short": LINKS, "held_short": HELD}[case["field"]]
        text = b64e(bytes.fromhex(case["bytes_hex"])) if "bytes_hex" in case else case["text"]
        table = fmt.decode(text)
        assert table is not None and not table.records and case["why"] in (table.problem or ""), (case, table)
        if "bytes_hex" in case:
            assert b64d(text, "vector").hex() == case["bytes_hex"]
    doc = {
        "description": "Short-id tables of a node status (protocols/link.md, 'Short ids (status format 3)'). "
                       "table = base64url(width || (id prefix || uleb128 value)*), '' for no record. 'roster' is "
                       "the reader's roster; 'roster_width' the narrowest width at which its members' prefixes "
                       "differ (what a node with this roster writes at). Each of 'tables' gives the values "
                       "written (full node id -> value; links: RTT ms + 1), the text, and what a reader with "
                       "'roster' reads (node id -> value) and how many reasons it logs. Each of 'invalid' must "
                       "read as no record, with a reason containing 'why'.",
        "roster": ROSTER,
        "roster_width": width,
        "tables": TABLES,
        "invalid": INVALID,
    }
    OUT.write_text(json.dumps(doc, indent=2) + "\n", "utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
