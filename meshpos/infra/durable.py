"""The one way meshpos writes a file that must survive a crash or a power cut.

``write_atomically``: the data goes to a temporary file beside the target (created with its final
mode, so a secret is never readable by others, not even briefly), is written whole and fsynced,
then renamed over the target, and the directory is fsynced so the rename itself is on disk. A
reader sees the old file or the new one, never a part. ``durable=False`` keeps the atomic rename
but skips both fsyncs (figures a simulator rewrites many times a second)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)  # a leftover of a crash: O_EXCL below then creates it with our mode
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)
