"""ISO 8583:1987 for acquirer advices, sans-IO (protocols/iso8583.md is normative).

Rules of the exchange:

* Framing: every message is preceded by a length header (:class:`LengthHeader`):
  2-byte big-endian binary (default), 4 ASCII decimal digits, or none (then the
  message's own structure delimits it). A frame larger than ``max_frame`` is a
  :class:`~meshpos.domain.errors.ProtocolError`.
* Requests: 0220 financial advice, 0221 its repeat (same fields), 0420 reversal
  advice (adds field 90). Answers: 0230 (or 0231) to an advice, 0430 to a reversal.
* Matching: an answer belongs to the outstanding request with the same family
  (advice / reversal), field 11 (STAN), field 37 (RRN) and field 41 (terminal).
* Result: field 39 ``"00"`` is approved (auth code from field 38, if present);
  any other code is a decline carrying that code.
* Decoding bytes from outside raises only EncodingError or ProtocolError.

:class:`ClientConnection` is the terminal/switch end, :class:`ServerConnection`
the host end (used by the simulator); both only turn bytes into events and
events into bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Final, Literal

import iso8583
from iso8583.specs import default_ascii

from meshpos.domain.currency import numeric_code
from meshpos.domain.errors import EncodingError, ProtocolError
from meshpos.wire.acquirer import RESPONSE_CODE, AcquirerRequest, AcquirerResult

Spec = Mapping[str, Mapping[str, Any]]

DEFAULT_SPEC: Final[Spec] = default_ascii
MAX_FRAME: Final = 4096
PROCESSING_CODE_PURCHASE: Final = "000000"
APPROVED: Final = "00"

#: field 22, POS entry mode: PAN entry (2 digits) + PIN capability (1 digit)
ENTRY_MODE_CODES: Final[Mapping[str, str]] = {
    "chip": "051",
    "contactless": "071",
    "magstripe": "901",
    "manual": "012",
}


class LengthHeader(Enum):
    BINARY2 = "binary2"
    ASCII4 = "ascii4"
    NONE = "none"


class NeedData(Enum):
    NEED_DATA = "need data"


NEED_DATA: Final = NeedData.NEED_DATA


class Family(Enum):
    ADVICE = "advice"
    REVERSAL = "reversal"


class RequestKind(Enum):
    ADVICE = "0220"
    ADVICE_REPEAT = "0221"
    REVERSAL = "0420"

    @property
    def mti(self) -> str:
        return self.value

    @property
    def family(self) -> Family:
        return Family.REVERSAL if self is RequestKind.REVERSAL else Family.ADVICE


ANSWER_MTIS: Final[Mapping[str, Family]] = {"0230": Family.ADVICE, "0231": Family.ADVICE, "0430": Family.REVERSAL}
ANSWER_TO: Final[Mapping[RequestKind, str]] = {
    RequestKind.ADVICE: "0230",
    RequestKind.ADVICE_REPEAT: "0230",
    RequestKind.REVERSAL: "0430",
}


@dataclass(frozen=True)
class MatchKey:
    family: Family
    stan: str  # field 11, 6 digits
    rrn: str  # field 37
    terminal_id: str  # field 41


@dataclass(frozen=True)
class AnswerReceived:
    mti: str
    key: MatchKey
    result: AcquirerResult


@dataclass(frozen=True)
class UnusableAnswer:
    """A whole frame (its length header delimited it, so the connection stays usable) whose message
    cannot be used: it does not decode, has another MTI, lacks a field, or its field 39 is not a
    response code. ``key`` is the outstanding request it names, when its MTI and fields 11, 37 and
    41 can be read; that request fails alone. Else None: the caller drops it, and whichever request
    it answered times out alone."""

    key: MatchKey | None
    reason: str


@dataclass(frozen=True)
class UnexpectedAnswer:
    """A well-formed answer that matches no outstanding request (late, or duplicated).
    It still carries the host's verdict: the caller can settle the sale from it."""

    mti: str
    key: MatchKey
    result: AcquirerResult


@dataclass(frozen=True)
class RequestReceived:
    """A request as the host sees it. ``fields`` holds the decoded message (with the PAN)."""

    kind: RequestKind
    key: MatchKey
    pan: str = field(repr=False)
    amount_minor: int
    currency_numeric: str
    fields: Mapping[str, str] = field(repr=False)


# --- framing -----------------------------------------------------------------


def frame(payload: bytes, header: LengthHeader = LengthHeader.BINARY2) -> bytes:
    if header is LengthHeader.BINARY2:
        if len(payload) > 0xFFFF:
            raise EncodingError("ISO 8583 message too long for a 2-byte length header")
        return len(payload).to_bytes(2, "big") + payload
    if header is LengthHeader.ASCII4:
        if len(payload) > 9999:
            raise EncodingError("ISO 8583 message too long for a 4-digit length header")
        return b"%04d" % len(payload) + payload
    return payload


_SHORT = re.compile(r"Field (?:data|length) is (\d+) bytes(?: wide)?, expecting (\d+)")


class FrameDecoder:
    """Bytes in, whole frames (header removed) out; NEED_DATA when a frame is incomplete."""

    def __init__(
        self,
        header: LengthHeader = LengthHeader.BINARY2,
        *,
        max_frame: int = MAX_FRAME,
        spec: Spec = DEFAULT_SPEC,
    ) -> None:
        self._header = header
        self._max = max_frame
        self._spec = spec
        self._buf = bytearray()

    def receive_data(self, data: bytes | bytearray) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_frame(self) -> bytes | Literal[NeedData.NEED_DATA]:
        if self._header is LengthHeader.NONE:
            return self._next_unframed()
        width = 2 if self._header is LengthHeader.BINARY2 else 4
        if len(self._buf) < width:
            return NEED_DATA
        raw = bytes(self._buf[:width])
        if self._header is LengthHeader.BINARY2:
            length = int.from_bytes(raw, "big")
        else:
            if not raw.isdigit():
                raise ProtocolError("ISO 8583 length header is not 4 ASCII digits")
            length = int(raw)
        if length == 0:
            raise ProtocolError("ISO 8583 frame of length 0")
        if length > self._max:
            raise ProtocolError(f"ISO 8583 frame of {length} bytes exceeds the limit of {self._max}")
        if len(self._buf) < width + length:
            return NEED_DATA
        payload = bytes(self._buf[width : width + length])
        del self._buf[: width + length]
        return payload

    def _next_unframed(self) -> bytes | Literal[NeedData.NEED_DATA]:
        # Without a header the message's own structure is the only delimiter.
        if not self._buf:
            return NEED_DATA
        try:
            iso8583.decode(bytes(self._buf), self._spec)
            end = len(self._buf)
        except iso8583.DecodeError as exc:
            if exc.msg.startswith("Extra data after last field"):
                end = exc.pos
            else:
                short = _SHORT.match(exc.msg)
                if short is None or int(short.group(1)) >= int(short.group(2)):
                    raise ProtocolError(f"ISO 8583 message does not decode: {exc.msg}") from exc
                if len(self._buf) > self._max:
                    raise ProtocolError(f"unframed ISO 8583 message exceeds {self._max} bytes") from exc
                return NEED_DATA
        except Exception as exc:  # pyiso8583 may raise others on hostile bitmaps
            raise ProtocolError("ISO 8583 message does not decode") from exc
        if end > self._max:
            raise ProtocolError(f"unframed ISO 8583 message exceeds {self._max} bytes")
        payload = bytes(self._buf[:end])
        del self._buf[:end]
        return payload


# --- messages ----------------------------------------------------------------


def _mmddhhmmss(ms: int) -> str:
    """``ms`` (UTC, ms since the epoch) as ISO 8583 MMDDhhmmss (fields 7, 12 + 13, 90): one
    datetime by addition and an f-string (``fromtimestamp`` and ``strftime`` per field cost more)."""
    t = _EPOCH + timedelta(seconds=ms // 1000)
    return f"{t.month:02d}{t.day:02d}{t.hour:02d}{t.minute:02d}{t.second:02d}"


def build_request(req: AcquirerRequest, kind: RequestKind, *, now_ms: int) -> dict[str, str]:
    """The decoded message for ``req`` sent as ``kind`` at transmission time ``now_ms``."""
    sale = _mmddhhmmss(req.created_at_ms)
    doc = {
        "t": kind.mti,
        "2": req.pan,
        "3": PROCESSING_CODE_PURCHASE,
        "4": f"{req.amount_minor:012d}",
        "7": _mmddhhmmss(now_ms),
        "11": f"{req.stan:06d}",
        "12": sale[4:],
        "13": sale[:4],
        "22": ENTRY_MODE_CODES[req.entry_mode],
        "37": req.rrn,
        "41": req.terminal_id,
        "42": req.merchant_id,
        "49": numeric_code(req.currency),
    }
    if req.expiry is not None:
        doc["14"] = req.expiry[2:] + req.expiry[:2]  # MMYY -> YYMM
    if kind is RequestKind.REVERSAL:
        # original MTI, STAN, date/time (of the sale), acquiring and forwarding institution ids
        doc["90"] = "0220" + doc["11"] + sale + "0" * 11 + "0" * 11
    return doc


def key_of(req: AcquirerRequest, family: Family) -> MatchKey:
    return MatchKey(family, f"{req.stan:06d}", req.rrn, req.terminal_id)


class _AsciiCodec:
    """The same bytes and dicts as pyiso8583, faster, for the messages of a spec whose type,
    bitmaps and fields are all ASCII text without padding (``DEFAULT_SPEC`` is): the type, the
    primary bitmap in hex, the secondary one when a field above 64 is present, then each field
    fixed-width or behind its ASCII length. Anything else (another kind of spec or field, a
    value or message it does not take exactly as pyiso8583 would) returns None and goes to
    pyiso8583, which encodes, decodes or raises as it always did."""

    PLAIN_KEYS = frozenset({"data_enc", "len_enc", "len_type", "max_len", "desc"})

    def __init__(self, t_len: int, fields: list[tuple[int, int] | None]) -> None:
        self.t_len = t_len
        self.fields = fields  # by field number 0..128: (length digits or 0 if fixed, max length)

    @classmethod
    def of(cls, spec: Spec) -> _AsciiCodec | None:
        def plain(key: str) -> tuple[int, int] | None:
            f = spec.get(key)
            if (f is None or not set(f) <= cls.PLAIN_KEYS or f.get("data_enc") != "ascii"
                    or f.get("len_enc") != "ascii" or f.get("len_type") not in (0, 1, 2, 3, 4)
                    or not isinstance(f.get("max_len"), int) or f["max_len"] < 0):
                return None
            return int(f["len_type"]), int(f["max_len"])

        h, t, p, secondary = plain("h"), plain("t"), plain("p"), plain("1")
        if h != (0, 0) or t is None or t[0] != 0 or p != (0, 16) or secondary != (0, 16):
            return None
        return cls(t[1], [None, None, *(plain(str(n)) for n in range(2, 129))])

    def encode(self, doc: Mapping[str, str]) -> bytes | None:
        t = doc.get("t")
        if not isinstance(t, str) or len(t) != self.t_len or not t.isascii():
            return None
        present: list[int] = []
        for key, value in doc.items():
            if key == "t":
                continue
            if not (isinstance(key, str) and key.isascii() and key.isdigit() and key[0] != "0"):
                return None
            n = int(key)
            f = self.fields[n] if n <= 128 else None
            if f is None or n == 65 or not isinstance(value, str) or not value.isascii():
                return None
            if len(value) > f[1] or (len(value) != f[1] if f[0] == 0 else len(str(len(value))) > f[0]):
                return None
            present.append(n)
        present.sort()
        bits = 0
        for n in present:
            bits |= 1 << (128 - n)
        parts = [t]
        if bits & 0xFFFFFFFFFFFFFFFF:
            bits |= 1 << 127
            parts += [f"{bits >> 64:016X}", f"{bits & 0xFFFFFFFFFFFFFFFF:016X}"]
        else:
            parts.append(f"{bits >> 64:016X}")
        for n in present:
            value = doc[str(n)]
            digits = self.fields[n][0]  # type: ignore[index]
            if digits:
                parts.append(f"{len(value):0{digits}d}")
            parts.append(value)
        return "".join(parts).encode("ascii")

    def decode(self, payload: bytes) -> dict[str, str] | None:
        try:
            text = payload.decode("ascii")
        except UnicodeDecodeError:
            return None
        at = self.t_len
        doc = {"t": text[:at]}
        primary = text[at:at + 16]
        if len(primary) != 16 or not _UPPER_HEX.fullmatch(primary):
            return None
        doc["p"] = primary
        bits = int(primary, 16) << 64
        at += 16
        if bits >> 127:
            second = text[at:at + 16]
            if len(second) != 16 or not _UPPER_HEX.fullmatch(second):
                return None
            doc["1"] = second
            bits |= int(second, 16)
            at += 16
            if bits >> 63 & 1:  # field 65: a tertiary bitmap
                return None
        bits &= (1 << 127) - 1
        while bits:
            n = 129 - bits.bit_length()
            bits &= ~(1 << (128 - n))
            f = self.fields[n]
            if f is None:
                return None
            digits, size = f
            if digits:
                given = text[at:at + digits]
                if len(given) != digits or not given.isdigit() or int(given) > size:
                    return None
                size = int(given)
                at += digits
            if at + size > len(text):
                return None
            doc[str(n)] = text[at:at + size]
            at += size
        return doc if at == len(text) else None


_UPPER_HEX = re.compile(r"[0-9A-F]{16}")
_EPOCH = datetime(1970, 1, 1)
_CODECS: dict[int, tuple[Spec, _AsciiCodec | None]] = {}


def _codec(spec: Spec) -> _AsciiCodec | None:
    cached = _CODECS.get(id(spec))
    if cached is None or cached[0] is not spec:
        cached = _CODECS[id(spec)] = (spec, _AsciiCodec.of(spec))
    return cached[1]


def encode_message(doc: Mapping[str, str], spec: Spec = DEFAULT_SPEC) -> bytes:
    codec = _codec(spec)
    fast = codec.encode(doc) if codec is not None else None
    if fast is not None:
        return fast
    try:
        raw, _ = iso8583.encode(dict(doc), spec)
    except iso8583.EncodeError as exc:
        raise EncodingError(f"ISO 8583 message does not encode: {exc.msg}") from exc
    return bytes(raw)


def decode_message(payload: bytes, spec: Spec = DEFAULT_SPEC) -> dict[str, str]:
    codec = _codec(spec)
    fast = codec.decode(bytes(payload)) if codec is not None else None
    if fast is not None:
        return fast
    try:
        doc, _ = iso8583.decode(bytes(payload), spec)
    except iso8583.DecodeError as exc:
        raise EncodingError(f"ISO 8583 message does not decode: {exc.msg}") from exc
    except Exception as exc:  # a hostile bitmap can trip pyiso8583 outside its own error type
        raise EncodingError("ISO 8583 message does not decode") from exc
    return doc


def _required(doc: Mapping[str, str], name: str) -> str:
    value = doc.get(name)
    if value is None:
        raise ProtocolError(f"ISO 8583 {doc.get('t', '????')} lacks field {name}")
    return value


def _key_from(doc: Mapping[str, str], family: Family) -> MatchKey:
    stan = _required(doc, "11")
    if len(stan) != 6 or not stan.isdigit():
        raise ProtocolError("ISO 8583 field 11 is not 6 digits")
    return MatchKey(family, stan, _required(doc, "37"), _required(doc, "41"))


def parse_answer(doc: Mapping[str, str]) -> AnswerReceived:
    mti = _required(doc, "t")
    family = ANSWER_MTIS.get(mti)
    if family is None:
        raise ProtocolError(f"unexpected ISO 8583 message type {mti!r} from the acquirer")
    key = _key_from(doc, family)
    code = _required(doc, "39")
    if not RESPONSE_CODE.fullmatch(code):
        raise ProtocolError("ISO 8583 field 39 is not a 2-character response code")
    auth = doc.get("38")
    auth = auth.strip() if auth is not None else None
    approved = code == APPROVED
    return AnswerReceived(mti, key, AcquirerResult(approved, code, (auth or None) if approved else None))


def parse_request(doc: Mapping[str, str]) -> RequestReceived:
    mti = _required(doc, "t")
    try:
        kind = RequestKind(mti)
    except ValueError as exc:
        raise ProtocolError(f"unsupported ISO 8583 request type {mti!r}") from exc
    pan = _required(doc, "2")
    amount = _required(doc, "4")
    currency = _required(doc, "49")
    if not pan.isdigit() or not amount.isdigit() or not currency.isdigit():
        raise ProtocolError("ISO 8583 field 2, 4 or 49 is not numeric")
    fields = {name: value for name, value in doc.items() if name not in ("p", "1")}  # bitmaps
    return RequestReceived(kind, _key_from(doc, kind.family), pan, int(amount), currency, fields)


_ECHOED = ("3", "4", "7", "11", "12", "13", "37", "41", "42", "49")


def build_answer(request: RequestReceived, response_code: str, auth_code: str | None) -> dict[str, str]:
    doc = {"t": ANSWER_TO[request.kind], "39": response_code}
    for name in _ECHOED:
        if name in request.fields:
            doc[name] = request.fields[name]
    if auth_code is not None:
        doc["38"] = auth_code
    return doc


# --- the two ends ------------------------------------------------------------


class _FramedEnd:
    """What both ends share: the wire format and a frame decoder fed by ``receive_data``."""

    def __init__(
        self,
        *,
        header: LengthHeader = LengthHeader.BINARY2,
        spec: Spec = DEFAULT_SPEC,
        max_frame: int = MAX_FRAME,
    ) -> None:
        self._header = header
        self._spec = spec
        self._frames = FrameDecoder(header, max_frame=max_frame, spec=spec)

    def receive_data(self, data: bytes | bytearray) -> None:
        self._frames.receive_data(data)


class ClientConnection(_FramedEnd):
    """The sending end: requests out, answers matched to outstanding requests in."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._outstanding: set[MatchKey] = set()

    @property
    def outstanding(self) -> frozenset[MatchKey]:
        return frozenset(self._outstanding)

    def send_request(self, req: AcquirerRequest, kind: RequestKind, *, now_ms: int) -> tuple[MatchKey, bytes]:
        key = key_of(req, kind.family)
        if key in self._outstanding:
            raise ProtocolError(f"a {kind.family.value} for {req.describe()} is already outstanding")
        data = frame(encode_message(build_request(req, kind, now_ms=now_ms), self._spec), self._header)
        self._outstanding.add(key)
        return key, data

    def forget(self, key: MatchKey) -> None:
        """Stop waiting for ``key`` (timed out); a late answer becomes UnexpectedAnswer."""
        self._outstanding.discard(key)

    def next_event(self) -> AnswerReceived | UnexpectedAnswer | UnusableAnswer | Literal[NeedData.NEED_DATA]:
        """The next answer. ProtocolError only when the stream itself can no longer be read (a bad
        length header; without one, a message that does not decode): one bad message in a frame
        is an UnusableAnswer, and the connection goes on."""
        payload = self._frames.next_frame()
        if payload is NEED_DATA:
            return NEED_DATA
        try:
            doc = decode_message(payload, self._spec)
        except EncodingError as exc:
            if self._header is LengthHeader.NONE:
                raise ProtocolError(str(exc)) from exc
            return UnusableAnswer(None, str(exc))
        try:
            answer = parse_answer(doc)
        except ProtocolError as exc:
            key = self._named(doc)
            if key is not None:
                self._outstanding.discard(key)
            return UnusableAnswer(key, str(exc))
        if answer.key not in self._outstanding:
            return UnexpectedAnswer(answer.mti, answer.key, answer.result)
        self._outstanding.discard(answer.key)
        return answer

    def _named(self, doc: Mapping[str, str]) -> MatchKey | None:
        """The outstanding request an unusable answer names, if it names one."""
        family = ANSWER_MTIS.get(doc.get("t", ""))
        if family is None:
            return None
        try:
            key = _key_from(doc, family)
        except ProtocolError:
            return None
        return key if key in self._outstanding else None


class ServerConnection(_FramedEnd):
    """The host end: requests in, answers out."""

    def next_event(self) -> RequestReceived | Literal[NeedData.NEED_DATA]:
        payload = self._frames.next_frame()
        if payload is NEED_DATA:
            return NEED_DATA
        return parse_request(decode_message(payload, self._spec))

    def send_answer(self, request: RequestReceived, response_code: str, auth_code: str | None) -> bytes:
        return frame(encode_message(build_answer(request, response_code, auth_code), self._spec), self._header)
