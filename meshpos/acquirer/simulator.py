"""The acquirer host simulator: ISO 8583 over TCP, or the JSON adapter over HTTP(S).

Answers by rules from a JSON file (devices/acquirer-rules.example.json), counts
every message it receives per sale and in total, and can write those counts as
JSON after every message (atomically) for another process to read. It never
writes a full PAN anywhere: logs carry the masked PAN.

Rule order for one message: a card rule's ``close_first`` / ``drop_first`` (the
first N messages for that sale), then ``close_rate`` / ``drop_rate`` (seeded),
then the response code: the first card rule whose prefix matches, else
``decline_above``, else approved. Reversals are always approved. A dropped
message was booked (its answer is lost); a closed one was not.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import random
import ssl
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import trio

from meshpos.infra.durable import write_atomically
from meshpos.domain.errors import ConfigError, EncodingError, InputError, ProtocolError
from meshpos.infra.http import AbortConnection, Request, Response, json_response, listener_port, serve_http
from meshpos.wire.acquirer import RESPONSE_CODE
from meshpos.wire.cards import mask
from meshpos.wire.iso8583 import DEFAULT_SPEC, MAX_FRAME, NEED_DATA, LengthHeader, RequestKind, ServerConnection, Spec
from meshpos.acquirer.json_https import ADVICES_PATH, REVERSALS_PATH, request_from_json, request_to_json

log = logging.getLogger(__name__)

APPROVED = "00"


@dataclass(frozen=True)
class CardRule:
    prefix: str
    response_code: str = APPROVED
    delay_ms: int | None = None
    drop_first: int = 0
    close_first: int = 0


@dataclass(frozen=True)
class SimRules:
    seed: int = 0
    delay_ms: int = 0
    drop_rate: float = 0.0
    close_rate: float = 0.0
    decline_above_minor: int | None = None
    decline_above_code: str = "61"
    cards: tuple[CardRule, ...] = ()

    @classmethod
    def from_json(cls, value: Any) -> SimRules:
        try:
            if not isinstance(value, dict):
                raise TypeError("not an object")
            above = value.get("decline_above") or {}
            cards = tuple(
                CardRule(
                    prefix=_digits(c["prefix"]),
                    response_code=_code(c.get("response_code", APPROVED)),
                    delay_ms=_nonneg(c["delay_ms"]) if c.get("delay_ms") is not None else None,
                    drop_first=_nonneg(c.get("drop_first", 0)),
                    close_first=_nonneg(c.get("close_first", 0)),
                )
                for c in value.get("cards", [])
            )
            return cls(
                seed=int(value.get("seed", 0)),
                delay_ms=_nonneg(value.get("delay_ms", 0)),
                drop_rate=_rate(value.get("drop_rate", 0.0)),
                close_rate=_rate(value.get("close_rate", 0.0)),
                decline_above_minor=_nonneg(above["amount_minor"]) if "amount_minor" in above else None,
                decline_above_code=_code(above.get("response_code", "61")),
                cards=cards,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"acquirer simulator rules are malformed: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> SimRules:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read rules file {path}: {exc.strerror}") from exc
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ConfigError(f"rules file {path} is not JSON: {exc}") from exc
        return cls.from_json(value)


def _digits(value: Any) -> str:
    if not isinstance(value, str) or not value.isascii() or not value.isdigit():
        raise ValueError("card prefix must be a string of digits")
    return value


def _code(value: Any) -> str:
    if not isinstance(value, str) or not RESPONSE_CODE.fullmatch(value):
        raise ValueError("response code must be 2 letters or digits")
    return value


def _nonneg(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("counts, delays and amounts must be non-negative integers")
    return value


def _rate(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError("rates must be numbers from 0 to 1")
    return float(value)


class Action(Enum):
    ANSWER = "answer"
    DROP = "drop"
    CLOSE = "close"


@dataclass(frozen=True)
class Decision:
    action: Action
    response_code: str
    auth_code: str | None
    delay_ms: int


class Decider:
    """The rules applied to one message; randomness from the rules' seed."""

    def __init__(self, rules: SimRules) -> None:
        self.rules = rules
        self._rng = random.Random(rules.seed)
        self._seen: Counter[str] = Counter()

    def decide(self, *, sale: str, pan: str, amount_minor: int, reversal: bool) -> Decision:
        rules = self.rules
        self._seen[sale] += 1
        n = self._seen[sale]
        card = next((c for c in rules.cards if pan.startswith(c.prefix)), None)
        delay = card.delay_ms if card is not None and card.delay_ms is not None else rules.delay_ms
        close_draw, drop_draw = self._rng.random(), self._rng.random()  # always both: stable sequences
        if card is not None and n <= card.close_first:
            return Decision(Action.CLOSE, "", None, delay)
        if card is not None and n <= card.close_first + card.drop_first:
            action = Action.DROP
        elif close_draw < rules.close_rate:
            return Decision(Action.CLOSE, "", None, delay)
        elif drop_draw < rules.drop_rate:
            action = Action.DROP
        else:
            action = Action.ANSWER
        if reversal:
            code = APPROVED
        elif card is not None and card.response_code != APPROVED:
            code = card.response_code
        elif rules.decline_above_minor is not None and amount_minor > rules.decline_above_minor:
            code = rules.decline_above_code
        else:
            code = APPROVED
        auth = auth_code(rules.seed, sale, amount_minor) if code == APPROVED and not reversal else None
        return Decision(action, code, auth, delay)


def auth_code(seed: int, sale: str, amount_minor: int) -> str:
    """Deterministic 6-character approval code: the same sale always gets the same one."""
    return hashlib.sha256(f"{seed}|{sale}|{amount_minor}".encode()).hexdigest()[:6].upper()


class SimulatorStats:
    """What the simulator received: per sale (RRN, or idempotency key for JSON) and in total."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self.by_sale: dict[str, Counter[str]] = {}
        self.charged: set[str] = set()
        self.reversed: set[str] = set()

    def count(self, sale: str, kind: str) -> None:
        self.totals[kind] += 1
        self.by_sale.setdefault(sale, Counter())[kind] += 1

    def of(self, sale: str, kind: str) -> int:
        return self.by_sale.get(sale, Counter())[kind]

    def book(self, sale: str, decision: Decision, *, reversal: bool) -> None:
        if decision.action is Action.CLOSE:
            self.totals["closed"] += 1
            return
        if decision.action is Action.DROP:
            self.totals["dropped"] += 1
        if reversal:
            if sale in self.charged:
                self.reversed.add(sale)
        elif decision.response_code == APPROVED:
            self.charged.add(sale)
            self.totals["approved"] += 1
        else:
            self.totals["declined"] += 1

    def snapshot(self) -> dict[str, Any]:
        totals = dict(self.totals)
        totals["charged"] = len(self.charged)
        totals["reversed"] = len(self.reversed)
        return {
            "totals": totals,
            "by_sale": {sale: dict(c) for sale, c in self.by_sale.items()},
            "charged": sorted(self.charged),
            "reversed": sorted(self.reversed),
        }


def write_json_atomically(path: Path, value: Any) -> None:
    """The simulator's figures: atomic (a reader never sees half), not fsynced (rewritten often)."""
    write_atomically(path, json.dumps(value, sort_keys=True, indent=1).encode("utf-8"), durable=False)


class _StatsFile:
    """Writes the stats after every message; concurrent messages share one write."""

    def __init__(self, path: Path | None, stats: SimulatorStats) -> None:
        self._path = path
        self._stats = stats
        self._version = 0
        self._written = 0
        self._lock = trio.Lock()

    def changed(self) -> None:
        self._version += 1

    async def sync(self) -> None:
        if self._path is None:
            return
        target = self._version
        async with self._lock:
            if self._written >= target:
                return
            version, snapshot = self._version, self._stats.snapshot()
            try:
                await trio.to_thread.run_sync(write_json_atomically, self._path, snapshot)
            except OSError as exc:
                log.warning("cannot write simulator stats to %s: %s", self._path, exc)
            self._written = version


class _AnswerQueue:
    """A connection's answers not sent yet, by due time (trio clock), in arrival order within
    one time."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Action, bytes]] = []
        self._seq = 0
        self._changed = trio.Event()

    def put(self, due: float, action: Action, data: bytes) -> None:
        heapq.heappush(self._heap, (due, self._seq, action, data))
        self._seq += 1
        self._changed.set()

    async def wait_due(self) -> None:
        """Return once the earliest answer is due (wait for one to be queued first)."""
        while True:
            if not self._heap:
                await self._changed.wait()
            self._changed = trio.Event()
            if not self._heap:
                continue
            with trio.move_on_at(self._heap[0][0]):
                await self._changed.wait()  # an earlier one may be queued meanwhile
                continue
            return

    def take_due(self, now: float) -> tuple[bytes, bool]:
        """The bytes of the answers due by ``now`` in order, and whether a CLOSE is among them
        (then what was due after it stays unsent)."""
        out = bytearray()
        while self._heap and self._heap[0][0] <= now:
            _, _, action, data = heapq.heappop(self._heap)
            if action is Action.CLOSE:
                return bytes(out), True
            out += data
        return bytes(out), False


class Simulator:
    """The running simulator: where it listens and what it has counted."""

    def __init__(self, rules: SimRules, stats_path: Path | None, host: str) -> None:
        self.decider = Decider(rules)
        self.stats = SimulatorStats()
        self.host = host
        self.port = 0
        self._file = _StatsFile(stats_path, self.stats)
        self._answers: dict[tuple[str, str], tuple[str, Response]] = {}
        self._inflight: dict[tuple[str, str], trio.Event] = {}

    # --- ISO 8583 --------------------------------------------------------

    async def serve_iso_connection(self, stream: trio.abc.Stream, header: LengthHeader, spec: Spec) -> None:
        proto = ServerConnection(header=header, spec=spec, max_frame=MAX_FRAME)
        answers = _AnswerQueue()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_answers, stream, answers, nursery.cancel_scope)
                while True:
                    try:
                        chunk = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    if not chunk:
                        break
                    proto.receive_data(chunk)
                    while True:
                        try:
                            event = proto.next_event()
                        except (EncodingError, ProtocolError) as exc:
                            log.warning("closing an acquirer connection on garbage: %s", exc)
                            self.stats.totals["garbage"] += 1
                            self._file.changed()
                            await self._file.sync()
                            nursery.cancel_scope.cancel()
                            return
                        if event is NEED_DATA:
                            break
                        sale = event.key.rrn
                        reversal = event.kind is RequestKind.REVERSAL
                        self.stats.count(sale, event.kind.mti)
                        decision = self.decider.decide(
                            sale=sale, pan=event.pan, amount_minor=event.amount_minor, reversal=reversal
                        )
                        self.stats.book(sale, decision, reversal=reversal)
                        self._file.changed()
                        log.info(
                            "%s rrn %s card %s amount %d -> %s %s",
                            event.kind.mti, sale, mask(event.pan), event.amount_minor,
                            decision.action.value, decision.response_code,
                        )
                        data = proto.send_answer(event, decision.response_code, decision.auth_code) if (
                            decision.action is Action.ANSWER
                        ) else b""
                        answers.put(trio.current_time() + decision.delay_ms / 1000, decision.action, data)
                    await self._file.sync()  # what this chunk brought, counted on file (with --stats)
                nursery.cancel_scope.cancel()  # the peer left: its answers have nowhere to go
        finally:
            await trio.aclose_forcefully(stream)

    async def _send_answers(self, stream: trio.abc.Stream, answers: _AnswerQueue, connection: trio.CancelScope) -> None:
        """One connection's answers, each at its time: the answers due by then go out in one
        ``send_all`` (not one task, timer and send per answer), after the stats file shows
        their requests; a CLOSE due closes the connection (answers due before it went out)."""
        while True:
            await answers.wait_due()
            await self._file.sync()
            data, close = answers.take_due(trio.current_time())
            if data:
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    connection.cancel()
                    return
            if close:
                connection.cancel()
                return

    # --- JSON over HTTP(S) -----------------------------------------------

    async def handle_http(self, request: Request) -> Response:
        if request.path not in (ADVICES_PATH, REVERSALS_PATH):
            return json_response(404, {"error": "not found"})
        if request.method != "POST":
            return json_response(405, {"error": "use POST"}, {"allow": "POST"})
        key = request.headers.get("idempotency-key", "")
        if not key:
            return json_response(400, {"error": "Idempotency-Key header required"})
        try:
            req, _repeat = request_from_json(request.json())
        except (ProtocolError, InputError) as exc:
            return json_response(400, {"error": str(exc)})
        reversal = request.path == REVERSALS_PATH
        family = "reversal" if reversal else "advice"
        slot = (family, key)
        # the same sale, whether sent as first try or repeat
        fingerprint = hashlib.sha256(json.dumps(request_to_json(req, repeat=False), sort_keys=True).encode()).hexdigest()
        self.stats.count(key, family)
        self._file.changed()
        await self._file.sync()
        while slot in self._inflight:
            await self._inflight[slot].wait()
        stored = self._answers.get(slot)
        if stored is not None:
            if stored[0] != fingerprint:
                return json_response(422, {"error": "Idempotency-Key reused with a different request"})
            self.stats.totals["replayed"] += 1
            return stored[1]
        done = self._inflight[slot] = trio.Event()
        try:
            decision = self.decider.decide(sale=key, pan=req.pan, amount_minor=req.amount_minor, reversal=reversal)
            log.info(
                "POST %s key %s card %s amount %d -> %s %s",
                request.path, key, mask(req.pan), req.amount_minor, decision.action.value, decision.response_code,
            )
            if decision.delay_ms:
                await trio.sleep(decision.delay_ms / 1000)
            self.stats.book(key, decision, reversal=reversal)
            self._file.changed()
            await self._file.sync()
            if decision.action is Action.CLOSE:
                raise AbortConnection
            answer = json_response(
                200,
                {
                    "approved": decision.response_code == APPROVED,
                    "response_code": decision.response_code,
                    "auth_code": decision.auth_code,
                },
            )
            self._answers[slot] = (fingerprint, answer)
            if decision.action is Action.DROP:
                raise AbortConnection
            return answer
        finally:
            del self._inflight[slot]
            done.set()


async def serve_simulator(
    rules: SimRules,
    host: str,
    port: int,
    *,
    format: str = "iso8583",
    ssl_context: ssl.SSLContext | None = None,
    stats_path: str | Path | None = None,
    header: LengthHeader = LengthHeader.BINARY2,
    spec: Spec = DEFAULT_SPEC,
    task_status: trio.TaskStatus[Simulator] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the simulator until cancelled; ``task_status.started`` gets the :class:`Simulator`.

    ``format`` is ``"iso8583"`` (``header`` framing) or ``"json"`` (HTTP); over TLS when
    ``ssl_context`` is given (meshpos.acquirer.tls.server_context), plain TCP otherwise.
    """
    sim = Simulator(rules, Path(stats_path) if stats_path is not None else None, host)
    async with trio.open_nursery() as nursery:
        if format == "iso8583":
            tcp_listeners = await trio.open_tcp_listeners(port, host=host)
            sim.port = tcp_listeners[0].socket.getsockname()[1]
            listeners: list[trio.abc.Listener[Any]] = list(tcp_listeners) if ssl_context is None else [
                trio.SSLListener(tcp, ssl_context) for tcp in tcp_listeners]

            async def serve_one(stream: trio.abc.Stream) -> None:
                await sim.serve_iso_connection(stream, header, spec)

            await nursery.start(trio.serve_listeners, serve_one, listeners)
        elif format == "json":
            http_listeners = await nursery.start(serve_http, sim.handle_http, (host, port, ssl_context))
            sim.port = listener_port(http_listeners[0])
        else:
            raise ConfigError(f"unknown simulator format {format!r}: use iso8583 or json")
        await sim._file.sync()
        task_status.started(sim)


__all__ = [
    "Action", "CardRule", "Decider", "Decision", "SimRules", "Simulator", "SimulatorStats",
    "auth_code", "serve_simulator", "write_json_atomically",
]
