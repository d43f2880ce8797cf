"""Child processes of meshpos (node, switch, acquirer simulator) for the demo and the tests.

Each child runs ``python -m meshpos.cli.main ...`` in its own process group,
with its output in a log file; the group is killed on exit whatever happens,
so nothing is left behind.
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from meshpos.domain.errors import MeshposError, NodeNotRunningError
from meshpos.node import client


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@dataclass
class ProcessGroup:
    log_dir: Path
    children: dict[str, Child] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop_all)

    def start(self, name: str, *args: str, wrap: Sequence[str] = ()) -> Child:
        """Start ``meshpos ARGS...`` as child ``name``; ``wrap`` goes before it (the lab's
        ``ip netns exec NS``, which execs the command: the child is still meshpos itself)."""
        old = self.children.get(name)
        if old is not None and old.alive:
            raise MeshposError(f"process {name} runs already")
        child = Child(name, [*wrap, sys.executable, "-m", "meshpos.cli.main", *args], self.log_dir / f"{name}.log")
        log = open(child.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        child.proc = subprocess.Popen(child.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, start_new_session=True)
        log.close()
        self.children[name] = child
        return child

    def start_node(self, name: str, node_dir: Path, *extra: str, timeout: float = 30.0,
                   wrap: Sequence[str] = ()) -> Child:
        child = self.start(name, "-v", "run", str(node_dir), *extra, wrap=wrap)
        wait_for(lambda: _answers(node_dir), timeout, lambda: f"node {name} did not start:\n{child.log_tail()}",
                 alive=child)
        return child

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        child = self.children[name]
        if child.proc is not None and child.alive:
            os.killpg(child.proc.pid, sig)
            child.proc.wait(timeout=30)

    def stop(self, name: str, timeout: float = 10.0) -> None:
        child = self.children.get(name)
        if child is None or child.proc is None or not child.alive:
            return
        os.killpg(child.proc.pid, signal.SIGTERM)
        try:
            child.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.proc.pid, signal.SIGKILL)
            child.proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.children):
            try:
                self.stop(name, timeout=5.0)
            except (ProcessLookupError, OSError):
                pass


_PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10000


def _unassigned_range() -> tuple[int, int] | None:
    """Ports the kernel never hands out on its own: below its ephemeral range (``None`` when that
    range cannot be read or leaves too little room below it)."""
    try:
        low = int(_PORT_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return (_LOWEST_PORT, low - 1) if low - _LOWEST_PORT >= 1000 else None


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free on ``host`` right now (bound together, then released).

    They are picked at random below the kernel's ephemeral range where it leaves room: a port
    from that range could be taken as the source port of any outgoing connection between this
    check and the child's own bind (seen with many tests at once), one below it only by another
    explicit bind."""
    span = _unassigned_range()
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            s = socket.socket()
            socks.append(s)
            if span is None:
                s.bind((host, 0))
                continue
            for _ in range(50):
                try:
                    s.bind((host, random.randint(*span)))
                    break
                except OSError:
                    continue
            else:
                s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _answers(node_dir: Path) -> bool:
    try:
        client.running(node_dir, timeout=5.0).status()
        return True
    except NodeNotRunningError:
        return False


def wait_for(predicate: Callable[[], bool], timeout: float, message: str | Callable[[], str],
             interval: float = 0.1, alive: Child | None = None) -> None:
    """Poll ``predicate`` until true; MeshposError(message) after ``timeout`` s (message may be a
    callable, evaluated then, so it can show the latest logs)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except MeshposError:
            pass
        exited = alive is not None and not alive.alive
        if exited or time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise MeshposError(f"{text} (process exited)" if exited else text)
        time.sleep(interval)
