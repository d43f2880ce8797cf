"""Small file-system helpers shared by the node and the switch directories."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from meshpos.domain.errors import LockedError


def lock_file(path: Path, busy: str) -> int:
    """flock ``path`` for this process's lifetime (it holds our pid); LockedError(busy) if taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise LockedError(busy) from exc
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
