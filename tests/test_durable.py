"""infra.durable: the one atomic, durable file write (issue 13, "one of each helper")."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshpos.infra.durable import write_atomically


def test_the_new_content_replaces_the_old_whole(tmp_path: Path) -> None:
    target = tmp_path / "policy.env"
    target.write_bytes(b"old")
    data = os.urandom(3 * 1024 * 1024)  # larger than one write() may take
    write_atomically(target, data)
    assert target.read_bytes() == data
    assert os.listdir(tmp_path) == ["policy.env"]  # no temporary file left


def test_a_secret_is_never_readable_by_others_even_over_a_stale_temporary(tmp_path: Path) -> None:
    target = tmp_path / "node.key"
    stale = tmp_path / f".node.key.{os.getpid()}.tmp"
    stale.write_bytes(b"crash leftover")
    os.chmod(stale, 0o644)  # a leftover created readable must not lend its mode to the secret
    write_atomically(target, b"secret", mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_bytes() == b"secret"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "site.json"
    target.write_bytes(b"old")

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)  # the disk fills while the new content is flushed
    with pytest.raises(OSError):
        write_atomically(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["site.json"]
