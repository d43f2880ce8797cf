"""The switch process protects the card numbers it opens, and bounds its connections.

Core dumps: ``meshpos switch run`` sets RLIMIT_CORE to 0 and PR_SET_DUMPABLE to 0, read from the
running process (``/proc/PID/limits``; the dumpable flag as the process itself reads it back).
Connections: real sockets on loopback; many idle connections from one source address do not
keep an honest forwarder's batch from being served, and idle ones are closed within seconds.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import nacl.signing
import pytest
import trio

from meshpos.wire import envelope
from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.site.sitedir import Site
from meshpos.switch.connlimit import ConnectionLimits
from meshpos.switch.processor import Switch
from meshpos.switch.service import SwitchService, serve_switch
from meshpos.switch.switchdir import SwitchDir, add_site, init_switch
from meshpos.switch.tls import server_context
from meshpos.uplink.client import forward, make_client_context, open_switch
from meshpos.uplink.forwarder import Forwarder

from switch_harness import switch_dir

# every switch these tests make runs on each backend in turn (tests/pg.py)
pytestmark = pytest.mark.usefixtures("switch_backend_env")

assert switch_dir  # a fixture, used by name


def core_limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError("no core limit in /proc/PID/limits")


def allow_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux")
async def test_switch_run_disables_core_dumps(tmp_path: Path, site: Site,
                                              switch_key: nacl.signing.SigningKey) -> None:
    sw = tmp_path / "sw"
    init_switch(sw, "127.0.0.1:0", "127.0.0.1:1", key=switch_key, acquirer_plain=True)
    add_site(sw, site.path)
    proc = subprocess.Popen([sys.executable, "-m", "meshpos.cli.switch_cmd", "run", str(sw)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=allow_core_dumps)  # started WITH core dumps allowed
    try:
        line = await trio.to_thread.run_sync(proc.stdout.readline)  # type: ignore[union-attr]
        assert "listening on port" in line
        assert core_limits(proc.pid) == ("0", "0")
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait, 30) == 0
        assert "core dumps disabled: RLIMIT_CORE 0, process not dumpable" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux")
def test_disable_core_dumps_makes_the_process_not_dumpable() -> None:
    code = ("import ctypes, resource; from meshpos.switch.hardening import disable_core_dumps; "
            "libc = ctypes.CDLL(None); before = libc.prctl(3, 0, 0, 0, 0); disable_core_dumps(); "
            "print(before, libc.prctl(3, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         preexec_fn=allow_core_dumps).stdout.split(maxsplit=2)
    assert out == ["1", "0", "(0, 0)\n"]  # PR_GET_DUMPABLE 1 before, 0 after; no core file size


# -- bounded connections -------------------------------------------------------------------------


@asynccontextmanager
async def switch_with(switch_dir: Path, clock: FakeClock, limits: ConnectionLimits) -> AsyncIterator[
        tuple[SwitchService, int]]:
    """A switch on 127.0.0.1 whose acquirer is never needed (cash sales)."""
    sd = SwitchDir(switch_dir)
    store = sd.open_store()
    try:
        switch = Switch(store, sd.key(), _NoAcquirer(), clock)
        service = SwitchService(switch, server_context(sd.tls_path, sd.key_path, [s.ca_pem for s in store.sites()]),
                                limits)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(lambda task_status: serve_switch(service, "127.0.0.1", 0, limits=limits,
                                                                        task_status=task_status))
            yield service, port
            nursery.cancel_scope.cancel()
    finally:
        store.close()


class _NoAcquirer:
    async def advise(self, *args: object, **kw: object) -> None:
        raise AssertionError("cash sales never reach the acquirer")

    reverse = advise

    async def aclose(self) -> None:
        pass


async def idle_connections(n: int, port: int, source: str) -> list[trio.socket.SocketType]:
    """``n`` TCP connections from ``source`` that never send a byte."""
    socks = []
    for _ in range(n):
        sock = trio.socket.socket()
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
        socks.append(sock)
    return socks


async def closed_by_peer(sock: trio.socket.SocketType) -> bool:
    with trio.move_on_after(0.01):
        try:
            return await sock.recv(1) == b""
        except OSError:
            return True
    return False


async def test_idle_connections_from_one_source_do_not_stop_an_honest_batch(
        switch_dir: Path, site: Site, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    sale = str(core.sell(500)["id"])
    limits = ConnectionLimits(total=16, per_source=4, idle_s=60.0, handshake_s=60.0)  # only the caps act here
    async with switch_with(switch_dir, clock, limits) as (service, port):
        socks = await idle_connections(40, port, "127.0.0.2")
        with trio.fail_after(20):  # the ones beyond the cap are closed at once; the first 4 stay open
            while sum([await closed_by_peer(s) for s in socks[4:]]) < 36:
                await trio.sleep(0.05)
        assert not any([await closed_by_peer(s) for s in socks[:4]])
        assert service.gate.by_source["127.0.0.2"] == 4 and service.gate.refused >= 36
        # an honest forwarder (another address) is served while those 4 sit idle
        reply = await forward(f"https://127.0.0.1:{port}", make_client_context(core),
                              Forwarder(core, clock).entries_for([sale]))
        assert envelope.decode(reply.results[0]).body["status"] == "approved"
        for s in socks:
            s.close()


async def test_a_connection_that_sends_nothing_is_closed_within_seconds(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],
        clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    sale = str(core.sell(500)["id"])
    limits = ConnectionLimits(total=4, per_source=4, idle_s=1.0, handshake_s=1.0)
    async with switch_with(switch_dir, clock, limits) as (service, port):
        url = f"https://127.0.0.1:{port}"
        socks = await idle_connections(3, port, "127.0.0.1")  # no TLS handshake
        silent = await open_switch(url, make_client_context(core))  # authenticated, then no request
        assert service.gate.open == 4  # every slot of the switch taken, silently
        with trio.fail_after(30):
            while not all([await closed_by_peer(s) for s in socks]):
                await trio.sleep(0.1)
            assert await silent.stream.receive_some(1) == b""  # closed by the switch, not by us
        assert service.gate.open == 0 and service.gate.idled_out >= 1
        reply = await forward(f"https://127.0.0.1:{port}", make_client_context(core),
                              Forwarder(core, clock).entries_for([sale]))
        assert envelope.decode(reply.results[0]).body["status"] == "approved"
        for s in socks:
            s.close()
