"""An in-memory network of sync sessions, for tests and benchmarks (no sockets).

Each MemLink joins two SyncSessions of two Replicators; ``pump`` moves bytes
until no session has anything left to say. Faults are injected by the caller:
``cut`` severs a link (both ends see EOF, like a dropped TCP connection), and
``deliver`` takes a ``mangle`` hook that may drop, duplicate or corrupt the
bytes of one hop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from meshpos.replication.sync import Replicator, SyncSession

Mangle = Callable[[bytes], bytes]


@dataclass
class MemLink:
    a: SyncSession
    b: SyncSession
    bytes_ab: int = 0
    bytes_ba: int = 0
    cut_done: bool = False

    def deliver(self, budget: int | None = None, mangle: Mangle | None = None) -> bool:
        """One hop each way; True if any byte moved."""
        moved = False
        for src, dst, forward in ((self.a, self.b, True), (self.b, self.a, False)):
            data = src.data_to_send(budget)
            if not data:
                continue
            if mangle is not None:
                data = mangle(data)
            if forward:
                self.bytes_ab += len(data)
            else:
                self.bytes_ba += len(data)
            moved = True
            if data and not dst.closed:
                dst.receive_data(data)
        return moved

    def cut(self) -> None:
        """Both ends see the connection drop."""
        if not self.cut_done:
            self.cut_done = True
            self.a.receive_data(b"")
            self.b.receive_data(b"")
            self.a.data_to_send()
            self.b.data_to_send()

    @property
    def closed(self) -> bool:
        return self.cut_done or (self.a.closed and self.b.closed and not self.a.wants_write and not self.b.wants_write)


@dataclass
class MemNetwork:
    links: list[MemLink] = field(default_factory=list)

    def connect(self, a: Replicator, b: Replicator, label_a: str = "", label_b: str = "") -> MemLink:
        link = MemLink(a.open_session(label=label_a or b.node_id, expect_node=b.node_id),
                       b.open_session(label=label_b or a.node_id, expect_node=a.node_id))
        self.links.append(link)
        return link

    def pump(self, max_rounds: int = 100_000, mangle: Mangle | None = None) -> int:
        """Deliver until quiet; returns the number of rounds. Closed links are dropped from the list."""
        for rounds in range(max_rounds):
            moved = False
            for link in list(self.links):
                if link.closed:
                    self.links.remove(link)
                    continue
                moved |= link.deliver(mangle=mangle)
            if not moved:
                return rounds
        raise RuntimeError(f"network did not quiesce within {max_rounds} rounds")
