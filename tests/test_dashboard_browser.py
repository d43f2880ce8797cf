"""The organizer dashboard in a real headless chromium: terminals and totals of running nodes,
refreshed by the page itself after a new sale; no password, no page."""

from __future__ import annotations

import base64
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from meshpos.identity import keys
from meshpos.node import client
from meshpos.node.enroll import enroll_one_step
from meshpos.apps.procs import ProcessGroup
from meshpos.site.sitedir import init_site
from tests.cdp import Browser, chromium_path
from tests.helpers import run_cli
from tests.test_mesh_loopback import free_ports

PASSWORD = "sagra-2026"

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (apt-get install chromium)")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    group.env["MESHPOS_STATUS_INTERVAL"] = "1"
    yield group
    group.stop_all()


def until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what} (last: {value!r})")
        time.sleep(0.2)


def test_dashboard_in_headless_chromium(tmp_path: Path, procs: ProcessGroup, switch_key: Any) -> None:
    site = init_site(tmp_path / "site", "Sagra del Test", "EUR", dashboard_password=PASSWORD,
                     switch_key=keys.x25519_public_of(switch_key).hex(), switch_url="https://127.0.0.1:9")
    pg, p1, p2, dash = free_ports(4)
    g, t1, t2 = tmp_path / "g", tmp_path / "t1", tmp_path / "t2"
    enroll_one_step(site, g, "gateway", "Gateway", listen=f"127.0.0.1:{pg}", dashboard=f"127.0.0.1:{dash}")
    enroll_one_step(site, t1, "terminal", "Stall 1", listen=f"127.0.0.1:{p1}", peers=[f"127.0.0.1:{pg}"])
    enroll_one_step(site, t2, "terminal", "Stall 2", listen=f"127.0.0.1:{p2}", peers=[f"127.0.0.1:{pg}"])
    for path, name in ((g, "gw"), (t1, "t1"), (t2, "t2")):
        procs.start_node(name, path, "--no-mdns")
    run_cli("sell", str(t1), "--amount", "12.50", "--card", "-", check=True,
            input="4111111111111111\n")  # the window: cards
    client.running(t2).sell(300)
    client.running(t2).sell(450)
    url = f"http://127.0.0.1:{dash}/"

    # no password, a wrong one: refused
    for auth in (None, "organizer:wrong"):
        req = urllib.request.Request(url + "api/state")
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=10)
        assert exc.value.code == 401 and "Basic" in exc.value.headers["WWW-Authenticate"]

    browser = Browser(tmp_path / "chromium.log")
    try:
        # without credentials the browser gets the 401 page, no dashboard
        browser.call("Network.enable")
        browser.call("Page.navigate", url=url)

        def answer_status() -> int | None:
            browser.evaluate("1")  # pumps the events
            for ev in browser.events:
                if ev["method"] == "Network.responseReceived" and ev["params"]["response"]["url"] == url:
                    return int(ev["params"]["response"]["status"])
            return None
        assert until(answer_status, 20, "the browser's request to be answered") == 401
        time.sleep(1.0)
        assert browser.evaluate("document.getElementById('terminals')") is None

        auth = "Basic " + base64.b64encode(f"organizer:{PASSWORD}".encode()).decode()
        browser.call("Network.setExtraHTTPHeaders", headers={"Authorization": auth})
        browser.call("Page.navigate", url=url)

        def rows() -> dict[str, list[str]]:
            got = browser.evaluate("Array.from(document.querySelectorAll('#terminals tbody tr'))"
                                   ".map(tr => Array.from(tr.cells).map(td => td.textContent))") or []
            return {r[0]: r for r in got}

        def whole() -> bool:
            r = rows()
            return (set(r) == {"Gateway", "Stall 1", "Stall 2"} and all(v[2] == "reachable" for v in r.values())
                    and r["Stall 2"][3] == "0 / 0.00" and r["Stall 1"][3] == "1 / 12.50")
        until(whole, 40, "the three nodes, reachable, with their pending sales (cash is never pending)")
        assert browser.evaluate("document.getElementById('site-pending').textContent") == "1"
        assert browser.evaluate("document.getElementById('site-pending-amount').textContent") == "12.50 EUR"
        assert browser.evaluate("document.querySelector('#settled tr[data-status=pending]').cells[1].textContent") == "1"
        assert browser.evaluate("document.querySelector('#settled tr[data-status=paid]').cells[1].textContent") == "2"
        assert browser.evaluate("document.getElementById('window-left').textContent").startswith("23 h")
        # each terminal's offline window (Stall 2 took cash only: none), and sales per hour by method
        assert rows()["Stall 1"][10].startswith("23 h") and rows()["Stall 2"][10] == "-"
        hour = browser.evaluate("Array.from(document.querySelectorAll('#per-hour tbody tr')).map("
                                "tr => Array.from(tr.cells).map(td => td.textContent))")
        assert [h[1:] for h in hour] in ([["1 / 12.50", "2 / 7.50"]],  # the three sales in one hour, or two
                                         [["1 / 12.50", "0 / 0.00"], ["0 / 0.00", "2 / 7.50"]],
                                         [["1 / 12.50", "1 / 3.00"], ["0 / 0.00", "1 / 4.50"]]), hour
        # the card sale reaches the other two nodes and their statuses say so: nothing at risk
        until(lambda: browser.evaluate("document.querySelector('#at-risk tbody').textContent") == "none", 40,
              "the card sale to be held by enough devices")

        # a new (cash) sale: the page refreshes by itself; the pending queue does not move
        client.running(t1).sell(700)
        until(lambda: browser.evaluate("document.querySelector('#settled tr[data-status=paid]').cells[1].textContent")
              == "3", 30, "the page to show the new sale")
        until(lambda: rows()["Stall 1"][4] == "2 / 19.50", 30, "Stall 1's sales to include the new sale")
        assert browser.evaluate("document.getElementById('site-pending').textContent") == "1"
        assert browser.evaluate("document.getElementById('total-amount').textContent") == "27.00 EUR"
    finally:
        browser.close()
