"""Lab tests: several hosts in Linux network namespaces (tools/netns_lab.py).

They are skipped, with the reason, when not root or when `ip netns` (with
bridges and veth pairs) is unusable here. Every lab a test builds is removed
afterwards, whether the test passed or not.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_netns_lab() -> Any:
    spec = importlib.util.spec_from_file_location("netns_lab", REPO / "tools" / "netns_lab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["netns_lab"] = module
    spec.loader.exec_module(module)
    return module


netns_lab = _load_netns_lab()
_reason: str | None | bool = False


def lab_unusable_reason() -> str | None:
    global _reason
    if _reason is False:
        if shutil.which("ip") is None:
            _reason = "iproute2 `ip` not found"
        else:
            _reason = netns_lab.usable()
    return _reason  # type: ignore[return-value]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    lab_items = [item for item in items if item.get_closest_marker("lab")]
    if not lab_items:
        return
    reason = lab_unusable_reason()
    if reason:
        for item in lab_items:
            item.add_marker(pytest.mark.skip(reason=f"lab test skipped: {reason}"))


@pytest.fixture
def make_lab() -> Iterator[Callable[[int], Any]]:
    """make_lab(n) -> an up Lab; all of them are torn down after the test."""
    labs: list[Any] = []

    def make(n: int) -> Any:
        lab = netns_lab.Lab(n)
        labs.append(lab)
        return lab.up()

    try:
        yield make
    finally:
        for lab in labs:
            lab.down()
