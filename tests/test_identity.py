"""Site CA, enrollment (real flow and shortcut), certificate checks, revocation."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from meshpos.wire import envelope, pin
from meshpos.infra.clock import FakeClock
from meshpos.domain.errors import ConfigError, InputError, VerificationError
from meshpos.identity import certs, keys
from meshpos.node.core import NodeCore
from meshpos.node.enroll import create_request, install_answer
from meshpos.site.nodedir import NodeDir
from meshpos.site.sitedir import Site, init_site, load_site


def test_site_init_writes_ca_and_signed_policy(site: Site) -> None:
    assert stat.S_IMODE((site.path / "ca.key").stat().st_mode) == 0o600
    loaded = load_site(site.path)
    assert loaded.site_id == site.site_id == certs.site_id_of(loaded.ca_cert)
    assert loaded.policy.currency == "EUR" and loaded.policy.offline_window_s == 24 * 3600


def test_real_enrollment_flow_keeps_the_key_on_the_device(tmp_path: Path, site: Site) -> None:
    node = tmp_path / "t1"
    request = create_request(node, "terminal", "Stall 1", listen="127.0.0.1:7001", peers=["127.0.0.1:7002"])
    assert "private" not in str(request) and bytes(NodeDir(node).key()._signing_key).hex() not in str(request)
    answer = site.sign_request(request)
    cfg = install_answer(node, answer)
    assert cfg.role == "terminal" and cfg.name == "Stall 1" and cfg.peers == ["127.0.0.1:7002"]
    assert stat.S_IMODE((node / "node.key").stat().st_mode) == 0o600
    ident = certs.verify_node_cert(NodeDir(node).cert(), site.ca_cert, now_ms=FakeClock().now_ms())
    assert ident.node_id == cfg.node_id == keys.node_id_of(bytes(NodeDir(node).key().verify_key))
    assert ident.role == "terminal" and ident.site_id == site.site_id
    assert [n["node_id"] for n in site.enrolled()] == [cfg.node_id]


def test_forged_request_is_refused(tmp_path: Path, site: Site) -> None:
    request = create_request(tmp_path / "t1", "terminal", "Stall 1")
    request["role"] = "gateway"
    with pytest.raises(InputError, match="not signed"):
        site.sign_request(request)


def test_answer_for_another_key_is_refused(tmp_path: Path, site: Site) -> None:
    create_request(tmp_path / "a", "terminal", "A")
    answer_b = site.sign_request(create_request(tmp_path / "b", "terminal", "B"))
    with pytest.raises(InputError, match="another key"):
        install_answer(tmp_path / "a", answer_b)


def test_certificate_checks(tmp_path: Path, site: Site) -> None:
    now = FakeClock().now_ms()
    other = init_site(tmp_path / "other", "Other fair")
    key = keys.generate()
    cert = certs.issue(site.ca_cert, site.ca_key, bytes(key.verify_key), "terminal", "T", now, 1)
    assert certs.verify_node_cert(cert, site.ca_cert, now).role == "terminal"
    with pytest.raises(VerificationError, match="another site|not issued"):
        certs.verify_node_cert(cert, other.ca_cert, now)
    with pytest.raises(VerificationError, match="expired"):
        certs.verify_node_cert(cert, site.ca_cert, now + 2 * 86_400_000)
    with pytest.raises(VerificationError, match="revoked"):
        certs.verify_node_cert(cert, site.ca_cert, now, revoked={keys.node_id_of(bytes(key.verify_key))})
    with pytest.raises(VerificationError, match="may not"):
        certs.verify_node_cert(cert, site.ca_cert, now, roles={"gateway"})
    forged = certs.issue(other.ca_cert, other.ca_key, bytes(key.verify_key), "terminal", "T", now, 1)
    with pytest.raises(VerificationError):
        certs.verify_node_cert(forged, site.ca_cert, now)


def test_revocation_is_a_signed_entry_that_stops_the_node(make_node, open_node, site: Site,
                                                          clock: FakeClock) -> None:
    t1, t2 = open_node(make_node("t1")), open_node(make_node("t2"))
    before = t2.sell(400)
    raw = site.revoke(t2.node_id, "stolen", clock)  # no sequence cut: what is dated up to now stays
    env = envelope.decode(raw)
    assert env.type == "revocation" and env.signer == site.site_id
    clock.advance(1)  # after the revocation's time: its cut (protocols/rules.md) keeps what came up to it
    sale = t2.sell(500)
    t1.ingest(t2.ledger.raw(f"cert/{t2.node_id}"), "test")
    t1.ingest(raw, "organizer")
    assert t2.node_id in t1.roster.revoked
    t1.ingest(t2.ledger.raw(f"sale/{before['id']}"), "peer")  # before the cut: valid, nothing honest lost
    assert t1.sale(before["id"])["status"] == "paid"  # a cash sale, kept
    with pytest.raises(VerificationError, match="revoked"):
        t1.ingest(t2.ledger.raw(f"sale/{sale['id']}"), "peer")


def test_node_dir_of_another_site_is_refused(tmp_path: Path, make_node, site: Site) -> None:
    node = make_node("t1")
    other = init_site(tmp_path / "other", "Other fair")
    (node / "policy.env").write_bytes(other.policy_envelope())
    with pytest.raises(ConfigError):
        NodeCore.open(node)


def test_a_private_key_readable_by_others_is_refused(make_node) -> None:
    node = make_node("t1")
    (node / "node.key").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        NodeCore.open(node)


def test_a_ca_signed_certificate_with_a_key_of_unknown_type_is_a_verification_error(
        site: Site) -> None:
    """cryptography reads a certificate's key only in ``public_key()``, and raises
    UnsupportedAlgorithm (neither a ValueError nor a VerificationError) for a key type it does not
    know. Signed by the site CA, such a certificate gets past the signature check, so before the
    fix it escaped verify_node_cert: out of a cert entry's check (a traceback per entry in the
    ledger's catch-all), a TLS handshake's check, and the switch's check of a forwarder."""
    now = FakeClock().now_ms()
    cert = certs.issue(site.ca_cert, site.ca_key, bytes(keys.generate().verify_key), "terminal", "T", now, 1)
    tbs = cert.tbs_certificate_bytes
    ed25519 = bytes.fromhex("06032b6570")  # OID 1.3.101.112: the TBS's signature algorithm, then the key's
    at = tbs.rindex(ed25519)
    assert tbs.index(ed25519) < at
    odd_tbs = tbs[:at] + bytes.fromhex("06032b657f") + tbs[at + len(ed25519):]  # 1.3.101.127: unknown
    der = certs.to_der(cert).replace(tbs, odd_tbs).replace(cert.signature, site.ca_key.sign(odd_tbs).signature)
    odd = certs.load_der(der)
    with pytest.raises(VerificationError, match="does not parse.*1.3.101.127"):
        certs.verify_node_cert(odd, site.ca_cert, now)
    with pytest.raises(VerificationError, match="no usable certificate"):
        pin.certificate_key(der)
