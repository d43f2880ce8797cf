"""The switch's store on both backends (tests/pg.py): group commit, the compare-and-set steps
instances agree by, claims, schema versions and ``switch migrate``, the database URL's rules."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import nacl.signing
import pytest
import trio

from meshpos.domain.errors import ConfigError, StoreError
from meshpos.switch import db_postgres, db_sqlite
from meshpos.cli.switch_cmd import main_switch
from meshpos.switch.database import ENV_VAR, redact
from meshpos.switch.store import (ADVICE_SENT, RECEIVED, SETTLED, AdviceSent, AlreadySettled, ClaimLost, GroupCommit,
                                  Settle, SwitchStore)
from meshpos.switch.switchdir import SwitchConfig, SwitchDir, init_switch, make_instance

from pg import PgCluster


def open_store(tmp_path: Path, switch_db: str | None) -> SwitchStore:
    return SwitchStore.open(switch_db or tmp_path / "s.db", create=True)


def received(store: SwitchStore, sale_id: str) -> None:
    with store.transaction():
        store.insert_received(sale_id, "site", "t", b"d", b"raw", 1)


async def test_group_commit_batches_and_isolates_a_failing_op(tmp_path: Path, switch_db: str | None) -> None:
    store = open_store(tmp_path, switch_db)
    writer = GroupCommit(store)
    failed: list[int] = []

    async def put(n: int) -> None:
        def op(s: SwitchStore) -> None:
            s.insert_received(f"t-{n:08d}", "site", "t", b"d", b"raw", n)
            if n == 3:
                raise ValueError("no")
        try:
            await writer.commit(op)
        except StoreError:
            failed.append(n)

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(put, n)
    assert failed == [3]
    assert [store.sale(f"t-{n:08d}") is not None for n in range(10)] == [n != 3 for n in range(10)]
    assert writer.commits < 10  # grouped
    store.close()


class CountingDatabase:
    """The store's database, counting the statements run through ``execute`` and ``execute_each``."""

    def __init__(self, db: object) -> None:
        self._db = db
        self.single = 0
        self.each: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)

    def execute(self, sql: str, params: object = ()) -> int:
        self.single += 1
        return self._db.execute(sql, params)  # type: ignore[attr-defined, no-any-return]

    def execute_each(self, sql: str, rows: list[object]) -> list[int]:
        self.each.append(len(rows))
        return self._db.execute_each(sql, rows)  # type: ignore[attr-defined, no-any-return]


async def test_a_group_runs_its_advice_and_settle_steps_as_one_statement_each_and_a_lost_step_fails_alone(
        tmp_path: Path, switch_db: str | None) -> None:
    """The hot path of a forwarded sale: the 0220 steps of many sales in one group are ONE
    pipelined statement, their settlements another; a sale another instance took first gets its
    ClaimLost / AlreadySettled alone, the others commit."""
    store = open_store(tmp_path, switch_db)
    for n in range(20):
        received(store, f"t-{n:08d}")
    with store.transaction():
        store.mark_advice_sent("t-00000005", 1, "other", 1000)  # another instance sent this one's 0220
    counting = store.db = CountingDatabase(store.db)  # type: ignore[assignment]
    writer = GroupCommit(store)
    lost: list[str] = []

    async def step(op: AdviceSent | Settle) -> None:
        try:
            await writer.commit(op, op.sale_id)
        except (ClaimLost, AlreadySettled) as exc:
            lost.append(f"{type(exc).__name__} {op.sale_id}")

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(step, AdviceSent(f"t-{n:08d}", 2, "me", 2000))
    assert lost == ["ClaimLost t-00000005"]
    assert writer.commits == 1 and counting.each == [20] and counting.single == 0 and writer.fallbacks == 0
    assert {store.sale(f"t-{n:08d}").state for n in range(20)} == {ADVICE_SENT}  # type: ignore[union-attr]
    with store.transaction():
        store.settle("t-00000007", b"theirs", "approved", None, 3)  # settled elsewhere meanwhile
    lost.clear()
    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(step, Settle(f"t-{n:08d}", b"mine", "approved", None, 4))
    assert lost == ["AlreadySettled t-00000007"]
    assert writer.commits == 2 and counting.each == [20, 1, 20] and writer.fallbacks == 0  # 1: the settle above
    rows = {n: store.sale(f"t-{n:08d}") for n in range(20)}
    assert {row.state for row in rows.values()} == {SETTLED}  # type: ignore[union-attr]
    assert [n for n, row in rows.items() if row.result != b"mine"] == [7]  # type: ignore[union-attr]
    store.close()


async def test_a_group_whose_plain_op_raises_runs_again_op_by_op_and_keeps_its_bulk_steps(
        tmp_path: Path, switch_db: str | None) -> None:
    """An op that raises undoes the fast run of its group; run again with a savepoint per op,
    it alone fails and every other op of the group (bulk steps included) commits."""
    store = open_store(tmp_path, switch_db)
    for n in range(4):
        received(store, f"t-{n:08d}")
    writer = GroupCommit(store)
    failed: list[str] = []

    def bad(s: SwitchStore) -> None:
        s.insert_received("t-99999999", "site", "t", b"d", b"raw", 1)
        raise ValueError("no")

    async def commit(op: AdviceSent | Callable[[SwitchStore], None], key: str) -> None:
        try:
            await writer.commit(op, key)
        except StoreError as exc:
            failed.append(f"{type(exc).__name__} {key}")

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(commit, AdviceSent(f"t-{n:08d}", 2, "me", 2000), f"t-{n:08d}")
        nursery.start_soon(commit, bad, "t-99999999")
    assert failed == ["StoreError t-99999999"] and writer.fallbacks == 1
    assert store.sale("t-99999999") is None
    assert {store.sale(f"t-{n:08d}").state for n in range(4)} == {ADVICE_SENT}  # type: ignore[union-attr]
    store.close()


def test_the_step_to_advice_sent_is_taken_once_even_by_two_connections_racing(
        tmp_path: Path, switch_db: str | None) -> None:
    """Two stores (two instances' connections) race to record the 0220 of one sale, many
    times over: each time exactly one wins, the other gets ClaimLost and must send nothing."""
    first, second = open_store(tmp_path, switch_db), open_store(tmp_path, switch_db)
    rounds = 40
    for n in range(rounds):
        received(first, f"t-{n:08d}")
    wins: dict[str, list[int]] = {"a": [], "b": []}
    lost: dict[str, list[int]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def racer(name: str, store: SwitchStore) -> None:
        for n in range(rounds):
            barrier.wait()
            try:
                with store.transaction():
                    store.mark_advice_sent(f"t-{n:08d}", 2, name, 10_000)
                wins[name].append(n)
            except ClaimLost:
                lost[name].append(n)

    threads = [threading.Thread(target=racer, args=(name, store)) for name, store in (("a", first), ("b", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins["a"] + wins["b"]) == list(range(rounds))
    assert sorted(lost["a"] + lost["b"]) == list(range(rounds))
    for n in range(rounds):
        row = first.sale(f"t-{n:08d}")
        assert row is not None and row.state == ADVICE_SENT and row.attempts == 1
        assert first.claim_of(row.sale_id)[0] == ("a" if n in wins["a"] else "b")
    first.close()
    second.close()


def test_claims_are_exclusive_until_they_expire_and_settling_is_first_wins(
        tmp_path: Path, switch_db: str | None) -> None:
    store = open_store(tmp_path, switch_db)
    received(store, "t-00000001")
    with store.transaction():
        assert not store.claim("t-00000001", "a", 0, 1000)  # only advice_sent sales are claimed
        store.mark_advice_sent("t-00000001", 10, "a", 1000)
        assert store.claim("t-00000001", "a", 500, 1500)  # its holder renews
        assert not store.claim("t-00000001", "b", 1400, 2400)  # held by a until 1500
        assert store.claim("t-00000001", "b", 1501, 2501)  # expired: b takes over
        assert store.renew_claims("a", 9999) == 0 and store.renew_claims("b", 3000) == 1
        store.settle("t-00000001", b"result-b", "approved", None, 1600)
        with pytest.raises(AlreadySettled):
            store.settle("t-00000001", b"result-a", "approved", None, 1601)
    row = store.sale("t-00000001")
    assert row is not None and row.result == b"result-b" and store.claim_of("t-00000001") == (None, None)
    store.close()


def write_v1_file(path: Path) -> None:
    """A switch.db as the first release wrote it (schema 1, its version in meta)."""
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA application_id={db_sqlite.APPLICATION_ID}")
    conn.executescript(db_sqlite.MIGRATIONS[1])
    conn.execute("INSERT INTO meta(key, value) VALUES('schema', '1')")
    conn.execute("INSERT INTO sales(sale_id, site_id, terminal, digest, sale_raw, state, received_at, updated_at)"
                 " VALUES('t-00000001', 'site', 't', x'00', x'00', 'received', 1, 1)")
    conn.commit()
    conn.close()


def test_a_schema_1_sqlite_file_is_migrated_in_place_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "switch.db"
    write_v1_file(path)
    store = SwitchStore.open(path)
    row = store.sale("t-00000001")
    assert row is not None and row.state == RECEIVED and row.reversal_entry is None
    assert store.db.schema_version() == db_sqlite.SCHEMA_VERSION
    assert store.site_generation() == 0 and store.claim_of("t-00000001") == (None, None)
    store.close()


def test_switch_migrate_brings_a_sqlite_file_and_a_postgresql_database_to_the_current_schema(
        tmp_path: Path, pg_cluster: PgCluster, switch_key: nacl.signing.SigningKey,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    sw = tmp_path / "sw"
    init_switch(sw, "127.0.0.1:0", "127.0.0.1:1", key=switch_key)
    sd = SwitchDir(sw)
    sd.db_path.unlink()
    write_v1_file(sd.db_path)
    assert main_switch(["migrate", str(sw), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["from"] == 1

    # PostgreSQL: an empty database gets the schema from `migrate` (as from `init`)
    url = pg_cluster.new_database()
    pg = tmp_path / "pg"
    init_switch(pg, "127.0.0.1:0", "127.0.0.1:1", key=switch_key, db=url)
    empty = pg_cluster.new_database()
    config = json.loads((pg / "config.json").read_text())
    (pg / "config.json").write_text(json.dumps({**config, "db": empty}))
    assert main_switch(["status", str(pg)]) == 6
    assert "no switch schema" in capsys.readouterr().err
    assert main_switch(["migrate", str(pg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["from"] == 0
    assert main_switch(["status", str(pg)]) == 0
    capsys.readouterr()

    # a release with one more schema version: instances refuse the old schema until `migrate`
    monkeypatch.setattr(db_postgres, "MIGRATIONS", {**db_postgres.MIGRATIONS,
                                                    4: "ALTER TABLE sales ADD COLUMN note TEXT"})
    monkeypatch.setattr(db_postgres, "SCHEMA_VERSION", 4)
    assert main_switch(["status", str(pg)]) == 6
    assert "switch migrate" in capsys.readouterr().err
    assert main_switch(["migrate", str(pg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["from"], out["to"]) == (3, 4)
    assert main_switch(["status", str(pg)]) == 0
    monkeypatch.undo()
    assert main_switch(["status", str(pg)]) == 6  # this program is now older than the schema
    assert "newer than this program's" in capsys.readouterr().err


def test_no_password_is_written_to_config_and_the_environment_names_the_database(
        tmp_path: Path, pg_cluster: PgCluster, switch_key: nacl.signing.SigningKey,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = pg_cluster.new_database()
    with_password = url.replace("@", ":s3cret-pw@", 1)
    assert redact(with_password) == url
    monkeypatch.setenv(ENV_VAR, with_password)  # trust auth: the password is not checked, only carried
    sw = tmp_path / "sw"
    init_switch(sw, "127.0.0.1:0", "127.0.0.1:1", key=switch_key)
    text = (sw / "config.json").read_text()
    assert "s3cret-pw" not in text and json.loads(text)["db"] == url
    assert not (sw / "switch.db").exists()
    monkeypatch.delenv(ENV_VAR)
    SwitchDir(sw).open_store().close()  # the recorded URL, without its password, still names it
    with pytest.raises(ConfigError, match="password"):
        SwitchConfig.from_json({**json.loads(text), "db": with_password}, "config.json")
    assert main_switch(["init", str(tmp_path / "argv"), "--listen", "127.0.0.1:0", "--acquirer", "127.0.0.1:1",
                        "--db", with_password]) == 4  # not on a command line, where `ps` shows it
    assert not (tmp_path / "argv").exists()
    with pytest.raises(ConfigError, match="not a postgresql"):
        init_switch(tmp_path / "bad", "127.0.0.1:0", "127.0.0.1:1", key=switch_key, db="mysql://x/y")


def test_an_instance_shares_key_and_database_and_sqlite_has_one_instance_only(
        tmp_path: Path, switch_db: str | None, switch_key: nacl.signing.SigningKey,
        capsys: pytest.CaptureFixture[str]) -> None:
    sw = tmp_path / "sw"
    init_switch(sw, "127.0.0.1:0", "127.0.0.1:1", key=switch_key, db=switch_db)
    code = main_switch(["instance", str(sw), str(tmp_path / "b"), "--listen", "127.0.0.1:0", "--json"])
    if switch_db is None:
        assert code == 4 and "PostgreSQL" in capsys.readouterr().err
        return
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    b = SwitchDir(tmp_path / "b")
    assert b.key_path.read_bytes() == SwitchDir(sw).key_path.read_bytes()
    assert oct(b.key_path.stat().st_mode & 0o777) == "0o600"
    assert b.config().db == SwitchDir(sw).config().db and out["instance"] != SwitchDir(sw).config().instance
    with pytest.raises(ConfigError):
        make_instance(sw, tmp_path / "b", "127.0.0.1:0")  # not over an existing instance


async def test_a_groups_ops_run_in_the_order_of_the_sales_they_write(tmp_path: Path) -> None:
    """Two instances whose groups write the same sales must lock them in one order (else
    PostgreSQL breaks a deadlock between them every second): ops run sorted by their key."""
    store = SwitchStore.open(tmp_path / "s.db", create=True)
    writer = GroupCommit(store)
    ran: list[str] = []

    async def put(key: str) -> None:
        await writer.commit(lambda s: ran.append(key), key)

    async with trio.open_nursery() as nursery:
        for key in ("t-3", "t-1", "t-2", "t-0"):
            nursery.start_soon(put, key)
    assert writer.commits == 1 and ran == ["t-0", "t-1", "t-2", "t-3"]
    store.close()
