"""A switch directory: key, TLS certificate, config, database; and site registration.

Layout of SWITCH_DIR:
  config.json   listen address, acquirer address and format, limits
  switch.key    the switch's Ed25519 private key (0600): signs results, opens sealed card data
                (its X25519 form), and is the key of the TLS certificate
  switch.pub    the X25519 public key as 64 hex characters: what ``meshpos site init --switch-key`` takes
  tls.pem       the self-signed TLS certificate of switch.key (nodes pin the key, not the certificate)
  switch.db     the de-duplication table and the registered sites (SQLite, WAL), unless the
                config names a PostgreSQL database (``db``, or ``$MESHPOS_SWITCH_DB``)
  switch.lock   held by the running switch

Instances: ``meshpos switch instance SWITCH_DIR NEW_DIR`` makes another directory of the same
switch (same key, same PostgreSQL database) with its own ``instance`` name and listen address.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing

from meshpos.infra.clock import SYSTEM_CLOCK, Clock
from meshpos.domain.errors import ConfigError, EncodingError, InputError, VerificationError
from meshpos.infra.fsutil import lock_file
from meshpos.domain.hostport import parse_hostport
from meshpos.identity import certs, keyfile, keys
from meshpos.infra.jsonfile import read_json, write_json
from meshpos.site.roster import Roster
from meshpos.site.sitedir import verify_policy_envelope
from meshpos.wire import envelope
from meshpos.switch.const import ACQUIRER_IN_FLIGHT, ACQUIRER_TIMEOUT_S, CLAIM_LEASE_S, SWITCH_FORMAT
from meshpos.switch.database import ENV_VAR, check_url, is_url, redact, resolve
from meshpos.switch.store import SiteRow, SwitchStore
from meshpos.switch.tls import make_tls_cert

ACQUIRER_FORMATS = ("iso8583", "json")
_MERCHANT = re.compile(r"[A-Za-z0-9 \-_./]{15}")


@dataclass
class SwitchConfig:
    """``acquirer_ca``: the CA file trusted for the acquirer's TLS (default: the system's);
    ``acquirer_cert`` / ``acquirer_key``: the switch's client certificate for mutual TLS;
    ``acquirer_plain``: plain TCP to an ISO 8583 host, only when set explicitly."""

    listen: str
    acquirer: str
    acquirer_format: str = "iso8583"
    acquirer_ca: str | None = None
    acquirer_timeout_s: float = ACQUIRER_TIMEOUT_S
    in_flight: int = ACQUIRER_IN_FLIGHT
    acquirer_cert: str | None = None
    acquirer_key: str | None = None
    acquirer_plain: bool = False
    #: a postgresql:// URL without password; None: the SQLite file switch.db
    db: str | None = None
    #: this instance's name, unique among the instances of one switch (claims, logs, metrics)
    instance: str = "main"
    #: ISO 8583 connections to the acquirer (a slow one does not hold the others)
    acquirer_connections: int = 1
    #: how long an instance's claim on a sale it advises holds unless renewed (a dead instance's
    #: sales wait this long before another instance continues them with 0221)
    claim_lease_s: float = CLAIM_LEASE_S
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": SWITCH_FORMAT, "listen": self.listen, "acquirer": self.acquirer,
                "acquirer_format": self.acquirer_format, "acquirer_ca": self.acquirer_ca,
                "acquirer_cert": self.acquirer_cert, "acquirer_key": self.acquirer_key,
                "acquirer_plain": self.acquirer_plain,
                "acquirer_timeout_s": self.acquirer_timeout_s, "in_flight": self.in_flight,
                "db": self.db, "instance": self.instance, "acquirer_connections": self.acquirer_connections,
                "claim_lease_s": self.claim_lease_s}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "SwitchConfig":
        plain = data.get("acquirer_plain", False)
        if not isinstance(plain, bool):
            raise ConfigError(f"{where}: acquirer_plain must be true or false")
        try:
            cfg = cls(listen=str(data["listen"]), acquirer=str(data["acquirer"]),
                      acquirer_format=str(data.get("acquirer_format", "iso8583")),
                      acquirer_ca=data.get("acquirer_ca"),
                      acquirer_timeout_s=float(data.get("acquirer_timeout_s", ACQUIRER_TIMEOUT_S)),
                      in_flight=int(data.get("in_flight", ACQUIRER_IN_FLIGHT)),
                      acquirer_cert=data.get("acquirer_cert"), acquirer_key=data.get("acquirer_key"),
                      acquirer_plain=plain, db=data.get("db"), instance=str(data.get("instance", "main")),
                      acquirer_connections=int(data.get("acquirer_connections", 1)),
                      claim_lease_s=float(data.get("claim_lease_s", CLAIM_LEASE_S)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: missing or bad setting {exc}") from exc
        cfg.validate(where)
        return cfg

    def validate(self, where: str) -> None:
        try:
            parse_hostport(self.listen, "listen")
            parse_hostport(self.acquirer, "acquirer")
        except InputError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        if self.acquirer_format not in ACQUIRER_FORMATS:
            raise ConfigError(f"{where}: acquirer format must be one of {', '.join(ACQUIRER_FORMATS)}")
        if not 1 <= self.in_flight <= 10_000 or self.acquirer_timeout_s <= 0:
            raise ConfigError(f"{where}: in_flight must be 1..10000 and acquirer_timeout_s positive")
        if (self.acquirer_cert is None) != (self.acquirer_key is None):
            raise ConfigError(f"{where}: the acquirer client certificate needs both acquirer_cert and acquirer_key")
        if self.acquirer_plain and self.acquirer_format != "iso8583":
            raise ConfigError(f"{where}: plain TCP is for an ISO 8583 acquirer only; the JSON acquirer is HTTPS")
        if self.db is not None:
            check_url(self.db, where)
            if redact(self.db) != self.db:
                raise ConfigError(f"{where}: the database URL holds a password: give it in ${ENV_VAR}, "
                                  "PGPASSWORD or ~/.pgpass instead")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.instance):
            raise ConfigError(f"{where}: instance must be 1-64 letters, digits or _.-")
        if not 0.3 <= self.claim_lease_s <= 3600:
            raise ConfigError(f"{where}: claim_lease_s must be 0.3..3600 seconds")
        if not 1 <= self.acquirer_connections <= 64:
            raise ConfigError(f"{where}: acquirer_connections must be 1..64")
        if self.acquirer_plain and (self.acquirer_ca or self.acquirer_cert):
            raise ConfigError(f"{where}: acquirer_plain excludes acquirer_ca / acquirer_cert (they are for TLS)")


class SwitchDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    config_path = property(lambda self: self.path / "config.json")
    key_path = property(lambda self: self.path / "switch.key")
    pub_path = property(lambda self: self.path / "switch.pub")
    tls_path = property(lambda self: self.path / "tls.pem")
    db_path = property(lambda self: self.path / "switch.db")

    def check_exists(self) -> None:
        if not self.config_path.exists():
            raise ConfigError(f"{self.path}: not a switch directory (run `meshpos switch init` first)")

    def config(self) -> SwitchConfig:
        self.check_exists()
        return SwitchConfig.from_json(read_json(self.config_path, "switch config", SWITCH_FORMAT),
                                      str(self.config_path))

    def key(self) -> nacl.signing.SigningKey:
        return keyfile.read_private_key(self.key_path)

    def db_location(self) -> str:
        """The database this switch uses: ``$MESHPOS_SWITCH_DB``, the configured URL, or switch.db."""
        return resolve(self.config().db, self.db_path)

    def open_store(self) -> SwitchStore:
        self.check_exists()
        return SwitchStore.open(self.db_location())

    def lock(self) -> None:
        self._lock_fd = lock_file(self.path / "switch.lock", f"{self.path}: another switch process runs on this directory")

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _existing(path: Path | None, what: str) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f"{path}: no such file ({what})")
    return str(path.resolve())


def init_switch(path: Path, listen: str, acquirer: str, acquirer_format: str = "iso8583",
                acquirer_ca: Path | None = None, key: nacl.signing.SigningKey | None = None,
                clock: Clock = SYSTEM_CLOCK, *, acquirer_cert: Path | None = None,
                acquirer_key: Path | None = None, acquirer_plain: bool = False, db: str | None = None,
                acquirer_connections: int = 1) -> SwitchDir:
    """Create SWITCH_DIR with a new key (or ``key``, for tests), its TLS certificate, config and database.

    ``db``: a PostgreSQL URL (``$MESHPOS_SWITCH_DB`` when set wins); the config keeps it without
    its password. Without either, the database is the SQLite file switch.db.
    The acquirer link is TLS unless ``acquirer_plain`` (ISO 8583 only): trusting ``acquirer_ca``
    (default: the system's CAs), presenting ``acquirer_cert`` / ``acquirer_key`` if given."""
    cfg = SwitchConfig(listen=listen, acquirer=acquirer, acquirer_format=acquirer_format,
                       acquirer_ca=_existing(acquirer_ca, "the acquirer's CA"),
                       acquirer_cert=_existing(acquirer_cert, "the switch's acquirer client certificate"),
                       acquirer_key=_existing(acquirer_key, "the switch's acquirer client key"),
                       acquirer_plain=acquirer_plain, acquirer_connections=acquirer_connections)
    env = os.environ.get(ENV_VAR)
    url = check_url(env, f"${ENV_VAR}") if env else (check_url(db, "--db") if db else None)
    cfg.db = redact(url) if url else None
    cfg.validate("switch config")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"{path}: directory exists and is not empty; choose a new switch directory")
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    sd = SwitchDir(path)
    key = key or keys.generate()
    keyfile.write_private_key(sd.key_path, key)
    host = parse_hostport(listen, "listen")[0]
    hosts = [h for h in (host, "localhost", "127.0.0.1", "::1") if h not in ("0.0.0.0", "::", "")]
    from meshpos.identity.certs import to_pem
    sd.tls_path.write_bytes(to_pem(make_tls_cert(key, hosts, clock.now_ms())))
    sd.pub_path.write_text(keys.x25519_public_of(key).hex() + "\n", encoding="ascii")
    write_json(sd.config_path, cfg.to_json())
    SwitchStore.open(url or sd.db_path, create=True).close()
    return sd


def make_instance(path: Path, new_path: Path, listen: str) -> SwitchDir:
    """Another instance of the switch at ``path``: same key, TLS certificate and PostgreSQL
    database, its own name and listen address. Each instance runs on its own directory."""
    sd = SwitchDir(path)
    cfg = sd.config()
    if cfg.db is None and not is_url(sd.db_location()):
        raise ConfigError(f"{path}: this switch keeps its state in SQLite (switch.db), which one process "
                          "uses at a time; several instances need PostgreSQL (`meshpos switch init --db URL`)")
    parse_hostport(listen, "listen")
    if new_path.exists() and any(new_path.iterdir()):
        raise ConfigError(f"{new_path}: directory exists and is not empty; choose a new directory")
    new_path.mkdir(parents=True, exist_ok=True)
    new_path.chmod(0o700)
    new = SwitchDir(new_path)
    shutil.copyfile(sd.key_path, new.key_path)
    os.chmod(new.key_path, 0o600)
    shutil.copyfile(sd.pub_path, new.pub_path)
    shutil.copyfile(sd.tls_path, new.tls_path)
    cfg.listen = listen
    cfg.instance = f"i-{secrets.token_hex(4)}"
    cfg.validate("switch config")
    write_json(new.config_path, cfg.to_json())
    return new


def default_merchant_id(site_id: str) -> str:
    return site_id[:15].upper()


def add_site(path: Path, site_dir: Path, merchant_id: str | None = None, clock: Clock = SYSTEM_CLOCK) -> SiteRow:
    """Register (or update) a site from its directory: ca.pem, policy.env and revocations/*.env.

    The private CA key is not needed; the policy must be signed by the site's CA and
    name this switch's key.
    """
    sd = SwitchDir(path)
    switch_pub = keys.x25519_public_of(sd.key()).hex()
    try:
        ca_pem = (site_dir / "ca.pem").read_bytes()
        policy_raw = (site_dir / "policy.env").read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{site_dir}: not a site directory ({exc.filename} is missing)") from exc
    ca_cert = certs.load_pem(ca_pem, str(site_dir / "ca.pem"))
    policy = verify_policy_envelope(policy_raw, ca_cert, str(site_dir / "policy.env"))
    if policy.switch_key is None:
        raise ConfigError(f"{site_dir}: the site policy names no switch key; run "
                          f"`meshpos site set-switch {site_dir} --switch-key {sd.pub_path} --switch-url URL` first")
    if policy.switch_key.lower() != switch_pub:
        raise ConfigError(f"{site_dir}: the site policy names switch key {policy.switch_key[:16]}..., "
                          f"not this switch's {switch_pub[:16]}... (see {sd.pub_path})")
    merchant = merchant_id if merchant_id is not None else default_merchant_id(policy.site_id)
    if not _MERCHANT.fullmatch(merchant):
        raise InputError("merchant id must be exactly 15 letters, digits, spaces or -_./")
    roster = Roster(ca_cert, policy)
    revocations: list[tuple[str, bytes]] = []
    for rpath in sorted((site_dir / "revocations").glob("*.env")) if (site_dir / "revocations").is_dir() else []:
        raw = rpath.read_bytes()
        try:
            verified = roster.verify(envelope.decode(raw), clock.now_ms())
        except (EncodingError, VerificationError) as exc:
            raise ConfigError(f"{rpath}: not a valid revocation of this site: {exc}") from exc
        if verified.env.type != "revocation":
            raise ConfigError(f"{rpath}: not a revocation")
        revocations.append((verified.key, raw))
    row = SiteRow(site_id=policy.site_id, name=policy.name, ca_pem=certs.to_pem(ca_cert),
                  policy_env=policy_raw, merchant_id=merchant)
    store = sd.open_store()
    try:
        with store.transaction():
            store.put_site(row, clock.now_ms())
            # every version stays known: sales are judged by the version in force at their time
            store.put_site_entry(policy.site_id, f"policy/{policy.version}", "policy", policy_raw)
            for key, raw in revocations:
                store.put_site_entry(policy.site_id, key, "revocation", raw)
    finally:
        store.close()
    return row
