"""DNS-SD records of a meshpos node (protocols/discovery.md): service type, instance
names and the TXT record a node advertises, encoded and parsed without any I/O.

meshpos.replication.discovery (the mDNS driver) advertises what :func:`encode_txt` gives and parses
what it hears with :func:`decode_txt`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from meshpos.domain.errors import EncodingError, InputError

SERVICE_TYPE = "_meshpos._tcp.local."
ROLES = frozenset({"terminal", "gateway", "inspector"})
# Bounds on what we put in TXT (RFC 6763 §6.1: one string <= 255 bytes).
MAX_TXT_VALUE = 200
MAX_LABEL = 63  # RFC 1035 §2.3.4


@dataclass(frozen=True)
class LocalService:
    """What this node advertises. ``addresses=None``: every non-loopback IPv4
    address of the chosen interfaces."""

    site_id: str
    node_id: str
    role: str
    name: str
    port: int
    addresses: list[str] | None = None
    proto: int = 1
    uplink: bool = False

    def __post_init__(self) -> None:
        for key in ("site_id", "node_id", "name"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise InputError(f"discovery: {key} must be a non-empty string")
            if len(value.encode()) > MAX_TXT_VALUE:
                raise InputError(f"discovery: {key} longer than {MAX_TXT_VALUE} bytes")
        if self.role not in ROLES:
            raise InputError(f"discovery: role must be one of {sorted(ROLES)}, not {self.role!r}")
        if not (isinstance(self.port, int) and 0 < self.port < 65536):
            raise InputError(f"discovery: bad port {self.port!r}")
        if not (isinstance(self.proto, int) and 0 <= self.proto <= 999_999):
            raise InputError(f"discovery: bad protocol version {self.proto!r}")
        for addr in self.addresses or ():
            try:
                ipaddress.IPv4Address(addr)
            except ValueError as exc:
                raise InputError(f"discovery: not an IPv4 address: {addr!r}") from exc


@dataclass(frozen=True)
class PeerTxt:
    site_id: str
    node_id: str
    role: str
    name: str
    proto: int
    uplink: bool


def instance_label(node_id: str) -> str:
    """The DNS-SD instance label for a node id (one DNS label, <= 63 bytes)."""
    label = node_id.replace(".", "-")
    raw = label.encode()
    if len(raw) > MAX_LABEL:
        label = raw[:MAX_LABEL].decode(errors="ignore")
    return label


def instance_name(node_id: str) -> str:
    return f"{instance_label(node_id)}.{SERVICE_TYPE}"


def encode_txt(local: LocalService) -> dict[str, str]:
    return {
        "site": local.site_id,
        "node": local.node_id,
        "role": local.role,
        "proto": str(local.proto),
        "uplink": "1" if local.uplink else "0",
        "name": local.name,
    }


def _text(props: Mapping[bytes, bytes | None], key: bytes) -> str:
    value = props.get(key)
    if value is None:
        raise EncodingError(f"TXT key {key.decode()!r} missing or without value")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EncodingError(f"TXT key {key.decode()!r} is not UTF-8") from exc
    if not text or len(value) > MAX_TXT_VALUE:
        raise EncodingError(f"TXT key {key.decode()!r} empty or too long")
    return text


def decode_txt(props: Mapping[bytes, bytes | None]) -> PeerTxt:
    """Parse a peer's TXT properties; raise EncodingError when malformed."""
    role = _text(props, b"role")
    if role not in ROLES:
        raise EncodingError(f"unknown role {role!r}")
    proto_text = _text(props, b"proto")
    if not (proto_text.isascii() and proto_text.isdigit() and len(proto_text) <= 6):
        raise EncodingError(f"bad protocol version {proto_text!r}")
    uplink_text = _text(props, b"uplink")
    if uplink_text not in ("0", "1"):
        raise EncodingError(f"bad uplink flag {uplink_text!r}")
    return PeerTxt(
        site_id=_text(props, b"site"),
        node_id=_text(props, b"node"),
        role=role,
        name=_text(props, b"name"),
        proto=int(proto_text),
        uplink=uplink_text == "1",
    )
