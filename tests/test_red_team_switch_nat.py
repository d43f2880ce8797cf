"""Red team: the switch's per-source cap (meshpos.switch.connlimit) and a fair behind one NAT address.

A whole fair reaches the switch from one address. Before, anyone on the fair's Wi-Fi who held
``per_source`` connections open (re-opening each the switch closed after ``idle_s``) had every
new connection from that address closed at once: no gateway of the fair could forward. Now a
newcomer closes the oldest anonymous connection of its source open for ``grace`` or more
(tests/test_red_team_switch_fairness.py: whatever it is doing)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.switch.connlimit import ConnectionLimits
from meshpos.uplink.client import forward, make_client_context
from meshpos.uplink.forwarder import Forwarder
from meshpos.wire import envelope
from switch_harness import switch_dir  # noqa: F401 -- fixture
from test_switch_hardening import closed_by_peer, idle_connections, switch_with


async def test_idle_connections_from_the_fairs_address_do_not_lock_its_gateways_out(
        switch_dir: Path, make_node: Callable[..., Path], open_node: Callable[[Path], NodeCore],  # noqa: F811
        clock: FakeClock) -> None:
    core = open_node(make_node("t"))
    sale = str(core.sell(500)["id"])
    limits = ConnectionLimits(total=64, per_source=4, idle_s=60.0, handshake_s=5.0)  # grace: 1 s
    async with switch_with(switch_dir, clock, limits) as (service, port):
        socks = await idle_connections(4, port, "127.0.0.1")  # the gateway's own address (one NAT)
        await trio.sleep(1.5)  # waiting for a TLS handshake longer than the grace, far from any timeout
        assert service.gate.by_source["127.0.0.1"] == 4
        reply = await forward(f"https://127.0.0.1:{port}", make_client_context(core),
                              Forwarder(core, clock).entries_for([sale]))
        assert envelope.decode(reply.results[0]).body["status"] == "approved"
        assert service.gate.evicted >= 1 and await closed_by_peer(socks[0])
        assert service.gate.by_source["127.0.0.1"] <= 4
        for s in socks:
            s.close()
