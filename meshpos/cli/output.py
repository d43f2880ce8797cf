"""JSON and human tables on the CLI's standard output (the table layout is `domain.text`)."""

from __future__ import annotations

import json
import sys
from typing import Any

from meshpos.domain.text import shown, table

__all__ = ["emit_json", "shown", "table"]


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
