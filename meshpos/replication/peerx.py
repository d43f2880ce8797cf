"""Peer exchange: where to dial the site's other nodes, learnt from their signed statuses.

Rules (protocols/peer-exchange.md; pure, time comes in as ``now``):

* A node's own signed ``status`` (protocols/link.md, "Status gossip") names the
  addresses and port it listens on. Statuses flood over the authenticated links,
  so a node that knows only the gateway's address learns every node's addresses
  from the gateway's link, without multicast. Each address comes signed by the
  node it belongs to: a relay cannot change it, and no node can say where another
  node is.
* An address is a hint, never an identity: the dial is TLS, and the certificate
  that answers decides which node the link is to. A hint that answers with
  another node's certificate is a link to that other node (kept only if we had
  no link to it), and a failed dial for the hinted node.
* Bounds: at most ``MAX_ADDRESSES`` addresses per node, IP literals only (no
  name is ever resolved), no multicast, broadcast or unspecified address, no
  loopback address unless the receiver itself is configured on loopback (a site on
  one machine: elsewhere it names the receiver's own local services), a port
  in 1..65535; hints of at most ``MAX_HINTED`` nodes; a hint lives as long as
  the status it came from is fresh (``ttl_s``, the status's own staleness bound),
  then it is forgotten unless a newer status renews it. A renewal can extend a
  hint only as far as its signer's clock advanced: the first status of a node we
  take anchors (our monotonic time, its ``at``), and no hint of that node lives past
  ``anchor + (at - anchor's at) + ttl + HINT_SLACK_S``. A hostile relay replaying a
  node's recorded statuses, each newer than the last, so keeps a stale address
  alive at most as long as the recording spans, not for ever.
* Hints only add dial targets to the ring planner (meshpos.replication.planner),
  whose targets, back-off and one-link-per-pair rule stay as they are: a hint
  never closes or replaces a working link. Dials to hinted nodes also draw on a
  ``DialBudget`` (``HINT_DIAL_RATE`` per second, bursts of ``HINT_DIAL_BURST``),
  so no set of statuses makes a node dial faster than that.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from meshpos.domain.errors import InputError
from meshpos.domain.hostport import parse_hostport
from meshpos.wire.status import StatusBody
from meshpos.replication.planner import PeerInfo

MAX_ADDRESSES = 4
MAX_HINTED = 1024
HINT_DIAL_RATE = 2.0  # dials per second to nodes known only by a hint
HINT_DIAL_BURST = 4
HINT_SLACK_S = 60.0  # how much later than its signer's clock advanced a hint may still live (delays, drift)
MAX_ANCHORS = 4096
LINK_ROLES = ("terminal", "gateway")  # the roles that listen for links (inspectors only dial)


def usable_address(text: object) -> str | None:
    """``text`` as a normalised IP literal a node may be dialled at, or None."""
    if not isinstance(text, str) or len(text) > 45:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if ip.is_multicast or ip.is_unspecified or (ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255")):
        return None
    return str(ip)


def on_loopback(hostports: Iterable[str]) -> bool:
    """True if any of ``hostports`` (HOST:PORT of this node's own configuration: its listen
    address, its static peers) is on loopback: then the site runs on one machine and loopback
    hints mean what they say."""
    for text in hostports:
        try:
            host = parse_hostport(text, "address")[0].strip("[]")
            if host == "localhost" or ipaddress.ip_address(host).is_loopback:
                return True
        except (InputError, ValueError):
            continue
    return False


def hint_from_status(node_id: str, role: str, status: StatusBody, *, loopback_ok: bool = False) -> PeerInfo | None:
    """The dial hint in one verified status (``role`` from the signer's certificate), or None
    if it names no usable address and port. A loopback address counts only with ``loopback_ok``
    (the receiver is on loopback itself, ``on_loopback``): a hostile node could otherwise make
    every node of the site dial services on its own 127.0.0.1."""
    if role not in LINK_ROLES:
        return None
    port = status.port
    if port is None or not 0 < port < 65536:
        return None
    addresses: list[str] = []
    for item in status.addresses:
        address = usable_address(item)
        if address is not None and not loopback_ok and ipaddress.ip_address(address).is_loopback:
            continue
        if address is not None and address not in addresses:
            addresses.append(address)
        if len(addresses) == MAX_ADDRESSES:
            break
    if not addresses:
        return None
    up = status.uplink.state == "up"
    return PeerInfo(node_id, tuple(addresses), port, role, up)


@dataclass
class PeerHints:
    """The dial hints of the site's nodes, each until its status goes stale."""

    me: str
    max_nodes: int = MAX_HINTED
    hints: dict[str, tuple[PeerInfo, float]] = field(default_factory=dict)  # node -> (hint, expires at)
    refused: int = 0  # hints not taken because the table was full
    # node -> (our monotonic time, its at) of the first status of it we took: kept after its hint
    # expires, so that replayed old statuses cannot start a hint's life again (bounded, oldest out)
    anchors: dict[str, tuple[float, int]] = field(default_factory=dict)

    def offer(self, info: PeerInfo | None, node_id: str, now: float, ttl_s: float, at: int | None = None) -> bool:
        """Take (or drop, if ``info`` is None) ``node_id``'s hint from its status dated ``at`` (its
        signer's clock, ms; None: no bound by it); True if what we would dial changed."""
        if node_id == self.me:
            return False
        old = self.hints.get(node_id)
        if info is None:
            return self.hints.pop(node_id, None) is not None
        if old is None and len(self.hints) >= self.max_nodes:
            self.refused += 1
            return False
        until = now + ttl_s
        if at is not None:
            anchor = self.anchors.get(node_id)
            if anchor is None:
                if len(self.anchors) >= MAX_ANCHORS:  # the oldest anchored first (insertion order)
                    del self.anchors[next(iter(self.anchors))]
                anchor = self.anchors[node_id] = (now, at)
            until = min(until, anchor[0] + max(0, at - anchor[1]) / 1000 + ttl_s + HINT_SLACK_S)
            if until <= now:  # a status its signer made long before: its address is not worth a dial
                return self.hints.pop(node_id, None) is not None
        self.hints[node_id] = (info, until)
        return old is None or old[0] != info

    def get(self, node_id: str) -> PeerInfo | None:
        entry = self.hints.get(node_id)
        return entry[0] if entry is not None else None

    def forget(self, node_id: str) -> bool:
        return self.hints.pop(node_id, None) is not None

    def expire(self, now: float) -> list[str]:
        """Drop the hints whose status went stale; the node ids dropped."""
        gone = [node for node, (_, until) in self.hints.items() if until <= now]
        for node in gone:
            del self.hints[node]
        return gone

    def nodes(self) -> list[str]:
        return sorted(self.hints)


@dataclass
class DialBudget:
    """A token bucket: at most ``rate`` dials per second on average, ``burst`` at once."""

    rate: float = HINT_DIAL_RATE
    burst: int = HINT_DIAL_BURST
    tokens: float = float(HINT_DIAL_BURST)
    at: float | None = None

    def take(self, now: float) -> bool:
        if self.at is not None:
            self.tokens = min(float(self.burst), self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def judge_answer(wanted: str, answered: str | None, linked_elsewhere: set[str]) -> str:
    """What to do with a link dialled at ``wanted``'s hinted address, by the certificate that answered:
    ``"wanted"`` (it is that node), ``"other"`` (another node we hold no link to: keep the link, count
    a failed dial of ``wanted``) or ``"close"`` (another node we are already linked to: a stale
    address must not replace a working link)."""
    if answered == wanted:
        return "wanted"
    return "close" if answered is None or answered in linked_elsewhere else "other"


def address_for(info: PeerInfo, failures: int) -> str:
    """Which of a node's addresses to dial after ``failures`` failed dials: each in turn."""
    return info.addresses[failures % len(info.addresses)]
