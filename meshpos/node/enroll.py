"""Enrollment, device side: make a key and a request, install the organizer's answer.

Real flow:  ``enroll request NODE_DIR``  ->  request file carried to the organizer
            ``enroll sign SITE_DIR REQUEST`` -> answer file carried back
            ``enroll install NODE_DIR ANSWER``
Demo shortcut: ``enroll SITE_DIR NODE_DIR`` does all three on one machine.
The private key is created inside NODE_DIR (0600) and never leaves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshpos.domain.errors import ConfigError, CryptoError, InputError
from meshpos.domain.hostport import parse_hostport
from meshpos.identity import certs, keyfile, keys
from meshpos.infra.jsonfile import read_json, write_json
from meshpos.infra.clock import SYSTEM_CLOCK, Clock
from meshpos.site.sitedir import ANSWER_FORMAT, Site, make_request, verify_policy_envelope
from meshpos.site.apitoken import ensure_api_token
from meshpos.site.nodedir import NodeConfig, NodeDir

PENDING = "enroll-pending.json"


def create_request(node_dir: Path, role: str, name: str, listen: str | None = None,
                   peers: list[str] | None = None, uplink: bool = False, language: str = "en",
                   dashboard: str | None = None, api: str | None = None) -> dict[str, Any]:
    if listen:
        parse_hostport(listen, "--listen")
    if dashboard:
        parse_hostport(dashboard, "--dashboard")
    if api:
        parse_hostport(api, "--api")
    for peer in peers or []:
        parse_hostport(peer, "--peer")
    nd = NodeDir(node_dir)
    if nd.config_path.exists():
        raise ConfigError(f"{node_dir}: this node is enrolled already")
    if not node_dir.exists():
        node_dir.parent.mkdir(parents=True, exist_ok=True)
        node_dir.mkdir(mode=0o700)
        node_dir.chmod(0o700)  # mkdir's mode is filtered by the umask
    elif not node_dir.is_dir():
        raise ConfigError(f"{node_dir}: exists and is not a directory")
    # An existing directory keeps its mode: it may be shared (a mount, a home); node.key is 0600 anyway.
    if nd.key_path.exists():
        key = nd.key()
    else:
        key = keys.generate()
        keyfile.write_private_key(nd.key_path, key)
    request = make_request(key, role, name)
    pending: dict[str, Any] = {"listen": listen, "peers": peers or [], "uplink": uplink, "language": language}
    if dashboard:
        pending["dashboard"] = dashboard
    if api:
        pending["api"] = api
    write_json(node_dir / PENDING, pending)
    return request


def install_answer(node_dir: Path, answer: dict[str, Any]) -> NodeConfig:
    nd = NodeDir(node_dir)
    if answer.get("format") != ANSWER_FORMAT:
        raise InputError("not an enrollment answer")
    if not nd.key_path.exists():
        raise ConfigError(f"{node_dir}: no key here: run `meshpos enroll request` in this directory first")
    key = nd.key()
    try:
        ca = certs.load_pem(answer["ca"].encode(), "answer CA")
        cert = certs.load_pem(answer["cert"].encode(), "answer certificate")
        policy_raw = answer["policy"].encode()
        revocations = [r.encode() for r in answer.get("revocations", [])]
    except (KeyError, AttributeError, CryptoError) as exc:
        raise InputError(f"malformed enrollment answer: {exc}") from exc
    ident = certs.verify_node_cert(cert, ca, now_ms=None)
    if ident.public_key != bytes(key.verify_key):
        raise InputError("the answer's certificate is for another key (wrong node directory?)")
    policy = verify_policy_envelope(policy_raw, ca, "answer policy")
    pending_path = node_dir / PENDING
    pending = read_json(pending_path, "pending enrollment") if pending_path.exists() else {}
    (node_dir / "ca.pem").write_bytes(certs.to_pem(ca))
    (node_dir / "node.pem").write_bytes(certs.to_pem(cert))
    (node_dir / "policy.env").write_bytes(policy_raw)
    if revocations:
        nd.inbox.mkdir(exist_ok=True)
        for i, raw in enumerate(revocations):
            (nd.inbox / f"revocation-{i}.env").write_bytes(raw)
    cfg = NodeConfig(name=ident.name, role=ident.role, node_id=ident.node_id, site_id=policy.site_id,
                     listen=pending.get("listen"), peers=list(pending.get("peers", [])),
                     uplink=bool(pending.get("uplink", False)), language=pending.get("language", "en"),
                     dashboard=pending.get("dashboard"), api=pending.get("api"))
    dashboard = answer.get("dashboard_hash")
    if cfg.dashboard and isinstance(dashboard, str) and dashboard:
        nd.save_dashboard_hash(dashboard)  # the gateway that serves the dashboard, and no other node, keeps it
    nd.save_config(cfg)
    ensure_api_token(nd.api_token_path)
    pending_path.unlink(missing_ok=True)
    return cfg


def enroll_one_step(site: Site, node_dir: Path, role: str, name: str, listen: str | None = None,
                    peers: list[str] | None = None, uplink: bool = False, language: str = "en",
                    valid_days: int = 90, dashboard: str | None = None, api: str | None = None,
                    clock: Clock = SYSTEM_CLOCK) -> NodeConfig:
    request = create_request(node_dir, role, name, listen, peers, uplink, language, dashboard, api)
    return install_answer(node_dir, site.sign_request(request, clock, valid_days=valid_days))
