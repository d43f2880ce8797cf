"""A node directory: config, key, certificates, policy, database, lock.

Layout (protocols/files.md):
  config.json   name, role, ids, listen address, static peers, uplink, printer, language
  node.key      the node's Ed25519 private key (0600): never leaves this directory
  node.pem      its certificate, signed by the site CA
  ca.pem        the site CA certificate: the only trust root
  policy.env    the site policy signed by the CA, as enrolled (newer versions arrive by the ledger)
  inbox/        signed envelopes from the organizer (revocations) to take into the ledger
  meshpos.db    the durable store (SQLite, WAL)
  dashboard.json  a gateway serving the organizer dashboard: its password hash (0600)
  node.lock     held by the one process that owns the directory
  api-token     the terminal API's bearer token (0600), made at enrollment or on first run
  api.sock      the terminal API on a UNIX socket (0600), while the node runs; the CLI uses it
  cashier-pin   the cashier app's PIN, as a scrypt hash (0600); cashier-lock(-remote).json its wrong tries
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing
from cryptography import x509

from meshpos.domain.roles import ROLES
from meshpos.domain.errors import ConfigError, InputError
from meshpos.infra.fsutil import lock_file
from meshpos.domain.hostport import parse_hostport
from meshpos.identity import certs, keyfile
from meshpos.infra.jsonfile import read_json, write_json
from meshpos.domain.policy import SitePolicy
from meshpos.site.sitedir import DASHBOARD_FILE, load_policy_envelope, read_dashboard_hash, write_dashboard_hash

NODE_FORMAT = "meshpos-node/1"
LANGUAGES = ("en", "it")
DEFAULT_API = "127.0.0.1:7480"  # the terminal API's TCP listener when config.json names none


@dataclass
class NodeConfig:
    name: str
    role: str
    node_id: str
    site_id: str
    listen: str | None = None
    peers: list[str] = field(default_factory=list)
    uplink: bool = False
    mdns: bool = True
    language: str = "en"
    printer: dict[str, Any] | None = None
    dashboard: str | None = None  # HOST:PORT of the organizer dashboard (gateway), None: not served
    api: str | None = None  # HOST:PORT of the terminal API's TCP listener; None: DEFAULT_API
    reader: dict[str, Any] | None = None  # the card reader (meshpos.devices.reader.reader_from_config)

    @property
    def api_address(self) -> str:
        return self.api or DEFAULT_API

    def to_json(self) -> dict[str, Any]:
        out = {"format": NODE_FORMAT, "name": self.name, "role": self.role, "node_id": self.node_id,
               "site_id": self.site_id, "listen": self.listen, "peers": self.peers, "uplink": self.uplink,
               "mdns": self.mdns, "language": self.language, "printer": self.printer}
        if self.dashboard is not None:
            out["dashboard"] = self.dashboard
        if self.api is not None:
            out["api"] = self.api
        if self.reader is not None:
            out["reader"] = self.reader
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "NodeConfig":
        known = {"format", "name", "role", "node_id", "site_id", "listen", "peers", "uplink", "mdns",
                 "language", "printer", "dashboard", "api", "reader"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{where}: unknown settings {sorted(unknown)}")
        try:
            cfg = cls(name=data["name"], role=data["role"], node_id=data["node_id"], site_id=data["site_id"],
                      listen=data.get("listen"), peers=list(data.get("peers") or []),
                      uplink=bool(data.get("uplink", False)), mdns=bool(data.get("mdns", True)),
                      language=data.get("language", "en"), printer=data.get("printer"),
                      dashboard=data.get("dashboard"), api=data.get("api"), reader=data.get("reader"))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{where}: missing or bad setting {exc}") from exc
        if cfg.role not in ROLES:
            raise ConfigError(f"{where}: role must be one of {', '.join(ROLES)}")
        if cfg.language not in LANGUAGES:
            raise ConfigError(f"{where}: language must be one of {', '.join(LANGUAGES)}")
        try:
            if cfg.listen:
                parse_hostport(cfg.listen, "listen")
            for peer in cfg.peers:
                parse_hostport(peer, "peer")
            if cfg.dashboard is not None:
                if not isinstance(cfg.dashboard, str):
                    raise InputError("dashboard must be HOST:PORT")
                parse_hostport(cfg.dashboard, "dashboard")
            if cfg.api is not None:
                if not isinstance(cfg.api, str):
                    raise InputError("api must be HOST:PORT")
                parse_hostport(cfg.api, "api")
            if cfg.reader is not None and not (isinstance(cfg.reader, dict) and isinstance(cfg.reader.get("kind"), str)):
                raise InputError('reader must be an object with a "kind" (e.g. {"kind": "simulated"})')
        except InputError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        return cfg


class NodeDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    config_path = property(lambda self: self.path / "config.json")
    key_path = property(lambda self: self.path / "node.key")
    cert_path = property(lambda self: self.path / "node.pem")
    ca_path = property(lambda self: self.path / "ca.pem")
    policy_path = property(lambda self: self.path / "policy.env")
    db_path = property(lambda self: self.path / "meshpos.db")
    inbox = property(lambda self: self.path / "inbox")
    dashboard_path = property(lambda self: self.path / DASHBOARD_FILE)
    api_token_path = property(lambda self: self.path / "api-token")
    api_socket_path = property(lambda self: self.path / "api.sock")
    cashier_pin_path = property(lambda self: self.path / "cashier-pin")
    cashier_lock_path = property(lambda self: self.path / "cashier-lock.json")

    def check_exists(self) -> None:
        if not self.path.is_dir():
            raise ConfigError(f"{self.path}: no such node directory (enroll it first: meshpos enroll ...)")
        if not self.config_path.exists():
            raise ConfigError(f"{self.path}: not a node directory (no config.json); enroll it first")

    def config(self) -> NodeConfig:
        self.check_exists()
        data = read_json(self.config_path, "node config", NODE_FORMAT)
        return NodeConfig.from_json(data, str(self.config_path))

    def save_config(self, cfg: NodeConfig) -> None:
        write_json(self.config_path, cfg.to_json())

    def key(self) -> nacl.signing.SigningKey:
        return keyfile.read_private_key(self.key_path)

    def ca_cert(self) -> x509.Certificate:
        try:
            return certs.load_pem(self.ca_path.read_bytes(), str(self.ca_path))
        except FileNotFoundError as exc:
            raise ConfigError(f"{self.ca_path}: site CA certificate is missing") from exc

    def cert(self) -> x509.Certificate:
        try:
            return certs.load_pem(self.cert_path.read_bytes(), str(self.cert_path))
        except FileNotFoundError as exc:
            raise ConfigError(f"{self.cert_path}: node certificate is missing (enrollment not installed?)") from exc

    def policy(self, ca_cert: x509.Certificate) -> SitePolicy:
        return load_policy_envelope(self.policy_path, ca_cert)

    def dashboard_hash(self) -> str | None:
        return read_dashboard_hash(self.dashboard_path)

    def save_dashboard_hash(self, stored: str) -> None:
        write_dashboard_hash(self.dashboard_path, stored)

    def lock(self) -> None:
        """Hold node.lock for this process's lifetime; a second process gets LockedError."""
        self._lock_fd = lock_file(self.path / "node.lock",
                                  f"{self.path}: another meshpos process holds this node directory "
                                  "(is `meshpos run` running? then commands go through it)")

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
