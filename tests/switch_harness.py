"""The switch in-process for tests: real HTTPS on 127.0.0.1, the acquirer simulator over ISO 8583,
real node directories. Shared by tests/test_switch.py and tests/test_switch_content.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import nacl.signing
import pytest
import trio

from meshpos.acquirer.base import AcquirerLink, LateAnswer
from meshpos.wire.iso8583 import DEFAULT_SPEC, Spec
from meshpos.acquirer.iso8583_link import open_iso8583_link
from meshpos.acquirer.simulator import CardRule, SimRules, Simulator, serve_simulator
from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.site.sitedir import Site
from meshpos.switch.processor import Switch, rrn_of
from meshpos.switch.service import SwitchService, serve_switch
from meshpos.switch.switchdir import SwitchDir, add_site, init_switch
from meshpos.switch.tls import server_context
from meshpos.uplink.forwarder import Forwarder, HttpsTransport

VISA, DECLINED = "4111111111111111", "4000000000000002"
EXAMPLE_RULES = SimRules(seed=1, cards=(CardRule(DECLINED, response_code="05"),))


@dataclass
class Harness:
    sim: Simulator
    switch: Switch
    service: SwitchService
    url: str
    cancel: trio.CancelScope

    def rrn(self, sale_id: str) -> str:
        row = self.switch.store.sale(sale_id)
        assert row is not None
        return rrn_of(row.ref)

    def at_acquirer(self, sale_id: str) -> dict[str, int]:
        row = self.switch.store.sale(sale_id)
        return {} if row is None else dict(self.sim.stats.by_sale.get(rrn_of(row.ref), {}))


@asynccontextmanager
async def running_switch(switch_dir: Path, clock: FakeClock, rules: SimRules = EXAMPLE_RULES, *,
                         link_timeout: float = 5.0, attempts: int = 5, spec: Spec = DEFAULT_SPEC,
                         wrap_link: Callable[[AcquirerLink], AcquirerLink] = lambda link: link,
                         ) -> AsyncIterator[Harness]:
    """The switch as `meshpos switch run` wires it (late answers included), over a plain TCP
    acquirer link to an in-process simulator (the tests using this are about the switch's rules)."""
    sd = SwitchDir(switch_dir)
    store = sd.open_store()
    try:
        async with trio.open_nursery() as nursery:
            sim: Simulator = await nursery.start(
                lambda task_status: serve_simulator(rules, "127.0.0.1", 0, task_status=task_status))
            late_in, late_out = trio.open_memory_channel[LateAnswer](float("inf"))
            async with open_iso8583_link("127.0.0.1", sim.port, timeout=link_timeout, spec=spec,
                                         on_late_answer=late_in.send_nowait) as link:
                switch = Switch(store, sd.key(), wrap_link(link), clock, advice_attempts=attempts,
                                reversal_attempts=attempts, backoff=lambda attempt: 0.0)
                nursery.start_soon(switch.take_late_answers, late_out)
                ctx = server_context(sd.tls_path, sd.key_path, [s.ca_pem for s in store.sites()])
                service = SwitchService(switch, ctx)
                port = await nursery.start(serve_switch, service, "127.0.0.1", 0)
                yield Harness(sim, switch, service, f"https://127.0.0.1:{port}", nursery.cancel_scope)
                nursery.cancel_scope.cancel()
    finally:
        store.close()


@pytest.fixture
def switch_dir(tmp_path: Path, site: Site, switch_key: nacl.signing.SigningKey, switch_db: str | None) -> Path:
    """A switch with the test site registered, on each backend in turn (tests/pg.py)."""
    path = tmp_path / "switch"
    init_switch(path, "127.0.0.1:0", "127.0.0.1:1", key=switch_key, db=switch_db)
    add_site(path, site.path)
    return path


def merge(dst: NodeCore, *sources: NodeCore) -> None:
    """What replication would do: every verified entry of ``sources`` into ``dst``."""
    for type_ in ("cert", "revocation", "policy", "sale", "void", "lease", "result"):
        for src in sources:
            for raw in src.store.entries_of_type(type_):
                dst.ingest(raw, "peer")


def card_sale(core: NodeCore, amount: int = 1250, pan: str = VISA) -> str:
    return str(core.sell(amount, card=core.seal_card(pan, "1228", "contactless"))["id"])


async def drain(fwd: Forwarder) -> list[str]:
    """Step the forwarder until it has nothing left to forward now."""
    sent: list[str] = []
    while True:
        report = await fwd.step()
        sent += report.forwarded
        if not report.more:
            return sent


def transport(core: NodeCore, url: str) -> HttpsTransport:
    return HttpsTransport(core, switch_url=url)


__all__ = ["Harness", "running_switch", "switch_dir", "merge", "card_sale", "drain", "transport", "VISA",
           "DECLINED", "EXAMPLE_RULES"]
