#!/usr/bin/env python3
"""A multicast-capable lab of N hosts in Linux network namespaces.

Topology (lab id L, hosts 0..N-1)::

    mplL-h0 [eth0 10.77.L.1/24] --veth-- p0 ┐
    mplL-h1 [eth0 10.77.L.2/24] --veth-- p1 ┼ br0 (bridge, in netns mplL-br,
    ...                                     ┘      IGMP snooping off)

Every host has ``lo`` up and a route for 224.0.0.0/4 on ``eth0``, so mDNS
floods to every host through the bridge, and a permanent ARP entry for every other
host (the kernel's neighbour table is shared by all namespaces and too small for
a big lab's N(N-1) entries: ``Lab._pin_neighbours``). The bridge lives in its own namespace,
so nothing of the lab touches the root namespace's links. ``cut(i)`` takes the
bridge port of host i down (the host keeps its address and routes, as when a
terminal walks out of Wi-Fi range); ``restore(i)`` brings it back.

Field profiles (issue 15: a fair's Wi-Fi is not a clean bridge), per host or per link:

* ``loss(i, pct)``: host i's interface drops each packet with probability pct %
  (nftables ``numgen random mod 100 < pct drop``; ``direction`` "in" by default, so
  a packet between two lossy hosts is dropped once at its receiver, not twice);
  ``link_loss(i, j, pct)``: only the packets between hosts i and j, in the bridge.
* ``rate(i, kbit)``: host i's traffic limited to kbit kbit/s each way (``tc tbf`` on
  its interface, egress, and on its bridge port, its ingress).
* ``block_multicast(i)``: host i sends and receives no multicast (224.0.0.0/4,
  ff00::/8), as on an access point that filters it: mDNS finds nobody.
* ``isolate(hosts)``: wireless client isolation in the bridge: those hosts reach
  every other host but not each other (terminals reach the wired gateway only).
* ``flap(i, up_s, down_s)``: host i's link goes down for down_s every up_s + down_s
  seconds (a background thread; stopped by ``stop_flaps()`` and by ``down()``).
* ``apply(i, Profile(...))``: loss, rate and multicast of one host at once.

``tc netem`` does not exist on this kernel, so there is no delay injection here.

Library::

    with Lab(5) as lab:
        p = lab.run(0, ["python", "node.py"], stdout=subprocess.PIPE)
        lab.cut(2); lab.restore(2)
        lab.loss(1, 20); lab.isolate([1, 2, 3, 4]); lab.flap(3, up_s=20, down_s=10)

CLI: ``python tools/netns_lab.py up N [--loss PCT] [--rate KBIT] [--no-multicast]
[--isolate I,J,...] | down [--id L | --all] | exec I -- cmd... | cut I | restore I |
profile I [--loss PCT] [--rate KBIT] [--no-multicast] | link-loss I J PCT |
isolate I J ... | flap I --up S --down S (in the foreground, until Ctrl-C) | status``. State of CLI-created labs lives in /run/meshpos-lab/<id>.json.

``down()`` always removes every namespace the lab created (and ends the
processes left in them); a context manager, an ``atexit`` hook and SIGTERM/
SIGINT handlers call it too. Needs root and iproute2; the profiles need nftables (``nft``) too.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

STATE_DIR = Path(os.environ.get("MESHPOS_LAB_STATE", "/run/meshpos-lab"))
PREFIX = "mpl"
MAX_HOSTS = 250
HOST_IF = "eth0"
BRIDGE = "br0"


class LabError(RuntimeError):
    pass


@dataclass(frozen=True)
class Profile:
    """What one host's network does to its packets (see the module's docstring)."""

    loss_pct: int = 0
    loss_direction: str = "in"  # "in", "out" or "both"
    rate_kbit: int | None = None
    multicast: bool = True


def _run(argv: list[str], stdin: str | None = None) -> None:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} is not installed (apt-get install nftables iproute2)") from exc
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv[:4])}...: {proc.stderr.strip()}")


def _nft(ns: str, script: str) -> None:
    _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=script)


def _drop(pct: int) -> str:
    """The nftables statement that drops pct % of packets (numgen's range is 0..99)."""
    return "drop" if pct >= 100 else f"numgen random mod 100 < {pct} drop"


def _pct(pct: int) -> int:
    if not isinstance(pct, int) or not 0 <= pct <= 100:
        raise LabError(f"a loss of {pct!r} %: 0..100")
    return pct


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def list_netns() -> list[str]:
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def usable() -> str | None:
    """None if labs can be built here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces)"
    probe = f"{PREFIX}probe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (OSError, LabError) as exc:
        return f"`ip netns` is unusable here: {exc}"
    try:
        _ip("-n", probe, "link", "add", "brprobe", "type", "bridge")
        _ip("-n", probe, "link", "add", "vprobe0", "type", "veth", "peer", "name", "vprobe1")
    except LabError as exc:
        return f"bridge/veth unavailable in a namespace: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


_LIVE: weakref.WeakSet[Lab] = weakref.WeakSet()
_HANDLERS_INSTALLED = False


def _down_all_live() -> None:
    for lab in list(_LIVE):
        lab.down()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _down_all_live()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_safety_net() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_down_all_live)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread: atexit still covers us
            pass


def _claim_id(preferred: int | None = None) -> int:
    """Take a lab id that no namespace and no other lab uses (atomic via O_EXCL)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    used = {n[len(PREFIX):].split("-")[0] for n in list_netns() if n.startswith(PREFIX)}
    candidates = [preferred] if preferred is not None else random.sample(range(1, 255), 254)
    for lab_id in candidates:
        if str(lab_id) in used:
            continue
        try:
            fd = os.open(STATE_DIR / f"{lab_id}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        os.close(fd)
        return lab_id
    raise LabError("no free lab id")


class Lab:
    def __init__(self, n: int, lab_id: int | None = None) -> None:
        if not 1 <= n <= MAX_HOSTS:
            raise LabError(f"1..{MAX_HOSTS} hosts")
        self.n = n
        self._want_id = lab_id
        self.id: int | None = None
        self.created: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.profiles: dict[int, Profile] = {}
        self.link_losses: dict[tuple[int, int], int] = {}
        self.isolated: frozenset[int] = frozenset()
        self._flaps: list[tuple[threading.Thread, threading.Event]] = []

    # names and addresses
    def host_ns(self, i: int) -> str:
        return f"{PREFIX}{self.id}-h{i}"

    @property
    def bridge_ns(self) -> str:
        return f"{PREFIX}{self.id}-br"

    def addr(self, i: int) -> str:
        return f"10.77.{self.id}.{i + 1}"

    @property
    def subnet(self) -> str:
        return f"10.77.{self.id}.0/24"

    def _check(self, i: int) -> None:
        if self.id is None:
            raise LabError("lab is not up")
        if not 0 <= i < self.n:
            raise LabError(f"no host {i} (0..{self.n - 1})")

    # life cycle
    def up(self) -> Lab:
        if self.id is not None:
            return self
        _install_safety_net()
        self.id = _claim_id(self._want_id)
        _LIVE.add(self)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._save()
        return self

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)
        self._save()  # so that `netns_lab.py down --all` finds it even after a SIGKILL
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        br = self.bridge_ns
        self._add_ns(br)
        _ip("-n", br, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0")
        _ip("-n", br, "link", "set", BRIDGE, "multicast", "on", "up")
        for i in range(self.n):
            h = self.host_ns(i)
            self._add_ns(h)
            _ip("-n", h, "link", "add", HOST_IF, "type", "veth", "peer", "name", f"p{i}", "netns", br)
            _ip("-n", br, "link", "set", f"p{i}", "master", BRIDGE, "up")
            _ip("-n", h, "addr", "add", f"{self.addr(i)}/24", "dev", HOST_IF)
            _ip("-n", h, "link", "set", HOST_IF, "multicast", "on", "up")
            _ip("-n", h, "route", "add", "224.0.0.0/4", "dev", HOST_IF)
        self._pin_neighbours()

    def _pin_neighbours(self) -> None:
        """Give every host a permanent ARP entry for every other host. The kernel's neighbour
        table is ONE table for all namespaces, and it holds at most gc_thresh3 (1024 by default)
        learnt entries: a lab of N hosts that all talk needs N(N-1) of them, so past ~32 hosts
        ARP fails ("neighbor table overflow" in dmesg) and hosts cannot reach each other, which
        no real network does (each device has its own table). Permanent entries do not count
        against that bound, and they survive a cut or flapping bridge port."""
        if self.n < 2:
            return
        macs = []
        for i in range(self.n):
            shown = json.loads(_ip("-n", self.host_ns(i), "-j", "link", "show", HOST_IF).stdout)
            macs.append(shown[0]["address"])
        for i in range(self.n):
            lines = [f"neigh replace {self.addr(j)} lladdr {macs[j]} dev {HOST_IF} nud permanent"
                     for j in range(self.n) if j != i]
            _run(["ip", "-n", self.host_ns(i), "-batch", "-"], stdin="\n".join(lines) + "\n")

    def _save(self) -> None:
        state = {"id": self.id, "n": self.n, "namespaces": self.created, "pid": os.getpid(),
                 "isolated": sorted(self.isolated),
                 "link_losses": [[i, j, pct] for (i, j), pct in sorted(self.link_losses.items())]}
        (STATE_DIR / f"{self.id}.json").write_text(json.dumps(state))

    def down(self) -> None:
        """Remove every namespace this lab created; safe to call repeatedly."""
        if self.id is None:
            return
        self.stop_flaps()
        for proc in self.procs:
            _stop(proc)
        for ns in reversed(self.created):
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            for _ in range(50):
                if _ip("netns", "del", ns, check=False).returncode == 0 or ns not in list_netns():
                    break
                time.sleep(0.1)
        self.created = []
        try:
            (STATE_DIR / f"{self.id}.json").unlink()
        except FileNotFoundError:
            pass
        _LIVE.discard(self)
        self.id = None

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    # using it
    def run(self, i: int, argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside host i (``ip netns exec``); the lab ends it on down()."""
        self._check(i)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.host_ns(i), *argv], **popen
        )
        self.procs.append(proc)
        return proc

    def cut(self, i: int) -> None:
        """Host i loses its link silently (its bridge port goes down)."""
        self._check(i)
        _ip("-n", self.bridge_ns, "link", "set", f"p{i}", "down")

    def restore(self, i: int) -> None:
        self._check(i)
        _ip("-n", self.bridge_ns, "link", "set", f"p{i}", "up")

    # field profiles (the module's docstring)
    def apply(self, i: int, profile: Profile) -> None:
        """Give host i this profile, replacing what it had (Profile() is a clean link)."""
        self._check(i)
        _pct(profile.loss_pct)
        if profile.loss_direction not in ("in", "out", "both"):
            raise LabError(f"loss direction {profile.loss_direction!r}: in, out or both")
        if profile.rate_kbit is not None and profile.rate_kbit <= 0:
            raise LabError(f"a rate of {profile.rate_kbit} kbit/s")
        rules = []
        if profile.loss_pct:
            drop = _drop(profile.loss_pct)
            if profile.loss_direction in ("in", "both"):
                rules.append(f'add rule inet meshlab input iifname "{HOST_IF}" {drop}')
            if profile.loss_direction in ("out", "both"):
                rules.append(f'add rule inet meshlab output oifname "{HOST_IF}" {drop}')
        if not profile.multicast:
            for chain, way in (("input", "iifname"), ("output", "oifname")):
                rules.append(f'add rule inet meshlab {chain} {way} "{HOST_IF}" ip daddr 224.0.0.0/4 drop')
                rules.append(f'add rule inet meshlab {chain} {way} "{HOST_IF}" ip6 daddr ff00::/8 drop')
        _nft(self.host_ns(i), "\n".join([
            "table inet meshlab {}", "delete table inet meshlab",  # replace whatever was there
            "table inet meshlab {",
            "  chain input { type filter hook input priority -10; policy accept; }",
            "  chain output { type filter hook output priority -10; policy accept; }",
            "}", *rules, ""]))
        for ns, dev in ((self.host_ns(i), HOST_IF), (self.bridge_ns, f"p{i}")):
            if profile.rate_kbit is None:  # back to the default qdisc (an error: there was no tbf)
                subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True)
            else:
                # burst: at least one MTU and ~20 ms of the rate; latency bounds the queue
                burst = max(1600, profile.rate_kbit * 1000 // 8 // 50)
                _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                      "rate", f"{profile.rate_kbit}kbit", "burst", str(burst), "latency", "400ms"])
        self.profiles[i] = profile

    def profile(self, i: int) -> Profile:
        return self.profiles.get(i, Profile())

    def loss(self, i: int, pct: int, direction: str = "in") -> None:
        """Host i drops pct % of its packets at random (``direction``: in, out or both)."""
        p = self.profile(i)
        self.apply(i, Profile(pct, direction, p.rate_kbit, p.multicast))

    def rate(self, i: int, kbit: int | None) -> None:
        """Host i's traffic limited to ``kbit`` kbit/s each way (None: no limit)."""
        p = self.profile(i)
        self.apply(i, Profile(p.loss_pct, p.loss_direction, kbit, p.multicast))

    def block_multicast(self, i: int, blocked: bool = True) -> None:
        p = self.profile(i)
        self.apply(i, Profile(p.loss_pct, p.loss_direction, p.rate_kbit, not blocked))

    def link_loss(self, i: int, j: int, pct: int) -> None:
        """The packets between hosts i and j (both ways) are dropped with probability pct %."""
        self._check(i)
        self._check(j)
        if i == j:
            raise LabError("a link joins two different hosts")
        self.link_losses[(min(i, j), max(i, j))] = _pct(pct)
        self._bridge_rules()
        self._save()

    def isolate(self, hosts: Iterable[int]) -> None:
        """Client isolation: ``hosts`` reach every other host, not each other (empty: none)."""
        chosen = frozenset(hosts)
        for i in chosen:
            self._check(i)
        self.isolated = chosen
        self._bridge_rules()
        self._save()

    def _bridge_rules(self) -> None:
        rules = []
        if len(self.isolated) > 1:
            ports = ", ".join(f'"p{i}"' for i in sorted(self.isolated))
            rules.append(f"add rule bridge meshlab forward iifname {{ {ports} }} oifname {{ {ports} }} drop")
        for (i, j), pct in sorted(self.link_losses.items()):
            if pct:
                for a, b in ((i, j), (j, i)):
                    rules.append(f'add rule bridge meshlab forward iifname "p{a}" oifname "p{b}" {_drop(pct)}')
        _nft(self.bridge_ns, "\n".join([
            "table bridge meshlab {}", "delete table bridge meshlab",
            "table bridge meshlab {", "  chain forward { type filter hook forward priority 0; policy accept; }",
            "}", *rules, ""]))

    def flap(self, i: int, up_s: float, down_s: float) -> None:
        """Host i's link: up for up_s, down for down_s, again and again (until stop_flaps/down)."""
        self._check(i)
        if up_s <= 0 or down_s <= 0:
            raise LabError("flap needs positive up and down times")
        stop = threading.Event()

        def loop() -> None:
            try:
                while not stop.wait(up_s):
                    self.cut(i)
                    if stop.wait(down_s):
                        break
                    self.restore(i)
            except LabError:
                pass  # the lab went down under us
            finally:
                try:
                    if self.id is not None:
                        self.restore(i)
                except LabError:
                    pass

        thread = threading.Thread(target=loop, name=f"flap-h{i}", daemon=True)
        self._flaps.append((thread, stop))
        thread.start()

    def stop_flaps(self) -> None:
        """Stop every flapping link, leaving it up."""
        flaps, self._flaps = self._flaps, []
        for thread, stop in flaps:
            stop.set()
        for thread, _ in flaps:
            thread.join(timeout=10)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=3)


# --- CLI -----------------------------------------------------------------------------


def _states() -> list[dict[str, Any]]:
    out = []
    for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.exists() else []:
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def _pick(lab_id: int | None) -> dict[str, Any]:
    states = _states()
    if lab_id is not None:
        states = [s for s in states if s["id"] == lab_id]
    if len(states) != 1:
        raise LabError("say which lab with --id" if states else "no lab is up (see `status`)")
    return states[0]


def _adopt(state: dict[str, Any]) -> Lab:
    lab = Lab(state["n"])
    lab.id = state["id"]
    lab.created = list(state["namespaces"])
    lab.isolated = frozenset(state.get("isolated", ()))
    lab.link_losses = {(i, j): pct for i, j, pct in state.get("link_losses", ())}
    return lab


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netns_lab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="build a lab of N hosts and leave it up")
    p_up.add_argument("n", type=int)
    p_up.add_argument("--id", type=int, help="lab id (1..254), default: a free one")
    _profile_options(p_up, "every host")
    p_up.add_argument("--isolate", metavar="I,J,...", help="client isolation between these hosts (`isolate`)")
    p_down = sub.add_parser("down", help="remove a lab built by `up`")
    p_down.add_argument("--id", type=int)
    p_down.add_argument("--all", action="store_true", help="every lab recorded in the state dir")
    p_exec = sub.add_parser("exec", help="run a command in host I: exec I -- cmd...")
    p_exec.add_argument("i", type=int)
    p_exec.add_argument("--id", type=int)
    p_exec.add_argument("argv", nargs=argparse.REMAINDER)
    for name, helptext in (("cut", "take host I's link down"), ("restore", "bring host I's link up")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("i", type=int)
        p.add_argument("--id", type=int)
    p_prof = sub.add_parser("profile", help="set host I's loss, bandwidth and multicast (replaces its profile)")
    p_prof.add_argument("i", type=int)
    p_prof.add_argument("--id", type=int)
    _profile_options(p_prof, "host I")
    p_ll = sub.add_parser("link-loss", help="drop PCT %% of the packets between hosts I and J")
    p_ll.add_argument("i", type=int)
    p_ll.add_argument("j", type=int)
    p_ll.add_argument("pct", type=int)
    p_ll.add_argument("--id", type=int)
    p_iso = sub.add_parser("isolate", help="client isolation: these hosts reach the others but not each other "
                                           "(no host: isolation off)")
    p_iso.add_argument("hosts", type=int, nargs="*")
    p_iso.add_argument("--id", type=int)
    p_flap = sub.add_parser("flap", help="host I's link up for --up s, down for --down s, until Ctrl-C")
    p_flap.add_argument("i", type=int)
    p_flap.add_argument("--up", type=float, required=True, help="seconds up between two drops")
    p_flap.add_argument("--down", type=float, required=True, help="seconds down each time")
    p_flap.add_argument("--id", type=int)
    sub.add_parser("status", help="list labs and their hosts")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "up":
            lab = Lab(args.n, args.id).up()
            _LIVE.discard(lab)  # the CLI leaves it up on exit
            try:
                for i in range(lab.n):
                    lab.apply(i, _profile_of(args))
                if args.isolate:
                    lab.isolate(int(x) for x in args.isolate.split(","))
            except (LabError, ValueError):
                lab.down()
                raise
            print(json.dumps({"id": lab.id, "hosts": {lab.host_ns(i): lab.addr(i) for i in range(lab.n)}}))
        elif args.cmd == "down":
            states = _states() if args.all else [_pick(args.id)]
            for state in states:
                _adopt(state).down()
                print(f"lab {state['id']} removed")
        elif args.cmd == "exec":
            cmd = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not cmd:
                parser.error("exec needs a command after --")
            lab = _adopt(_pick(args.id))
            lab._check(args.i)
            return subprocess.call(["ip", "netns", "exec", lab.host_ns(args.i), *cmd])
        elif args.cmd in ("cut", "restore"):
            lab = _adopt(_pick(args.id))
            getattr(lab, args.cmd)(args.i)
        elif args.cmd == "profile":
            _adopt(_pick(args.id)).apply(args.i, _profile_of(args))
        elif args.cmd == "link-loss":
            lab = _adopt(_pick(args.id))
            lab.link_loss(args.i, args.j, args.pct)
        elif args.cmd == "isolate":
            _adopt(_pick(args.id)).isolate(args.hosts)
        elif args.cmd == "flap":
            lab = _adopt(_pick(args.id))
            lab.flap(args.i, args.up, args.down)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                lab.stop_flaps()
        elif args.cmd == "status":
            present = set(list_netns())
            for state in _states():
                lab = _adopt(state)
                print(f"lab {lab.id}: {lab.n} hosts, bridge ns {lab.bridge_ns}")
                for i in range(lab.n):
                    mark = "" if lab.host_ns(i) in present else "  (missing)"
                    print(f"  {i}: {lab.host_ns(i)} {lab.addr(i)}{mark}")
    except (LabError, ValueError) as exc:
        print(f"netns_lab: {exc}", file=sys.stderr)
        return 1
    return 0


def _profile_options(p: argparse.ArgumentParser, who: str) -> None:
    p.add_argument("--loss", type=int, default=0, metavar="PCT",
                   help=f"{who} drops PCT %% of the packets it receives, at random (nftables numgen)")
    p.add_argument("--loss-direction", choices=("in", "out", "both"), default="in",
                   help="which packets --loss drops: received (in, default), sent (out) or both")
    p.add_argument("--rate", type=int, metavar="KBIT", help=f"{who}'s bandwidth each way, in kbit/s (tc tbf)")
    p.add_argument("--no-multicast", action="store_true", help=f"{who} sends and receives no multicast (no mDNS)")


def _profile_of(args: argparse.Namespace) -> Profile:
    return Profile(args.loss, args.loss_direction, args.rate, not args.no_multicast)


if __name__ == "__main__":
    sys.exit(main())
