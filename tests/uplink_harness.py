"""A fair on loopback for the uplink acceptance tests: real processes, real TLS, real ISO 8583.

:class:`Fair` sets up an acquirer host simulator (``meshpos acquirer-sim``), a switch
(``meshpos switch run``) and N terminals (``meshpos run``, static peers in a line, so
replication is multi-hop), all as child processes on 127.0.0.1, and offers what the
tests check: every node's view of every sale, the simulator's stats file (written
atomically after every message), and the switch's de-duplication table.

Every wait is bounded and polls state; nothing asserts on how long something took.
"""

from __future__ import annotations

from meshpos.node.ops import SealedCard
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from meshpos.acquirer.simulator import auth_code
from meshpos.wire.cards import seal_card
from meshpos.domain.errors import MeshposError
from meshpos.infra.clock import SYSTEM_CLOCK, Clock
from meshpos.identity import keys
from meshpos.node import client
from meshpos.node.enroll import enroll_one_step
from meshpos.apps.procs import ProcessGroup, free_ports, wait_for
from meshpos.site.sitedir import Site, init_site
from meshpos.switch.processor import rrn_of
from meshpos.switch.switchdir import add_site, init_switch

VISA = "4111111111111111"
MASTERCARD = "5555555555554444"
DECLINED_05 = "4000000000000002"  # the acquirer answers 05, do not honour
DECLINED_51 = "4000000000009995"  # the acquirer answers 51, insufficient funds
DECLINES = {DECLINED_05: "05", DECLINED_51: "51"}
FINAL = {"approved", "declined", "voided", "expired", "rejected"}
WAIT_S = 60.0


def base_rules(**extra: Any) -> dict[str, Any]:
    rules: dict[str, Any] = {"seed": 7, "delay_ms": 20, "cards": [
        {"prefix": DECLINED_05, "response_code": "05"}, {"prefix": DECLINED_51, "response_code": "51"}]}
    rules.update(extra)
    return rules


@dataclass
class Expected:
    sale_id: str
    name: str  # the terminal that took it
    amount: int
    pan: str | None  # None: cash

    @property
    def card(self) -> bool:
        return self.pan is not None


@dataclass
class Fair:
    root: Path
    procs: ProcessGroup
    rules: dict[str, Any]
    site: Site
    switch_dir: Path
    stats_path: Path
    nodes: dict[str, Path] = field(default_factory=dict)
    expected: dict[str, Expected] = field(default_factory=dict)
    node_args: dict[str, list[str]] = field(default_factory=dict)  # extra `meshpos run` options per node

    # -- set-up ------------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path, procs: ProcessGroup, *, terminals: int = 3, rules: dict[str, Any] | None = None,
               switch_settings: dict[str, Any] | None = None, policy: dict[str, Any] | None = None,
               start_nodes: bool = True, site_clock: Clock = SYSTEM_CLOCK,
               node_args: dict[str, list[str]] | None = None) -> "Fair":
        acq_port, switch_port, *node_ports = free_ports(2 + terminals)
        rules = rules if rules is not None else base_rules()
        rules_path = root / "acquirer-rules.json"
        rules_path.write_text(json.dumps(rules))
        stats_path = root / "acquirer-stats.json"
        acquirer_ca = root / "acquirer-ca.pem"  # the simulator's own certificate: the link is TLS
        acquirer = procs.start("acquirer", "acquirer-sim", "--listen", f"127.0.0.1:{acq_port}",
                               "--rules", str(rules_path), "--stats", str(stats_path),
                               "--tls-cert-out", str(acquirer_ca))
        switch_dir = root / "switch"
        wait_for(lambda: acquirer.log_path.exists() and "listening on" in acquirer.log_path.read_text(), WAIT_S,
                 lambda: f"the acquirer simulator did not start\n{acquirer.log_tail(15)}", alive=acquirer)
        init_switch(switch_dir, f"127.0.0.1:{switch_port}", f"127.0.0.1:{acq_port}", acquirer_ca=acquirer_ca)
        if switch_settings:
            cfg_path = switch_dir / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg.update(switch_settings)
            cfg_path.write_text(json.dumps(cfg))
        switch_key = (switch_dir / "switch.pub").read_text().strip()
        site = init_site(root / "site", "Fiera dell'Uplink", "EUR", switch_key=switch_key,
                         switch_url=f"https://127.0.0.1:{switch_port}", clock=site_clock)
        if policy:
            site.update_policy(**policy)
        add_site(switch_dir, site.path)
        fair = cls(root, procs, rules, site, switch_dir, stats_path, node_args=dict(node_args or {}))
        for i in range(terminals):
            name = f"t{i + 1}"
            peers = [f"127.0.0.1:{node_ports[i - 1]}"] if i else []  # a line: t1 - t2 - t3
            enroll_one_step(site, root / name, "terminal", name.upper(), listen=f"127.0.0.1:{node_ports[i]}",
                            peers=peers, clock=site_clock)
            fair.nodes[name] = root / name
        fair.start_switch()
        if start_nodes:
            for name in fair.nodes:
                fair.start_node(name)
        return fair

    def start_switch(self) -> None:
        child = self.procs.start("switch", "switch", "run", str(self.switch_dir))
        size = child.log_path.stat().st_size if child.log_path.exists() else 0
        self.wait(lambda: "switch listening on port" in child.log_path.read_text()[size:],
                  "the switch did not start", alive="switch")

    def start_node(self, name: str) -> None:
        try:
            self.procs.start_node(name, self.nodes[name], "--no-mdns", *self.node_args.get(name, []), timeout=WAIT_S)
        except MeshposError as exc:
            raise AssertionError(f"{exc}\n{self.log_tails()}") from exc

    # -- waiting -----------------------------------------------------------------------

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT_S,
             state: Callable[[], str] | None = None, alive: str | None = None, interval: float = 0.1) -> None:
        """Poll ``predicate`` until true; on timeout fail with ``state()`` and the logs' last lines."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if predicate():
                    return
            except (MeshposError, OSError, ValueError, sqlite3.Error):
                pass  # a node restarting, a file being replaced: look again
            child = self.procs.children.get(alive) if alive else None
            if (child is not None and not child.alive) or time.monotonic() > deadline:
                detail = state() if state is not None else ""
                raise AssertionError(f"{what} (after {timeout:g} s){': ' + detail if detail else ''}\n"
                                     + self.log_tails())
            time.sleep(interval)

    def log_tails(self, lines: int = 15) -> str:
        return "\n".join(f"--- {name} ---\n{child.log_tail(lines)}" for name, child in self.procs.children.items())

    # -- selling -----------------------------------------------------------------------

    def sell(self, name: str, amount: int, pan: str | None = None) -> str:
        """One sale on a running terminal, the card sealed here as `meshpos sell --card` does."""
        node = client.running(self.nodes[name])
        card = None
        if pan is not None:
            key = bytes.fromhex(node.policy().switch_key or "")
            card = SealedCard.of(seal_card(pan, "1230", "contactless", key))
        sale = node.sell(amount, card)
        assert sale["status"] == ("pending" if pan is not None else "paid"), sale  # cash is final when taken
        self.expected[sale["id"]] = Expected(sale["id"], name, amount, pan)
        return str(sale["id"])

    def sell_mix(self, n: int, names: list[str] | None = None, first_amount: int = 300) -> list[str]:
        """``n`` sales round-robin over ``names``: cards (some the acquirer declines) and cash."""
        names = names or list(self.nodes)
        pans = [VISA, MASTERCARD, None, DECLINED_05, VISA, None, DECLINED_51, MASTERCARD, None, VISA]
        return [self.sell(names[k % len(names)], first_amount + 37 * k, pans[k % len(pans)]) for k in range(n)]

    def uplink(self, name: str, on: bool = True) -> None:
        client.running(self.nodes[name]).uplink(on)

    # -- looking -----------------------------------------------------------------------

    def view(self, name: str) -> dict[str, dict[str, Any]]:
        return {s["id"]: s for s in client.running(self.nodes[name]).sales()}

    def views(self, names: list[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        return {name: self.view(name) for name in (names or list(self.nodes))}

    def progress(self, names: list[str] | None = None) -> str:
        try:
            views = self.views(names)
        except MeshposError as exc:
            return f"cannot read the nodes: {exc}"
        parts = []
        for name, view in views.items():
            held = sum(1 for sid in self.expected if sid in view)
            final = sum(1 for sid in self.expected if view.get(sid, {}).get("status") in FINAL
                        and view[sid].get("settled_at"))
            parts.append(f"{name}: holds {held}/{len(self.expected)}, settled {final}")
        return "; ".join(parts) + f"; acquirer totals {self.stats()['totals']}"

    def wait_converged(self, names: list[str] | None = None) -> None:
        want = set(self.expected)
        self.wait(lambda: all(want <= set(v) for v in self.views(names).values()),
                  "the mesh did not converge", state=lambda: self.progress(names))

    def settled_on(self, name: str) -> bool:
        view = self.view(name)
        return all(view.get(sid, {}).get("status") in FINAL and view[sid].get("settled_at") for sid in self.expected)

    def wait_settled(self, names: list[str] | None = None, timeout: float = WAIT_S) -> None:
        """Every expected sale has its switch result on every node in ``names``."""
        names = names or list(self.nodes)
        self.wait(lambda: all(self.settled_on(n) for n in names), "not every sale settled on every node",
                  timeout=timeout, state=lambda: self.progress(names), interval=0.3)

    def stats(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.stats_path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return {"totals": {}, "by_sale": {}, "charged": [], "reversed": []}

    def switch_rows(self) -> dict[str, dict[str, Any]]:
        """The switch's de-duplication table (read beside the running switch: WAL readers never block it)."""
        conn = sqlite3.connect(self.switch_dir / "switch.db", timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            rows = conn.execute("SELECT ref, sale_id, state, result_status, attempts FROM sales").fetchall()
        finally:
            conn.close()
        return {r["sale_id"]: {**dict(r), "rrn": rrn_of(r["ref"])} for r in rows}

    def switch_log(self) -> str:
        return self.procs.children["switch"].log_path.read_text(errors="replace")

    # -- the acceptance checks ------------------------------------------------------------

    def check_exactly_once(self, *, repeats_allowed: bool, names: list[str] | None = None) -> dict[str, Any]:
        """Every sale settled on every node, the same everywhere and at the switch; each card sale
        reached the acquirer once as a 0220 (or, after a fault, only by repeats 0221); no second charge;
        cash never reached the acquirer. Returns the simulator's stats for further checks."""
        names = names or list(self.nodes)
        views = self.views(names)
        rows = self.switch_rows()
        stats = self.stats()
        seed = int(self.rules.get("seed", 0))
        problems: list[str] = []
        # nothing lost, nothing extra: the switch holds exactly the site's sales
        if set(rows) != set(self.expected):
            problems.append(f"switch table differs: missing {sorted(set(self.expected) - set(rows))}, "
                            f"extra {sorted(set(rows) - set(self.expected))}")
        card_rrns: dict[str, str] = {}
        for sid, exp in self.expected.items():
            row = rows.get(sid)
            if row is None:
                continue
            if row["state"] != "settled":
                problems.append(f"{sid}: switch state {row['state']}")
            if exp.card:
                card_rrns[row["rrn"]] = sid
            if exp.pan is None:
                want_status, want_code, want_auth = "approved", None, None
            elif exp.pan in DECLINES:
                want_status, want_code, want_auth = "declined", DECLINES[exp.pan], None
            else:
                want_status, want_code, want_auth = "approved", "00", auth_code(seed, row["rrn"], exp.amount)
            if row["result_status"] != want_status:
                problems.append(f"{sid}: switch result {row['result_status']}, expected {want_status}")
            for name, view in views.items():
                got = view.get(sid)
                if got is None:
                    problems.append(f"{sid} ({exp.name}): missing on {name}")
                    continue
                seen = (got["status"], got["response_code"], got["auth_code"])
                if seen != (want_status, want_code, want_auth) or not got["settled_at"]:
                    problems.append(f"{sid} ({exp.name}, {'card' if exp.card else 'cash'}): {name} shows {seen} "
                                    f"settled_at={got['settled_at']}, expected {(want_status, want_code, want_auth)}")
        # the acquirer's side, from its stats file
        by_sale: dict[str, dict[str, int]] = stats["by_sale"]
        if set(by_sale) != set(card_rrns):
            problems.append(f"acquirer saw RRNs {sorted(by_sale)}, the card sales are {sorted(card_rrns)}")
        for rrn, counts in by_sale.items():
            sid = card_rrns.get(rrn, "?")
            other = set(counts) - {"0220", "0221"}
            if other:
                problems.append(f"{sid} (rrn {rrn}): unexpected messages {counts}")
            if counts.get("0220", 0) > 1:
                problems.append(f"{sid} (rrn {rrn}): {counts['0220']} originals 0220 -- a second charge")
            if counts.get("0220", 0) + counts.get("0221", 0) < 1:
                problems.append(f"{sid} (rrn {rrn}): never advised")
            if not repeats_allowed and counts != {"0220": 1}:
                problems.append(f"{sid} (rrn {rrn}): expected exactly one 0220, got {counts}")
        approved_rrns = {rrn for rrn, sid in card_rrns.items() if self.expected[sid].pan not in DECLINES}
        if set(stats["charged"]) != approved_rrns:
            problems.append(f"acquirer charged {sorted(stats['charged'])}, approved card sales {sorted(approved_rrns)}")
        assert not problems, "\n".join(problems[:40]) + "\n" + self.log_tails(8)
        return stats


def other_site_terminal(root: Path, switch_dir: Path) -> tuple[Site, Path]:
    """A second site registered at the same switch, with one enrolled terminal directory."""
    switch_key = (switch_dir / "switch.pub").read_text().strip()
    other = init_site(root / "other-site", "Altra Fiera", "EUR", switch_key=switch_key,
                      switch_url="https://127.0.0.1:9")
    add_site(switch_dir, other.path)
    path = root / "o1"
    enroll_one_step(other, path, "terminal", "O1")
    return other, path


def rogue_key() -> tuple[Any, str]:
    key = keys.generate()
    return key, keys.node_id_of(bytes(key.verify_key))
