"""free_ports: ports a child process can bind, out of reach of the kernel's own port choice."""

from __future__ import annotations

import socket
from pathlib import Path

from meshpos.apps import procs


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    ports = procs.free_ports(40)
    assert len(set(ports)) == 40
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    # an outgoing connection's source port comes from [low, high]: none of ours may
    assert all(p < low for p in ports), ports
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_taken_port_is_never_handed_out(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    try:
        # a range of one port, already taken: the kernel's own choice is the way out
        monkeypatch.setattr(procs, "_unassigned_range", lambda: (taken, taken))
        (port,) = procs.free_ports(1)
        assert port != taken
    finally:
        held.close()
