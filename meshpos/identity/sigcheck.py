"""Bulk Ed25519 signature checks in a helper process, beside the node's own work.

PyNaCl lets go of the GIL for each ~45 us check, too briefly for threads to gain
anything: on a 2-core host two verifying threads ran no faster than one, and a
verifying thread beside the interpreter's own work slowed both (a thread that wants
the GIL back waits out the switch interval). A child process (``python -m
meshpos.identity.sigcheck``) has no such limit: it checks the signatures of a big merge
while the node decodes, verifies and stores the entries.

Its answers are only a cache for ``Roster.verify``, which runs every rule itself and
checks any signature the helper did not call valid (a bad one, or no answer because
the helper could not start, died or hung for ANSWER_TIMEOUT): a node never depends on it.

Pipe protocol, in order both ways: a batch is ``u32 length`` then, per signature,
``public key (32) | signature (64) | u32 length | message``; its answer is one byte
per signature, 1 for a valid one.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import fcntl
import itertools
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
from typing import IO

from meshpos.identity import keys
from meshpos.domain.errors import VerificationError

log = logging.getLogger(__name__)

U32 = struct.Struct(">I")
ITEM_HEAD = keys.KEY_LEN + keys.SIG_LEN + U32.size
PIPE_SIZE = 1 << 20
ANSWER_TIMEOUT = 10.0  # a helper that hangs costs this once; then this process checks signatures itself
HELPERS = max(1, min(3, (os.cpu_count() or 2) - 1))  # this process keeps a core of its own


class Batch:
    """The answers to one batch, read from the helper when first asked for."""

    def __init__(self, checker: "SigChecker", count: int) -> None:
        self._checker = checker
        self.count = count
        self.answers: bytes | None = None

    def valid(self, index: int) -> bool:
        if self.answers is None:
            self._checker.read_until(self)
        assert self.answers is not None
        return index < len(self.answers) and self.answers[index] == 1

    def ready(self) -> bool:
        """Whether the answers are in, reading what the helper has written so far (never waits)."""
        if self.answers is None:
            self._checker.poll()
        return self.answers is not None


class SigChecker:
    """One helper process, started on first use; batches go in, answers come back in order."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._failed = False
        self._sent: collections.deque[Batch] = collections.deque()
        self._got = bytearray()  # answers read but not yet handed to their batch
        self._lock = threading.Lock()  # answers come back in order: one caller at a time

    def submit(self, jobs: list[tuple[bytes, bytes, bytes]]) -> Batch:
        """Send (public key, message, signature) triples to be checked; never raises."""
        with self._lock:
            return self._submit(jobs)

    def _submit(self, jobs: list[tuple[bytes, bytes, bytes]]) -> Batch:
        batch = Batch(self, len(jobs))
        proc = self._start()
        if proc is None or not all(len(pk) == keys.KEY_LEN and len(sig) == keys.SIG_LEN for pk, _, sig in jobs):
            batch.answers = b""
            return batch
        parts: list[bytes] = []
        for pk, msg, sig in jobs:
            parts += (pk, sig, U32.pack(len(msg)), msg)
        body = b"".join(parts)
        try:
            assert proc.stdin is not None
            proc.stdin.write(U32.pack(len(body)) + body)
            proc.stdin.flush()
        except OSError as exc:
            self._fail(f"cannot write to it: {exc}")
            batch.answers = b""
            return batch
        self._sent.append(batch)
        return batch

    def read_until(self, batch: Batch) -> None:
        """Read answers in order until ``batch`` has its own."""
        with self._lock:
            while batch.answers is None:
                self._read_one()

    def settle(self) -> None:
        """Read every outstanding answer (so answers nobody asks for cannot fill the pipe)."""
        with self._lock:
            while self._sent:
                self._read_one()

    def poll(self) -> None:
        """Take in the answers the helper has written so far, without waiting for more."""
        with self._lock:
            if self._sent:
                self._read(wait=False)

    def outstanding(self) -> int:
        """Signatures sent and not answered yet (as of the last read)."""
        return sum(batch.count for batch in self._sent)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for batch in self._sent:
            batch.answers = b""
        self._sent.clear()
        self._got.clear()
        try:
            assert proc.stdin is not None
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _read_one(self) -> None:
        """Wait until the oldest outstanding batch has its answers."""
        head = self._sent[0]
        while head.answers is None:
            self._read(wait=True)

    def _read(self, wait: bool) -> None:
        """Read what the helper has written (waiting up to ANSWER_TIMEOUT for something if ``wait``)
        and hand each complete batch its answers, in order."""
        if self._proc is None:  # closed: nothing more will come
            for batch in self._sent:
                batch.answers = b""
            self._sent.clear()
            return
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()  # read raw, never through the buffered file: select sees it all
        try:
            while select.select([fd], [], [], ANSWER_TIMEOUT if wait else 0)[0]:
                got = os.read(fd, 1 << 16)
                if not got:
                    self._fail("it exited")
                    return
                self._got += got
                wait = False  # then take whatever else is there already
            if wait:
                self._fail(f"no answer within {ANSWER_TIMEOUT:g} s")
                return
        except OSError as exc:
            self._fail(f"cannot read from it: {exc}")
            return
        while self._sent and len(self._got) >= self._sent[0].count:
            batch = self._sent.popleft()
            batch.answers = bytes(self._got[:batch.count])
            del self._got[:batch.count]

    def _start(self) -> subprocess.Popen[bytes] | None:
        if self._proc is None and not self._failed:
            try:
                self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            except OSError as exc:
                self._fail(f"cannot start it: {exc}")
                return None
            assert self._proc.stdin is not None
            with contextlib.suppress(OSError, AttributeError):  # Linux only: room for a few shards ahead
                fcntl.fcntl(self._proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        return self._proc

    def _fail(self, reason: str) -> None:
        log.warning("signature helper process: %s; signatures are checked in this process", reason)
        self._failed = True
        if self._proc is not None:
            self._proc.kill()
        self.close()


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        got = stream.read(n - len(data))
        if not got:
            break
        data += got
    return bytes(data)


class HelperPool:
    """The signature helper processes of this process: started at the first batch, one per core
    but the one this process needs (on 2 cores a second helper made a 100,000-sale join slower,
    3 runs of 3), closed at exit. Every Roster of the process shares the one ``POOL``: a simulation
    holding 20 nodes in one process would otherwise start 20 times as many helpers
    (tests/test_sigcheck.py shows they are shared)."""

    def __init__(self, size: int = HELPERS) -> None:
        self.size = size
        self.helpers: list[SigChecker] = []
        self._turn = itertools.count()

    def submit(self, jobs: list[tuple[bytes, bytes, bytes]]) -> Batch:
        """Send a batch to the next helper."""
        if not self.helpers:
            self.helpers.extend(SigChecker() for _ in range(self.size))
            atexit.register(self.close)
        return self.helpers[next(self._turn) % len(self.helpers)].submit(jobs)

    def settle(self) -> None:
        for helper in self.helpers:
            helper.settle()

    def outstanding(self) -> int:
        """Signatures sent to the helpers and not answered yet (reading what they answered so far)."""
        for helper in self.helpers:
            helper.poll()
        return sum(helper.outstanding() for helper in self.helpers)

    def close(self) -> None:
        for helper in self.helpers:
            helper.close()


POOL = HelperPool()


def serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """The helper's side: answer batches until the input ends."""
    while len(head := _read_exactly(inp, U32.size)) == U32.size:
        body = _read_exactly(inp, U32.unpack(head)[0])
        answers = bytearray()
        at = 0
        while at + ITEM_HEAD <= len(body):
            pk, sig = body[at:at + keys.KEY_LEN], body[at + keys.KEY_LEN:at + keys.KEY_LEN + keys.SIG_LEN]
            end = at + ITEM_HEAD + U32.unpack_from(body, at + ITEM_HEAD - U32.size)[0]
            try:
                keys.verify(pk, body[at + ITEM_HEAD:end], sig)
                answers.append(1)
            except VerificationError:
                answers.append(0)
            at = end
        out.write(answers)
        out.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the node: it ends us by closing our input
    serve(sys.stdin.buffer, sys.stdout.buffer)
