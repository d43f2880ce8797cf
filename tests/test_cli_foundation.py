"""The foundation's acceptance, through the real `meshpos` command."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from meshpos.wire import envelope
from meshpos.node.core import NodeCore

from helpers import TEST_PANS, make_cli_site, run_cli, scan_for


@pytest.fixture
def cli_site(tmp_path: Path) -> Path:
    return make_cli_site(tmp_path)


def test_two_terminals_five_sales_each_card_pending_cash_paid_and_verifying(cli_site: Path) -> None:
    made = []
    for name in ("t1", "t2"):
        for i in range(5):
            args = ["sell", str(cli_site / name), "--amount", f"{i + 1}.50", "--json"]
            args += ["--card", "-"] if i % 2 == 0 else ["--cash"]
            card_line = f"{TEST_PANS[i % 3]} 1230\n" if i % 2 == 0 else None
            made.append(json.loads(run_cli(*args, check=True, input=card_line).stdout))
    for name in ("t1", "t2"):
        listed = json.loads(run_cli("sales", str(cli_site / name), "--json", check=True).stdout)
        assert len(listed) == 5
        # card sales wait for their authorization; cash is final when taken
        assert {s["status"] for s in listed if s["method"] == "card"} == {"pending"}
        assert {s["status"] for s in listed if s["method"] == "cash"} == {"paid"}
        for sale in listed:
            assert {"id", "terminal", "amount_minor", "currency", "method", "card_last4", "status", "auth_code",
                    "created_at"} <= set(sale)
        assert listed == [m for m in made if m["terminal"] == listed[0]["terminal"]]
        core = NodeCore.open(cli_site / name)
        try:
            for sale in listed:
                raw = core.ledger.raw(f"sale/{sale['id']}")
                core.roster.verify(envelope.decode(raw), core.clock.now_ms())
        finally:
            core.close()
    card = next(m for m in made if m["method"] == "card")
    assert card["card_last4"] == TEST_PANS[0][-4:] and card["card_brand"] == "visa"


def test_no_full_card_number_anywhere_in_the_node_directory(cli_site: Path) -> None:
    for i, pan in enumerate(TEST_PANS):
        run_cli("-vv", "sell", str(cli_site / "t1"), "--amount", "2.00", "--card", "-", check=True, input=pan + "\n")
    run_cli("sales", str(cli_site / "t1"), check=True)
    hits = scan_for(cli_site / "t1", [p.encode() for p in TEST_PANS])
    assert hits == []
    conn = sqlite3.connect(cli_site / "t1" / "meshpos.db")
    last4 = {r[0] for r in conn.execute("SELECT last4 FROM sales")}
    assert last4 == {p[-4:] for p in TEST_PANS}


@pytest.mark.parametrize("args, stdin, message", [
    (["--amount", "0", "--cash"], None, "greater than zero"),
    (["--amount", "-5", "--cash"], None, "greater than zero"),
    (["--amount", "1.234", "--cash"], None, "decimal places"),
    (["--amount", "abc", "--cash"], None, "not a number"),
    (["--amount", "600", "--cash"], None, "per-sale offline cap"),
    (["--amount", "5", "--card", "-"], "4111111111111112\n", "Luhn"),
    (["--amount", "5", "--card", "-"], "41111\n", "12 to 19"),
    (["--amount", "5", "--card", "-", "--expiry", "1399"], "4111111111111111\n", "month 13"),
    (["--amount", "5", "--card", "-"], "4111111111111111 1399\n", "month 13"),
    (["--amount", "5", "--card", "-", "--expiry", "1230"], "4111111111111111 1230\n", "expiry was given twice"),
    (["--amount", "5", "--card", "-"], "", "no card number on standard input"),
    (["--amount", "5", "--card"], "", "there is none here"),
])
def test_bad_sale_input_is_a_clear_error(cli_site: Path, args: list[str], stdin: str | None, message: str) -> None:
    proc = run_cli("sell", str(cli_site / "t1"), *args, input=stdin)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert "4111111111111112" not in proc.stderr + proc.stdout


def test_unknown_currency_and_missing_node_dir(tmp_path: Path, cli_site: Path) -> None:
    proc = run_cli("site", "init", str(tmp_path / "s2"), "--name", "X", "--currency", "XYZ")
    assert proc.returncode != 0 and "unknown currency" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("sales", str(tmp_path / "nowhere"))
    assert proc.returncode != 0 and "no such node directory" in proc.stderr and "Traceback" not in proc.stderr


def test_node_dir_of_another_site(tmp_path: Path, cli_site: Path) -> None:
    run_cli("site", "init", str(tmp_path / "other"), "--name", "Other", check=True)
    (cli_site / "t1" / "policy.env").write_bytes((tmp_path / "other" / "policy.env").read_bytes())
    proc = run_cli("sales", str(cli_site / "t1"))
    assert proc.returncode != 0 and "policy" in proc.stderr and "Traceback" not in proc.stderr


def test_truncated_and_corrupt_database(cli_site: Path) -> None:
    run_cli("sell", str(cli_site / "t1"), "--amount", "1", "--cash", check=True)
    db = cli_site / "t1" / "meshpos.db"
    db.write_bytes(db.read_bytes()[:2048])
    proc = run_cli("sales", str(cli_site / "t1"))
    assert proc.returncode != 0 and "meshpos.db" in proc.stderr and "Traceback" not in proc.stderr
    db.write_bytes(b"\x00garbage" * 1000)
    proc = run_cli("status", str(cli_site / "t1"))
    assert proc.returncode != 0 and "meshpos.db" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_config_names_the_file(cli_site: Path) -> None:
    (cli_site / "t1" / "config.json").write_text("{ not json")
    proc = run_cli("status", str(cli_site / "t1"))
    assert proc.returncode != 0 and "config.json" in proc.stderr and "Traceback" not in proc.stderr


def test_card_sale_without_switch_key_is_refused_but_cash_works(tmp_path: Path) -> None:
    run_cli("site", "init", str(tmp_path / "site"), "--name", "No switch", check=True)
    run_cli("enroll", str(tmp_path / "site"), str(tmp_path / "t1"), "--role", "terminal", "--name", "t1",
            check=True)
    proc = run_cli("sell", str(tmp_path / "t1"), "--amount", "3", "--card", "-", input="4111111111111111\n")
    assert proc.returncode != 0 and "no switch key" in proc.stderr and "Traceback" not in proc.stderr
    assert run_cli("sell", str(tmp_path / "t1"), "--amount", "3", "--cash").returncode == 0


def test_real_enrollment_flow_through_the_cli(tmp_path: Path, cli_site: Path) -> None:
    run_cli("enroll", "request", str(tmp_path / "g"), "--role", "gateway", "--name", "Gate",
            "--out", str(tmp_path / "req.json"), check=True)
    assert "PRIVATE" not in (tmp_path / "req.json").read_text()
    run_cli("enroll", "sign", str(cli_site / "site"), str(tmp_path / "req.json"), "--out", str(tmp_path / "ans.json"),
            check=True)
    run_cli("enroll", "install", str(tmp_path / "g"), str(tmp_path / "ans.json"), check=True)
    status = json.loads(run_cli("status", str(tmp_path / "g"), "--json", check=True).stdout)
    assert status["role"] == "gateway" and status["name"] == "Gate"


def test_every_command_has_help() -> None:
    for cmd in (["site", "init"], ["site", "set-switch"], ["site", "revoke"], ["enroll"], ["enroll", "request"],
                ["enroll", "sign"], ["enroll", "install"], ["sell"], ["sales"], ["status"], ["void"]):
        proc = run_cli(*cmd, "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout, cmd


@pytest.mark.parametrize(("card_line", "args", "message"), [
    ("４１１１１１１１１１１１１１１１ 1230", [], "12 to 19 digits"),  # full-width, as a phone keyboard gives
    ("4111111111111111 ١٢٣٠", [], "MMYY"),  # Arabic-Indic expiry
    ("4111111111111111 0120", [], "expired"),
    ("0000000000000000 1230", [], "not an issued card number"),
    ("4111111111111111 1230", ["--description", "card 1234 5678 9012 3456"], "card number"),
    ("4111111111111111 1230", ["--amount", "٥"], "not a number"),
])
def test_harmful_content_is_refused_at_sell(cli_site: Path, card_line: str, args: list[str], message: str) -> None:
    """Reproduction 1 of issue 12: what `sell` accepted and then stopped the site's forwarding."""
    amount = [] if "--amount" in args else ["--amount", "5.00"]
    proc = run_cli("sell", str(cli_site / "t1"), *amount, *args, "--card", "-", input=card_line + "\n")
    assert proc.returncode != 0, proc.stdout
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "4111111111111111" not in proc.stderr + proc.stdout
    assert json.loads(run_cli("sales", str(cli_site / "t1"), "--json", check=True).stdout) == []


def test_set_policy_lowers_a_cap_from_its_effective_time_without_refusing_earlier_sales(cli_site: Path) -> None:
    site, t1 = str(cli_site / "site"), str(cli_site / "t1")
    before = json.loads(run_cli("sell", t1, "--amount", "400.00", "--cash", "--json", check=True).stdout)
    proc = run_cli("site", "set-policy", site, "--max-sale", "100.00")  # default: in 10 minutes
    assert proc.returncode == 0 and "in force from" in proc.stdout, proc.stderr
    run_cli("site", "push", site, t1, check=True)
    # not in force yet: terminals have ten minutes to receive it
    run_cli("sell", t1, "--amount", "300.00", "--cash", check=True)
    proc = run_cli("site", "set-policy", site, "--max-sale", "100.00", "--effective-in", "0")
    assert proc.returncode == 0, proc.stderr
    run_cli("site", "push", site, t1, check=True)
    refused = run_cli("sell", t1, "--amount", "200.00", "--cash")
    assert refused.returncode != 0 and "per-sale offline cap" in refused.stderr
    listed = {s["id"]: s["status"] for s in json.loads(run_cli("sales", t1, "--json", check=True).stdout)}
    assert listed[before["id"]] == "paid" and list(listed.values()) == ["paid", "paid"]
    nothing = run_cli("site", "set-policy", site)
    assert nothing.returncode != 0 and "nothing to change" in nothing.stderr
