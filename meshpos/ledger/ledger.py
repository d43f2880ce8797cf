"""The site ledger: verified signed entries replicated as sharded Automerge documents.

Layout (normative: protocols/ledger.md). Every node appends the entries it
writes (its sales, voids, the results it brought back, its certificate...)
to its own log, cut into shards of SEGMENT entries named
``<node_id>/<segment>``. A shard is one Automerge document whose root map holds
``entry key -> envelope bytes``. Sharding keeps every Automerge operation
(sync round, scan, save) bounded by SEGMENT, whatever the size of the site's
ledger, and lets a fresh node bootstrap shard by shard from snapshots.

Automerge does not know who may write what, so the documents are only the
transport. The node's view is the set of *verified* entries in its store:
after each merge the shard is scanned; new entries are verified against the
roster before they enter the view (an unknown signer is parked until its
certificate arrives), invalid ones are logged and kept out, and an entry a
peer deleted or overwrote in its home shard is re-asserted from the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import automerge.core as am

from meshpos.wire.leb128 import uleb128
from meshpos.wire import amcanon, amchange, amhistory
from meshpos.ledger import amguard
from meshpos.wire import envelope as env_mod
from meshpos.domain import rules
from meshpos.infra.clock import Clock
from meshpos.domain.errors import EncodingError, MeshposError, VerificationError
from meshpos.domain.policy import SitePolicy
from meshpos.site.roster import Roster, UnknownSigner, Verified
from meshpos.ledger.holdings import Holdings
from meshpos.ledger.store import EntryRow, Store, damaged, sale_row
from meshpos.wire.shards import shard_name, valid_shard_name

log = logging.getLogger(__name__)

COMPACT_AFTER_CHUNKS = 64
PUSH_LIMIT = 256 * 1024  # new changes of one shard pushed as they are; more goes by the sync protocol
MERGED_KEYS_MAX_CHANGES = 16  # a merge of more changes reads its keys from Automerge's diff
PUSH_WHOLE_SHARD_MAX = 8  # entries of a shard new to this node still pushed as changes
PRESIGN_BATCH = 32  # signatures sent to the helper process at a time (the last ones first)
RESTRIP_LIMIT = 3  # times a refused entry a peer puts back is stripped again
# keys under which a node could sign two different entries (the rest are fixed by their signer
# alone, or signed by the CA or the switch): the lowest digest wins on every node
EQUIVOCABLE = ("sale/", "void/", "lease/")


def entry_bytes(got: object) -> bytes | None:
    """The envelope bytes of a ``doc.get`` answer, or None if it holds anything else.

    automerge 1.0.0rc1 hands Bytes scalars back as a list of ints.
    """
    if not isinstance(got, tuple) or not got:
        return None
    value = got[0]
    if not isinstance(value, tuple) or len(value) != 2 or value[0] != am.ScalarType.Bytes:
        return None
    data = value[1]
    if isinstance(data, bytes):
        return data
    try:
        return bytes(data)
    except (TypeError, ValueError):
        return None


_PATCH_KEY = re.compile(r'(?:PutMap|DeleteMap) \{ key: "((?:[^"\\]|\\.)*)"')
_RUST_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "0": "\0", "\\": "\\", '"': '"', "'": "'"}


def _unescape(text: str) -> str | None:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1: i + 2]
        if nxt in _RUST_ESCAPES:
            out.append(_RUST_ESCAPES[nxt])
            i += 2
        elif nxt == "u" and text[i + 2: i + 3] == "{":
            end = text.find("}", i)
            if end < 0:
                return None
            out.append(chr(int(text[i + 3: end], 16)))
            i = end + 1
        else:
            return None
    return "".join(out)


def changed_keys(doc: am.Document, before: list[bytes]) -> set[str] | None:
    """Root keys whose value a merge changed since ``before`` (put, overwritten or deleted), from
    Automerge's own diff.

    automerge 1.0.0rc1's Python binding exposes patches only through their
    Debug text, so the keys are read from it; anything unexpected returns None
    and the caller scans the whole shard instead. The diff is taken backwards, from now to
    ``before``: the same keys (those whose value differs between the two), but a new entry, what
    nearly every merge brings, reads as ``DeleteMap { key }`` instead of a ``PutMap`` that prints
    the whole envelope as a list of numbers (most of this function's cost). A key whose value
    stays but gained a losing concurrent value is in neither direction's keys (forwards it is a
    ``Conflict`` patch, which made the caller scan every key for nothing).
    """
    if not before:
        return None  # a whole new shard (a snapshot): scanning it is cheaper than printing its diff
    try:
        patches = doc.diff(doc.get_heads(), before)
    except Exception:
        return None
    keys: set[str] = set()
    for patch in patches:
        text = repr(patch)
        if not text.startswith("Patch { obj: Root, path: [], action: "):
            return None
        found = _PATCH_KEY.search(text)
        if found is None:
            return None
        key = _unescape(found.group(1))
        if key is None:
            return None
        keys.add(key)
    return keys


def merged_keys(doc: am.Document, before: list[bytes], changes: list[Any] | None = None) -> set[str] | None:
    """Root keys a merge since ``before`` may have changed: the keys its new changes' operations
    name (meshpos.wire.amchange, a superset of the changed keys, in time that does not grow with
    the shard), else Automerge's diff (``changed_keys``): also for a merge of many changes (a
    sync after a partition), where one diff costs less than reading each change here.
    ``changes``: ``doc.get_changes(before)`` when the caller has it already."""
    if not before:
        return None
    if changes is None:
        changes = doc.get_changes(before)
    if len(changes) > MERGED_KEYS_MAX_CHANGES:
        return changed_keys(doc, before)
    keys: set[str] = set()
    for change in changes:
        try:  # the kind of change meshpos writes: read (and remembered) by the canonical check
            named: set[str] | None = {op.key for op in amcanon.change_ops(change.raw_bytes)}
        except amcanon.NonCanonical:  # another kind (it came in a snapshot): read its columns
            named = amchange.root_keys(change.raw_bytes)
        if named is None:
            return changed_keys(doc, before)
        keys |= named
    return keys


def changes_message(changes: list[bytes]) -> bytes:
    """An Automerge sync message (format v1) that carries just ``changes``.

    automerge 1.0.0rc1's binding has no ``apply_changes``; ``receive_sync_message`` on a
    throw-away SyncState applies such a message's changes, queueing any whose dependencies
    are missing, exactly as Automerge's own apply would.
    """
    out = bytearray(b"\x42\x00\x00\x00")  # message type; no heads, no needs, no haves
    out += uleb128(len(changes))
    for change in changes:
        out += uleb128(len(change)) + change
    return bytes(out)


def digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


@dataclass
class IngestReport:
    accepted: list[Verified] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    parked: int = 0
    reasserted: int = 0
    stripped: list[str] = field(default_factory=list)  # invalid keys deleted from the shard


@dataclass
class _Rows:
    """Rows of accepted sales not written to the store yet (``Ledger._accept``)."""
    entries: list[EntryRow] = field(default_factory=list)
    sales: list[tuple[object, ...]] = field(default_factory=list)


class _Feeder:
    """Hands a big merge's signatures to the helper process a batch at a time from the far end,
    while this process verifies from the front (Roster.verify checks itself what the helper has
    not answered when it gets there): the two meet in the middle. Only a few batches are sent
    ahead (Roster.presign refuses more), so the helper is not left checking entries this
    process has passed already."""

    def __init__(self, roster: Roster, ahead: list[tuple[int, env_mod.Envelope]]) -> None:
        self.roster = roster
        self.ahead = ahead  # (position in the merge, envelope), in merge order
        self.end = len(ahead)  # ahead[end:] has been handed over

    def feed(self, at: int) -> None:
        """Hand over batches from the far end while they lie wholly after position ``at``."""
        while self.end > 0:
            start = max(0, self.end - PRESIGN_BATCH)
            if self.ahead[start][0] < at or not self.roster.presign([env for _, env in self.ahead[start:self.end]]):
                return
            self.end = start


@dataclass
class _Indexed:
    digest: bytes
    home: str


class Ledger:
    def __init__(self, store: Store, roster: Roster, node_id: str, clock: Clock,
                 entropy: Callable[[int], bytes] = os.urandom) -> None:
        self.store = store
        self.roster = roster
        self.node_id = node_id
        self.clock = clock
        # where the random half of each Automerge actor id comes from (a seeded stream in the site
        # simulation, so that a seed gives the same bytes; os.urandom everywhere else)
        self._entropy = entropy
        self.actor = bytes.fromhex(node_id) + entropy(8)
        self.docs: dict[str, am.Document] = {}
        self.index: dict[str, _Indexed] = {}
        self.homes: dict[str, set[str]] = {}
        self._seen_bad: set[tuple[str, bytes]] = set()
        self._restrips: dict[tuple[str, bytes], int] = {}
        self._parked: set[str] = set()
        self._purged_shards: set[str] = set()  # changed by a revocation's purge: pushed by the sync path
        self._rollbacks_seen = store.rollbacks
        self.holdings = Holdings()  # what we hold of each terminal's sales (statuses carry it)
        self.on_accept: list[Callable[[Verified], None]] = [self._hold]
        # (shard, its new Automerge changes, or None when too many to push as they are)
        self.on_changes: list[Callable[[str, list[bytes] | None], None]] = []
        # the new changes of the last merge (Automerge's objects) and their encodings, keyed by the
        # shard and its heads before and after: ``_new_changes``, ``_changes_since``
        self._new: tuple[tuple[str, tuple[bytes, ...], tuple[bytes, ...]], list[Any]] | None = None
        self._since: tuple[tuple[str, tuple[bytes, ...], tuple[bytes, ...]], list[bytes]] | None = None
        # (shard, heads before, the changes) of the push being taken in (``receive_push``)
        self._pushed: tuple[str, tuple[bytes, ...], list[bytes]] | None = None
        self._histories = amhistory.Histories()  # what a merged change must fit, per shard

    # -- opening ------------------------------------------------------------------

    @classmethod
    def open(cls, store: Store, roster: Roster, node_id: str, clock: Clock,
             entropy: Callable[[int], bytes] = os.urandom) -> "Ledger":
        ledger = cls(store, roster, node_id, clock, entropy)
        ledger._load()
        return ledger

    def _load(self) -> None:
        for raw in self.store.entries_of_type("cert", "revocation", "policy"):
            try:
                env = env_mod.decode(raw)
            except EncodingError as exc:  # stored once verified: the file changed under SQLite
                raise damaged(self.store.path, "database is damaged (a stored certificate, revocation or "
                                               f"policy entry: {exc})") from exc
            self.roster.apply(env)
        for key, raw, shard in self.store.all_entries():
            self._index(key, raw, shard)
        for shard in self.store.shard_names():
            self._load_shard(shard)
        self._parked = {key for key, _, _ in self.store.parked()}
        self._rollbacks_seen = self.store.rollbacks
        self.holdings.rebuild(*self.store.held_marks())

    def _hold(self, verified: Verified) -> None:
        if verified.env.type == "sale":
            self.holdings.add(verified.env.body["terminal"], verified.env.body["seq"])

    def _after_rollback(self) -> None:
        """SQLite rolled the held transaction back (a full disk): the documents and the index in
        memory hold writes the disk lost. Read them again from the store before anything else is
        written, or later changes would be stored without the changes they depend on (a shard
        that then never syncs again); every shard is offered to the links again, which bring back
        what was lost."""
        if self.store.rollbacks == self._rollbacks_seen:
            return
        self.docs.clear()
        self.index.clear()
        self.homes.clear()
        self._load()
        log.warning("the ledger was read again from %s after SQLite rolled back unsaved writes", self.store.path)
        for shard in sorted(self.docs):
            for on_changes in self.on_changes:
                on_changes(shard, None)

    def _index(self, key: str, raw: bytes, home: str) -> None:
        self.index[key] = _Indexed(digest(raw), home)
        self.homes.setdefault(home, set()).add(key)

    def _load_shard(self, shard: str) -> None:
        data = self.store.load_shard(shard)
        blob = (data.snapshot or b"") + b"".join(data.chunks)
        try:
            with amguard.automerge_input("Automerge refused it"):
                doc = am.Document.load(blob) if blob else am.Document(self.actor)
                doc.set_actor(self.actor)
        except EncodingError as exc:
            log.warning("shard %s in %s does not load (%s): rebuilding it from verified entries",
                        shard, self.store.path, exc)
            doc = None
        if doc is None or data.damaged:
            if data.damaged:
                log.warning("shard %s: %d damaged chunk(s) dropped; rebuilding from verified entries",
                            shard, data.damaged)
            # a new history, so a new actor: this process's actor may have written into the shard
            # already, and its seq starting again at 1 would be refused by every peer holding that
            doc = am.Document(self.actor[:8] + self._entropy(8))
            with self.store.transaction():
                with doc.transaction() as tx:
                    for key, raw in self.store.entries_of_shard(shard):
                        tx.put(am.ROOT, key, am.ScalarType.Bytes, raw)
                self.store.put_snapshot(shard, doc.save())
        self.docs[shard] = doc
        self._reassert(shard, IngestReport())

    # -- queries ------------------------------------------------------------------

    def shards(self) -> list[str]:
        return sorted(self.docs)

    def heads(self, shard: str) -> list[bytes]:
        doc = self.docs.get(shard)
        return sorted(doc.get_heads()) if doc is not None else []

    def shard_digest(self, shard: str) -> bytes:
        """8-byte digest of a shard's heads: equal digests, equal shards."""
        return hashlib.blake2b(b"".join(self.heads(shard)), digest_size=8).digest()

    def summary(self) -> dict[str, bytes]:
        """shard -> digest of its heads: what a peer compares on link set-up."""
        return {s: self.shard_digest(s) for s in self.docs}

    def has(self, key: str) -> bool:
        return key in self.index

    def raw(self, key: str) -> bytes | None:
        got = self.store.entry(key)
        return got[0] if got else None

    def snapshot(self, shard: str) -> bytes:
        return self.docs[shard].save()

    # -- local writes ---------------------------------------------------------------

    def write_local(self, raw: bytes) -> Verified:
        """Verify and append an entry this node writes to its own log; durable on return."""
        self._after_rollback()
        verified = self.roster.verify(env_mod.decode(raw), self.clock.now_ms())
        if verified.key in self.index:
            raise VerificationError(f"entry {verified.key} exists already")
        with self.store.transaction():
            position = int(self.store.get_meta("log_seq") or 0)
            shard = shard_name(self.node_id, position)
            self.store.set_meta("log_seq", str(position + 1))
            before = self._put(shard, [(verified.key, raw)])
            self._accept(verified, shard)
        self._notify(shard, [verified], before)
        return verified

    def _doc(self, shard: str) -> am.Document:
        doc = self.docs.get(shard)
        if doc is None:
            doc = self.docs[shard] = am.Document(self.actor)
        return doc

    def _put(self, shard: str, items: list[tuple[str, bytes]]) -> list[bytes]:
        """Write ``items`` into the shard; the heads before, for ``_notify``."""
        doc = self._doc(shard)
        before = doc.get_heads()
        with doc.transaction() as tx:
            for key, raw in items:
                tx.put(am.ROOT, key, am.ScalarType.Bytes, raw)
        self._persist(shard, before)
        return before

    def _persist(self, shard: str, before: list[bytes]) -> None:
        doc = self.docs[shard]
        if not before:  # a whole shard arrived (bootstrap): keep it as a compact snapshot
            self.store.put_snapshot(shard, doc.save())
            return
        changes = self._changes_since(shard, before)
        if not changes:
            return
        if self.store.add_chunk(shard, b"".join(changes)) >= COMPACT_AFTER_CHUNKS:
            self.store.put_snapshot(shard, doc.save())

    def judge_sale(self, body: dict[str, object]) -> str | None:
        """Why a verified sale breaks a content rule, or None (meshpos.domain.rules; the same verdict
        on every node that holds the same policies, whatever its clock)."""
        created_at = body["created_at"]
        assert isinstance(created_at, int)
        return rules.sale_problem(body, self.roster.policy_at(created_at))

    def _accept(self, verified: Verified, shard: str, rows: _Rows | None = None) -> None:
        """Store a verified entry and take its effect on the views. With ``rows``, a sale's two
        rows wait there for ``_write_rows`` (one statement each for a whole shard); anything else
        writes them first, so the store is never read or changed behind rows not written yet."""
        env = verified.env
        body = env.body
        if rows is None or env.type != "sale":
            self._write_rows(rows)
            self.store.insert_entry(verified.key, env.type, env.signer, env.raw, shard, self.clock.now_ms())
        else:
            rows.entries.append((verified.key, env.type, env.signer, env.raw, shard, self.clock.now_ms()))
        self._index(verified.key, env.raw, shard)
        if env.type == "sale":
            refused = self.judge_sale(body)
            if refused is not None:
                # kept (every node holds it and reaches the same verdict), out of views and totals
                log.warning("sale %s by %s refused: %s", body["sale_id"], self.roster.name_of(env.signer), refused)
            if rows is None:
                self.store.insert_sale(body, refused)
            else:
                rows.sales.append(sale_row(body, refused))
            for later in (f"void/{body['sale_id']}", f"result/{body['sale_id']}", f"reversal/{body['sale_id']}"):
                if later in self.index:  # the void or result arrived before the sale
                    self._write_rows(rows)
                    got = self.store.entry(later)
                    if got:
                        self._apply_view(env_mod.decode(got[0]))
        else:
            self._apply_view(env)

    def _write_rows(self, rows: _Rows | None) -> None:
        if rows is not None and rows.entries:
            self.store.insert_entries(rows.entries)
            self.store.insert_sales(rows.sales)
            rows.entries.clear()
            rows.sales.clear()

    def _apply_view(self, env: env_mod.Envelope) -> None:
        if env.type == "void":
            self.store.mark_void(env.body["sale_id"], env.body["at"])
        elif env.type == "result":
            self.store.set_result(env.body)
        elif env.type == "reversal":
            self.store.mark_reversed(env.body["sale_id"], env.body["reversed_at"])
        elif env.type == "cert":
            self.roster.apply(env)
        elif env.type == "revocation":
            self.roster.apply(env)
            self._purge_beyond_cut(env.body["node_id"])
        elif env.type == "policy":
            known = set(self.roster.policies)
            self.roster.apply(env)
            if set(self.roster.policies) != known:
                self._rejudge(SitePolicy.from_json(env.body["policy"], "policy entry").effective_at)

    def _rejudge(self, since_ms: int) -> None:
        """A policy version arrived: judge again every sale it may now be the one in force for."""
        changed = 0
        for raw in self.store.sale_entries_since(since_ms):
            body = env_mod.decode(raw).body
            changed += self.store.set_refused(body["sale_id"], self.judge_sale(body))
        if changed:
            log.info("a new policy version changed the verdict on %d sale(s)", changed)

    def _purge_beyond_cut(self, node_id: str) -> None:
        """A revocation arrived: entries of the revoked node after its cut leave the ledger (and
        the shards, so that every node ends with the same ledger whatever it saw first)."""
        doomed: dict[str, list[str]] = {}
        for key, raw, shard in self.store.entries_of_signer(node_id):
            env = env_mod.decode(raw)
            if env.type == "sale":
                beyond = self.roster.beyond_cut(node_id, env.body["seq"], env.body["created_at"])
            elif env.type == "void":
                seq = rules.seq_of(env.body["sale_id"], node_id)
                beyond = (self.roster.beyond_cut(node_id, None, env.body["at"])
                          or self.roster.beyond_cut(node_id, seq, env.body["at"]))
            elif env.type in ("lease", "status"):
                at = env.body["granted_at"] if env.type == "lease" else 0
                beyond = self.roster.beyond_cut(node_id, None, at)
            else:
                continue  # its certificate stays: entries up to the cut are checked against it
            if beyond:
                doomed.setdefault(shard, []).append(key)
        if not doomed:
            return
        n = 0
        for shard, keys in doomed.items():
            doc = self.docs.get(shard)
            before = doc.get_heads() if doc is not None else []
            for key in keys:
                self._drop(key)
                n += 1
            if doc is not None:
                with doc.transaction() as tx:
                    for key in keys:
                        if doc.get(am.ROOT, key) is not None:
                            tx.delete(am.ROOT, key)
                self._persist(shard, before)
                self._purged_shards.add(shard)
        log.warning("revocation of %s: %d entr%s after its cut left the ledger", node_id, n, "y" if n == 1 else "ies")

    def _new_changes(self, shard: str, before: list[bytes]) -> list[Any]:
        """``get_changes(before)`` of the shard, taken once per merge: the merge's keys
        (``merged_keys``), the store's chunk and the push to the other links all read it."""
        doc = self.docs[shard]
        key = (shard, tuple(before), tuple(doc.get_heads()))
        if self._new is None or self._new[0] != key:
            self._new = (key, doc.get_changes(before))
        return self._new[1]

    def _changes_since(self, shard: str, before: list[bytes]) -> list[bytes]:
        """The shard's changes since ``before``, as Automerge encodes them to store and push.
        ``Change.bytes`` deflates the change anew on each call (~35 us for a sale): both
        ``_persist`` and ``_notify`` want the same list, so the last one is kept, keyed by the
        heads it was taken at. And when a push of one change brought exactly one new change, it
        is that change (a change a push unblocks makes two; a duplicate, none): its bytes as they
        came, which Automerge has just read, are not encoded again."""
        doc = self.docs[shard]
        key = (shard, tuple(before), tuple(doc.get_heads()))
        if self._since is None or self._since[0] != key:
            new = self._new_changes(shard, before)
            pushed = self._pushed
            if pushed is not None and len(pushed[2]) == 1 and len(new) == 1 and pushed[:2] == key[:2]:
                self._since = (key, list(pushed[2]))
            else:
                self._since = (key, [c.bytes for c in new])
        return self._since[1]

    def _notify(self, shard: str, accepted: list[Verified], before: list[bytes]) -> None:
        for verified in accepted:
            for on_accept in self.on_accept:
                on_accept(verified)
        if not self.on_changes:
            self._purged_shards.clear()
            return
        purged, self._purged_shards = self._purged_shards - {shard}, set()
        for other in sorted(purged):
            for on_changes in self.on_changes:
                on_changes(other, None)
        doc = self.docs[shard]
        changes: list[bytes] | None = None
        # A whole shard that just arrived (a snapshot) is not pushed change by change: links
        # that need it sync it. A new shard of our own log (one entry) is.
        if before or doc.length(am.ROOT) <= PUSH_WHOLE_SHARD_MAX:
            changes = self._changes_since(shard, before)
            if sum(map(len, changes)) > PUSH_LIMIT:
                changes = None
        for on_changes in self.on_changes:
            on_changes(shard, changes)

    # -- replication ----------------------------------------------------------------

    def generate_sync(self, shard: str, state: am.SyncState) -> bytes | None:
        """Our next sync message for the shard, or None. The state holds what the peer said (its
        heads, needs and Bloom filter): a state Automerge cannot answer from (a filter of zero bits
        panics it) is an EncodingError, and the caller starts the shard's sync afresh."""
        doc = self._doc(shard)
        with self._unless_panic(shard), amguard.automerge_input(f"Automerge cannot answer the sync of shard {shard}"):
            msg = doc.generate_sync_message(state)
        return None if msg is None else msg.encode()

    def _before_receiving(self, shard: str) -> None:
        """What every way of receiving a shard starts with: our view matches the store again after
        a rollback, and the shard's name is one a node may write."""
        self._after_rollback()
        if not valid_shard_name(shard):
            raise EncodingError(f"bad shard name {shard[:60]!r}")

    def receive_sync(self, shard: str, state: am.SyncState, data: bytes, peer: str) -> IngestReport:
        self._before_receiving(shard)
        amcanon.check_sync_message(data)  # before Automerge: a non-canonical change breaks every save
        with amguard.automerge_input(f"bad Automerge sync message for shard {shard}"):
            msg = am.Message.decode(data)
        doc = self._doc(shard)
        before = doc.get_heads()
        with self._unless_panic(shard), amguard.automerge_input(f"Automerge refused a sync message for shard {shard}"):
            doc.receive_sync_message(state, msg)
        return self._after_merge(shard, before, peer)

    def receive_snapshot(self, shard: str, data: bytes, peer: str) -> IngestReport:
        self._before_receiving(shard)
        with amguard.automerge_input(f"bad Automerge snapshot for shard {shard}"):
            other = am.Document.load(data)
        doc = self.docs.get(shard)
        if doc is not None and doc.get_heads():
            before = doc.get_heads()
            with self._unless_panic(shard), amguard.automerge_input(f"Automerge refused a snapshot for shard {shard}"):
                doc.merge(other)
            return self._after_merge(shard, before, peer)
        # a shard new to this node (a fresh node's bootstrap): the loaded document is the shard
        other.set_actor(self.actor)
        self.docs[shard] = other
        return self._after_merge(shard, [], peer, received=data)

    def receive_push(self, shard: str, changes: list[bytes], peer: str) -> IngestReport:
        """Apply changes a peer pushed (a change whose dependencies are missing waits inside
        Automerge until they arrive; the heads do not move meanwhile)."""
        self._before_receiving(shard)
        for change in changes:  # before Automerge: a non-canonical change breaks every save
            amcanon.check_chunks(change)
        doc = self._doc(shard)
        before = doc.get_heads()
        with self._unless_panic(shard), amguard.automerge_input(f"Automerge refused pushed changes for shard {shard}"):
            doc.receive_sync_message(am.SyncState(), am.Message.decode(changes_message(changes)))
        self._pushed = (shard, tuple(before), changes)
        try:
            return self._after_merge(shard, before, peer)
        finally:
            self._pushed = None

    def _fits_history(self, shard: str, before: list[bytes]) -> None:
        """The changes a merge applied must fit the shard's history (meshpos.wire.amhistory), or
        every later save of the shard fails to load: if one does not, the shard is read again
        from the store, as it was before the merge, and the ``Unfit`` (an EncodingError) goes on
        to the caller, whose link closes as for bad replication data."""
        if self.docs[shard].get_heads() == before:
            return
        try:
            self._histories.check_merge(shard, self.docs[shard], before, self._new_changes(shard, before))
        except amhistory.Unfit:
            self._reload(shard)
            raise

    def _reload(self, shard: str) -> None:
        """The shard's document thrown away and read again from the store: after a merge that
        failed or was refused, it is the shard as it was before."""
        self.docs.pop(shard, None)
        self._load_shard(shard)

    @contextmanager
    def _unless_panic(self, shard: str) -> Iterator[None]:
        """Around a merge into the shard's document: if Automerge panics in it (the document is
        unusable then, meshpos.ledger.amguard), the shard is reloaded from the store as it was
        before the merge, and the AutomergePanic goes on to the caller."""
        try:
            yield
        except amguard.AutomergePanic:
            self._reload(shard)
            raise

    def _after_merge(self, shard: str, before: list[bytes], peer: str, received: bytes | None = None) -> IngestReport:
        """Verify, strip, re-assert and persist what a merge brought; ``received`` is the
        snapshot a new shard was loaded from, stored as it is if the checks leave it unchanged."""
        self._fits_history(shard, before)
        doc = self.docs[shard]
        heads = doc.get_heads()
        if heads == before:
            return IngestReport()
        report = IngestReport()
        try:
            touched = merged_keys(doc, before, self._new_changes(shard, before) if before else None)
            with self.store.transaction():
                self._scan(shard, peer, report, touched)
                self._strip(shard, report)
                self._reassert(shard, report, touched)
                if received is not None and doc.get_heads() == heads:
                    self.store.put_snapshot(shard, received)  # save() would re-encode the very same document
                else:
                    self._persist(shard, before)
                if any(v.env.type == "cert" for v in report.accepted):
                    self._retry_parked(report)
        except MeshposError:
            raise
        except Exception:
            self._reload(shard)  # the store rolled back: the document goes back to what it holds
            raise
        except BaseException as exc:  # Automerge panicked reading what it applied (a value of a
            if not amguard.is_panic(exc):  # type it does not know: "not yet implemented")
                raise
            self._reload(shard)
            raise amguard.AutomergePanic(f"Automerge failed inside reading shard {shard} after the merge "
                                         f"({exc})") from exc
        self._notify(shard, report.accepted, before)
        for key, reason in report.rejected:
            log.warning("rejected entry %s in shard %s from peer %s: %s", key, shard, peer, reason)
        return report

    def _scan(self, shard: str, peer: str, report: IngestReport, keys: set[str] | None = None) -> None:
        """Verify what a merge brought: the keys it touched, or (None) every key of the shard."""
        doc = self.docs[shard]
        now = self.clock.now_ms()
        found: list[tuple[str, object]]
        if keys is None:  # every value in one call: far cheaper than a get per key
            found = list(zip(doc.keys(am.ROOT), doc.values(am.ROOT)))
        else:
            found = [(key, doc.get(am.ROOT, key)) for key in sorted(keys)]
        decoded, feeder = self._presign(found) if len(found) >= 32 else ({}, None)
        rows = _Rows()
        try:
            self._scan_keys(found, shard, peer, report, now, decoded, rows, feeder)
            self._write_rows(rows)
        finally:
            self.roster.forget_presigned()

    def _presign(self, found: list[tuple[str, object]]) -> tuple[dict[str, tuple[bytes, env_mod.Envelope]], _Feeder]:
        """Decode the new entries of a big merge and start handing their signatures to the
        helper process from the far end (``_Feeder``)."""
        decoded: dict[str, tuple[bytes, env_mod.Envelope]] = {}
        ahead: list[tuple[int, env_mod.Envelope]] = []
        for at, (key, got) in enumerate(found):
            if key in self.index:
                continue
            raw = entry_bytes(got)
            if raw is None:
                continue
            try:
                env = env_mod.decode(raw)
            except EncodingError:
                continue
            decoded[key] = (raw, env)
            ahead.append((at, env))
        feeder = _Feeder(self.roster, ahead)
        feeder.feed(0)
        return decoded, feeder

    def _scan_keys(self, found: list[tuple[str, object]], shard: str, peer: str, report: IngestReport,
                   now: int, decoded: dict[str, tuple[bytes, env_mod.Envelope]], rows: _Rows,
                   feeder: _Feeder | None = None) -> None:
        """Verify and accept ``found``; accepted sales leave their rows in ``rows``."""
        for at, (key, got) in enumerate(found):
            if feeder is not None and at % PRESIGN_BATCH == 0:
                feeder.feed(at)
            pre = decoded.get(key)
            if pre is not None:
                raw: bytes | None = pre[0]
            else:
                if got is None:  # deleted: _reassert puts it back if it is ours to keep
                    continue
                raw = entry_bytes(got)
            if raw is None:
                self._reject(report, shard, key, b"", "entry value is not bytes")
                report.stripped.append(key)
                continue
            d = digest(raw)
            known = self.index.get(key)
            if known is not None:
                if known.digest != d:
                    self._write_rows(rows)  # an equivocation may replace the held entry
                if known.digest != d and self._equivocation(key, raw, d, known, shard, report, now):
                    continue
                if known.digest != d and known.home != shard:
                    self._reject(report, shard, key, d, "differs from the verified entry held for this key")
                    report.stripped.append(key)
                continue
            if (key, d) in self._seen_bad:
                # refused before, and a peer put it back: strip it again, or this node relays it and
                # its honest peers cut it off for entries it never wrote; a few times only, because a
                # peer that holds it as verified (one that accepted it before a revocation) re-asserts
                # it, and the two must not trade changes forever
                restrips = self._restrips.get((key, d), 0)
                if restrips < RESTRIP_LIMIT and len(self._restrips) < 100_000:
                    self._restrips[(key, d)] = restrips + 1
                    report.stripped.append(key)
                continue
            try:
                env = pre[1] if pre is not None else env_mod.decode(raw)
                verified = self.roster.verify(env, now, key)
            except UnknownSigner as exc:
                held = self.store.parked_entry(key)
                if held is not None and digest(held) < d:
                    continue  # two entries under one key: the lowest digest waits (see _equivocation)
                self.store.park(key, raw, shard, str(exc), now)
                self._parked.add(key)
                report.parked += 1
                continue
            except (EncodingError, VerificationError) as exc:
                self._reject(report, shard, key, d, str(exc))
                report.stripped.append(key)
                continue
            except Exception as exc:  # a decoder bug must not let one peer's entry stop the merge
                log.exception("verifying entry %s of shard %s from peer %s failed unexpectedly", key[:80], shard, peer)
                self._reject(report, shard, key, d, f"does not verify ({type(exc).__name__})")
                report.stripped.append(key)
                continue
            self._accept(verified, shard, rows)
            if key in self._parked:
                self.store.unpark(key)
                self._parked.discard(key)
            report.accepted.append(verified)

    def _equivocation(self, key: str, raw: bytes, d: bytes, known: _Indexed, shard: str,
                      report: IngestReport, now: int) -> bool:
        """A node signed two different authentic entries under one key (two sales with one sale
        id, two voids of one sale, two leases of one grant): every node keeps the one whose
        digest is the lowest, whatever order they arrived in, and strips the other (True when
        the entry just read replaced the one held)."""
        if d >= known.digest or not key.startswith(EQUIVOCABLE):
            return False
        try:
            verified = self.roster.verify(env_mod.decode(raw), now, key)
        except Exception:  # not authentic (or its signer unknown yet): the held entry stays
            return False
        log.warning("%s: its signer signed two different entries under this key; keeping the one "
                    "with the lowest digest, as every node does", key[:80])
        if known.home != shard:  # the loser leaves its home shard too, so no honest node relays it
            doc = self.docs.get(known.home)
            if doc is not None and doc.get(am.ROOT, key) is not None:
                before = doc.get_heads()
                with doc.transaction() as tx:
                    tx.delete(am.ROOT, key)
                self._persist(known.home, before)
                self._purged_shards.add(known.home)
        self._drop(key)
        self._accept(verified, shard)
        report.accepted.append(verified)
        return True

    def _drop(self, key: str) -> None:
        """Take a verified entry out of the store, the sales view and the index."""
        self.store.delete_entry(key)
        if key.startswith("sale/"):
            self.store.delete_sale(key[len("sale/"):])
        elif key.startswith("void/"):
            self.store.unmark_void(key[len("void/"):])
        known = self.index.pop(key, None)
        if known is not None:
            self.homes.get(known.home, set()).discard(key)

    def _strip(self, shard: str, report: IngestReport) -> None:
        """Delete invalid keys from the shard, so honest nodes do not relay a forgery onward.

        Only keys that failed verification for good (not parked ones) and that are
        not verified entries homed in this shard; the home shard's true entry, if
        any, is put back by re-assertion.
        """
        doomed = [k for k in report.stripped if self.index.get(k) is None or self.index[k].home != shard]
        if not doomed:
            return
        doc = self.docs[shard]
        with doc.transaction() as tx:
            for key in dict.fromkeys(doomed):
                tx.delete(am.ROOT, key)

    def _reject(self, report: IngestReport, shard: str, key: str, d: bytes, reason: str) -> None:
        if (key, d) in self._seen_bad:
            return
        if len(self._seen_bad) < 100_000:
            self._seen_bad.add((key, d))
        report.rejected.append((key[:80], reason))

    def _reassert(self, shard: str, report: IngestReport, keys: set[str] | None = None) -> None:
        """Put back, in its home shard, every verified entry a peer deleted or overwrote
        (checking only ``keys`` when the merge says which keys it touched)."""
        doc = self.docs[shard]
        missing: list[tuple[str, bytes]] = []
        home = self.homes.get(shard, set())
        if keys is None:  # full check, but what this very merge accepted is in the shard as received
            fresh = {v.key for v in report.accepted}
            candidates = home - fresh if fresh else home
        else:
            candidates = home & keys
        for key in candidates:
            raw = entry_bytes(doc.get(am.ROOT, key))
            if raw is None or digest(raw) != self.index[key].digest:
                stored = self.store.entry(key)
                if stored is not None:
                    missing.append((key, stored[0]))
        if missing:
            log.warning("re-asserting %d entr%s in shard %s that a peer deleted or overwrote",
                        len(missing), "y" if len(missing) == 1 else "ies", shard)
            before = doc.get_heads()
            with doc.transaction() as tx:
                for key, raw in missing:
                    tx.put(am.ROOT, key, am.ScalarType.Bytes, raw)
            report.reasserted += len(missing)
            with self.store.transaction():
                self._persist(shard, before)

    def _retry_parked(self, report: IngestReport) -> None:
        now = self.clock.now_ms()
        for key, raw, shard in self.store.parked():
            try:
                verified = self.roster.verify(env_mod.decode(raw), now, key)
            except UnknownSigner:
                continue
            except (EncodingError, VerificationError) as exc:
                self.store.unpark(key)
                self._parked.discard(key)
                self._reject(report, shard, key, digest(raw), str(exc))
                continue
            self.store.unpark(key)
            self._parked.discard(key)
            if key not in self.index:
                self._accept(verified, shard)
                report.accepted.append(verified)
            elif self.index[key].digest != digest(raw):
                self._equivocation(key, raw, digest(raw), self.index[key], shard, report, now)

    def ingest_raw(self, raw: bytes, peer: str) -> Verified:
        """Take one envelope from outside the mesh (the switch, an organizer file) into our own log."""
        verified = self.roster.verify(env_mod.decode(raw), self.clock.now_ms())
        if verified.key in self.index:
            return verified
        return self.write_local(raw)

