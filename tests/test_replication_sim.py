"""A Hypothesis stateful model of a small mesh in memory: sales, partitions, heals, restarts,
lost and duplicated frames. Once the network is whole and quiet, every ledger is identical and
every acknowledged sale is on every node."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from meshpos.wire.link_frames import FrameDecoder, FrameType
from meshpos.replication.memnet import MemLink, MemNetwork
from meshpos.node.memnode import SimNode, enroll, make_site, wall_clock

N = 4
_TEMPLATE: Path | None = None


def _template() -> Path:
    """Site and node directories enrolled once; each example works on a fresh copy."""
    global _TEMPLATE
    if _TEMPLATE is None:
        root = Path(tempfile.mkdtemp(prefix="meshpos-sim-template-"))
        atexit.register(shutil.rmtree, root, True)  # kept for the whole run, removed at its end
        site = make_site(root / "site")
        for i in range(N):
            enroll(site, root / f"n{i}", f"t{i}")
        _TEMPLATE = root
    return _TEMPLATE


def _faulty(data: bytes, kind: str) -> bytes:
    """Drop or duplicate the first SYNC frame in ``data`` (whole frames: data_to_send cuts none)."""
    dec = FrameDecoder()
    dec.receive_data(data)
    out, done = bytearray(), False
    while (frame := dec.next_frame()) is not None:
        raw = len(frame.payload).to_bytes(4, "big") + bytes([frame.type]) + frame.payload
        if not done and frame.type is FrameType.SYNC:
            done = True
            out += b"" if kind == "drop" else raw + raw
        else:
            out += raw
    return bytes(out)


class Mesh(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="meshpos-sim-"))
        shutil.copytree(_template(), self.dir, dirs_exist_ok=True)
        self.clock = wall_clock()
        self.nodes = [SimNode.open(self.dir / f"n{i}", self.clock) for i in range(N)]
        self.net = MemNetwork()
        self.links: dict[tuple[int, int], MemLink] = {}
        self.acked: set[str] = set()
        self.faults: dict[tuple[int, int], str] = {}

    def teardown(self) -> None:
        if hasattr(self, "nodes"):
            for node in self.nodes:
                node.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _live(self) -> dict[tuple[int, int], MemLink]:
        for key, link in list(self.links.items()):
            if link.closed or link.a.closed or link.b.closed:
                link.cut()
                del self.links[key]
        return self.links

    @rule(i=st.integers(0, N - 1), amounts=st.lists(st.integers(1, 900), min_size=1, max_size=4))
    def sell(self, i: int, amounts: list[int]) -> None:
        for amount in amounts:
            self.acked.add(self.nodes[i].core.sell(amount)["id"])

    @rule(i=st.integers(0, N - 1), amount=st.integers(1, 900))
    def sell_one(self, i: int, amount: int) -> None:
        self.acked.add(self.nodes[i].core.sell(amount)["id"])

    @rule(i=st.integers(0, N - 1), j=st.integers(0, N - 1))
    def link(self, i: int, j: int) -> None:
        i, j = min(i, j), max(i, j)
        if i != j and (i, j) not in self._live():
            self.links[(i, j)] = self.net.connect(self.nodes[i].replicator, self.nodes[j].replicator)

    @rule(data=st.data())
    @precondition(lambda self: bool(self.links))
    def partition(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.links)))
        self.links.pop(key).cut()

    @rule(data=st.data(), kind=st.sampled_from(["drop", "dup"]))
    @precondition(lambda self: bool(self.links))
    def fault(self, data: st.DataObject, kind: str) -> None:
        self.faults[data.draw(st.sampled_from(sorted(self.links)))] = kind

    @rule(rounds=st.integers(1, 6))
    def deliver(self, rounds: int) -> None:
        for _ in range(rounds):
            for key, link in list(self._live().items()):
                kind = self.faults.pop(key, None)
                link.deliver(mangle=(lambda d, k=kind: _faulty(d, k)) if kind else None)

    @rule(i=st.integers(0, N - 1))
    def restart(self, i: int) -> None:
        for key in [k for k in self._live() if i in k]:
            self.links.pop(key).cut()
        self.nodes[i] = self.nodes[i].reopen(self.clock)

    @rule(seconds=st.sampled_from([1.0, 20.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        for link in self._live().values():
            link.a.tick()
            link.b.tick()

    def check_converged(self) -> None:
        # Heal: a line through every node, then quiesce; a periodic SUMMARY pass repairs lost messages.
        for i in range(N - 1):
            self.link(i, i + 1)
        self.net.links = [l for l in self._live().values()]
        self.net.pump()
        for link in self._live().values():
            link.a.request_summary()
            link.b.request_summary()
        self.net.pump()
        first = self.nodes[0]
        for node in self.nodes:
            assert self.acked <= node.sale_ids(), (node.core.node_id, self.acked - node.sale_ids())
            assert node.entries() == first.entries()
            assert node.core.ledger.summary() == first.core.ledger.summary()

    @rule()
    @precondition(lambda self: len(self.acked) % 3 == 0)
    def converge(self) -> None:
        self.check_converged()


Mesh.TestCase.settings = settings(max_examples=25, stateful_step_count=40, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class FinalCheck(Mesh):
    def teardown(self) -> None:
        try:
            if hasattr(self, "nodes"):
                self.check_converged()
        finally:
            super().teardown()


FinalCheck.TestCase.settings = Mesh.TestCase.settings
TestMesh = FinalCheck.TestCase
