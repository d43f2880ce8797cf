"""Readable JSON files written atomically, read with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meshpos.domain.errors import ConfigError
from meshpos.infra.durable import write_atomically


def write_json(path: Path, data: Any, mode: int = 0o644) -> None:
    """Readable JSON, written atomically and durably (infra.durable)."""
    write_atomically(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode=mode)


def read_json(path: Path, what: str, expect_format: str | None = None) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: {what} is missing") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: {what} is not valid JSON (nested too deep)") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} must be a JSON object")
    if expect_format is not None and data.get("format") != expect_format:
        raise ConfigError(f"{path}: not a {what} (format {data.get('format')!r}, expected {expect_format!r})")
    return data
