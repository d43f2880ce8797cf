"""The organizer dashboard's guards, on a real gateway process: the password hash only on that gateway,
wrong passwords rate-limited per address at a fixed memory cost, HTTPS when not on loopback."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import http.client
import socket
import ssl
import stat
from pathlib import Path
from typing import Any, Iterator

import pytest

from meshpos.node.dashboard import LIMITS, LOGIN_BURST, LoginLimiter
from meshpos.node import client
from meshpos.node.enroll import enroll_one_step
from meshpos.apps.procs import ProcessGroup, free_ports, wait_for
from meshpos.site.sitedir import Site, init_site

PASSWORD = "sagra-2026"


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    yield group
    group.stop_all()


@pytest.fixture
def dash_site(tmp_path: Path) -> Site:
    return init_site(tmp_path / "site", "Sagra del Test", "EUR", dashboard_password=PASSWORD)


def get(port: int, password: str | None, source: str = "127.0.0.1", tls: bool = False, method: str = "GET",
        path: str = "/api/state") -> http.client.HTTPResponse:
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # pinned by fingerprint in the test
        conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30,
                                                                        source_address=(source, 0), context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    headers = {}
    if password is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"organizer:{password}".encode()).decode()
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_the_password_hash_is_kept_by_the_dashboard_gateway_only(tmp_path: Path, dash_site: Site) -> None:
    (dash,) = free_ports(1)
    nodes = {"g": ("gateway", f"127.0.0.1:{dash}"), "g2": ("gateway", None), "t": ("terminal", None),
             "i": ("inspector", None)}
    for name, (role, dashboard) in nodes.items():
        enroll_one_step(dash_site, tmp_path / name, role, name.upper(), dashboard=dashboard)
    for name in nodes:
        hits = sorted(p.name for p in (tmp_path / name).rglob("*") if p.is_file() and b"scrypt$" in p.read_bytes())
        assert hits == (["dashboard.json"] if name == "g" else []), (name, hits)
    for path in (tmp_path / "g" / "dashboard.json", tmp_path / "site" / "dashboard.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"scrypt$" not in (tmp_path / "site" / "policy.env").read_bytes()


def test_wrong_passwords_are_rate_limited_per_address_at_a_fixed_memory_cost(
        tmp_path: Path, dash_site: Site, procs: ProcessGroup) -> None:
    pg, dash = free_ports(2)
    g = tmp_path / "g"
    enroll_one_step(dash_site, g, "gateway", "Gateway", listen=f"127.0.0.1:{pg}", dashboard=f"127.0.0.1:{dash}")
    child = procs.start_node("g", g, "--no-mdns")
    assert child.proc is not None
    assert get(dash, None).status == 401
    assert get(dash, PASSWORD).status == 200
    # every path asks for the password first; read-only; the same guarding headers on every answer
    answers = {(method, path, password): get(dash, password, method=method, path=path)
               for method, path, password in (("GET", "/nowhere", None), ("GET", "/nowhere", PASSWORD),
                                              ("POST", "/api/state", None), ("POST", "/api/state", PASSWORD),
                                              ("HEAD", "/", PASSWORD), ("GET", "/app.css", PASSWORD))}
    assert {k: r.status for k, r in answers.items()} == {
        ("GET", "/nowhere", None): 401, ("GET", "/nowhere", PASSWORD): 404, ("POST", "/api/state", None): 401,
        ("POST", "/api/state", PASSWORD): 405, ("HEAD", "/", PASSWORD): 200, ("GET", "/app.css", PASSWORD): 200}
    for r in answers.values():
        assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"
    codes = [get(dash, "wrong", source="127.0.0.3").status for _ in range(LOGIN_BURST + 3)]
    assert codes == [401] * LOGIN_BURST + [429] * 3
    limited = get(dash, "right?", source="127.0.0.3")
    assert limited.status == 429 and int(limited.headers["Retry-After"]) > 0
    assert get(dash, PASSWORD, source="127.0.0.3").status == 200  # a password checked before costs no scrypt
    assert get(dash, "wrong", source="127.0.0.4").status == 401  # other addresses are not locked out

    before = peak_rss_kib(child.proc.pid)
    with concurrent.futures.ThreadPoolExecutor(40) as pool:  # 40 addresses at once, each within its burst
        statuses = list(pool.map(lambda i: get(dash, f"wrong-{i}", source=f"127.0.1.{i + 1}").status, range(40)))
    assert statuses == [401] * 40
    grown_mib = (peak_rss_kib(child.proc.pid) - before) / 1024
    assert grown_mib < 160, f"40 parallel wrong passwords raised the gateway's peak memory by {grown_mib:.0f} MiB"
    assert get(dash, PASSWORD, source="127.0.0.5").status == 200

    idle = []  # connections that never send a request: a few held (briefly), the rest closed at once
    for _ in range(50):
        s = socket.socket()
        s.bind(("127.0.0.6", 0))
        s.connect(("127.0.0.1", dash))
        idle.append(s)

    def closed(s: socket.socket) -> bool:
        s.settimeout(0.01)
        try:
            return s.recv(1) == b""
        except socket.timeout:
            return False
        except OSError:
            return True
    wait_for(lambda: sum(closed(s) for s in idle) >= 50 - LIMITS.per_source, 20,
             "the dashboard did not close the idle connections past its per-address bound")
    assert get(dash, PASSWORD, source="127.0.0.7").status == 200
    for s in idle:
        s.close()


def test_the_dashboard_is_https_only_when_not_on_loopback(tmp_path: Path, dash_site: Site, procs: ProcessGroup) -> None:
    pg, dash = free_ports(2)
    g = tmp_path / "g"
    enroll_one_step(dash_site, g, "gateway", "Gateway", listen=f"127.0.0.1:{pg}", dashboard=f"0.0.0.0:{dash}")
    procs.start_node("g", g, "--no-mdns")
    info: dict[str, Any] = client.running(g).status()["dashboard"]
    assert info["url"].startswith("https://")
    assert get(dash, None, tls=True).status == 401
    assert get(dash, PASSWORD, tls=True).status == 200
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", dash), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None and hashlib.sha256(der).hexdigest() == info["tls_fingerprint_sha256"].replace(":", "").lower()
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        get(dash, PASSWORD)  # plain HTTP with the password in it: no answer
    assert stat.S_IMODE((g / "dashboard-tls.key").stat().st_mode) == 0o600


def test_login_limiter_refills_and_forgets_the_oldest_address() -> None:
    now = [0.0]
    limiter = LoginLimiter(lambda: now[0], burst=2, refill_s=10.0, max_sources=3)
    assert limiter.take("a") is None and limiter.take("a") is None
    assert limiter.take("a") == pytest.approx(10.0)
    now[0] = 5.0
    assert limiter.take("a") == pytest.approx(5.0)
    now[0] = 10.5
    assert limiter.take("a") is None and limiter.take("a") is not None
    for source in ("b", "c", "d"):
        limiter.take(source)
    assert len(limiter._buckets) == 3 and "a" not in limiter._buckets
