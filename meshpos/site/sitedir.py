"""The organizer's site directory: the site CA, the policy, enrollment, revocation.

Layout of SITE_DIR (protocols/files.md):
  site.json      readable summary: site id, name, current policy
  ca.key         the site CA's Ed25519 private key (0600): keep it offline
  ca.pem         the site CA certificate
  policy.env     the current policy, signed by the CA (an envelope)
  enrolled.json  every certificate issued: name, node id, role, serial
  revocations/   signed revocation envelopes, one per revoked node
  dashboard.json the organizer dashboard's password hash (0600): given to gateways at enrollment
                 only, never put in the policy (which every node, inspectors too, receives)
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import nacl.signing
from cryptography import x509

from meshpos.domain.roles import ROLES
from meshpos.domain import rules
from meshpos.infra.clock import SYSTEM_CLOCK, Clock
from meshpos.domain.errors import ConfigError, CryptoError, InputError, VerificationError
from meshpos.identity import certs, keyfile, keys
from meshpos.infra.durable import fsync_dir, write_atomically
from meshpos.infra.jsonfile import read_json, write_json
from meshpos.domain.policy import SitePolicy, hash_password
from meshpos.wire import canonical, envelope

SITE_FORMAT = "meshpos-site/1"
REQUEST_FORMAT = "meshpos-enroll-request/1"
ANSWER_FORMAT = "meshpos-enroll-answer/1"
DEFAULT_VALID_DAYS = 90
POLICY_LIMITS = frozenset({"offline_window_s", "warn_before_s", "max_sale_minor", "max_terminal_pending_minor",
                           "max_site_pending_minor"})
DASHBOARD_FILE = "dashboard.json"
DASHBOARD_FORMAT = "meshpos-dashboard/1"
DASHBOARD_ROLES = frozenset({"gateway"})  # the roles an enrollment answer hands the password hash to


def read_dashboard_hash(path: Path) -> str | None:
    """The dashboard password hash kept in ``path`` (a site's or a gateway's dashboard.json), if any."""
    if not path.exists():
        return None
    stored = read_json(path, "dashboard password file", DASHBOARD_FORMAT).get("password_hash")
    if not isinstance(stored, str) or not stored.startswith("scrypt$"):
        raise ConfigError(f"{path}: no dashboard password hash in it")
    return stored


def write_dashboard_hash(path: Path, stored: str) -> None:
    write_json(path, {"format": DASHBOARD_FORMAT, "password_hash": stored}, mode=0o600)


def read_switch_key_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: switch key file is missing") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read switch key file: {exc}") from exc
    first = text.splitlines()[0].strip() if text else ""
    try:
        if len(bytes.fromhex(first)) != 32 or len(first) != 64:
            raise ValueError
    except ValueError as exc:
        raise ConfigError(f"{path}: must hold the switch's X25519 public key as 64 hex characters") from exc
    return first.lower()


def check_switch_url(url: str) -> str:
    if not url.startswith("https://") or len(url) < 12:
        raise InputError(f"switch URL must be https://HOST:PORT, got {url!r}")
    return url.rstrip("/")


@dataclass
class Site:
    path: Path
    ca_key: nacl.signing.SigningKey
    ca_cert: x509.Certificate
    policy: SitePolicy

    @property
    def site_id(self) -> str:
        return self.policy.site_id

    def dashboard_hash(self) -> str | None:
        """The dashboard password hash (a site made before it moved out of the policy: the policy's)."""
        return read_dashboard_hash(self.path / DASHBOARD_FILE) or self.policy.dashboard_password

    def policy_envelope(self) -> bytes:
        return (self.path / "policy.env").read_bytes()

    def _write_policy(self, policy: SitePolicy) -> None:
        raw = envelope.seal("policy", self.site_id, {"policy": policy.to_json()}, self.ca_key)
        write_atomically(self.path / "policy.env", raw)
        self.policy = policy
        summary = read_json(self.path / "site.json", "site file", SITE_FORMAT)
        summary["policy"] = {k: v for k, v in policy.to_json().items() if k != "dashboard_password"}
        write_json(self.path / "site.json", summary)

    def update_policy(self, **changes: Any) -> SitePolicy:
        policy = dataclasses.replace(self.policy, version=self.policy.version + 1, **changes)
        policy.validate("new policy")
        self._write_policy(policy)
        return policy

    def sign_request(self, request: dict[str, Any], clock: Clock = SYSTEM_CLOCK,
                     valid_days: int = DEFAULT_VALID_DAYS) -> dict[str, Any]:
        public_key, role, name = check_request(request)
        now = clock.now_ms()
        cert = certs.issue(self.ca_cert, self.ca_key, public_key, role, name, now, valid_days)
        node_id = keys.node_id_of(public_key)
        self._record_enrollment(name, node_id, role, cert.serial_number, now)
        answer = {
            "format": ANSWER_FORMAT,
            "cert": certs.to_pem(cert).decode(),
            "ca": certs.to_pem(self.ca_cert).decode(),
            "policy": self.policy_envelope().decode(),
            "revocations": [p.read_bytes().decode() for p in sorted((self.path / "revocations").glob("*.env"))],
        }
        dashboard = self.dashboard_hash() if role in DASHBOARD_ROLES else None
        if dashboard:
            answer["dashboard_hash"] = dashboard
        return answer

    def _record_enrollment(self, name: str, node_id: str, role: str, serial: int, now: int) -> None:
        path = self.path / "enrolled.json"
        data = read_json(path, "enrollment list") if path.exists() else {"nodes": []}
        data["nodes"].append({"name": name, "node_id": node_id, "role": role, "serial": str(serial), "at": now})
        write_json(path, data)

    def enrolled(self) -> list[dict[str, Any]]:
        path = self.path / "enrolled.json"
        return list(read_json(path, "enrollment list")["nodes"]) if path.exists() else []

    def find_node(self, who: str) -> str:
        matches = {n["node_id"] for n in self.enrolled() if who in (n["node_id"], n["name"])}
        if not matches:
            raise InputError(f"no node named or with id {who!r} was enrolled in this site")
        if len(matches) > 1:
            raise InputError(f"several nodes are named {who!r}: give the node id")
        return str(matches.pop())

    def revoke(self, node_id: str, reason: str | None, clock: Clock = SYSTEM_CLOCK,
               cut_seq: int | None = None) -> bytes:
        """Sign a revocation. ``cut_seq``: the node's sales up to this sequence number stay valid
        (the last one the organizer's node holds); without it, those dated up to now do.
        One revocation per node: every node must apply the same cut."""
        path = self.path / "revocations" / f"{node_id}.env"
        if path.exists():
            raise InputError(f"node {node_id} is revoked already ({path}); one revocation per node, so that "
                             "every node applies the same cut")
        if cut_seq is not None and (not isinstance(cut_seq, int) or cut_seq < 0):
            raise InputError("the cut must be a sequence number (0 or more)")
        problem = rules.description_problem(reason)  # replicated to every node like a description
        if problem:
            raise InputError(problem.replace("description", "reason", 1))
        body: dict[str, Any] = {"node_id": node_id, "site": self.site_id, "at": clock.now_ms(), "reason": reason}
        if cut_seq is not None:
            body["cut_seq"] = cut_seq
        raw = envelope.seal("revocation", self.site_id, body, self.ca_key)
        (self.path / "revocations").mkdir(exist_ok=True)
        path.write_bytes(raw)
        return raw


def init_site(path: Path, name: str, currency: str = "EUR", switch_key: str | None = None,
              switch_url: str | None = None, dashboard_password: str | None = None,
              clock: Clock = SYSTEM_CLOCK, limits: Mapping[str, int] | None = None,
              more_switch_urls: Sequence[str] = ()) -> Site:
    """Create SITE_DIR whole or not at all: everything is checked first, then written into a
    hidden directory beside it that is renamed into place (``limits``: SitePolicy fields such as
    ``max_sale_minor``, in the first policy version)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path}: exists and is not an empty directory; choose a new site directory")
    limits = dict(limits or {})
    unknown = set(limits) - POLICY_LIMITS
    if unknown:
        raise InputError(f"unknown policy settings {sorted(unknown)}")
    ca_key = keys.generate()
    ca_cert = certs.make_ca(name, ca_key, clock.now_ms())
    site_id = certs.site_id_of(ca_cert)
    fields: dict[str, Any] = {"site_id": site_id, "name": name, "currency": currency, "switch_key": switch_key,
                              "switch_url": check_switch_url(switch_url) if switch_url else None,
                              "switch_more_urls": tuple(check_switch_url(u) for u in more_switch_urls), **limits}
    policy = SitePolicy(**fields)
    policy.validate("site policy")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the site directory: {exc.strerror or exc}") from exc
    try:
        umask = os.umask(0)
        os.umask(umask)
        work.chmod(0o777 & ~umask)  # what mkdir would have given; ca.key itself is 0600
        (work / "revocations").mkdir()
        keyfile.write_private_key(work / "ca.key", ca_key)
        (work / "ca.pem").write_bytes(certs.to_pem(ca_cert))
        write_json(work / "site.json", {"format": SITE_FORMAT, "site_id": site_id, "name": name, "policy": {}})
        site = Site(path=work, ca_key=ca_key, ca_cert=ca_cert, policy=policy)
        site._write_policy(policy)
        if dashboard_password:
            write_dashboard_hash(work / DASHBOARD_FILE, hash_password(dashboard_password))
        os.rename(work, path)  # also replaces an empty directory, atomically
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ConfigError(f"{path}: cannot create the site directory: {exc.strerror or exc}") from exc
        raise
    fsync_dir(path.parent)
    site.path = path
    return site


def check_site_dir(path: Path) -> str:
    """That ``path`` is an organizer's site directory (made by ``meshpos site init``), not a
    node directory or a copy of some of its files; its site id."""
    if not path.is_dir():
        raise ConfigError(f"{path}: no such site directory")
    if (path / "config.json").exists() or (path / "node.key").exists() or (path / "node.pem").exists():
        raise ConfigError(f"{path}: this is a node directory, not a site directory: its policy.env is the one "
                          "it was enrolled with and it holds no revocations; give the organizer's site "
                          "directory (made by `meshpos site init`)")
    summary = read_json(path / "site.json", "site file", SITE_FORMAT)
    try:
        ca_cert = certs.load_pem((path / "ca.pem").read_bytes(), str(path / "ca.pem"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: not a site directory (ca.pem is missing)") from exc
    site_id: str = certs.site_id_of(ca_cert)
    if summary.get("site_id") != site_id:
        raise ConfigError(f"{path}: site.json names site {summary.get('site_id')!r} but ca.pem is of {site_id}")
    return site_id


def load_site(path: Path) -> Site:
    if not path.is_dir():
        raise ConfigError(f"{path}: no such site directory")
    read_json(path / "site.json", "site file", SITE_FORMAT)
    ca_key = keyfile.read_private_key(path / "ca.key")
    try:
        ca_cert = certs.load_pem((path / "ca.pem").read_bytes(), str(path / "ca.pem"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path / 'ca.pem'}: site CA certificate is missing") from exc
    if bytes(ca_key.verify_key) != certs.ca_public_key(ca_cert):
        raise ConfigError(f"{path / 'ca.key'}: does not match {path / 'ca.pem'}")
    policy = load_policy_envelope(path / "policy.env", ca_cert)
    return Site(path=path, ca_key=ca_key, ca_cert=ca_cert, policy=policy)


def load_policy_envelope(path: Path, ca_cert: x509.Certificate) -> SitePolicy:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: signed site policy is missing") from exc
    return verify_policy_envelope(raw, ca_cert, str(path))


def verify_policy_envelope(raw: bytes, ca_cert: x509.Certificate, where: str) -> SitePolicy:
    try:
        env = envelope.decode(raw)
        envelope.check_schema(env)
        if env.type != "policy" or env.signer != certs.site_id_of(ca_cert):
            raise VerificationError("not a policy of this site")
        envelope.check_signature(env, certs.ca_public_key(ca_cert))
    except (CryptoError, Exception) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: signed site policy is invalid: {exc}") from exc
    return SitePolicy.from_json(env.body["policy"], where)


# -- enrollment requests -------------------------------------------------------

def make_request(key: nacl.signing.SigningKey, role: str, name: str) -> dict[str, Any]:
    if role not in ROLES:
        raise InputError(f"role must be one of {', '.join(ROLES)}")
    check_node_name(name)
    public_key = bytes(key.verify_key)
    body = {"public_key": public_key.hex(), "role": role, "name": name}
    proof = keys.sign(key, canonical.encode(body))
    return {"format": REQUEST_FORMAT, **body, "proof": proof.hex()}


def check_request(request: dict[str, Any]) -> tuple[bytes, str, str]:
    try:
        if request.get("format") != REQUEST_FORMAT:
            raise ValueError("not an enrollment request")
        public_key = bytes.fromhex(request["public_key"])
        role, name = request["role"], request["name"]
        proof = bytes.fromhex(request["proof"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"malformed enrollment request: {exc}") from exc
    if role not in ROLES:
        raise InputError(f"enrollment request has unknown role {role!r}")
    check_node_name(name)
    body = {"public_key": public_key.hex(), "role": role, "name": name}
    try:
        keys.verify(public_key, canonical.encode(body), proof)
    except CryptoError as exc:
        raise InputError("enrollment request is not signed by the key it names") from exc
    return public_key, role, name


def check_node_name(name: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 40 or not name.isprintable():
        raise InputError("node name must be 1 to 40 printable characters")
    return name
