"""Automerge documents for the tests of what a merge changed (ledger.changed_keys, wire.amchange)."""

from __future__ import annotations

import automerge.core as am


def concurrent_writes(ours: list[str], theirs: list[str],
                      their_deletes: list[str]) -> tuple[am.Document, am.Document]:
    """Two forks of one document (keys a, b, c) after concurrent writes of the same keys, as an
    equivocating peer or a re-assertion makes them: ``mine`` wrote ``ours``, ``other`` wrote
    ``theirs`` and deleted ``their_deletes`` (those that exist)."""
    base = am.Document()
    with base.transaction() as tx:
        for key in "abc":
            tx.put(am.ROOT, key, am.ScalarType.Bytes, b"base-" + key.encode())
    mine, other = base.fork(), base.fork()
    with mine.transaction() as tx:
        for key in ours:
            tx.put(am.ROOT, key, am.ScalarType.Bytes, b"mine-" + key.encode())
    with other.transaction() as tx:
        for key in theirs:
            tx.put(am.ROOT, key, am.ScalarType.Bytes, b"other-" + key.encode())
        for key in their_deletes:
            if other.get(am.ROOT, key) is not None:
                tx.delete(am.ROOT, key)
    return mine, other


def doc_with_one_key() -> tuple[am.Document, list[bytes]]:
    """A document holding the key "untouched", and its heads: the start of the one-change tests."""
    doc = am.Document()
    with doc.transaction() as tx:
        tx.put(am.ROOT, "untouched", am.ScalarType.Bytes, b"0")
    return doc, doc.get_heads()


def delete_keys(doc: am.Document, keys: set[str]) -> list[bytes]:
    """Delete ``keys`` from the root map in one change; the heads from before it."""
    before = doc.get_heads()
    with doc.transaction() as tx:
        for key in keys:
            tx.delete(am.ROOT, key)
    return before
