"""The cashier app's login: the PIN lock (five wrong PINs lock for a minute, also across a restart,
also when tried at once), sessions, the cookie's attributes, the Guard accepting the session beside
the bearer token (and only with the API's own Origin for a change), the CLI that sets the PIN
(never from argv), and the page's files as package data."""

from __future__ import annotations

import fnmatch
import http.client
import json
import tomllib
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from api_harness import ApiClient, make_site, start
from helpers import is_scrypt_hash_of, run_cli
from meshpos.apps.procs import ProcessGroup
from meshpos.site.cashierpin import (
    LockState, generate_pin, pin_matches, pin_problem, read_lock_state, read_pin_hash, set_cashier_pin,
)
from meshpos.terminal.cashier_app import FILES, static_file
from meshpos.terminal.cashier import (
    LOCK_MS, MAX_FAILURES, MAX_SESSIONS, SESSION_MS, CashierLogin, CookiePolicy, Locked, NoPin, Sessions, WrongPin,
    after_attempt, cookie_value, locked_for,
)

ROOT = Path(__file__).resolve().parents[1]
PIN = "4831"


class Clock:
    def __init__(self) -> None:
        self.ms = 1_800_000_000_000

    def __call__(self) -> int:
        return self.ms


# -- the rule -------------------------------------------------------------------------

def test_five_wrong_pins_lock_for_a_minute_and_a_right_one_clears_the_count() -> None:
    state = LockState()
    for n in range(1, MAX_FAILURES):
        state = after_attempt(state, False, 1000)
        assert state == LockState(n, 0) and locked_for(state, 1000) == 0
    locked = after_attempt(state, False, 1000)
    assert locked_for(locked, 1000) == LOCK_MS == 60_000
    assert locked_for(locked, 1000 + LOCK_MS - 1) == 1 and locked_for(locked, 1000 + LOCK_MS) == 0
    assert after_attempt(LockState(3, 0), True, 1000) == LockState()


def make_login(tmp_path: Path, clock: Clock, pin: str | None = PIN) -> CashierLogin:
    if pin is not None:
        set_cashier_pin(tmp_path / "cashier-pin", pin)
    return CashierLogin(tmp_path / "cashier-pin", tmp_path / "cashier-lock.json", clock)


async def test_the_lock_holds_even_for_the_right_pin_and_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    login = make_login(tmp_path, clock)
    for left in range(MAX_FAILURES - 1, -1, -1):
        with pytest.raises(WrongPin) as wrong:
            await login.login("0000")
        assert wrong.value.tries_left == left
    with pytest.raises(Locked) as locked:
        await login.login(PIN)  # locked: not even the right PIN is checked
    assert locked.value.retry_after_s == 60
    restarted = make_login(tmp_path, clock, pin=None)  # a new process on the same node directory
    clock.ms += 30_000
    with pytest.raises(Locked) as still:
        await restarted.login(PIN)
    assert still.value.retry_after_s == 30
    clock.ms += 30_000
    token = await restarted.login(PIN)
    assert restarted.sessions.valid(token) and not login.sessions.valid(token)
    assert read_lock_state(tmp_path / "cashier-lock.json") == LockState()


async def test_guesses_sent_at_once_are_counted_one_by_one(tmp_path: Path) -> None:
    login = make_login(tmp_path, Clock())
    refused: list[type] = []

    async def guess(pin: str) -> None:
        try:
            await login.login(pin)
        except (WrongPin, Locked) as exc:
            refused.append(type(exc))

    async with trio.open_nursery() as nursery:
        for n in range(MAX_FAILURES + 3):
            nursery.start_soon(guess, f"{1000 + n}")
    assert refused.count(WrongPin) == MAX_FAILURES and refused.count(Locked) == 3


async def test_no_pin_set_is_a_clear_refusal(tmp_path: Path) -> None:
    login = make_login(tmp_path, Clock(), pin=None)
    assert not login.pin_set()
    with pytest.raises(NoPin, match="meshpos cashier-pin"):
        await login.login(PIN)


def test_only_a_slow_hash_is_kept_and_only_its_owner_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "cashier-pin"
    set_cashier_pin(path, PIN)
    stored = read_pin_hash(path)
    assert stored is not None and is_scrypt_hash_of(stored, PIN)
    assert path.stat().st_mode & 0o777 == 0o600
    assert pin_matches(stored, PIN) and not pin_matches(stored, "4832")
    for bad in ("12", "abcd", "1111", "１２３４", "1234567890123"):
        assert pin_problem(bad) is not None, bad
    assert pin_problem(generate_pin()) is None and len(generate_pin()) == 6


def test_sessions_end_after_their_time_and_at_logout() -> None:
    clock = Clock()
    sessions = Sessions(clock)
    token = sessions.open()
    assert sessions.valid(token) and not sessions.valid(token + "x") and not sessions.valid(None)
    clock.ms += SESSION_MS
    assert not sessions.valid(token)
    first = sessions.open()
    others = [sessions.open() for _ in range(MAX_SESSIONS)]
    assert not sessions.valid(first) and all(sessions.valid(t) for t in others)  # the oldest went
    sessions.close(others[0])
    assert not sessions.valid(others[0])


def test_the_cookie_is_httponly_samesite_strict_and_secure_off_loopback() -> None:
    for secure in (False, True):
        morsel = SimpleCookie(CookiePolicy(secure).set("tok"))["meshpos_cashier"]
        assert morsel.value == "tok" and morsel["httponly"] and morsel["samesite"] == "Strict"
        assert morsel["path"] == "/" and bool(morsel["secure"]) is secure
        cleared = SimpleCookie(CookiePolicy(secure).clear())["meshpos_cashier"]
        assert cleared.value == "" and cleared["max-age"] == "0"
    assert cookie_value("a=b; meshpos_cashier=tok; c=d") == "tok" and cookie_value("meshpos_cashierx=1") is None


# -- over HTTP, against a running node --------------------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("cashier")
    make_site(root, "t1")
    run_cli("cashier-pin", str(root / "t1"), "--pin", "-", input=PIN + "\n", check=True)
    group = ProcessGroup(root / "logs")
    try:
        start(group, "t1", root / "t1")
        yield root / "t1"
    finally:
        group.stop_all()


class Browserish:
    """What a browser on the page sends: its own Host and Origin, and the cookie once set."""

    def __init__(self, node: Path) -> None:
        self.api = ApiClient(node, "tcp")
        self.host = self.api.host_port
        self.cookie: str | None = None

    def send(self, method: str, path: str, body: Any = None, origin: str | None = "own",
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection(*self.host.rsplit(":", 1), timeout=30)
        h = {"Host": self.host, **(headers or {})}
        if origin is not None:
            h["Origin"] = f"http://{self.host}" if origin == "own" else origin
        if self.cookie:
            h["Cookie"] = self.cookie
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            h["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        raw = resp.read()
        out = {k.lower(): v for k, v in resp.getheaders()}
        conn.close()
        value = json.loads(raw) if out.get("content-type", "").startswith("application/json") else raw
        return resp.status, out, value

    def login(self, pin: str) -> tuple[int, dict[str, str], Any]:
        status, headers, body = self.send("POST", "/cashier/login", {"pin": pin})
        if status == 200:
            self.cookie = "meshpos_cashier=" + SimpleCookie(headers["set-cookie"])["meshpos_cashier"].value
        return status, headers, body


def cash(key: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    return "/v1/sales", {"amount": "1.00", "method": "cash"}, {"Idempotency-Key": key}


def test_the_session_cookie_authorizes_the_page_and_nothing_else(node: Path) -> None:
    page = Browserish(node)
    status, headers, body = page.send("GET", "/")
    assert status == 200 and b"/cashier/app.js" in body
    assert "default-src 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    assert page.send("GET", "/v1/status")[0] == 401  # the page alone reads nothing
    status, headers, body = page.login(PIN)
    assert status == 200 and body == {"logged_in": True}
    cookie = SimpleCookie(headers["set-cookie"])["meshpos_cashier"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and not cookie["secure"]  # loopback: plain HTTP
    assert "api-token" not in json.dumps(body) and page.api.token not in headers["set-cookie"]
    assert page.send("GET", "/cashier/session")[2]["logged_in"] is True
    assert page.send("GET", "/v1/status")[0] == 200

    path, sale, key = cash("cookie-1")
    assert page.send("POST", path, sale, headers=key)[0] == 201  # the page's own origin
    assert page.send("POST", path, sale, origin=None, headers=cash("cookie-2")[2])[0] == 403  # no Origin
    assert page.send("POST", path, sale, origin="http://127.0.0.1:1", headers=cash("cookie-3")[2])[0] == 403
    forged = Browserish(node)
    forged.cookie = "meshpos_cashier=" + "A" * 43
    assert forged.send("GET", "/v1/status")[0] == 401

    assert page.send("POST", "/cashier/logout")[0] == 200
    assert page.send("GET", "/v1/status")[0] == 401  # the session is gone on the node, not only in the browser
    page.api.close()
    forged.api.close()


def test_five_wrong_pins_over_http_get_429_with_retry_after(node: Path) -> None:
    page = Browserish(node)
    for left in range(MAX_FAILURES - 1, -1, -1):
        status, _, body = page.login("9999")
        assert status == 401 and body["error"]["code"] == "wrong_pin", body
    status, headers, body = page.login(PIN)
    assert status == 429 and body["error"]["code"] == "locked" and 50 <= int(headers["retry-after"]) <= 60
    assert read_lock_state(node / "cashier-lock.json").locked_until_ms > 0
    assert page.send("POST", "/cashier/login", {"pin": PIN}, origin="http://evil.example")[0] == 403
    assert page.send("POST", "/cashier/login", {"pin": 1234})[0] in (400, 429)
    page.api.close()


# -- the CLI ------------------------------------------------------------------------------

def test_the_cli_never_takes_the_pin_from_argv(tmp_path: Path) -> None:
    make_site(tmp_path, "t1")
    node_dir = tmp_path / "t1"
    refused = run_cli("cashier-pin", str(node_dir), "--pin", "5174")
    assert refused.returncode != 0 and "5174" not in refused.stdout + refused.stderr
    assert not (node_dir / "cashier-pin").exists()
    weak = run_cli("cashier-pin", str(node_dir), "--pin", "-", input="1111\n")
    assert weak.returncode != 0 and "too easy" in weak.stderr
    generated = run_cli("cashier-pin", str(node_dir), "--generate", check=True)
    pin = generated.stdout.split(": ", 1)[1].split()[0]
    stored = read_pin_hash(node_dir / "cashier-pin")
    assert stored is not None and pin_matches(stored, pin)
    # at enrollment
    run_cli("enroll", str(tmp_path / "site"), str(tmp_path / "t2"), "--role", "terminal", "--name", "t2",
            "--cashier-pin", "-", input="2468\n", check=True)
    stored = read_pin_hash(tmp_path / "t2" / "cashier-pin")
    assert stored is not None and pin_matches(stored, "2468")
    bad = run_cli("enroll", str(tmp_path / "site"), str(tmp_path / "t3"), "--role", "terminal", "--name", "t3",
                  "--cashier-pin", "-", input="12\n")
    assert bad.returncode != 0 and not (tmp_path / "t3").exists()  # a bad PIN leaves nothing behind
    helped = run_cli("cashier-pin", "--help", check=True).stdout
    assert "--generate" in helped and "standard input" in helped


def test_the_package_data_ships_every_file_the_page_serves() -> None:
    """A non-editable install has the page: pyproject's package data names each file the app serves
    (building a wheel here would need a newer setuptools from the network; it was checked by hand:
    ``pip wheel --no-deps .`` holds meshpos/terminal/cashier_static/{index.html,app.js,app.css})."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["meshpos.terminal"]
    served = {name for name, _ in FILES.values()}
    for name in served:
        assert any(fnmatch.fnmatch(f"cashier_static/{name}", g) for g in globs), name
        assert static_file(name)  # and the running code reads it from the package, not the source tree
