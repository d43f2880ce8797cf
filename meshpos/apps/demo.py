"""``meshpos demo``: a whole fair on one machine, with real parts.

An acquirer host simulator and the switch on loopback; a gateway and N
terminals as separate ``meshpos run`` processes linked by real TLS (static
peers on loopback). The scripted day: the uplink is down; every terminal
sells (cards, cash, one card the acquirer declines, one void); one terminal is
killed with SIGKILL and restarted; then one terminal gets an uplink; the whole
queue is forwarded; results flow back to every node; the final receipts print.
Exit 0 only if every sale reached its final status on every node and the
acquirer saw each card sale advised once.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from meshpos.domain.errors import MeshposError
from meshpos.node import client
from meshpos.apps.procs import ProcessGroup, free_ports, wait_for
from meshpos.site.cashierpin import generate_pin

FINAL = {"approved", "declined", "voided", "expired", "rejected"}
CASHIER_TERMINAL = "terminal-1"  # the terminal whose cashier app the demo shows
CARDS = ("4111111111111111", "5555555555554444")
DECLINED_CARD = "4000000000000002"


class Demo:
    def __init__(self, out: Path, terminals: int, sales: int, write: Callable[[str], None],
                 quiet: bool = False) -> None:
        self.out = out
        self.write = write  # where progress and the summary go (the CLI gives stdout)
        self.n = terminals
        self.sales = sales
        self.quiet = quiet
        self.procs = ProcessGroup(out / "logs")
        self.t0 = time.monotonic()
        self.nodes: dict[str, Path] = {}
        self.expected: dict[str, dict[str, Any]] = {}
        self.cashier_pin = ""

    def say(self, text: str) -> None:
        if not self.quiet:
            self.write(f"[{time.monotonic() - self.t0:5.1f}s] {text}")

    def cli(self, *args: str, stdin: str = "") -> str:
        import subprocess
        proc = subprocess.run([sys.executable, "-m", "meshpos.cli.main", *args], capture_output=True, text=True,
                              timeout=120, input=stdin)
        if proc.returncode != 0:
            raise MeshposError(f"meshpos {' '.join(args[:2])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    # -- the day ------------------------------------------------------------------------

    def run(self) -> int:
        self.setup()
        self.start_all()
        self.sell_offline()
        self.crash_and_restart()
        self.wait_converged()
        self.uplink()
        self.wait_settled()
        return self.summary()

    def setup(self) -> None:
        out = self.out
        ports = free_ports(2 + 2 * (self.n + 1))
        acq_port, switch_port = ports[:2]
        node_ports, api_ports = ports[2:3 + self.n], ports[3 + self.n:]
        self.say(f"setting up in {out}: acquirer simulator, switch, gateway and {self.n} terminals")
        rules = out / "acquirer-rules.json"
        rules.write_text(json.dumps({"seed": 1, "delay_ms": 20, "cards": [
            {"prefix": DECLINED_CARD, "response_code": "05"}]}, indent=1))
        self.stats = out / "acquirer-stats.json"
        acquirer_ca = out / "acquirer-ca.pem"  # the simulator's own certificate: the ISO 8583 link is TLS
        acquirer = self.procs.start("acquirer", "acquirer-sim", "--listen", f"127.0.0.1:{acq_port}", "--rules",
                                    str(rules), "--stats", str(self.stats), "--tls-cert-out", str(acquirer_ca))
        wait_for(lambda: acquirer.log_path.exists() and "listening on" in acquirer.log_path.read_text(), 60,
                 lambda: f"the acquirer simulator did not start: {acquirer.log_tail(5)}", alive=acquirer)
        self.cli("switch", "init", str(out / "switch"), "--listen", f"127.0.0.1:{switch_port}",
                 "--acquirer", f"127.0.0.1:{acq_port}", "--acquirer-ca", str(acquirer_ca))
        self.cli("site", "init", str(out / "site"), "--name", "Sagra della Castagna", "--switch-key",
                 str(out / "switch" / "switch.pub"), "--switch-url", f"https://127.0.0.1:{switch_port}",
                 "--dashboard-password", "-", stdin="demo\n")  # never on the command line
        self.cli("switch", "add-site", str(out / "switch"), str(out / "site"))
        receipts = out / "receipts"
        receipts.mkdir()
        names = ["gateway"] + [f"terminal-{i}" for i in range(1, self.n + 1)]
        for i, name in enumerate(names):
            peers = [f"127.0.0.1:{node_ports[0]}"] if i else []
            if i > 1:
                peers.append(f"127.0.0.1:{node_ports[i - 1]}")
            args = ["enroll", str(out / "site"), str(out / name), "--role", "gateway" if i == 0 else "terminal",
                    "--name", name.replace("-", " ").title(), "--listen", f"127.0.0.1:{node_ports[i]}",
                    "--language", "it" if i % 2 == 0 else "en",
                    "--api", f"127.0.0.1:{api_ports[i]}"]  # each node's terminal API on a port of its own
            for p in peers:
                args += ["--peer", p]
            pin = ""
            if name == CASHIER_TERMINAL:  # its cashier app, with a fresh PIN (stdin, not argv)
                self.cashier_pin = pin = generate_pin()
                args += ["--cashier-pin", "-"]
            self.cli(*args, stdin=pin + "\n" if pin else "")
            cfg_path = out / name / "config.json"
            cfg = json.loads(cfg_path.read_text())
            if i:
                cfg["printer"] = {"kind": "file", "path": str(receipts / f"{name}.escpos"),
                                  "profile": "generic-58mm" if i % 2 else "generic-80mm"}
            cfg_path.write_text(json.dumps(cfg, indent=2))
            self.nodes[name] = out / name

    def start_all(self) -> None:
        self.procs.start("switch", "switch", "run", str(self.out / "switch"))
        for name, path in self.nodes.items():
            self.procs.start_node(name, path, "--no-mdns")
        self.say(f"started {len(self.nodes)} nodes; no uplink anywhere: every sale stays offline")
        self.say(self.cashier_line())

    def cashier_line(self) -> str:
        """Where to open terminal 1's cashier app, and its PIN."""
        api = client.running(self.nodes[CASHIER_TERMINAL]).status().get("api") or {}
        url = str(api.get("url") or "").removesuffix("v1/") or f"(not served: {api.get('error')})"
        return f"cashier app of {CASHIER_TERMINAL}: {url}  PIN {self.cashier_pin}"

    def sell(self, name: str, amount: int, pan: str | None) -> dict[str, Any]:
        node = client.running(self.nodes[name])
        if pan is None:
            sale = node.sell(amount)
        else:
            # the same path as `meshpos sell --card`: sealed here, never sent in clear
            from meshpos.node.ops import SealedCard
            from meshpos.wire.cards import seal_card
            key = bytes.fromhex(node.policy().switch_key or "")
            sale = node.sell(amount, SealedCard.of(seal_card(pan, "1230", "contactless", key)))
        self.expected[sale["id"]] = sale
        return dict(sale)

    def sell_offline(self) -> None:
        terminals = [n for n in self.nodes if n != "gateway"]
        for k in range(self.sales):
            name = terminals[k % len(terminals)]
            pan = None if k % 3 == 2 else CARDS[k % 2]
            if k == 4:
                pan = DECLINED_CARD
            self.sell(name, 250 + 75 * k, pan)
        victim = next(s for s in self.expected.values() if s["method"] == "cash")
        terminal_dir = next(p for n, p in self.nodes.items() if client.running(p).status()["node_id"]
                            == victim["terminal"])
        client.running(terminal_dir).void(victim["id"], "customer changed mind")
        self.voided = victim["id"]
        self.say(f"{len(self.expected)} sales taken offline on {len(terminals)} terminals "
                 f"(one card the acquirer declines, sale {victim['id']} voided)")

    def crash_and_restart(self) -> None:
        name = "terminal-2" if "terminal-2" in self.nodes else "terminal-1"
        before = len(self.expected)
        for k in range(5):
            self.sell(name, 990 + k, None if k % 2 else CARDS[0])
        self.procs.kill(name, signal.SIGKILL)
        self.say(f"{name} killed with SIGKILL after {len(self.expected) - before} more sales; restarting it")
        self.procs.start_node(name, self.nodes[name], "--no-mdns")
        held = {s["id"] for s in client.running(self.nodes[name]).sales()}
        node_id = self._node_id(name)
        lost = {sid for sid, s in self.expected.items() if s["terminal"] == node_id and sid not in held}
        if lost:
            raise MeshposError(f"{name} lost acknowledged sales after SIGKILL: {sorted(lost)}")
        self.say(f"{name} is back with every sale it had acknowledged")

    def _node_id(self, name: str) -> str:
        return str(client.running(self.nodes[name]).status()["node_id"])

    def _views(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {name: {s["id"]: s for s in client.running(path).sales()}
                for name, path in self.nodes.items()}

    def wait_converged(self) -> None:
        want = set(self.expected)

        def done() -> bool:
            views = self._views()
            counts = {n: len(want & set(v)) for n, v in views.items()}
            self.say("replicating: " + ", ".join(f"{n} {c}/{len(want)}" for n, c in counts.items()))
            return all(c == len(want) for c in counts.values())
        wait_for(done, 60, "the mesh did not converge", interval=0.5)
        live = [s for s in self.expected.values() if s["id"] != self.voided]
        cards = sum(1 for s in live if s["method"] == "card")  # cash is final when taken: never pending
        self.say(f"every node holds all {len(want)} sales (card pending {cards}, cash paid {len(live) - cards}, "
                 "voided 1)")

    def uplink(self) -> None:
        name = "terminal-3" if "terminal-3" in self.nodes else list(self.nodes)[-1]
        client.running(self.nodes[name]).uplink(True)
        self.say(f"{name} gets an uplink: it forwards the whole site's queue to the switch")

    def wait_settled(self) -> None:
        def done() -> bool:
            views = self._views()
            parts = []
            all_final = True
            for n, v in views.items():
                final = sum(1 for sid in self.expected if v.get(sid, {}).get("status") in FINAL)
                all_final &= final == len(self.expected)
                parts.append(f"{n} {final}/{len(self.expected)}")
            self.say("settled: " + ", ".join(parts))
            return all_final
        wait_for(done, 90, "not every sale reached its final status on every node", interval=0.5)
        time.sleep(1.0)  # let the printers take the outcome slips

    def summary(self) -> int:
        views = self._views()
        from meshpos.domain.text import table
        from meshpos.domain.currency import format_amount
        rows = []
        ok = True
        for name, path in self.nodes.items():
            node_id = self._node_id(name)
            own = [s for s in views[name].values() if s["terminal"] == node_id]
            by = {st: [s for s in own if s["status"] == st] for st in ("approved", "declined", "voided", "expired")}
            total = sum(s["amount_minor"] for s in by["approved"])
            rows.append([name, len(own), len(by["approved"]), len(by["declined"]), len(by["voided"]),
                         len(by["expired"]), format_amount(total, "EUR")])
            for sid in self.expected:
                if views[name].get(sid, {}).get("status") not in FINAL:
                    ok = False
        self.write("")
        self.write(table(rows, ["NODE", "OWN SALES", "APPROVED", "DECLINED", "VOIDED", "EXPIRED", "SETTLED EUR"]))
        stats = json.loads(self.stats.read_text()) if self.stats.exists() else {"by_sale": {}, "totals": {}}
        double = [s for s, c in stats["by_sale"].items() if c.get("0220", 0) > 1]
        cards = sum(1 for s in self.expected.values() if s["method"] == "card" and s["id"] != self.voided)
        advised = len([s for s, c in stats["by_sale"].items() if c.get("0220", 0) + c.get("0221", 0) > 0])
        self.write(f"\nacquirer: {advised} card sales advised (expected {cards}), "
              f"{stats['totals'].get('0221', 0)} repeats (0221), {len(double)} advised twice")
        receipts = sorted((self.out / "receipts").glob("*"))
        self.write(f"receipts: {', '.join(str(p) for p in receipts)}")
        ok = ok and not double and advised == cards
        self.write(self.cashier_line())
        self.write("demo " + ("passed: every sale is final on every node" if ok else "FAILED"))
        return 0 if ok else 1

    def write_text_receipts(self) -> None:
        from meshpos.devices.receipts import render_text
        from meshpos.node.core import NodeCore
        from meshpos.node.receipts import receipt_data, receipt_options
        for name, path in self.nodes.items():
            if name == "gateway":
                continue
            core = NodeCore.open(path, lock=False)
            try:
                lines = []
                options = receipt_options(core)
                for sale in core.sales(core.node_id):
                    final = receipt_data(core, sale)
                    offline = dataclasses.replace(final, status="pending", auth_code=None, response_code=None)
                    lines.append(render_text(offline, options, "customer"))  # as printed at the stall
                    lines.append(render_text(final, options, "outcome"))  # once settled
                (self.out / "receipts" / f"{name}.txt").write_text("\n\n".join(lines) + "\n")
            finally:
                core.store.close()


def prepare_out(out: Path) -> None:
    """Empty the demo's folder (only one made by an earlier demo) and mark it as the demo's."""
    if out.exists():
        marker = out / ".meshpos-demo"
        if any(out.iterdir()) and not marker.exists():
            raise MeshposError(f"{out} exists and is not a demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / ".meshpos-demo").write_text("made by meshpos demo; removed by the next run\n")
