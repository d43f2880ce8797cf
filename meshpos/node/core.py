"""The node's core: identity, roster, store and ledger opened together, and the
operations a cashier or the mesh performs on them. No I/O but the store's.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable

from meshpos.domain.roles import SELLING_ROLES
from meshpos.infra.durable import write_atomically
from meshpos import __version__
from meshpos.domain import rules
from meshpos.infra.clock import SYSTEM_CLOCK, Clock
from meshpos.domain.currency import format_amount
from meshpos.domain.policy import SitePolicy
from meshpos.node.status import AtRisk, NodeSummary, PendingSummary, SalesCount
from meshpos.wire.status import LedgerSize
from meshpos.domain.errors import ConfigError, ContentError, InputError, PolicyError, VerificationError
from meshpos.identity import certs
from meshpos.ledger.ledger import Ledger
from meshpos.site.roster import Roster
from meshpos.ledger.store import Store
from meshpos.wire import envelope
from meshpos.wire.cards import CardCapture, seal_card
from meshpos.node.after_answer import AfterAnswer
from meshpos.node.diskspace import check_room_for_sale
from meshpos.site.nodedir import NodeConfig, NodeDir
from meshpos.status.holders import MIN_HOLDERS, HeldIndex, Holders, at_risk as is_at_risk

log = logging.getLogger(__name__)

# refused: breaks a content rule (meshpos.domain.rules), kept out of totals; deferred: dated ahead of this
# node's clock by more than the skew, judged once the clock gets there; reversed: voided after
# approval and reversed at the acquirer; paid: a cash sale, final when taken (no authorization to
# wait for: the switch records it approved once forwarded, for the day's reconciliation)
STATUSES = ("pending", "paid", "approved", "declined", "expired", "voided", "reversed", "rejected", "refused",
            "deferred")


STORE_CREATED_FILE = "meshpos.db.created"  # the node has had a store: a missing one is a loss
RECOVERING_FILE = "RECOVERING"  # the store was re-created: no selling until a peer gave our log back


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class NodeCore:
    def __init__(self, nd: NodeDir, cfg: NodeConfig, clock: Clock,
                 entropy: Callable[[int], bytes] = os.urandom) -> None:
        self.dir = nd
        self.config = cfg
        self.clock = clock
        self.key = nd.key()
        self.ca_cert = nd.ca_cert()
        self.cert = nd.cert()
        self.identity = certs.verify_node_cert(self.cert, self.ca_cert, now_ms=None)
        if self.identity.node_id != cfg.node_id or self.identity.public_key != bytes(self.key.verify_key):
            raise ConfigError(f"{nd.path}: node.pem, node.key and config.json do not belong together")
        policy = nd.policy(self.ca_cert)
        if policy.site_id != cfg.site_id:
            raise ConfigError(f"{nd.path}: policy.env is of site {policy.site_id}, config of {cfg.site_id}")
        self.roster = Roster(self.ca_cert, policy)
        # A store that existed once and is gone (moved aside after damage, a lost disk) or empty (a
        # file truncated to nothing, an SQLite file without our tables) comes back empty: until a
        # peer gives back this node's own log, selling would reuse sale ids the mesh (and the
        # switch) hold already. A missing store is flagged before the new one exists; an empty one
        # by the node's own certificate missing from it, which the first open writes after this
        # (a crash in between finds it missing again).
        created = nd.path / STORE_CREATED_FILE
        self.recovery_flag = nd.path / RECOVERING_FILE
        if not nd.db_path.exists() and created.exists():
            self._flag_recovery(f"{nd.db_path} was created once and is missing")
        self.store = Store.open(nd.db_path, create=True,
                                identity={"site_id": cfg.site_id, "node_id": cfg.node_id})
        if created.exists() and not self.recovery_flag.exists() and self.store.entry(f"cert/{cfg.node_id}") is None:
            self._flag_recovery(f"{nd.db_path} was created once and holds nothing of this node")
        if not created.exists():
            write_atomically(created, f"node {cfg.node_id}\n".encode(), mode=0o600)
        self.ledger = Ledger.open(self.store, self.roster, cfg.node_id, clock, entropy)
        # who else holds which sales, from the statuses the node receives (fed by its status board)
        self.holders = Holders(cfg.node_id, lambda: self.ledger.holdings.highest(cfg.node_id))
        # called with each sale this node takes, as ``sell`` returns it, once it is durable (the
        # terminal API's ``sale.created`` event: the answer's own object, not a second read); a
        # hook must not raise. ``selling``: the id of the sale ``sell`` is writing, while the
        # ledger's accept hooks run (before the sale is durable and its idempotency key stored)
        self.on_sold: list[Callable[[dict[str, Any]], None]] = []
        self.selling: str | None = None
        # what ``sell(..., defer=True)`` leaves to run after the answer (meshpos.node.after_answer)
        self.after_answer = AfterAnswer()

    def _flag_recovery(self, why: str) -> None:
        write_atomically(self.recovery_flag, f"store {self.dir.db_path} re-created; selling waits for a peer\n".encode(),
                         mode=0o600)
        log.warning("%s: recovering this node's log from the mesh before it sells again", why)

    @classmethod
    def open(cls, path: Path, clock: Clock = SYSTEM_CLOCK, lock: bool = True,
             entropy: Callable[[int], bytes] = os.urandom) -> "NodeCore":
        """``entropy``: the random half of the ledger's Automerge actor ids (a seeded stream in
        the site simulation only)."""
        nd = NodeDir(path)
        cfg = nd.config()
        if lock:
            nd.lock()
        try:
            core = cls(nd, cfg, clock, entropy)
            core._bootstrap()
        except BaseException:
            nd.unlock()
            raise
        return core

    def close(self) -> None:
        self.store.close()
        self.dir.unlock()

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def policy(self) -> SitePolicy:
        return self.roster.policy

    def _bootstrap(self) -> None:
        """First open: put our own certificate and the enrolled policy into the ledger;
        take in whatever the organizer dropped into the inbox (revocations)."""
        if not self.ledger.has(f"cert/{self.node_id}"):
            body = {"cert": envelope.b64e(certs.to_der(self.cert))}
            self.ledger.write_local(envelope.seal("cert", self.node_id, body, self.key))
        policy_raw = self.dir.policy_path.read_bytes()
        self.ingest(policy_raw, "enrollment")
        if self.dir.inbox.is_dir():
            for path in sorted(self.dir.inbox.glob("*.env")):
                try:
                    self.ingest(path.read_bytes(), f"inbox {path.name}")
                except (VerificationError, InputError, Exception) as exc:
                    log.warning("inbox entry %s refused: %s", path, exc)
                    continue
                path.unlink()

    def ingest(self, raw: bytes, origin: str) -> str:
        verified = self.ledger.ingest_raw(raw, origin)
        self.store.flush()
        return verified.key

    # -- selling ------------------------------------------------------------------

    def seal_card(self, pan: str, expiry: str | None, entry_mode: str = "manual",
                  ephemeral: bytes | None = None) -> CardCapture:
        """The card checked and sealed to the site's switch (``ephemeral``: ``wire.cards.seal_card``'s,
        the site simulation's only)."""
        key = self.policy.switch_key_bytes
        if key is None:
            raise PolicyError("this site's policy names no switch key, so card data cannot be sealed: "
                              "take cash, or have the organizer run `meshpos site set-switch`")
        return seal_card(pan, expiry, entry_mode, key, at_ms=self.clock.now_ms(), ephemeral=ephemeral)

    def sell(self, amount_minor: int, card: CardCapture | None = None, description: str | None = None,
             currency: str | None = None, idempotency: tuple[str, str] | None = None,
             defer: bool = False) -> dict[str, Any]:
        """Take one sale; returns only once it is durable (the acknowledgement). ``idempotency``
        (key, body hash) of the terminal API is stored in the sale's own transaction. ``defer``:
        the ``on_sold`` hooks are queued on ``after_answer`` (the caller runs it after answering)
        instead of run before returning."""
        if self.identity.role not in SELLING_ROLES:
            raise PolicyError(f"a {self.identity.role} node does not sell")
        policy = self.policy
        if currency is not None and currency != policy.currency:
            raise InputError(f"this site sells in {policy.currency}, not {currency}")
        if not isinstance(amount_minor, int) or amount_minor <= 0:
            raise InputError("amount must be a positive number of minor units")
        if self.recovery_flag.exists():
            raise PolicyError(
                f"{self.dir.path}: this node's database was re-created and waits for a peer to give back its "
                f"own sales, so that no sale id is used twice; link it to the mesh (or, if it never sold "
                f"before, delete {self.recovery_flag})")
        # A full disk refuses the sale before anything of it exists, in memory or on disk: the
        # room is checked, and what links brought in is committed apart (a failing commit is
        # DiskFullError here), so the sale's own commit holds only the sale.
        check_room_for_sale(self.dir.db_path)
        self.store.commit()
        now = self.clock.now_ms()
        policy = self.roster.policy_at(now)
        problem = rules.description_problem(description)
        if problem:
            raise ContentError(problem)
        with self.store.transaction():
            window_start = now - policy.offline_window_ms
            # our own pending sales count whatever their date ahead of our clock: a clock set back
            # (by a cashier, or a device that reset it) must not free this terminal's caps
            pending = self.store.pending_for_sale(window_start, now + rules.MAX_SKEW_MS, self.node_id)
            if card is None:  # cash is final when taken: only the per-sale cap applies
                policy.check_amount(amount_minor)
            else:
                policy.check_sale(amount_minor, pending.get(self.node_id, 0))
            # No other terminal counts for more than its own cap: one that signs more (a hostile
            # or broken one) cannot stop the whole site from selling (protocols/rules.md)
            cap = policy.max_terminal_pending_minor
            site_total = sum(min(v, cap) for t, v in pending.items() if t != self.node_id)
            site_total += pending.get(self.node_id, 0) + amount_minor
            if card is not None and site_total > policy.max_site_pending_minor:
                over = site_total - policy.max_site_pending_minor
                raise PolicyError(
                    f"this sale would bring the site's pending offline total over its cap of "
                    f"{format_amount(policy.max_site_pending_minor, policy.currency)} {policy.currency} by "
                    f"{format_amount(over, policy.currency)} {policy.currency}")
            seq = self.store.last_seq(self.node_id) + 1
            body = {
                "sale_id": envelope.sale_id(self.node_id, seq), "site": policy.site_id,
                "terminal": self.node_id, "seq": seq, "created_at": now, "amount_minor": amount_minor,
                "currency": policy.currency, "method": "card" if card else "cash",
                "description": description, "items": [],
                "card": None if card is None else {
                    "brand": card.brand, "last4": card.last4, "entry_mode": card.entry_mode,
                    "sealed": envelope.b64e(card.sealed)},
            }
            rules.check_sale(body, policy, now)  # the very rules every node and the switch apply
            self.selling = str(body["sale_id"])
            try:
                self.ledger.write_local(envelope.seal("sale", self.node_id, body, self.key))
            finally:
                self.selling = None
            if idempotency is not None:
                self.store.insert_idempotency(idempotency[0], idempotency[1], str(body["sale_id"]), now)
        self.store.flush()  # the acknowledgement: durable before it is returned
        sale = self.sale(str(body["sale_id"]))
        if not defer:
            self.after_answer.run()  # an earlier sale's deferred hooks come before this one's
        for sold in self.on_sold:
            if defer:
                self.after_answer.defer(sold, sale)
            else:
                sold(sale)
        return sale

    def void(self, sale_id: str, reason: str | None = None) -> dict[str, Any]:
        row = self.store.sale(sale_id)
        if row is None:
            raise InputError(f"no sale {sale_id} on this node")
        if row["terminal"] != self.node_id:
            raise InputError(f"sale {sale_id} was taken by another terminal: void it there")
        current = self.status_of(row)
        if current not in ("pending", "paid") and not (current == "approved" and row["result_status"] == "approved"):
            raise InputError(f"sale {sale_id} is {current}: only a pending, paid or approved sale can be voided")
        if self.ledger.has(f"void/{sale_id}"):
            raise InputError(f"sale {sale_id} is voided already")
        problem = rules.description_problem(reason)  # signed and replicated like a description
        if problem:
            raise ContentError(problem.replace("description", "reason", 1))
        body = {"sale_id": sale_id, "site": self.policy.site_id, "at": self.clock.now_ms(), "reason": reason}
        self.ledger.write_local(envelope.seal("void", self.node_id, body, self.key))
        self.store.flush()
        return self.sale(sale_id)

    # -- views --------------------------------------------------------------------

    def status_of(self, row: sqlite3.Row) -> str:
        if row["refused"] is not None:
            return "refused"
        if row["reversed_at"] is not None:
            return "reversed"
        if row["result_status"] is not None:
            return str(row["result_status"])
        if rules.future_problem(row["created_at"], self.clock.now_ms(), "sale") is not None:
            return "deferred"
        if row["voided_at"] is not None:
            return "voided"
        if row["method"] == "cash":
            return "paid"  # the money is in the till: nothing pending, nothing to expire
        if row["created_at"] + self.policy.offline_window_ms < self.clock.now_ms():
            return "expired"  # the window bounds card authorization
        return "pending"

    def held_index(self) -> HeldIndex:
        """Who else holds what, by the statuses received so far (revoked nodes left out)."""
        return self.holders.index(self.roster.revoked)

    def held_by(self, row: sqlite3.Row, index: HeldIndex | None = None) -> int:
        """How many distinct nodes are known to hold this sale: this one (it lists it from its own
        store; an inspector does not count itself) and the others whose status says so."""
        index = index if index is not None else self.held_index()
        own = 0 if self.identity.role == "inspector" else 1
        return own + index.others_holding(str(row["terminal"]), int(row["seq"]))

    def at_risk(self, terminal: str | None = None) -> list[dict[str, Any]]:
        """The pending sales held by fewer than MIN_HOLDERS nodes (of one terminal, or all): the
        loss of a device would lose them before they reach the switch."""
        index = self.held_index()
        return [self.sale_json(row, index) for row in self.store.sales(terminal)
                if is_at_risk(self.status_of(row), self.held_by(row, index))]

    def sale_json(self, row: sqlite3.Row, index: HeldIndex | None = None) -> dict[str, Any]:
        currency = row["currency"]
        return {
            "id": row["sale_id"], "terminal": row["terminal"], "terminal_name": self.roster.name_of(row["terminal"]),
            "seq": row["seq"], "amount_minor": row["amount_minor"],
            "amount": format_amount(row["amount_minor"], currency), "currency": currency,
            "method": row["method"], "card_brand": row["brand"], "card_last4": row["last4"],
            "entry_mode": row["entry_mode"], "description": row["description"],
            "status": self.status_of(row), "auth_code": row["auth_code"], "response_code": row["response_code"],
            "reason": self._reason(row), "created_at": iso(row["created_at"]), "created_at_ms": row["created_at"],
            # the offline window bounds card authorization; a cash sale has nothing to wait for
            "deadline": iso(row["created_at"] + self.policy.offline_window_ms) if row["method"] == "card" else None,
            "voided_at": iso(row["voided_at"]), "settled_at": iso(row["settled_at"]),
            "held_by": self.held_by(row, index),
            # the card authorization's window (cash is final when taken: no window)
            "window_ends_at": iso(row["created_at"] + self.policy.offline_window_ms) if row["method"] == "card" else None,
            "idempotency_key": row["idempotency_key"],  # terminal API sales of this node only
        }

    def _reason(self, row: sqlite3.Row) -> str | None:
        if row["refused"] is not None:
            return str(row["refused"])
        if row["result_status"] is None and row["reversed_at"] is None:
            ahead = rules.future_problem(row["created_at"], self.clock.now_ms(), "the sale's time")
            if ahead is not None:
                return ahead + "; judged once this node's clock gets there"
        return None if row["reason"] is None else str(row["reason"])

    def sale(self, sale_id: str) -> dict[str, Any]:
        row = self.store.sale(sale_id)
        if row is None:
            raise InputError(f"no sale {sale_id} on this node")
        return self.sale_json(row)

    def sales(self, terminal: str | None = None) -> list[dict[str, Any]]:
        index = self.held_index()
        return [self.sale_json(r, index) for r in self.store.sales(terminal)]

    def status(self) -> NodeSummary:
        rows = self.store.sales()  # classified row by row: a busy node holds 100,000 sales
        counts = {s: 0 for s in STATUSES}
        pending = []
        risky = []
        index = self.held_index()
        for row in rows:
            status = self.status_of(row)
            counts[status] += 1
            if status == "pending":
                pending.append(row)
                if row["terminal"] == self.node_id and is_at_risk(status, self.held_by(row, index)):
                    risky.append(row)
        now = self.clock.now_ms()
        return NodeSummary(
            node_id=self.node_id, name=self.config.name, role=self.identity.role,
            site_id=self.config.site_id, site_name=self.policy.name, version=__version__,
            certificate_expires=iso(self.identity.not_after_ms),
            certificate_valid=self.identity.not_before_ms <= now <= self.identity.not_after_ms,
            uplink_allowed=self.config.uplink, switch_configured=self.policy.switch_key is not None,
            ledger=LedgerSize(entries=self.store.entry_count(), shards=len(self.ledger.shards())),
            sales=SalesCount(total=len(rows), by_status=counts,
                             own=sum(1 for r in rows if r["terminal"] == self.node_id)),
            pending=PendingSummary(count=len(pending), amount_minor=sum(r["amount_minor"] for r in pending),
                                   oldest_created_at=iso(min(r["created_at"] for r in pending)) if pending else None),
            at_risk=AtRisk(count=len(risky), amount_minor=sum(r["amount_minor"] for r in risky),
                           min_holders=MIN_HOLDERS),
            revoked_nodes=sorted(self.roster.revoked),
            policy={k: v for k, v in self.policy.to_json().items() if k != "dashboard_password"},
        )
