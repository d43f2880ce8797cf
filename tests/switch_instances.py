"""Several switch instances as real processes on one PostgreSQL database, for the tests of
tests/test_switch_instances.py and tools/bench_switch_backends.py.

:class:`Instances` starts the acquirer simulator (``meshpos acquirer-sim``, plain ISO 8583 on
loopback, its stats file written after every message) and N instances (``meshpos switch run
--metrics``), each on its own directory made by ``meshpos switch instance``. Uplink nodes are
node directories of one site driven in-process by :func:`forward_until_settled`: the batches
an uplink node's forwarder sends, over real HTTPS, to the instance it is given, moving on to
the next instance when one does not answer.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from meshpos.infra.clock import SYSTEM_CLOCK
from meshpos.domain.errors import UplinkError
from meshpos.node.core import NodeCore
from meshpos.apps.procs import ProcessGroup, free_ports, wait_for
from meshpos.site.sitedir import Site, init_site
from meshpos.switch.processor import rrn_of
from meshpos.switch.switchdir import SwitchDir, add_site, init_switch, make_instance
from meshpos.uplink.client import forward, make_client_context
from meshpos.uplink.forwarder import Forwarder
from meshpos.wire import envelope

WAIT_S = 60.0


@dataclass
class Instances:
    root: Path
    procs: ProcessGroup
    url_db: str
    stats_path: Path
    site: Site
    dirs: list[Path] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    metrics_ports: list[int] = field(default_factory=list)
    #: a command put before each instance's own (tools/bench_switch_backends.py --profile)
    wrap: tuple[str, ...] = ()

    @classmethod
    def create(cls, root: Path, procs: ProcessGroup, db: str | None, n: int, *, delay_ms: int = 0,
               claim_lease_s: float = 2.0, acquirer_connections: int = 1,
               policy: dict[str, Any] | None = None, stats: bool = True,
               wrap: tuple[str, ...] = (), in_flight: int | None = None) -> "Instances":
        acq_port, *ports = free_ports(1 + 2 * n)
        rules = root / "rules.json"
        rules.write_text(json.dumps({"seed": 3, "delay_ms": delay_ms}))
        stats_path = root / "acquirer-stats.json"
        sim = procs.start("acquirer", "acquirer-sim", "--listen", f"127.0.0.1:{acq_port}", "--rules", str(rules),
                          *(["--stats", str(stats_path)] if stats else []), "--plain")
        wait_for(lambda: "listening on" in sim.log_path.read_text(), WAIT_S,
                 lambda: f"the acquirer simulator did not start\n{sim.log_tail()}", alive=sim)
        first = root / "sw0"
        init_switch(first, f"127.0.0.1:{ports[0]}", f"127.0.0.1:{acq_port}", acquirer_plain=True, db=db,
                    acquirer_connections=acquirer_connections)
        cfg_path = first / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg_path.write_text(json.dumps({**cfg, "claim_lease_s": claim_lease_s,
                                        **({"in_flight": in_flight} if in_flight else {})}))
        site = init_site(root / "site", "Fiera delle Istanze", "EUR",
                         switch_key=(first / "switch.pub").read_text().strip(),
                         switch_url=f"https://127.0.0.1:{ports[0]}")
        if policy:
            site.update_policy(**policy)
        add_site(first, site.path)
        inst = cls(root, procs, db or "", stats_path, site, [first], [ports[0]], [ports[n]], wrap)
        for i in range(1, n):
            make_instance(first, root / f"sw{i}", f"127.0.0.1:{ports[i]}")
            inst.dirs.append(root / f"sw{i}")
            inst.ports.append(ports[i])
            inst.metrics_ports.append(ports[n + i])
        for i in range(n):
            inst.start(i)
        return inst

    def url(self, i: int) -> str:
        return f"https://127.0.0.1:{self.ports[i]}"

    def start(self, i: int) -> None:
        name = f"sw{i}"
        log = self.procs.log_dir / f"{name}.log"
        size = log.stat().st_size if log.exists() else 0
        child = self.procs.start(name, "switch", "run", str(self.dirs[i]),
                                 "--metrics", f"127.0.0.1:{self.metrics_ports[i]}", wrap=self.wrap)
        wait_for(lambda: "switch listening on port" in child.log_path.read_text()[size:], WAIT_S,
                 lambda: f"instance {i} did not start\n{child.log_tail()}", alive=child)

    def kill(self, i: int) -> None:
        self.procs.kill(f"sw{i}")

    def alive(self, i: int) -> bool:
        return self.procs.children[f"sw{i}"].alive

    def ops(self, i: int, path: str) -> tuple[int, bytes]:
        """GET /healthz, /readyz or /metrics of instance ``i``: (status, body)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[i]}{path}", timeout=10) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())

    def stats(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.stats_path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return {"totals": {}, "by_sale": {}, "charged": []}

    def wait_stats(self, predicate: Any, what: str, timeout: float = WAIT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: acquirer totals {stats['totals']}")
            time.sleep(0.05)

    def rrns(self, sale_ids: list[str]) -> dict[str, str]:
        store = SwitchDir(self.dirs[0]).open_store()
        try:
            rows = {s: store.sale(s) for s in sale_ids}
        finally:
            store.close()
        return {s: rrn_of(row.ref) for s, row in rows.items() if row is not None}

    def log_tails(self) -> str:
        return "\n".join(f"--- {c.name}\n{c.log_tail(10)}" for c in self.procs.children.values())


def card_sales(core: NodeCore, n: int, pan: str = "4111111111111111") -> list[str]:
    # amounts of 1.00 to 4.99 EUR: 2,000 of them stay under the terminal's pending cap (10,000 EUR)
    return [str(core.sell(100 + k % 400, card=core.seal_card(pan, "1228", "contactless"))["id"]) for k in range(n)]


def copy_sales(dst: NodeCore, src: NodeCore) -> None:
    """What replication would do: the source's roster and sales into ``dst``."""
    for type_ in ("cert", "revocation", "policy", "sale"):
        for raw in src.store.entries_of_type(type_):
            dst.ingest(raw, "peer")


async def forward_until_settled(core: NodeCore, urls: list[str], sale_ids: list[str], *, batch: int = 100,
                                timeout: float = WAIT_S, start: int = 0, rotate: bool = False) -> dict[str, bytes]:
    """Forward ``sale_ids`` in batches (in sale id order, so that two nodes contend for the same
    sales at once) to ``urls[start]``, moving on to the next URL when an instance does not
    answer (and after every batch with ``rotate``), until every sale has a result; the signed
    result bytes by sale id. Fails when no sale settled for ``timeout`` seconds (a stall, not a
    slow host: a loaded CI host once took more than 60 s for 2,000 sales that settled steadily)."""
    ctx = make_client_context(core)
    fwd = Forwarder(core, SYSTEM_CLOCK)
    results: dict[str, bytes] = {}
    remaining = sorted(sale_ids)
    which = start
    deadline = trio.current_time() + timeout
    while remaining:
        if trio.current_time() > deadline:
            raise AssertionError(f"{len(remaining)} sales still unsettled, e.g. {remaining[:3]}")
        chunk = remaining[:batch]
        try:
            reply = await forward(urls[which % len(urls)], ctx, fwd.entries_for(chunk))
        except UplinkError:
            which += 1  # this instance is down or failed the batch: the next one
            await trio.sleep(0.1)
            continue
        for raw in reply.results:
            env = envelope.decode(raw)
            if env.type == "result":
                core.ingest(raw, "switch")
                results[env.body["sale_id"]] = raw
        settled = [s for s in remaining if s in results]
        if settled:
            remaining = [s for s in remaining if s not in results]
            deadline = trio.current_time() + timeout
        if rotate:
            which += 1
        if reply.pending and not reply.results:
            await trio.sleep(0.1)
    return results


__all__ = ["Instances", "card_sales", "copy_sales", "forward_until_settled"]
