"""Sells a burst through the node's public interface, printing each sale id once acknowledged.

Usage: python crash_driver.py NODE_DIR COUNT
"""

from __future__ import annotations

import sys
from pathlib import Path

from meshpos.node.core import NodeCore


def main() -> None:
    core = NodeCore.open(Path(sys.argv[1]))
    for i in range(int(sys.argv[2])):
        sale = core.sell(100 + i % 50)
        sys.stdout.write(sale["id"] + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
