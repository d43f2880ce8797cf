"""The cashier app in a real headless chromium (Debian's), against a real terminal in a small fair
of real processes (tests/uplink_harness.py: acquirer simulator, switch, two terminals with TLS
links): PIN login, the amount keypad, a cash sale and a keyed card sale, the card sale's offline
window counting down, a charge whose answer was lost retried with the same key (one sale), a declined card with
its reason, "held on" rising when the peer comes up and syncs, approval through the
peer's uplink without a reload, a void, Italian; a double click on "charge" makes one sale; the
page asks nothing of any other origin; no card number stays in the page or reaches a log.

Screenshots (320x480 and 1280x800) go to the test's temp directory:
``<pytest tmp_path>/screenshots/*.png`` (pytest keeps the last three runs' temp directories,
under ``/tmp/pytest-of-$USER/``; the path is printed at the end of the test).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from api_harness import ApiClient
from cdp import Browser, chromium_path
from helpers import run_cli
from meshpos.apps.procs import ProcessGroup
from uplink_harness import DECLINED_05, VISA, Fair

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (apt-get install chromium)")]

PIN = "4831"


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    group.env["MESHPOS_STATUS_INTERVAL"] = "1"  # statuses (what a peer holds) every second
    yield group
    for child in group.children.values():
        if child.proc is not None and child.alive:
            os.killpg(child.proc.pid, signal.SIGTERM)
    group.stop_all()


CHARGE_RECT = 'JSON.stringify(document.getElementById("charge").getBoundingClientRect())'


def until(cond: Callable[[], Any], what: str, timeout: float = 45.0, state: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what} (last: {value!r}){'; ' + state() if state else ''}")
        time.sleep(0.2)


class Page:
    def __init__(self, browser: Browser, shots: Path) -> None:
        self.b = browser
        self.shots = shots

    def js(self, expression: str) -> Any:
        return self.b.evaluate(expression)

    def text(self, element_id: str) -> str:
        return str(self.js(f"document.getElementById({json.dumps(element_id)}).textContent"))

    def visible(self, element_id: str) -> bool:
        return bool(self.js(f"!document.getElementById({json.dumps(element_id)}).closest('[hidden]')"))

    def click(self, selector: str, count: int = 1) -> None:
        """Real mouse clicks at the element's centre (``count`` 2: a double click)."""
        x, y = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                       "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
                       "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for n in range(1, count + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.b.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=n)

    def keys(self, attr: str, text: str) -> None:
        for ch in text:
            self.click(f"[{attr}='{ch}']")

    def type_into(self, element_id: str, text: str) -> None:
        self.js(f"document.getElementById({json.dumps(element_id)}).focus()")
        self.b.call("Input.insertText", text=text)

    def size(self, width: int, height: int) -> None:
        self.b.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                    mobile=width < 700)

    def shot(self, name: str) -> None:
        data = self.b.call("Page.captureScreenshot", format="png")["data"]
        (self.shots / f"{name}.png").write_bytes(base64.b64decode(data))

    def current(self) -> dict[str, Any]:
        return dict(self.js("(() => { const c = document.getElementById('current'); return {status: c.dataset.status,"
                            " id: c.dataset.saleId, held: c.dataset.heldBy, state: document.getElementById("
                            "'current-state').textContent, detail: document.getElementById('current-detail')"
                            ".textContent}; })()") or {})

    def small_targets(self) -> list[str]:
        """Visible buttons and inputs smaller than 44 x 44 CSS px."""
        return list(self.js("Array.from(document.querySelectorAll('button, input')).filter(e => e.offsetParent"
                            " !== null).map(e => [e.id || e.dataset.key || e.dataset.digit || e.textContent,"
                            " e.getBoundingClientRect()]).filter(([, r]) => r.width < 44 || r.height < 44)"
                            ".map(([n, r]) => `${n}: ${r.width}x${r.height}`)") or [])


def own_sales(api: ApiClient) -> list[dict[str, Any]]:
    node_id = api.request("GET", "/v1/status").body["summary"]["node_id"]
    return [s for s in api.request("GET", "/v1/sales?limit=500").body["sales"] if s["terminal"] == node_id]


def test_the_cashier_app_in_chromium(tmp_path: Path, procs: ProcessGroup) -> None:
    fair = Fair.create(tmp_path, procs, terminals=2, start_nodes=False)
    t1 = fair.nodes["t1"]
    cfg = json.loads((t1 / "config.json").read_text())
    cfg["api"] = "127.0.0.1:0"
    (t1 / "config.json").write_text(json.dumps(cfg))
    run_cli("cashier-pin", str(t1), "--pin", "-", input=PIN + "\n", check=True)  # never in argv
    fair.start_node("t1")  # t2 stays down for now: t1's sales are held by t1 alone
    api = ApiClient(t1, "tcp")
    origin = api.request("GET", "/v1/status").body["node"]["api"]["url"].removesuffix("/v1/")
    shots = tmp_path / "screenshots"
    shots.mkdir()

    browser = Browser(tmp_path / "chromium.log")
    try:
        page = Page(browser, shots)
        browser.call("Network.enable")
        browser.call("Page.enable")
        page.size(320, 480)
        browser.call("Page.navigate", url=origin + "/")
        until(lambda: page.js("document.readyState") == "complete" and page.visible("login"), "the login screen")
        page.shot("01-login-320x480")
        assert page.small_targets() == []

        # a wrong PIN is refused with the tries left; the right one opens the till
        page.keys("data-key", "1234")
        page.click("#login-ok")
        until(lambda: "wrong PIN" in page.text("login-error"), "the wrong PIN to be refused")
        # today's sales load slowly (a busy node): the till is usable before they arrive
        browser.call("Fetch.enable", patterns=[{"urlPattern": "*/v1/sales?limit=*", "requestStage": "Request"}])
        page.keys("data-key", PIN)
        page.click("#login-ok")
        until(lambda: page.visible("app") and not page.visible("login"), "the till after the login")
        today = until(lambda: page.js("0") or next((e["params"] for e in browser.events
                                                    if e["method"] == "Fetch.requestPaused"), None),
                      "the page to ask for today's sales")  # js("0") only pumps the events
        cookies = browser.call("Network.getCookies", urls=[origin + "/"])["cookies"]
        assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [("meshpos_cashier", True, "Strict")]
        assert page.js("document.cookie") == ""  # the page's script cannot read its session
        until(lambda: (page.text("st-peers"), page.text("st-uplink"), page.text("st-printer")) == ("0", "off", "none"),
              "the status bar")
        page.js("window.__sameDocument = true")  # gone if anything reloads the page
        page.js("window.__taps = []; for (const k of ['mousedown', 'click']) document.addEventListener(k, e => "
                "window.__taps.push(k + ':' + (e.target.id || e.target.dataset.digit || e.target.tagName) + '@' + "
                "e.clientX + ',' + e.clientY), true)")  # what each tap hit, for the failure messages

        # a cash sale: 2.50 on the keypad
        page.keys("data-digit", "250")
        assert page.text("amount") == "2.50"
        page.click("#method-cash")
        page.click("#charge")
        until(lambda: page.current().get("status") == "paid", "the cash sale",
              state=lambda: f"{page.current()}, error {page.text('sell-error')!r}, amount {page.text('amount')}, "
                            f"page {page.js('JSON.stringify({busy: state.busy, method: state.method, attempt: state.attempt})')}, "
                            f"taps {page.js('window.__taps')}, charge at "
                            f"{page.js(CHARGE_RECT)}")
        cash_id = page.current()["id"]
        assert page.current()["state"] == "Paid in cash"
        browser.call("Fetch.continueRequest", requestId=today["requestId"])  # today's list arrives late
        browser.call("Fetch.disable")
        browser.events[:] = [e for e in browser.events if e["method"] != "Fetch.requestPaused"]

        # the answer to a charge is lost on the way back (the sale was made): the retry sends the
        # same Idempotency-Key and the same body, and gets that sale, not a second one
        browser.call("Fetch.enable", patterns=[{"urlPattern": "*/v1/sales", "requestStage": "Response"}])
        page.keys("data-digit", "300")
        page.click("#method-cash")
        page.click("#charge")
        paused = until(lambda: page.js("0") or next((e["params"] for e in browser.events
                                                     if e["method"] == "Fetch.requestPaused"), None),
                       "the charge's answer to be held back")  # js("0") only pumps the events
        lost_key = {k.lower(): v for k, v in paused["request"]["headers"].items()}["idempotency-key"]
        browser.call("Fetch.failRequest", requestId=paused["requestId"], errorReason="ConnectionReset")
        browser.call("Fetch.disable")
        until(lambda: page.text("charge") == "Retry charge", "the page to offer a retry")
        assert len(own_sales(api)) == 2  # the node made the sale; the page did not hear of it
        page.click("#charge")
        until(lambda: page.current().get("status") == "paid" and page.current().get("id") != cash_id,
              "the retried sale")
        retried = api.request("GET", f"/v1/sales/{page.current()['id']}").body
        assert retried["idempotency_key"] == lost_key and retried["amount"] == "3.00"
        assert len(own_sales(api)) == 2 and page.text("charge") == "Charge"

        # a card the acquirer will decline, keyed
        page.keys("data-digit", "400")
        page.click("#method-card")
        page.type_into("pan", DECLINED_05)
        page.type_into("expiry", "1230")
        page.click("#charge")
        until(lambda: page.current().get("status") == "pending", "the card sale to be declined, pending")
        declined_id = page.current()["id"]

        # a keyed card sale, charged with a double click: one sale
        assert page.js("document.getElementById('method-reader').disabled") is True  # no reader configured
        page.keys("data-digit", "1200")
        page.click("#method-card")
        page.type_into("pan", VISA)
        page.type_into("expiry", "1230")
        page.click("#charge", count=2)
        until(lambda: page.current().get("status") == "pending" and page.current().get("id") != declined_id,
              "the card sale, pending")
        card_id = page.current()["id"]
        sales = own_sales(api)
        assert len([s for s in sales if s["method"] == "card"]) == 2, sales  # the double click made one sale
        assert len(sales) == 4
        assert page.text("sell-error") == ""  # the second tap is no mistake to scold the seller for
        # the card number is gone from the page once sent: not in a field, not in the document
        assert page.js("document.getElementById('pan').value") == ""
        for pan in (VISA, DECLINED_05):
            assert not page.js(f"document.documentElement.outerHTML.includes('{pan}')")
            assert not page.js(f"document.body.innerText.includes('{pan[-8:]}')")

        # pending, with the offline window counting down, held by this terminal alone
        first = page.current()
        assert first["state"] == "Authorization pending" and first["held"] == "1", first
        assert "left in the offline window" in first["detail"] and "held on 1 device" in first["detail"]
        until(lambda: page.current()["detail"] != first["detail"], "the countdown to move", timeout=10)
        assert page.current()["detail"].startswith("23:59:") or page.current()["detail"].startswith("24:00:")
        page.shot("02-card-pending-320x480")

        # void the cash sale (two taps: void, confirm), before anything forwards it
        row = f"#sales tr[data-id='{cash_id}']"
        page.click(row + " button.void")
        assert page.js(f"document.querySelector(\"{row} button.void\").textContent") == "Confirm void"
        page.click(row + " button.void")
        until(lambda: page.js(f"document.querySelector(\"{row}\").dataset.status") == "voided", "the void")
        assert api.request("GET", f"/v1/sales/{cash_id}").body["status"] == "voided"

        # the peer comes up and syncs: "held on" rises, live
        fair.start_node("t2")
        until(lambda: page.current()["held"] == "2", "held_by to reach 2 on the page")
        assert "held on 2 devices" in page.current()["detail"]

        # another node's uplink settles it: approved with its auth code, without a reload
        fair.uplink("t2")
        until(lambda: page.current()["status"] == "approved", "the card sale approved through t2's uplink",
              timeout=60)
        approved = page.current()
        assert approved["id"] == card_id and approved["state"] == "Approved"
        auth = api.request("GET", f"/v1/sales/{card_id}").body["auth_code"]
        assert auth and f"auth code {auth}" in approved["detail"]
        assert page.js("window.__sameDocument") is True
        until(lambda: page.text("st-peers") == "1", "the status bar to show the peer")

        # today's sales, with totals per status and method
        def row_status(sale_id: str) -> str:
            return str(page.js(f"document.querySelector(\"#sales tr[data-id='{sale_id}']\").dataset.status"))
        until(lambda: row_status(retried["id"]) == "approved" and row_status(declined_id) == "declined",
              "the switch's results for the cash sale and the declined card")
        totals = {r[0]: r[1:] for r in page.js("Array.from(document.querySelectorAll('#totals tbody tr')).map("
                                               "tr => Array.from(tr.cells).map(td => td.textContent))")}
        assert totals == {"Voided": ["1 / 2.50", "0 / 0.00"], "Approved": ["1 / 3.00", "1 / 12.00"],
                          "Declined": ["0 / 0.00", "1 / 4.00"], "Total": ["2 / 5.50", "2 / 16.00"]}, totals
        # a tap on the declined sale shows it, with the acquirer's reason
        page.click(f"#sales tr[data-id='{declined_id}'] td")
        until(lambda: page.current()["id"] == declined_id, "the declined sale shown")
        assert page.current()["state"] == "Declined" and "response code 05 (do not honour)" in page.current()["detail"]
        page.click(f"#sales tr[data-id='{card_id}'] td")
        page.click(f"#sales tr[data-id='{card_id}'] button.reprint")
        until(lambda: page.text("toast"), "an answer to the reprint")  # no printer here: its message

        # Italian
        page.click("#lang")
        until(lambda: page.text("charge") == "Incassa", "the page in Italian")
        assert page.current()["state"] == "Approvata" and f"codice autorizzazione {auth}" in page.current()["detail"]
        page.shot("03-italian-320x480")
        assert page.js("document.documentElement.scrollWidth") <= 320  # nothing sticks out sideways
        assert page.small_targets() == []
        page.size(1280, 800)
        assert page.small_targets() == []
        page.shot("04-italian-1280x800")

        # the page asked nothing of any other origin
        page.js("1")  # collects the last events
        urls = [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"]
        assert urls and all(u.startswith(origin + "/") for u in urls), [u for u in urls if not u.startswith(origin)]
        doc = next(e for e in browser.events if e["method"] == "Network.responseReceived"
                   and e["params"]["response"]["url"] == origin + "/")
        csp = {k.lower(): v for k, v in doc["params"]["response"]["headers"].items()}["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    finally:
        browser.close()
    api.close()
    for log in [*(tmp_path / "logs").glob("*.log"), tmp_path / "chromium.log"]:
        text = log.read_text(errors="replace")
        assert VISA not in text and DECLINED_05 not in text, log
    print(f"screenshots in {shots}")
