"""What the forwarder tests share: replication by hand between node cores, and a switch in memory."""

from __future__ import annotations

import nacl.signing
import trio

from meshpos.wire import envelope
from meshpos.infra.clock import FakeClock
from meshpos.node.core import NodeCore
from meshpos.wire.forwarding import ForwardReply, Pending
from meshpos.uplink.client import NotSent

VISA = "4111111111111111"


def merge(dst: NodeCore, *sources: NodeCore) -> None:
    for type_ in ("cert", "revocation", "policy", "sale", "void", "lease", "result"):
        for src in sources:
            for raw in src.store.entries_of_type(type_):
                dst.ingest(raw, "peer")


class FakeSwitch:
    """A transport that records batches; settles them (signed by the real switch key) only when told to."""

    def __init__(self, key: nacl.signing.SigningKey, clock: FakeClock, settle: bool = True) -> None:
        self.key = key
        self.clock = clock
        self.settle = settle
        self.batches: list[list[str]] = []
        self.fail_next = 0

    async def forward(self, entries: list[bytes]) -> ForwardReply:
        await trio.lowlevel.checkpoint()
        if self.fail_next:
            self.fail_next -= 1
            raise NotSent("no route to the switch")
        sales = [envelope.decode(raw) for raw in entries if envelope.decode(raw).type == "sale"]
        self.batches.append([s.body["sale_id"] for s in sales])
        if not self.settle:
            return ForwardReply(pending=tuple(Pending(s.body["sale_id"], "acquirer silent") for s in sales))
        results = tuple(envelope.seal("result", "switch", {
            "sale_id": s.body["sale_id"], "site": s.body["site"], "status": "approved", "auth_code": "A1B2C3",
            "response_code": "00", "reason": None, "settled_at": self.clock.now_ms(), "reversed": False,
        }, self.key) for s in sales)
        return ForwardReply(results=results)

    def sent(self) -> list[str]:
        return [s for batch in self.batches for s in batch]
