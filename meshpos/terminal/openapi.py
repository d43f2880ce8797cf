"""The terminal API's OpenAPI 3.1 document, served at ``/v1/openapi.json``: read once, on first
request, from the package's own ``terminal-api.yaml`` (package data, so an installed node serves it
with no source tree). In the repository that file is a symbolic link to the document of record,
``protocols/terminal-api.yaml``; a wheel or sdist build copies its content: one source of truth."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import yaml

from meshpos.domain.errors import ConfigError

DOCUMENT: Traversable = resources.files(__package__ or "meshpos.terminal") / "terminal-api.yaml"


def load_openapi(path: Traversable = DOCUMENT) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: the terminal API document cannot be read: {exc}") from exc
    if not isinstance(doc, dict) or not str(doc.get("openapi", "")).startswith("3.1"):
        raise ConfigError(f"{path}: not an OpenAPI 3.1 document")
    return doc


class OpenApiDocument:
    def __init__(self, path: Traversable = DOCUMENT) -> None:
        self.path = path
        self._doc: dict[str, Any] | None = None

    def get(self) -> dict[str, Any]:
        if self._doc is None:
            self._doc = load_openapi(self.path)
        return self._doc
