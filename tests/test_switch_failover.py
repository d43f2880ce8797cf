"""A node and several switch instances (issue 16, part 3): the failover rules of
meshpos/uplink/instances.py with a fake clock, the transport that follows them (with a fake
exchange: the logic only), the policy field that lists the instances, and the CLI that sets it.
Real instances on a real PostgreSQL: tests/test_switch_failover_e2e.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from meshpos.domain.errors import ConfigError, UplinkError
from meshpos.domain.policy import SitePolicy
from meshpos.site.sitedir import init_site, load_site
from meshpos.uplink.client import Exchanged, NotSent, SwitchRefused
from meshpos.uplink.forwarder import HttpsTransport
from meshpos.uplink.instances import InstanceChooser, Verdict, instance_address, verdict
from meshpos.wire.forwarding import ForwardReply
from meshpos.wire.forwarding_codings import RESULTS_PATH

from helpers import run_cli

A, B, C = "https://a.example:8443", "https://b.example:8443", "https://c.example:8443"
URLS = (A, B, C)
KEY = "11" * 32


# -- the choice, with a fake clock -------------------------------------------------------------


def test_a_node_starts_at_the_first_instance_and_sticks_to_the_one_that_answers() -> None:
    ch = InstanceChooser()
    assert ch.first(URLS, 0.0) == A
    ch.answered(B)
    # B works: the node stays on it, though A (listed first) is not backing off
    assert ch.first(URLS, 0.0) == B and ch.first(URLS, 1000.0) == B
    # a policy whose list no longer holds the current instance: the first listed again
    assert ch.first((C, A), 0.0) == C


def test_moving_on_goes_in_list_order_after_the_failed_one_skipping_tried_and_backing_off() -> None:
    ch = InstanceChooser()
    ch.failed(A, 0.0)
    assert ch.next(URLS, A, {A}, 0.0) == B
    ch.failed(B, 0.0)
    assert ch.next(URLS, B, {A, B}, 0.0) == C
    # C failed too: nothing left for this request
    ch.failed(C, 0.0)
    assert ch.next(URLS, C, {A, B, C}, 0.0) is None
    # wrapping around: after C comes A (when A is neither tried nor backing off)
    ch2 = InstanceChooser()
    assert ch2.next(URLS, C, {C}, 0.0) == A
    # a backing-off instance is skipped even though this request did not try it
    ch2.failed(A, 0.0)
    assert ch2.next(URLS, C, {C}, 1.0) == B


def test_back_off_is_per_instance_doubles_and_resets_on_an_answer() -> None:
    ch = InstanceChooser()
    ch.failed(A, 0.0)  # 1st failure: 2 s
    assert ch.first(URLS, 1.9) == B
    assert ch.first(URLS, 2.0) == A  # its back-off ended, and A is still the current instance
    ch.failed(A, 2.0)  # 2nd in a row: 4 s
    assert ch.first(URLS, 5.9) == B and ch.first(URLS, 6.0) == A
    ch.failed(A, 6.0)  # 3rd: 8 s
    assert [s.retry_in_s for s in ch.states(URLS, 6.0)] == [8.0, 0.0, 0.0]
    assert ch.states(URLS, 6.0)[0].failures == 3
    ch.answered(A)
    ch.failed(A, 100.0)  # counted from one again
    assert ch.states(URLS, 100.0)[0].retry_in_s == 2.0
    # B's state is its own: it never failed
    assert ch.states(URLS, 100.0)[1].failures == 0
    # the cap: 120 s
    for _ in range(20):
        ch.failed(C, 0.0)
    assert ch.states(URLS, 0.0)[2].retry_in_s == 120.0


def test_when_every_instance_backs_off_a_request_starts_at_the_one_free_first() -> None:
    ch = InstanceChooser()
    ch.failed(A, 0.0)
    ch.failed(A, 0.0)  # A: 4 s
    ch.failed(B, 1.0)  # B: until 3 s
    ch.failed(C, 0.5)  # C: until 2.5 s
    assert ch.first(URLS, 1.0) == C
    ch2 = InstanceChooser()
    for url in URLS:
        ch2.failed(url, 0.0)  # all end together: list order from the current one
    assert ch2.first(URLS, 1.0) == A
    ch2.answered(B)
    for url in URLS:
        ch2.failed(url, 10.0)
    assert ch2.first(URLS, 11.0) == B


def test_which_failures_move_to_another_instance() -> None:
    assert verdict(NotSent("no route")) is Verdict.NEXT
    for status in (500, 502, 503, 504):
        assert verdict(SwitchRefused(status, "x")) is Verdict.NEXT, status
    for status in (400, 401, 403, 404, 405, 413, 415, 429):
        assert verdict(SwitchRefused(status, "x")) is Verdict.ANSWERED, status
    assert verdict(UplinkError("connection lost once sent")) is Verdict.FAILED


def test_instance_address_is_host_and_port() -> None:
    assert instance_address("https://sw-2.processor.example:8443") == "sw-2.processor.example:8443"
    assert instance_address(None) is None


# -- the transport that follows the rules (its exchange faked: the logic alone) ----------------


class Host:
    """What HttpsTransport reads of the node: its policy (the TLS context is never built here)."""

    def __init__(self, urls: tuple[str, ...]) -> None:
        self.policy = SitePolicy(site_id="s", name="n", switch_key=KEY, switch_url=urls[0],
                                 switch_more_urls=urls[1:])


class ScriptedTransport(HttpsTransport):
    """HttpsTransport with each instance's answer scripted: an exception to raise, or a reply."""

    def __init__(self, urls: tuple[str, ...], script: dict[str, list[Any]]) -> None:
        self.t = 0.0
        super().__init__(Host(urls), clock=lambda: self.t)  # type: ignore[arg-type]
        self._ctx = object()  # type: ignore[assignment]
        self._for = KEY
        self.script = script
        self.sent: list[tuple[str, str]] = []

    async def _send(self, url: str, ctx: Any, path: str, wire: bytes, gzip_body: bool) -> Exchanged:
        self.sent.append((url, path))
        answer = self.script[url].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return Exchanged(ForwardReply(), False, len(wire))


async def _forward(t: ScriptedTransport) -> Any:
    return await t.forward([])


def test_connection_error_and_5xx_go_on_to_the_next_instance_within_the_request() -> None:
    t = ScriptedTransport(URLS, {A: [NotSent("refused")], B: [SwitchRefused(503, "busy")], C: ["ok", "ok"]})
    trio.run(_forward, t)
    assert [u for u, _ in t.sent] == [A, B, C]
    assert t.instances.current == C
    # the next request sticks to C: A and B back off, and C works
    trio.run(_forward, t)
    assert [u for u, _ in t.sent] == [A, B, C, C]


def test_a_4xx_refusal_does_not_fail_over_nor_count_against_the_instance() -> None:
    t = ScriptedTransport(URLS, {A: [SwitchRefused(403, "revoked"), "ok"], B: ["ok"], C: ["ok"]})
    with pytest.raises(SwitchRefused) as got:
        trio.run(_forward, t)
    assert got.value.status == 403
    assert t.sent == [(A, "/v1/forward")]  # B and C never asked: they would say the same
    assert t.instances.states(URLS, 0.0)[0].failures == 0
    trio.run(_forward, t)
    assert [u for u, _ in t.sent] == [A, A]


def test_an_exchange_broken_after_sending_is_not_resent_but_the_lookup_goes_to_the_next_instance() -> None:
    t = ScriptedTransport(URLS, {A: [UplinkError("connection lost")], B: ["ok"], C: []})
    with pytest.raises(UplinkError):
        trio.run(_forward, t)
    assert t.sent == [(A, "/v1/forward")]  # not re-sent elsewhere by the transport

    async def lookup() -> None:
        await t.results(["t-00000001"])
    trio.run(lookup)  # the forwarder's next request: what the switch knows of the batch
    assert t.sent[-1] == (B, RESULTS_PATH)  # another instance answers: one shared database
    assert t.instances.current == B


def test_every_instance_failing_raises_the_last_error_and_the_next_request_starts_at_the_first_free() -> None:
    t = ScriptedTransport(URLS, {A: [NotSent("a"), "ok"], B: [NotSent("b")], C: [SwitchRefused(502, "c")]})
    with pytest.raises(SwitchRefused) as got:
        trio.run(_forward, t)
    assert got.value.status == 502
    assert [u for u, _ in t.sent] == [A, B, C]
    t.t = 2.0  # each backs off 2 s from its failure at t=0: all free now; the current one (A) first
    trio.run(_forward, t)
    assert t.sent[-1][0] == A


class ScriptedProbe(ScriptedTransport):
    async def _health_of(self, url: str, ctx: Any, timeout: float) -> dict[str, Any]:
        self.sent.append((url, "/v1/health"))
        answer = self.script[url].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return {"ok": True}


def test_the_probe_moves_on_after_any_failure_but_a_4xx() -> None:
    t = ScriptedProbe(URLS, {A: [NotSent("down")], B: [UplinkError("connection lost")], C: ["ok"]})
    assert trio.run(t.health) == (C, {"ok": True})
    assert t.instances.current == C  # the probe moved the node off the dead instances
    t2 = ScriptedProbe(URLS, {A: [SwitchRefused(403, "revoked")], B: ["ok"], C: ["ok"]})
    assert trio.run(t2.health) is None  # not accepted: no uplink, and B and C are not asked
    assert [u for u, _ in t2.sent] == [A]
    t3 = ScriptedProbe(URLS, {A: [NotSent("a")], B: [SwitchRefused(503, "b")], C: [NotSent("c")]})
    assert trio.run(t3.health) is None and [u for u, _ in t3.sent] == [A, B, C]


def test_a_static_switch_url_overrides_the_policys_instances() -> None:
    t = ScriptedTransport(URLS, {C: ["ok"]})
    t.switch_url = C
    trio.run(_forward, t)
    assert t.sent == [(C, "/v1/forward")]


# -- the policy field -------------------------------------------------------------------------


def policy(**kw: Any) -> SitePolicy:
    return SitePolicy(site_id="s", name="n", switch_key=KEY, **kw)


def test_a_one_instance_policy_encodes_exactly_as_before_and_older_ones_decode() -> None:
    one = policy(switch_url=A)
    assert "switch_more_urls" not in one.to_json()  # an older node or switch decodes it as before
    assert one.switch_urls == (A,)
    old = {k: v for k, v in one.to_json().items()}
    assert SitePolicy.from_json(old, "p") == one
    assert policy().switch_urls == ()


def test_a_policy_lists_every_instance_and_round_trips() -> None:
    more = policy(switch_url=A, switch_more_urls=(B, C))
    data = json.loads(json.dumps(more.to_json()))
    assert data["switch_url"] == A and data["switch_more_urls"] == [B, C]
    back = SitePolicy.from_json(data, "p")
    assert back == more and back.switch_urls == URLS


@pytest.mark.parametrize("bad, message", [
    ({"switch_more_urls": [B]}, "needs switch_url"),
    ({"switch_url": A, "switch_more_urls": [A]}, "listed twice"),
    ({"switch_url": A, "switch_more_urls": [B, B]}, "listed twice"),
    ({"switch_url": A, "switch_more_urls": ["http://b:1"]}, "https://"),
    ({"switch_url": A, "switch_more_urls": "https://b:1"}, "list of URLs"),
    ({"switch_url": A, "switch_more_urls": [7]}, "list of URLs"),
    ({"switch_url": A, "switch_more_urls": [f"https://h{i}:1" for i in range(16)]}, "at most 16"),
])
def test_a_policy_with_a_bad_instance_list_is_refused(bad: dict[str, Any], message: str) -> None:
    data = {**policy().to_json(), **bad}
    with pytest.raises(ConfigError, match=message):
        SitePolicy.from_json(data, "p")


def test_an_older_decoder_refuses_the_new_field_and_nothing_else() -> None:
    """What a node or switch from before this field does (its from_json refuses unknown fields):
    a one-instance policy passes, a several-instance one is refused, which is why the field is
    written only when the policy lists more than one instance (protocols/files.md)."""
    older = {f for f in SitePolicy.__dataclass_fields__ if f != "switch_more_urls"}
    assert set(policy(switch_url=A).to_json()) <= older
    assert set(policy(switch_url=A, switch_more_urls=(B,)).to_json()) - older == {"switch_more_urls"}


# -- the CLI -------------------------------------------------------------------------------------


def meshpos(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


def test_site_init_and_set_switch_take_the_option_repeated(tmp_path: Path) -> None:
    key = tmp_path / "switch.pub"
    key.write_text(KEY + "\n")
    site_dir = tmp_path / "site"
    done = meshpos("site", "init", str(site_dir), "--name", "Fiera", "--switch-key", str(key),
                   "--switch-url", A, "--switch-url", B + "/", "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)["policy"]
    assert shown["switch_url"] == A and shown["switch_more_urls"] == [B]
    assert load_site(site_dir).policy.switch_urls == (A, B)

    done = meshpos("site", "set-switch", str(site_dir), "--switch-key", str(key),
                   "--switch-url", C, "--switch-url", A, "--switch-url", B)
    assert done.returncode == 0, done.stderr
    assert f"switch {C}, {A}, {B}" in done.stdout
    assert load_site(site_dir).policy.switch_urls == (C, A, B)
    # back to one instance: the list field leaves the policy (older nodes read it again)
    assert meshpos("site", "set-switch", str(site_dir), "--switch-key", str(key), "--switch-url", B).returncode == 0
    site = load_site(site_dir)
    assert site.policy.switch_urls == (B,) and "switch_more_urls" not in site.policy.to_json()


def test_a_url_given_twice_is_a_clear_error_and_leaves_no_site(tmp_path: Path) -> None:
    done = meshpos("site", "init", str(tmp_path / "site"), "--name", "F", "--switch-url", A, "--switch-url", A)
    assert done.returncode != 0 and "given twice" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "site").exists()
    site = init_site(tmp_path / "s2", "F", switch_key=KEY, switch_url=A)
    done = meshpos("site", "set-switch", str(site.path), "--switch-key", str(tmp_path / "nokey"),
                   "--switch-url", "http://plain:80")
    assert done.returncode != 0 and "Traceback" not in done.stderr


def test_help_explains_the_repeated_option() -> None:
    for command in (["site", "init"], ["site", "set-switch"]):
        text = " ".join(meshpos(*command, "--help").stdout.split())
        assert "repeat it for every instance" in text and "connection errors or 5xx" in text, command
    assert "the list replaces the previous one" in " ".join(meshpos("site", "set-switch", "--help").stdout.split())
