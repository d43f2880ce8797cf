"""The switch's durable state, behind :class:`SwitchStore`; the queries live here, written once for
both backends (:mod:`.database`: SQLite by default, PostgreSQL for several instances).

Tables:
  sites            registered sites: CA certificate (PEM), current signed policy, merchant id
  site_entries     CA-signed revocations and policies, and node certificates, learned from batches
  site_generation  one counter, raised by every change to the two tables above: running
                   instances poll it and reload their sites (``switch add-site`` without restarts)
  sales            the de-duplication table, keyed on sale id: the sale envelope (its card data stays
                   sealed), its digest, the state (received / advice_sent / settled), the signed
                   result bytes, the reversal state and, once a void after approval was reversed,
                   the signed ``reversal`` entry; the attempts. ``ref`` numbers the sale for the
                   acquirer (RRN and STAN derive from it), so a repeat carries the same numbers.
                   ``claimed_by`` / ``claimed_until``: which instance is advising the sale, and
                   until when its claim holds unless renewed (protocols/switch-instances.md).
  voids            void envelopes received, also those that came before their sale
  schema_version   the schema's version (``meshpos switch migrate``)

Every state change of a sale commits before the switch acts on it: ``received`` before the
batch is answered, ``advice_sent`` before the first byte of the 0220 leaves, ``settled`` before
the result is returned. A crash between "advice sent" and "answer" therefore leaves
``advice_sent``, and the next attempt goes as 0221, never as a second 0220. The two state changes
that matter are compare-and-set updates (``... WHERE state = <expected>``): of two instances
racing on one sale, exactly one sees its update take effect.

No column ever holds a full card number.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import trio

from meshpos.domain.errors import StoreError
from meshpos.switch.database import Database, RetryableStoreError, open_database

log = logging.getLogger(__name__)

RECEIVED = "received"
ADVICE_SENT = "advice_sent"
SETTLED = "settled"
STATES = (RECEIVED, ADVICE_SENT, SETTLED)

REVERSAL_SENT = "sent"
REVERSAL_DONE = "done"

#: sale ids per ``IN (...)`` query (SQLite allows 32766 parameters, PostgreSQL 65535)
IN_CHUNK = 500
#: times one group's ops are run again after the database broke a deadlock between instances
DEADLOCK_RETRIES = 5


class ClaimLost(StoreError):
    """Another instance took this step of the sale first (its 0220 is recorded, or it holds the
    sale's claim): this instance must not advise it now."""


class AlreadySettled(StoreError):
    """The sale was settled meanwhile (by another instance, or a late answer): keep its result."""


@dataclass(frozen=True)
class SiteRow:
    site_id: str
    name: str
    ca_pem: bytes
    policy_env: bytes
    merchant_id: str


@dataclass(frozen=True)
class SaleRow:
    ref: int
    sale_id: str
    site_id: str
    terminal: str
    digest: bytes
    sale_raw: bytes
    state: str
    result: bytes | None
    result_status: str | None
    reversal: str | None
    attempts: int
    reversal_entry: bytes | None = None  # the signed ``reversal`` envelope, once the 0420 was answered


def _sale(row: Any) -> SaleRow:
    return SaleRow(ref=int(row[0]), sale_id=str(row[1]), site_id=str(row[2]), terminal=str(row[3]),
                   digest=bytes(row[4]), sale_raw=bytes(row[5]), state=str(row[6]),
                   result=None if row[7] is None else bytes(row[7]),
                   result_status=None if row[8] is None else str(row[8]),
                   reversal=None if row[9] is None else str(row[9]), attempts=int(row[10]),
                   reversal_entry=None if row[11] is None else bytes(row[11]))


_SALE_COLUMNS = ("ref, sale_id, site_id, terminal, digest, sale_raw, state, result, result_status, reversal,"
                 " attempts, reversal_entry")

Op = Callable[["SwitchStore"], None]


class SwitchStore:
    """The switch's queries over one :class:`~.database.Database`. Writes run inside
    :meth:`transaction` (in :class:`GroupCommit`'s worker thread while a service runs); reads see
    committed data only. ``blocking_reads``: run reads in a worker thread (PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.location = db.location
        self.blocking_reads = db.reads_block
        self._depth = 0

    @classmethod
    def open(cls, location: Any, *, create: bool = False) -> "SwitchStore":
        """``location``: a SQLite file path or a ``postgresql://`` URL."""
        return cls(open_database(str(location), create=create))

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction, durable on return; nested uses join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            with self.db.transaction():
                yield
        finally:
            self._depth = 0

    def ping(self) -> None:
        self.db.ping()

    # -- sites ---------------------------------------------------------------------

    def _sites_changed(self) -> None:
        self.db.execute("UPDATE site_generation SET gen = gen + 1 WHERE one = 1")

    def site_generation(self) -> int:
        """Raised by every change of sites or their roster entries, by any instance."""
        return int(self.db.query("SELECT gen FROM site_generation WHERE one = 1")[0][0])

    def put_site(self, site: SiteRow, now_ms: int) -> None:
        self.db.execute(
            "INSERT INTO sites(site_id, name, ca_pem, policy_env, merchant_id, added_at) VALUES(?,?,?,?,?,?) "
            "ON CONFLICT(site_id) DO UPDATE SET name=excluded.name, policy_env=excluded.policy_env, "
            "merchant_id=excluded.merchant_id",
            (site.site_id, site.name, site.ca_pem.decode("ascii"), site.policy_env, site.merchant_id, now_ms))
        self._sites_changed()

    def sites(self) -> list[SiteRow]:
        rows = self.db.query("SELECT site_id, name, ca_pem, policy_env, merchant_id FROM sites ORDER BY site_id")
        return [SiteRow(str(r[0]), str(r[1]), str(r[2]).encode("ascii"), bytes(r[3]), str(r[4])) for r in rows]

    def put_site_entry(self, site_id: str, key: str, type_: str, raw: bytes) -> bool:
        """Keep a verified roster entry; False if it was known already."""
        added = self.db.execute("INSERT INTO site_entries(key, site_id, type, raw) VALUES(?,?,?,?) "
                                "ON CONFLICT DO NOTHING", (key, site_id, type_, raw)) > 0
        if added:
            self._sites_changed()
        return added

    def site_entries(self, site_id: str) -> list[bytes]:
        rows = self.db.query(
            "SELECT raw FROM site_entries WHERE site_id=? ORDER BY "
            f"CASE type WHEN 'policy' THEN 0 WHEN 'cert' THEN 1 ELSE 2 END, {self.db.rowid}", (site_id,))
        return [bytes(r[0]) for r in rows]

    # -- sales ---------------------------------------------------------------------

    def _one_sale(self, where: str, value: Any) -> SaleRow | None:
        rows = self.db.query(f"SELECT {_SALE_COLUMNS} FROM sales WHERE {where}=?", (value,))
        return _sale(rows[0]) if rows else None

    def sale(self, sale_id: str) -> SaleRow | None:
        return self._one_sale("sale_id", sale_id)

    def sales_of(self, sale_ids: list[str]) -> dict[str, SaleRow]:
        """The rows of those of ``sale_ids`` the table holds, by sale id."""
        found: dict[str, SaleRow] = {}
        for k in range(0, len(sale_ids), IN_CHUNK):
            chunk = sale_ids[k:k + IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            for r in self.db.query(f"SELECT {_SALE_COLUMNS} FROM sales WHERE sale_id IN ({marks})", chunk):
                row = _sale(r)
                found[row.sale_id] = row
        return found

    def voids_of(self, sale_ids: list[str]) -> dict[str, bytes]:
        """The stored void envelopes of those of ``sale_ids`` that have one."""
        found: dict[str, bytes] = {}
        for k in range(0, len(sale_ids), IN_CHUNK):
            chunk = sale_ids[k:k + IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            for sale_id, raw in self.db.query(f"SELECT sale_id, raw FROM voids WHERE sale_id IN ({marks})", chunk):
                found[str(sale_id)] = bytes(raw)
        return found

    def sale_by_ref(self, ref: int) -> SaleRow | None:
        return self._one_sale("ref", ref)

    def insert_received(self, sale_id: str, site_id: str, terminal: str, digest: bytes, raw: bytes,
                        now_ms: int) -> None:
        self.insert_received_many([(sale_id, site_id, terminal, digest, raw)], now_ms)

    def insert_received_many(self, sales: list[tuple[str, str, str, bytes, bytes]], now_ms: int) -> None:
        """Record sales (sale id, site id, terminal, digest, envelope) as received; known ids are
        left as they are. Sorted by sale id, so two instances recording overlapping batches take
        the rows' locks in one order (no deadlock between them)."""
        self.db.execute_many(
            "INSERT INTO sales(sale_id, site_id, terminal, digest, sale_raw, state, received_at, updated_at)"
            " VALUES(?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            [(*sale, RECEIVED, now_ms, now_ms) for sale in sorted(sales)])

    def mark_advice_sent(self, sale_id: str, now_ms: int, owner: str = "", claim_until_ms: int = 0) -> None:
        """received -> advice_sent, claimed by ``owner``: the one step that lets a 0220 leave.
        ClaimLost if the sale is not ``received`` any more (another instance recorded it first)."""
        if not self.mark_advice_sent_many([(sale_id, now_ms, owner, claim_until_ms)])[0]:
            raise ClaimLost(f"sale {sale_id} is not in state {RECEIVED}: refusing to mark a second 0220")

    def mark_advice_sent_many(self, sales: list[tuple[str, int, str, int]]) -> list[bool]:
        """:meth:`mark_advice_sent` of each (sale id, now, owner, claim until), in one pipelined
        round trip: whether each took effect (False: not ``received`` any more, nothing written)."""
        changed = self.db.execute_each(
            "UPDATE sales SET state=?, attempts=attempts+1, updated_at=?, claimed_by=?, claimed_until=?"
            " WHERE sale_id=? AND state=?",
            [(ADVICE_SENT, now_ms, owner, until, sale_id, RECEIVED) for sale_id, now_ms, owner, until in sales])
        return [n == 1 for n in changed]

    def claim(self, sale_id: str, owner: str, now_ms: int, until_ms: int) -> bool:
        """Take (or renew) the claim on an ``advice_sent`` sale: free, ours, or expired. True if ours now."""
        return self.db.execute(
            "UPDATE sales SET claimed_by=?, claimed_until=? WHERE sale_id=? AND state=?"
            " AND (claimed_by IS NULL OR claimed_by=? OR claimed_until < ?)",
            (owner, until_ms, sale_id, ADVICE_SENT, owner, now_ms)) == 1

    def release(self, sale_id: str, owner: str) -> None:
        self.db.execute("UPDATE sales SET claimed_by=NULL, claimed_until=NULL WHERE sale_id=? AND claimed_by=?",
                        (sale_id, owner))

    def renew_claims(self, owner: str, until_ms: int) -> int:
        """Extend every claim ``owner`` holds (its heartbeat); how many it holds."""
        return self.db.execute("UPDATE sales SET claimed_until=? WHERE claimed_by=? AND state=?",
                               (until_ms, owner, ADVICE_SENT))

    def claim_of(self, sale_id: str) -> tuple[str | None, int | None]:
        rows = self.db.query("SELECT claimed_by, claimed_until FROM sales WHERE sale_id=?", (sale_id,))
        if not rows:
            return None, None
        by, until = rows[0]
        return (None if by is None else str(by)), (None if until is None else int(until))

    def add_attempts(self, sale_id: str, n: int, now_ms: int) -> None:
        self.db.execute("UPDATE sales SET attempts=attempts+?, updated_at=? WHERE sale_id=?", (n, now_ms, sale_id))

    def settle(self, sale_id: str, result: bytes, status: str, reversal: str | None, now_ms: int) -> None:
        """-> settled with ``result``; AlreadySettled if it was settled first (by anyone)."""
        if not self.settle_many([(sale_id, result, status, reversal, now_ms)])[0]:
            raise AlreadySettled(f"sale {sale_id} is settled already or unknown")

    def settle_many(self, sales: list[tuple[str, bytes, str, str | None, int]]) -> list[bool]:
        """:meth:`settle` of each (sale id, result, status, reversal, now), in one pipelined round
        trip: whether each took effect (False: settled already or unknown, nothing written)."""
        changed = self.db.execute_each(
            "UPDATE sales SET state=?, result=?, result_status=?, reversal=coalesce(?, reversal), updated_at=?,"
            " claimed_by=NULL, claimed_until=NULL WHERE sale_id=? AND state<>?",
            [(SETTLED, result, status, reversal, now_ms, sale_id, SETTLED)
             for sale_id, result, status, reversal, now_ms in sales])
        return [n == 1 for n in changed]

    def set_reversal(self, sale_id: str, reversal: str, now_ms: int, entry: bytes | None = None) -> None:
        self.db.execute("UPDATE sales SET reversal=?, reversal_entry=coalesce(?, reversal_entry), updated_at=?"
                        " WHERE sale_id=?", (reversal, entry, now_ms, sale_id))

    def statuses(self) -> dict[str, str | None]:
        """Every sale id with its result status (None while unsettled)."""
        return {str(r[0]): None if r[1] is None else str(r[1])
                for r in self.db.query("SELECT sale_id, result_status FROM sales")}

    def count_states(self) -> dict[str, int]:
        counts = {s: 0 for s in STATES}
        for state, n in self.db.query("SELECT state, count(*) FROM sales GROUP BY state"):
            counts[str(state)] = int(n)
        return counts

    # -- voids ---------------------------------------------------------------------

    def put_void(self, sale_id: str, site_id: str, raw: bytes, at_ms: int) -> None:
        self.db.execute("INSERT INTO voids(sale_id, site_id, raw, at) VALUES(?,?,?,?) ON CONFLICT DO NOTHING",
                        (sale_id, site_id, raw, at_ms))

    def void_of(self, sale_id: str) -> bytes | None:
        rows = self.db.query("SELECT raw FROM voids WHERE sale_id=?", (sale_id,))
        return bytes(rows[0][0]) if rows else None


@dataclass(frozen=True)
class AdviceSent:
    """The op :meth:`SwitchStore.mark_advice_sent` (ClaimLost if it does not take effect), given as
    data so that a group runs all of its kind as one pipelined statement (:class:`GroupCommit`)."""

    sale_id: str
    now_ms: int
    owner: str
    claim_until_ms: int

    def apply(self, store: SwitchStore) -> None:
        store.mark_advice_sent(self.sale_id, self.now_ms, self.owner, self.claim_until_ms)

    @staticmethod
    def apply_many(store: SwitchStore, ops: list["AdviceSent"]) -> list[StoreError | None]:
        if not ops:
            return []
        done = store.mark_advice_sent_many([(o.sale_id, o.now_ms, o.owner, o.claim_until_ms) for o in ops])
        return [None if ok else ClaimLost(f"sale {o.sale_id} is not in state {RECEIVED}: refusing to mark a "
                                          "second 0220") for o, ok in zip(ops, done)]


@dataclass(frozen=True)
class Settle:
    """The op :meth:`SwitchStore.settle` (AlreadySettled if it does not take effect), as data."""

    sale_id: str
    result: bytes
    status: str
    reversal: str | None
    now_ms: int

    def apply(self, store: SwitchStore) -> None:
        store.settle(self.sale_id, self.result, self.status, self.reversal, self.now_ms)

    @staticmethod
    def apply_many(store: SwitchStore, ops: list["Settle"]) -> list[StoreError | None]:
        if not ops:
            return []
        done = store.settle_many([(o.sale_id, o.result, o.status, o.reversal, o.now_ms) for o in ops])
        return [None if ok else AlreadySettled(f"sale {o.sale_id} is settled already or unknown")
                for o, ok in zip(ops, done)]


#: ops a group runs together, one statement per kind for all of them (the hot path: two per sale)
BulkOp = AdviceSent | Settle


class _Fallback(Exception):
    """The fast way of running a group met an error: undo it and run it op by op."""


class _Group:
    __slots__ = ("ops", "keys", "done", "errors", "leader")

    def __init__(self) -> None:
        self.ops: list[Op | BulkOp] = []
        self.keys: list[str] = []
        self.done = trio.Event()
        self.errors: dict[int, BaseException] = {}
        self.leader = False


class GroupCommit:
    """Durable writes from many tasks, many per commit (group commit).

    ``await commit(op)`` returns once ``op`` is committed. Ops join the open group;
    its first caller leads it: it waits until the previous group's commit is done (so
    the group grows meanwhile), then runs all its ops in ONE transaction in a worker
    thread, so the event loop goes on while the database writes and syncs. The leader is
    shielded: a cancelled caller never strands the others. Every write of a running switch
    goes through here; no transaction is held across an await.

    Fast way first: the group's :data:`BulkOp` ops (a sale's "advice sent" and "settled"
    compare-and-sets) run as one pipelined statement per kind, each in sale id order, then the
    other ops in key order, with no savepoint between them. A bulk op that does not take effect
    wrote nothing and gets its ClaimLost / AlreadySettled. If anything else goes wrong (an op
    raises, the database broke a deadlock), the transaction is rolled back and the group runs
    the careful way: each op in its own savepoint, so one that raises is undone alone and its
    caller gets the error, and an op the database gave up to break a deadlock with another
    instance runs again in a next transaction, after this one released its locks.
    """

    def __init__(self, store: SwitchStore) -> None:
        self.store = store
        self._group = _Group()
        self._lock = trio.Lock()
        self.commits = 0
        #: groups that had to run op by op (an op raised, or a deadlock with another instance)
        self.fallbacks = 0
        #: seconds each group's transaction took (metrics), set by whoever runs the service
        self.observe: Callable[[float], None] = lambda seconds: None

    def _run(self, group: _Group) -> None:
        committed = False
        try:
            with self.store.transaction():
                self._run_fast(group)
                committed = True  # the ops ran: an error now is the commit's, not theirs
        except _Fallback as exc:
            cause: BaseException = exc.__cause__ or exc
        except Exception as exc:
            if committed:  # the commit failed: nothing is durable
                group.errors.clear()
                for i in range(len(group.ops)):
                    group.errors[i] = exc
                return
            cause = exc
        else:
            return
        group.errors.clear()
        self.fallbacks += 1
        log.info("a group of %d writes runs again op by op (%s: %s)", len(group.ops), type(cause).__name__,
                 str(cause)[:200])
        self._run_careful(group)

    def _run_fast(self, group: _Group) -> None:
        order = sorted(range(len(group.ops)), key=lambda i: group.keys[i])
        advices = [(i, op) for i in order if isinstance(op := group.ops[i], AdviceSent)]
        settles = [(i, op) for i in order if isinstance(op := group.ops[i], Settle)]
        try:
            outcomes = [*zip([i for i, _ in advices], AdviceSent.apply_many(self.store, [o for _, o in advices])),
                        *zip([i for i, _ in settles], Settle.apply_many(self.store, [o for _, o in settles]))]
        except Exception as exc:
            raise _Fallback() from exc
        for i, error in outcomes:
            if error is not None:
                group.errors[i] = error
        for i in order:
            op = group.ops[i]
            if isinstance(op, (AdviceSent, Settle)):
                continue
            try:
                op(self.store)
            except Exception as exc:
                raise _Fallback() from exc

    def _run_careful(self, group: _Group) -> None:
        # in the order of the rows they lock (a sale id): two instances whose groups touch the
        # same sales then take the locks in one order and never deadlock each other
        todo = sorted(range(len(group.ops)), key=lambda i: group.keys[i])
        for round_ in range(DEADLOCK_RETRIES + 1):
            again: list[int] = []
            try:
                with self.store.transaction():
                    for i in todo:
                        op = group.ops[i]
                        try:
                            with self.store.db.savepoint():
                                if isinstance(op, (AdviceSent, Settle)):
                                    op.apply(self.store)
                                else:
                                    op(self.store)
                        except RetryableStoreError as exc:
                            if round_ == DEADLOCK_RETRIES:
                                group.errors[i] = exc
                            else:
                                again.append(i)
                        except Exception as exc:
                            group.errors[i] = exc
            except Exception as exc:  # the commit failed: nothing of this round is durable
                for i in todo:
                    group.errors[i] = exc
                return
            if not again:
                return
            todo = again

    async def commit(self, op: Op | BulkOp, key: str = "") -> None:
        """``key``: the (first) sale id the op writes; ops of a group run in key order."""
        group = self._group
        index = len(group.ops)
        group.ops.append(op)
        group.keys.append(key)
        if group.leader:
            await group.done.wait()
        else:
            group.leader = True
            with trio.CancelScope(shield=True):
                async with self._lock:
                    self._group = _Group()  # later ops form the next group
                    started = trio.current_time()
                    await trio.to_thread.run_sync(self._run, group)
                    self.commits += 1
                    self.observe(trio.current_time() - started)
                    group.done.set()
        error = group.errors.get(index)
        if isinstance(error, (ClaimLost, AlreadySettled)):
            raise error
        if error is not None:
            raise StoreError(f"switch database write failed: {error}") from error


__all__ = ["SwitchStore", "GroupCommit", "AdviceSent", "Settle", "BulkOp", "SiteRow", "SaleRow", "ClaimLost",
           "AlreadySettled", "RECEIVED", "ADVICE_SENT", "SETTLED", "REVERSAL_SENT", "REVERSAL_DONE"]
