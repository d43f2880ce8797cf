"""The organizer dashboard in a real headless chromium: terminals and totals of running nodes,
refreshed by the page itself after a new sale; no password, no page. The mesh as a picture
(a node and a link element each, a partition when links are cut, who has uplink), the per-hour
chart, the at-risk list with a sale made on an isolated node; the page asks nothing of any other
origin (every request the browser makes is recorded over the DevTools protocol)."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from meshpos.apps.procs import free_ports, wait_for
from meshpos.node import client
from meshpos.switch.switchdir import add_site, init_switch
from meshpos.node.enroll import enroll_one_step
from meshpos.apps.procs import ProcessGroup
from meshpos.site.nodedir import NodeDir
from meshpos.site.sitedir import init_site
from tests.cdp import Browser, chromium_path
from tests.helpers import run_cli
from tests.test_held_mesh import sell_card
from tests.uplink_harness import base_rules

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


def start_switch(root: Path, procs: ProcessGroup) -> tuple[Path, str, str]:
    """The acquirer simulator and a switch, as processes: (switch dir, its public key, its URL)."""
    acq_port, switch_port = free_ports(2)
    (root / "rules.json").write_text(json.dumps(base_rules()))
    acquirer = procs.start("acquirer", "acquirer-sim", "--listen", f"127.0.0.1:{acq_port}", "--rules",
                           str(root / "rules.json"), "--tls-cert-out", str(root / "acquirer-ca.pem"))
    wait_for(lambda: acquirer.log_path.exists() and "listening on" in acquirer.log_path.read_text(), 60,
             lambda: f"the acquirer simulator did not start\n{acquirer.log_tail(15)}", alive=acquirer)
    switch_dir = root / "switch"
    init_switch(switch_dir, f"127.0.0.1:{switch_port}", f"127.0.0.1:{acq_port}", acquirer_ca=root / "acquirer-ca.pem")
    return switch_dir, (switch_dir / "switch.pub").read_text().strip(), f"https://127.0.0.1:{switch_port}"


def test_dashboard_in_headless_chromium(tmp_path: Path, procs: ProcessGroup) -> None:
    switch_dir, switch_key, switch_url = start_switch(tmp_path, procs)
    site = init_site(tmp_path / "site", "Sagra del Test", "EUR", dashboard_password=PASSWORD,
                     switch_key=switch_key, switch_url=switch_url)
    add_site(switch_dir, site.path)
    switch = procs.start("switch", "switch", "run", str(switch_dir))
    wait_for(lambda: "switch listening on port" in switch.log_path.read_text(), 60,
             lambda: f"the switch did not start\n{switch.log_tail(15)}", alive=switch)
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

        ids = {name: NodeDir(path).config().node_id for name, path in (("g", g), ("t1", t1), ("t2", t2))}

        # the mesh as a picture: one element per node and per link, no partition, no uplink yet
        def mesh() -> dict[str, Any]:
            return dict(browser.evaluate(MESH_JS) or {})
        def links(m: dict[str, Any]) -> set[frozenset[str]]:
            return {frozenset(pair) for pair in m["links"]}
        star = {frozenset((ids["g"], ids["t1"])), frozenset((ids["g"], ids["t2"]))}
        until(lambda: (m := mesh()) and set(m["nodes"]) == set(ids.values()) and star <= links(m)
              and m["partition"] == "false", 30, "the mesh picture with three nodes and their links")
        m = mesh()
        assert links(m) <= star | {frozenset((ids["t1"], ids["t2"]))}  # the stalls may link up (peer exchange)
        assert {m["nodes"][i]["name"] for i in ids.values()} == {"Gateway", "Stall 1", "Stall 2"}
        assert all(n["uplink"] == "off" and not n["marker"] for n in m["nodes"].values())
        assert m["nodes"][ids["t1"]]["detail"].startswith("pending 1 · 23 h")  # its offline window
        # the per-hour chart: bars by method whose counts add up to the sales taken
        bars = browser.evaluate("Array.from(document.querySelectorAll('#per-hour-chart svg rect.bar'))"
                                ".map(r => [r.dataset.method, Number(r.dataset.count)])")
        assert {meth: sum(c for mm, c in bars if mm == meth) for meth, _ in bars} == {"card": 1, "cash": 3}

        # links cut: Stall 2 stops; the picture shows it cut off in a part of its own
        procs.stop("t2")
        until(lambda: (m := mesh())["partition"] == "true" and m["nodes"][ids["t2"]]["part"] != m["nodes"][ids["g"]]["part"]
              and links(m) == {frozenset((ids["g"], ids["t1"]))}, 40,
              "the picture to show the partition")
        assert mesh()["cut"] == ["part 2 of 2 (cut off)"] and mesh()["nodes"][ids["t2"]]["reachable"] is False

        # the gateway alone (Stall 1 stops too) takes a card sale: held by one device, at risk
        procs.stop("t1")
        until(lambda: (m := mesh())["partition"] == "true" and not m["nodes"][ids["t1"]]["reachable"]
              and [i for i, n in m["nodes"].items() if n["part"] == m["nodes"][ids["g"]]["part"]] == [ids["g"]], 40,
              "the gateway cut off from both stalls")
        lone = sell_card(g, 4200)
        def risky() -> dict[str, list[str]]:
            got = browser.evaluate("Array.from(document.querySelectorAll('#at-risk tbody tr[data-sale]'))"
                                   ".map(tr => [tr.dataset.sale, ...Array.from(tr.cells).map(td => td.textContent)])")
            return {r[0]: r[1:] for r in got or []}
        until(lambda: lone["id"] in risky(), 30, "the isolated sale in the at-risk list")
        assert risky()[lone["id"]][1:4] == ["Gateway", "42.00 EUR", "1"]
        assert len(risky()) == 1  # the earlier card sale is held by all three (what they hold is on their disks)

        # Stall 1 back: it holds the sale too, nothing is at risk; then the gateway's uplink goes on,
        # the picture marks it up and the pending card sales are settled through it
        procs.start_node("t1", t1, "--no-mdns")
        until(lambda: browser.evaluate("document.querySelector('#at-risk tbody').textContent") == "none", 40,
              "the sale to be held by two devices")
        client.running(g).uplink(True)
        until(lambda: mesh()["nodes"][ids["g"]]["marker"] == "uplink up", 40, "the gateway's uplink marked up")
        assert mesh()["nodes"][ids["t1"]]["marker"] is None
        until(lambda: browser.evaluate("document.getElementById('site-pending').textContent") == "0", 60,
              "the card sales to be settled through the gateway's uplink")
        shot = browser.call("Page.captureScreenshot", format="png")
        (tmp_path / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))

        # every request the page made went to the dashboard itself, with a strict CSP on the page
        browser.evaluate("1")
        asked = [ev["params"]["request"]["url"] for ev in browser.events if ev["method"] == "Network.requestWillBeSent"]
        assert asked and {u.split("/", 3)[2] for u in asked} == {f"127.0.0.1:{dash}"}, sorted(set(asked))
        assert any(u.endswith("/api/state") for u in asked) and any(u.endswith("/app.js") for u in asked)
        page = next(ev["params"]["response"] for ev in browser.events if ev["method"] == "Network.responseReceived"
                    and ev["params"]["response"]["url"] == url and ev["params"]["response"]["status"] == 200)
        csp = {k.lower(): v for k, v in page["headers"].items()}["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    finally:
        browser.close()


# what the page's mesh picture shows, read from its SVG elements
MESH_JS = """(() => {
  const svg = document.querySelector('#mesh svg');
  if (!svg) return null;
  const nodes = {};
  svg.querySelectorAll('g[data-node]').forEach(g => {
    const marker = g.querySelector('g[data-state]');
    nodes[g.dataset.node] = {name: g.dataset.name, uplink: g.dataset.uplink || null, part: g.dataset.part,
      reachable: g.classList.contains('reachable'), marker: marker ? marker.getAttribute('class') : null,
      detail: g.querySelector('text.detail').textContent};
  });
  return {nodes: nodes, partition: svg.dataset.partition, parts: svg.dataset.parts,
          links: Array.from(svg.querySelectorAll('line.link')).map(l => [l.dataset.a, l.dataset.b]),
          cut: Array.from(svg.querySelectorAll('g.part.cut text')).map(t => t.textContent)};
})()"""
