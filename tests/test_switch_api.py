"""The forwarding API against protocols/vectors/forwarding.json, the switch directory and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio

from meshpos.wire import envelope
from meshpos.domain.errors import ConfigError, EncodingError, InputError
from meshpos.identity import keys
from meshpos.site.sitedir import Site, init_site
from meshpos.wire import forwarding as api
from meshpos.cli.switch_cmd import main_switch
from meshpos.switch.processor import decline_reason, rrn_of, stan_of, terminal_id_of
from meshpos.switch.switchdir import SwitchDir, add_site, init_switch
from meshpos.wire.pin import certificate_key, check_pin
from meshpos.identity.certs import load_pem, to_der
from meshpos.uplink.client import make_client_context, probe
from meshpos.uplink.leases import scope_of

# every switch these tests make runs on each backend in turn (tests/pg.py)
pytestmark = pytest.mark.usefixtures("switch_backend_env")

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "protocols" / "vectors" / "forwarding.json").read_text(encoding="utf-8"))


def test_switch_key_vectors() -> None:
    v = VECTORS["switch_key"]
    key = nacl.signing.SigningKey(bytes.fromhex(v["ed25519_seed_hex"]))
    assert bytes(key.verify_key).hex() == v["ed25519_public_hex"]
    assert keys.x25519_public_of(key).hex() == v["x25519_public_hex"]
    x = bytes.fromhex(v["x25519_public_hex"])
    assert [c.hex() for c in keys.montgomery_to_edwards_candidates(x)] == v["pin_candidates_hex"]
    assert v["ed25519_public_hex"] in v["pin_candidates_hex"]


def test_result_vectors_sign_and_verify_by_the_pinned_key() -> None:
    key = nacl.signing.SigningKey(bytes.fromhex(VECTORS["switch_key"]["ed25519_seed_hex"]))
    x = bytes.fromhex(VECTORS["switch_key"]["x25519_public_hex"])
    for case in VECTORS["results"]:
        raw = case["envelope"].encode()
        assert envelope.seal("result", "switch", case["body"], key) == raw
        env = envelope.decode(raw)
        envelope.check_schema(env)
        keys.verify_by_x25519(x, env.signed_bytes(), env.sig)
    assert VECTORS["results"][1]["body"]["reason"] == decline_reason("51")


def test_request_and_reply_vectors() -> None:
    req = VECTORS["request"]
    entries = [e.encode() for e in req["entries"]]
    assert api.encode_request(entries) == req["body"].encode()
    assert api.decode_request(req["body"].encode()) == entries
    rep = VECTORS["reply"]
    reply = api.decode_reply(rep["body"].encode())
    assert [r.decode() for r in reply.results] == rep["results"]
    assert [p.to_json() for p in reply.pending] == rep["pending"]
    assert [r.to_json() for r in reply.refused] == rep["refused"]
    assert list(reply.reversed) == rep["reversed"]
    assert api.encode_reply(reply) == rep["body"].encode()
    for bad in VECTORS["bad_requests"]:
        with pytest.raises(EncodingError, match=bad["error"]):
            api.decode_request(bad["body"].encode())


def test_acquirer_field_and_scope_vectors() -> None:
    for case in VECTORS["acquirer_fields"]:
        assert (rrn_of(case["ref"]), stan_of(case["ref"])) == (case["rrn"], case["stan"])
    for case in VECTORS["terminal_ids"]:
        assert terminal_id_of(case["node_id"]) == case["field_41"]
    for case in VECTORS["lease_scopes"]:
        assert scope_of(case["sale_id"], case["buckets"]) == case["scope"]


# -- the switch directory ------------------------------------------------------------------


def test_init_writes_key_pub_and_a_certificate_of_the_same_key(tmp_path: Path) -> None:
    sd = init_switch(tmp_path / "sw", "127.0.0.1:8443", "127.0.0.1:8583")
    assert sd.key_path.stat().st_mode & 0o777 == 0o600
    pub = sd.pub_path.read_text()
    assert len(pub) == 65 and pub.endswith("\n") and bytes.fromhex(pub.strip())
    key = sd.key()
    assert pub.strip() == keys.x25519_public_of(key).hex()
    der = to_der(load_pem(sd.tls_path.read_bytes(), "tls"))
    assert certificate_key(der) == bytes(key.verify_key)
    check_pin(der, bytes.fromhex(pub.strip()))
    with pytest.raises(ConfigError, match="not empty"):
        init_switch(tmp_path / "sw", "127.0.0.1:8443", "127.0.0.1:8583")


def test_add_site_checks_the_policy_names_this_switch(tmp_path: Path, site: Site,
                                                      switch_key: nacl.signing.SigningKey) -> None:
    init_switch(tmp_path / "sw", "127.0.0.1:0", "127.0.0.1:1", key=switch_key)
    row = add_site(tmp_path / "sw", site.path)
    assert row.site_id == site.site_id and len(row.merchant_id) == 15
    other = init_site(tmp_path / "elsewhere", "Other", switch_key=keys.x25519_public_of(keys.generate()).hex())
    with pytest.raises(ConfigError, match="not this switch"):
        add_site(tmp_path / "sw", other.path)
    nokey = init_site(tmp_path / "nokey", "No switch")
    with pytest.raises(ConfigError, match="names no switch key"):
        add_site(tmp_path / "sw", nokey.path)
    # field 42 is exactly 15 characters: one more (a newline an anchored pattern let through) would
    # fail every sale of the site at the acquirer, so add-site refuses it
    for merchant in ("MERCHANT0000001\n", "MERCHANT000001", "MERCHANT00000Ü1"):
        with pytest.raises(InputError, match="exactly 15"):
            add_site(tmp_path / "sw", site.path, merchant_id=merchant)


def test_cli_init_add_site_status_and_help(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main_switch(["--help"])
    assert exc.value.code == 0 and "add-site" in capsys.readouterr().out
    sw = tmp_path / "sw"
    assert main_switch(["init", str(sw), "--listen", "127.0.0.1:0", "--acquirer", "127.0.0.1:1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    site = init_site(tmp_path / "site", "Fiera", switch_key=out["switch_key"])
    assert main_switch(["add-site", str(sw), str(site.path)]) == 0
    capsys.readouterr()
    assert main_switch(["status", str(sw), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["sites"][0]["site_id"] == site.site_id and status["sales"]["settled"] == 0
    assert main_switch(["init", str(sw), "--listen", "nope", "--acquirer", "127.0.0.1:1"]) == 4
    assert "HOST:PORT" in capsys.readouterr().err


async def test_cli_run_serves_until_sigterm(tmp_path: Path, site: Site, switch_key: nacl.signing.SigningKey,
                                            make_node: Any) -> None:
    sw = tmp_path / "sw"
    init_switch(sw, "127.0.0.1:0", "127.0.0.1:1", key=switch_key)
    add_site(sw, site.path)
    node = make_node("t")
    proc = subprocess.Popen([sys.executable, "-m", "meshpos.cli.switch_cmd", "run", str(sw)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = await trio.to_thread.run_sync(proc.stdout.readline)  # type: ignore[union-attr]
        port = int(line.split("port ")[1].split()[0])
        assert await probe(f"https://127.0.0.1:{port}", make_client_context(node))
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert SwitchDir(sw).open_store().count_states()["settled"] == 0
