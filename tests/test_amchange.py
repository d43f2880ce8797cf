"""meshpos.wire.amchange: the root keys an Automerge change names, read from its bytes, and the
ledger's use of them (``merged_keys``): never fewer keys than a merge changed, and None (the
caller falls back to the diff) for anything that is not plain root-map operations."""

from __future__ import annotations

import automerge.core as am
from hypothesis import given, settings, strategies as st

from meshpos.ledger.ledger import merged_keys
from meshpos.wire.amchange import root_keys
from tests.amdocs import concurrent_writes, delete_keys, doc_with_one_key


def _visible(doc: am.Document) -> dict[str, object]:
    return {key: doc.get(am.ROOT, key)[0] for key in doc.keys(am.ROOT)}  # type: ignore[index]


def _new_changes(doc: am.Document, before: list[bytes]) -> list[bytes]:
    return [c.raw_bytes for c in doc.get_changes(before)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=8, unique=True),
       st.lists(st.integers(min_value=0, max_value=7), max_size=4), st.binary(max_size=700))
def test_a_change_names_exactly_the_keys_it_puts_and_deletes(keys: list[str], deletes: list[int],
                                                             value: bytes) -> None:
    doc, before = doc_with_one_key()
    with doc.transaction() as tx:
        for key in keys:
            tx.put(am.ROOT, key, am.ScalarType.Bytes, value)
    [raw] = _new_changes(doc, before)
    assert root_keys(raw) == set(keys)  # any Unicode, quotes and backslashes included
    gone = {keys[i] for i in deletes if i < len(keys)}
    if gone:
        [raw] = _new_changes(doc, delete_keys(doc, gone))
        assert root_keys(raw) == gone


def test_operations_off_the_root_map_are_not_read_as_keys() -> None:
    doc = am.Document()
    with doc.transaction() as tx:
        items = tx.put_object(am.ROOT, "list", am.ObjType.List)
        tx.insert(items, 0, am.ScalarType.Str, "a")
    [raw] = _new_changes(doc, [])
    assert root_keys(raw) is None
    before = doc.get_heads()
    with doc.transaction() as tx:
        inner = tx.put_object(am.ROOT, "map", am.ObjType.Map)
        tx.put(inner, "sale/x", am.ScalarType.Bytes, b"1")
    [raw] = _new_changes(doc, before)
    assert root_keys(raw) is None  # "sale/x" is not a root key: no answer rather than a wrong one


def test_bytes_that_are_not_an_uncompressed_change_give_no_answer() -> None:
    doc = am.Document()
    with doc.transaction() as tx:
        tx.put(am.ROOT, "sale/a", am.ScalarType.Bytes, b"x" * 600)
    [change] = doc.get_changes([])
    assert root_keys(change.raw_bytes) == {"sale/a"}
    assert root_keys(change.bytes) is None  # the deflated chunk
    assert root_keys(doc.save()) is None  # a document chunk
    raw = change.raw_bytes
    for cut in range(len(raw)):
        assert root_keys(raw[:cut]) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_raises(data: bytes) -> None:
    for raw in (b"\x85\x6f\x4a\x83\x00\x00\x00\x00\x01" + data, data):
        got = root_keys(raw)  # returns, whatever the bytes
        assert got is None or all(isinstance(k, str) for k in got)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from("abcdef"), max_size=5), st.lists(st.sampled_from("abcdef"), max_size=5),
       st.lists(st.sampled_from("abcdef"), max_size=3), st.booleans())
def test_merged_keys_hold_every_key_whose_value_a_merge_changed(
        ours: list[str], theirs: list[str], their_deletes: list[str], winner_first: bool) -> None:
    """Concurrent writes of the same keys (an equivocating peer, a re-assertion), then a merge:
    every key whose visible value differs is among the merged keys, and the merged keys are only
    keys the incoming side wrote or deleted."""
    mine, other = concurrent_writes(ours, theirs, their_deletes)
    doc, incoming, written = (mine, other, set(theirs) | set(their_deletes)) if winner_first else (
        other, mine, set(ours))
    before, seen = doc.get_heads(), _visible(doc)
    doc.merge(incoming)
    if doc.get_heads() == before:
        return
    now = _visible(doc)
    differs = {k for k in seen.keys() | now.keys() if seen.get(k) != now.get(k)}
    touched = merged_keys(doc, before)
    assert touched is not None
    assert differs <= touched <= written


def test_a_merge_of_many_changes_reads_its_keys_from_the_diff_with_the_same_answer() -> None:
    from meshpos.ledger.ledger import MERGED_KEYS_MAX_CHANGES
    doc = am.Document()
    with doc.transaction() as tx:
        tx.put(am.ROOT, "old", am.ScalarType.Bytes, b"0")
    before = doc.get_heads()
    for i in range(MERGED_KEYS_MAX_CHANGES + 1):
        with doc.transaction() as tx:
            tx.put(am.ROOT, f"sale/{i}", am.ScalarType.Bytes, b"x")
    assert merged_keys(doc, before) == {f"sale/{i}" for i in range(MERGED_KEYS_MAX_CHANGES + 1)}
