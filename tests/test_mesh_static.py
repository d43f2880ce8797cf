"""The mesh's static peers (meshpos.node.runner.Mesh), in one process over real TLS on loopback."""

from __future__ import annotations

from pathlib import Path

import trio

from meshpos.apps.procs import free_ports
from meshpos.node.core import NodeCore
from meshpos.node.enroll import enroll_one_step
from meshpos.node.runner import Mesh
from meshpos.site.sitedir import Site


async def test_a_static_address_is_known_by_the_certificate_that_answered_it(tmp_path: Path, site: Site) -> None:
    # The keeper of a static peer learns which node its address is as soon as the TLS handshake
    # names it (the session's HELLO may come later). It used to wait for the HELLO, which had
    # never arrived by then: the address stayed unknown, so the keeper dialled it again whenever
    # its own link lost to a duplicate, and the planner could close that link as surplus.
    pa, pb = free_ports(2)
    address = f"127.0.0.1:{pa}"
    enroll_one_step(site, tmp_path / "a", "gateway", "A", listen=address)
    enroll_one_step(site, tmp_path / "b", "terminal", "B", listen=f"127.0.0.1:{pb}", peers=[address])
    core_a, core_b = NodeCore.open(tmp_path / "a"), NodeCore.open(tmp_path / "b")
    try:
        mesh_a, mesh_b = Mesh(core_a, mdns=False), Mesh(core_b, mdns=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(mesh_a.run)
            await nursery.start(mesh_b.run)
            with trio.fail_after(30):
                while core_a.node_id not in mesh_b.linked_peers():
                    await trio.sleep(0.05)
            assert mesh_b.static_ids == {address: core_a.node_id}
            nursery.cancel_scope.cancel()
    finally:
        core_a.close()
        core_b.close()
