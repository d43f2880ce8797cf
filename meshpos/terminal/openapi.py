"""The terminal API's OpenAPI 3.1 document, protocols/terminal-api.yaml, served at
``/v1/openapi.json``: read from the source tree once, on first request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from meshpos.domain.errors import ConfigError

DOCUMENT = Path(__file__).resolve().parents[2] / "protocols" / "terminal-api.yaml"


def load_openapi(path: Path = DOCUMENT) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: the terminal API document cannot be read: {exc}") from exc
    if not isinstance(doc, dict) or not str(doc.get("openapi", "")).startswith("3.1"):
        raise ConfigError(f"{path}: not an OpenAPI 3.1 document")
    return doc


class OpenApiDocument:
    def __init__(self, path: Path = DOCUMENT) -> None:
        self.path = path
        self._doc: dict[str, Any] | None = None

    def get(self) -> dict[str, Any]:
        if self._doc is None:
            self._doc = load_openapi(self.path)
        return self._doc
