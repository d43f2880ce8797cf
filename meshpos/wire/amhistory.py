"""Does an Automerge change that a merge applied fit the shard's history it joined?

Why: a change encoded exactly as Automerge encodes it (meshpos.wire.amcanon) can still break
every save of the shard: Automerge applies it, but on load it rebuilds each change from the
saved operations and refuses the document ("mismatching heads", "changes out of order") when a
field does not fit the history: a ``seq`` that does not follow its actor's previous change, a
``startOp`` other than the one Automerge assigns, a predecessor naming no operation, or an
operation on another key. A hostile enrolled terminal could push one and cut joining nodes off
the honest node, whose own store breaks too. So after each merge the ledger checks the changes
it applied, in the order Automerge applied them (a change whose deps are missing waits inside
Automerge and is checked by the merge that applies it), and refuses the merge if one does not
fit (protocols/link.md, "Canonical changes").

The rules, each what Automerge itself does when it writes a change (so an honest change always
passes them):

- ``seq`` is 1 + the highest seq of the change's actor in the shard (1 for an actor's first
  change): a writer numbers its changes one by one, and its previous change is in its own
  document, hence in the change's history, hence applied here before it.
- ``startOp`` is 1 + the highest ``max_op`` of the change's deps (1 without deps): a writer
  starts a change at its document's max op + 1; its document's history is the causal closure of
  its heads, which are the change's deps, and ``max_op`` only grows along a causal chain (a
  change starts past each of its deps), so the max over that closure is the max over the deps.
- every predecessor (counter, actor) names a put already in the shard, or earlier in the same
  change, on the same root key: a writer's operation names the values the key holds in its
  document, which are puts (Automerge keeps a delete only as its target's successor: it is never
  a predecessor) on that key.

The index per shard is small: each actor's last seq, each change's max op, each put's key. It is
built once from the document (``get_changes``) the first time a merge into the shard is checked,
then kept up to date: changes the node wrote itself since, and those a merge brought, are read
when the next check comes (``Change.raw_bytes``, decoded by amcanon). The index belongs to one
document object: a shard reloaded from the store (after a refusal, a panic, a rollback) gets a
new index.

Pure: no I/O and no Automerge import (changes are read through their attributes); ``Unfit`` (an
``EncodingError``) says what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from meshpos.domain.errors import EncodingError
from meshpos.wire import amcanon


class Unfit(EncodingError):
    """A change Automerge applied that does not fit the shard's history: every later save of the
    shard would fail to load."""


class Change(Protocol):
    """What this reads of an Automerge ``Change``."""

    @property
    def actor_id(self) -> bytes: ...
    @property
    def seq(self) -> int: ...
    @property
    def start_op(self) -> int: ...
    @property
    def max_op(self) -> int: ...
    @property
    def deps(self) -> list[bytes]: ...
    @property
    def hash(self) -> bytes: ...
    @property
    def raw_bytes(self) -> bytes: ...


class Document(Protocol):
    """What this reads of an Automerge ``Document``."""

    def get_heads(self) -> list[bytes]: ...
    def get_changes(self, have_deps: list[bytes]) -> Sequence[Change]: ...


@dataclass
class History:
    """The index of one shard's document: what the rules read."""
    doc: object
    heads: list[bytes] = field(default_factory=list)
    last_seq: dict[bytes, int] = field(default_factory=dict)
    max_op: dict[bytes, int] = field(default_factory=dict)
    put_key: dict[tuple[int, bytes], str] = field(default_factory=dict)

    def check(self, change: Change) -> list[str | None] | None:
        """Raise ``Unfit`` unless ``change`` fits the history indexed so far; the root key each of
        its operations puts (for ``add``), or None if this did not read them."""
        actor = change.actor_id
        if change.seq != self.last_seq.get(actor, 0) + 1:
            raise Unfit(f"a change's seq {change.seq} does not follow its actor's last ({self.last_seq.get(actor, 0)})")
        try:
            start = 1 + max((self.max_op[d] for d in change.deps), default=0)
        except KeyError as exc:
            raise Unfit("a change depends on a change the shard does not hold") from exc
        if change.start_op != start:
            raise Unfit(f"a change's startOp {change.start_op} is not the one Automerge assigns ({start})")
        try:
            ops = amcanon.change_ops(change.raw_bytes)
        except amcanon.NonCanonical:
            # Another kind of change than meshpos writes: a push or a sync refuses those before
            # Automerge sees them, so it came in a document chunk (a snapshot), which Automerge
            # loaded only because each change it rebuilt from the operations hashed to the
            # document's heads: its predecessors are the document's own. Its seq and startOp
            # are checked above (an actor's changes could clash with the shard's).
            return None
        own: dict[tuple[int, bytes], str] = {}  # a change may overwrite its own earlier put
        for i, op in enumerate(ops):
            for pred in op.preds:
                if self.put_key.get(pred, own.get(pred)) != op.key:
                    raise Unfit("a predecessor does not name a put on the same key")
            if op.put:
                own[(change.start_op + i, actor)] = op.key
        return [op.key if op.put else None for op in ops]

    def add(self, change: Change, keys: list[str | None] | None = None) -> None:
        """Index ``change`` (checked, or written by this node); ``keys``: what ``check`` returned."""
        self.last_seq[change.actor_id] = max(change.seq, self.last_seq.get(change.actor_id, 0))
        self.max_op[change.hash] = change.max_op
        for i, key in enumerate(amcanon.root_keys_set(change.raw_bytes) if keys is None else keys):
            if key is not None:
                self.put_key[(change.start_op + i, change.actor_id)] = key


class Histories:
    """The index of every shard checked so far."""

    def __init__(self) -> None:
        self._shards: dict[str, History] = {}

    def check_merge(self, shard: str, doc: Document, before: list[bytes], new: Sequence[Change]) -> None:
        """``new``: the changes a merge just applied to ``doc`` (``get_changes(before)``, in the
        order applied; ``before``: the heads before the merge). Raises ``Unfit`` if one does not
        fit; the caller must then drop the document (the index is dropped here), whose history
        now holds it."""
        history = self._shards.get(shard)
        if history is None or history.doc is not doc:
            history = self._shards[shard] = History(doc)
        if history.heads != before:  # what this node wrote since the last check, or all of it
            fresh = {c.hash for c in new}
            for change in doc.get_changes(history.heads):
                if change.hash not in fresh:
                    history.add(change)
        try:
            for change in new:
                history.add(change, history.check(change))
        except Unfit:
            del self._shards[shard]
            raise
        history.heads = doc.get_heads()
