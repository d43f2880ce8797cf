"""Red team: HOST:PORT settings with odd characters or of the wrong type in a node's config.json.

One parser reads every HOST:PORT (meshpos.domain.hostport). Only ASCII digits count (issue 12's
rule for amounts, card numbers and PINs): a superscript digit passed ``str.isdigit`` and then
failed ``int``, so every command on the node died with a traceback; Arabic-Indic digits were
taken as a port number nobody could read back in the file; a number where a string belongs gave
an AttributeError. The real CLI in a subprocess, on a real node directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import run_cli


@pytest.mark.parametrize("field, value", [
    ("api", "127.0.0.1:\u00b2"),  # superscript two
    ("api", "127.0.0.1:\u0667\u0664\u0668\u0660"),  # 7480 in Arabic-Indic digits
    ("listen", "0.0.0.0:\uff17\uff14\uff18\uff10"),  # fullwidth digits
    ("dashboard", "127.0.0.1:\U0001d7d5"),  # mathematical bold seven
    ("listen", 7481),
    ("peers", [7481]),
])
def test_a_port_that_is_not_ascii_digits_is_a_clear_config_error(
        make_node: Callable[..., Path], field: str, value: object) -> None:
    node = make_node("t1")
    cfg = json.loads((node / "config.json").read_text())
    cfg[field] = value
    (node / "config.json").write_text(json.dumps(cfg))
    out = run_cli("status", str(node))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "config.json" in out.stderr and "HOST:PORT" in out.stderr
