"""Receipt printers chosen by configuration, and the transports that send a job.

A node config holds a printer dict, e.g.::

    {"kind": "network", "host": "192.168.1.50", "port": 9100, "profile": "epson-tm-t20-80mm"}
    {"kind": "usb", "vendor_id": "0x04b8", "product_id": "0x0e15", "profile": "generic-80mm"}
    {"kind": "serial", "device": "/dev/ttyUSB0", "baudrate": 19200, "profile": "generic-58mm"}
    {"kind": "file", "path": "/dev/usb/lp0", "profile": "generic-58mm"}
    {"kind": "dummy", "profile": "generic-58mm"}

:func:`load_printer_config` validates it into a :class:`PrinterConfig`;
:func:`open_printer` gives the :class:`Printer` that sends one already rendered
ESC/POS job (``print_job(data) -> condition``).

Network printers are driven here over a trio TCP stream, not through
python-escpos's ``Network``: that class blocks a thread in ``sendall`` with one
socket timeout for everything, and a printer that accepts a connection and
then stops reading would tie up a worker thread we cannot cancel. With trio
every phase (connect, status query, send, confirmation) has its own deadline
and is cancelled cleanly. The bytes themselves are still produced by
python-escpos (its ``Dummy``, see :func:`meshpos.devices.receipts.render_bytes`).
USB, serial and file printers go through python-escpos's own classes in a
worker thread under a deadline (they block in libusb / the tty driver).

When has a printer "accepted all bytes"? A printer that answers the real-time
status query (DLE EOT) is asked again after the job: the answer can only come
once it has read everything before it. A printer (or a socat/nc relay) that
does not answer is told we are done (TCP half-close) and must close its side,
as raw port-9100 servers do once they have read the job. Neither within the
deadline means it stalled: the job stays queued and is sent again later.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from meshpos.devices import escpos_import
from meshpos.domain.errors import PrinterError
from meshpos.devices.profiles import PaperProfile, load_printer_profile

log = logging.getLogger(__name__)

PRINTER_KINDS = ("usb", "network", "serial", "file", "dummy")
DEFAULT_PROFILE = "generic-80mm"
DEFAULT_PORT = 9100
BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)

# Real-time status (ESC/POS DLE EOT n): n=2 offline cause, n=4 roll paper sensor.
STATUS_QUERY = b"\x10\x04\x02\x10\x04\x04"
_COVER_OPEN = 0x04  # DLE EOT 2, bit 2
_PAPER_STOP = 0x20  # DLE EOT 2, bit 5: printing stopped at paper end
_PAPER_END = 0x60  # DLE EOT 4, bits 5-6: roll paper end detected

_KEYS = {
    "usb": {"vendor_id", "product_id"},
    "network": {"host", "port"},
    "serial": {"device", "baudrate"},
    "file": {"path"},
    "dummy": set(),
}
_COMMON_KEYS = {"kind", "profile", "timeout", "tz"}
_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class PrinterUnreachableError(PrinterError):
    """The printer cannot be reached, or stalled before taking the whole job."""

    state = "unreachable"


class PaperOutError(PrinterError):
    state = "paper_out"


class CoverOpenError(PrinterError):
    state = "cover_open"


class PrinterConfigError(PrinterError):
    """The printer config, profile or installation is wrong; retrying will not help."""

    state = "misconfigured"


@dataclass(frozen=True)
class PrinterTiming:
    """Every deadline of the printer path, in seconds (the one place for them)."""

    connect_timeout: float = 5.0
    status_timeout: float = 1.0  # how long to wait for a DLE EOT answer before deciding "does not answer"
    io_timeout: float = 20.0  # sending one job and its confirmation
    backoff_initial: float = 1.0
    backoff_max: float = 30.0

    @property
    def job_timeout(self) -> float:
        """Backstop over one whole attempt, whatever the transport."""
        return self.connect_timeout + 2 * self.status_timeout + self.io_timeout + 1.0


DEFAULT_TIMING = PrinterTiming()


@dataclass(frozen=True)
class PrinterConfig:
    kind: str
    profile: PaperProfile
    host: str | None = None
    port: int = DEFAULT_PORT
    vendor_id: int | None = None
    product_id: int | None = None
    device: str | None = None  # serial device, or the file printer's path
    baudrate: int = 9600
    timeout: float | None = None  # overrides PrinterTiming.io_timeout
    tz: str = "UTC"  # time zone the receipts show

    def describe(self) -> str:
        where = {
            "network": f"{self.host}:{self.port}",
            "usb": f"{self.vendor_id or 0:04x}:{self.product_id or 0:04x}",
            "serial": f"{self.device} @ {self.baudrate}",
            "file": str(self.device),
            "dummy": "in memory",
        }[self.kind]
        return f"{self.kind} printer {where} ({self.profile.name})"


def load_printer_config(cfg: Mapping[str, Any]) -> PrinterConfig:
    """Validate a printer config dict; PrinterError (PrinterConfigError) says what is wrong."""
    if not isinstance(cfg, Mapping):
        raise PrinterConfigError("printer config must be an object such as {\"kind\": \"network\", ...}")
    kind = cfg.get("kind")
    if kind not in PRINTER_KINDS:
        raise PrinterConfigError(f"unknown printer kind {kind!r}: use one of {', '.join(PRINTER_KINDS)}")
    unknown = set(cfg) - _COMMON_KEYS - _KEYS[kind]
    if unknown:
        raise PrinterConfigError(
            f"unknown setting(s) for a {kind} printer: {', '.join(sorted(unknown))} "
            f"(allowed: {', '.join(sorted(_COMMON_KEYS | _KEYS[kind]))})"
        )
    try:
        profile = load_printer_profile(cfg.get("profile", DEFAULT_PROFILE))
    except PrinterError as exc:
        raise PrinterConfigError(str(exc)) from exc
    timeout = cfg.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0):
        raise PrinterConfigError("printer 'timeout' must be a positive number of seconds")
    tz = cfg.get("tz", "UTC")
    if not isinstance(tz, str) or not tz:
        raise PrinterConfigError("printer 'tz' must be a time zone name such as UTC or Europe/Rome")
    common: dict[str, Any] = {"kind": kind, "profile": profile, "timeout": timeout, "tz": tz}
    if kind == "network":
        return PrinterConfig(host=_check_host(cfg.get("host")), port=_check_port(cfg.get("port", DEFAULT_PORT)), **common)
    if kind == "usb":
        return PrinterConfig(vendor_id=_usb_id(cfg, "vendor_id"), product_id=_usb_id(cfg, "product_id"), **common)
    if kind == "serial":
        baudrate = cfg.get("baudrate", 9600)
        if baudrate not in BAUDRATES or isinstance(baudrate, bool):
            raise PrinterConfigError(f"serial baudrate {baudrate!r} is not one of {', '.join(map(str, BAUDRATES))}")
        return PrinterConfig(device=_check_device(cfg.get("device"), "device", must_exist=True), baudrate=baudrate, **common)
    if kind == "file":
        return PrinterConfig(device=_check_device(cfg.get("path"), "path", must_exist=False), **common)
    return PrinterConfig(**common)


def _check_host(host: Any) -> str:
    if not isinstance(host, str) or not host:
        raise PrinterConfigError("a network printer needs 'host': its IP address or host name")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise PrinterConfigError(
            f"printer host {host!r} is neither an IP address nor a valid host name "
            "(write only the address, e.g. 192.168.1.50 or printer-1.local, without scheme or port)"
        )
    return host


def _check_port(port: Any) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise PrinterConfigError(f"printer port {port!r} must be an integer from 1 to 65535")
    return port


def _usb_id(cfg: Mapping[str, Any], key: str) -> int:
    value = cfg.get(key)
    try:
        number = int(value, 16) if isinstance(value, str) else value
    except ValueError:
        number = None
    if not isinstance(number, int) or isinstance(number, bool) or not 0 < number <= 0xFFFF:
        raise PrinterConfigError(f"a USB printer needs '{key}' as a number or hex string such as \"0x04b8\", got {value!r}")
    return number


def _check_device(value: Any, key: str, *, must_exist: bool) -> str:
    if not isinstance(value, str) or not value:
        raise PrinterConfigError(f"this printer needs '{key}': the path of its device file")
    path = Path(value)
    # A device node must be there; a plain output file may be created (its folder must exist).
    if must_exist or value.startswith("/dev/"):
        if not path.exists():
            raise PrinterConfigError(f"printer device file {value} does not exist (printer unplugged, or wrong path?)")
    elif not path.parent.is_dir():
        raise PrinterConfigError(f"folder of printer file {value} does not exist")
    return value


# --- status ---------------------------------------------------------------------------


def status_condition(answer: bytes) -> str | None:
    """Interpret the answers to STATUS_QUERY: 'paper_out', 'cover_open', 'ok', or None if unusable."""
    if len(answer) < 2 or any((b & 0x93) != 0x12 for b in answer[:2]):
        return None  # every DLE EOT answer has bits 1 and 4 set and bits 0 and 7 clear
    offline_cause, paper = answer[0], answer[1]
    if offline_cause & _COVER_OPEN:
        return "cover_open"
    if offline_cause & _PAPER_STOP or (paper & _PAPER_END) == _PAPER_END:
        return "paper_out"
    return "ok"


def _raise_for(condition: str | None, where: str) -> None:
    if condition == "paper_out":
        raise PaperOutError(f"{where} is out of paper")
    if condition == "cover_open":
        raise CoverOpenError(f"{where} has its cover open")


# --- printers -------------------------------------------------------------------------


class Printer(Protocol):
    """What the spool worker needs from a printer; tests pass in-memory fakes."""

    async def print_job(self, data: bytes) -> str:
        """Send one job; return the condition afterwards ('ok', 'paper_out', 'cover_open').

        Raises PrinterError subclasses: PrinterUnreachableError, PaperOutError,
        CoverOpenError (nothing printed) or PrinterConfigError.
        """
        ...


class NetworkPrinter:
    """Raw ESC/POS over TCP (port 9100), every phase under its own trio deadline."""

    def __init__(self, config: PrinterConfig, timing: PrinterTiming = DEFAULT_TIMING) -> None:
        assert config.host is not None
        self.config = config
        self._host: str = config.host
        self.timing = timing
        self._where = f"printer at {config.host}:{config.port}"

    async def print_job(self, data: bytes) -> str:
        t = self.timing
        try:
            with trio.fail_after(t.connect_timeout):
                stream = await trio.open_tcp_stream(self._host, self.config.port)
        except trio.TooSlowError as exc:
            raise PrinterUnreachableError(f"{self._where} did not accept a connection within {t.connect_timeout:g} s") from exc
        except OSError as exc:
            raise PrinterUnreachableError(f"cannot connect to {self._where}: {exc.strerror or exc}") from exc
        io_timeout = self.config.timeout or t.io_timeout
        async with stream:
            try:
                before = await self._query(stream, t.status_timeout)
                _raise_for(before, self._where)
                with trio.fail_after(io_timeout):
                    await stream.send_all(data)
                    if before is not None:
                        after = await self._query(stream, None)
                        return after or "ok"
                    await stream.send_eof()
                    while await stream.receive_some(4096):
                        pass  # late or unsolicited status bytes
                    return "ok"
            except trio.TooSlowError as exc:
                raise PrinterUnreachableError(
                    f"{self._where} accepted the connection but did not take the job within {io_timeout:g} s (stalled)"
                ) from exc
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PrinterUnreachableError(f"connection to {self._where} broke while printing: {exc}") from exc

    @staticmethod
    async def _query(stream: trio.SocketStream, timeout: float | None) -> str | None:
        """Ask DLE EOT 2 and 4; None if the printer does not answer within ``timeout``."""
        await stream.send_all(STATUS_QUERY)
        answer = b""
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            while len(answer) < 2:
                chunk = await stream.receive_some(2 - len(answer))
                if not chunk:
                    raise trio.BrokenResourceError("printer closed the connection")
                answer += chunk
        return status_condition(answer) if len(answer) >= 2 else None


class EscposPrinter:
    """USB, serial and file printers through python-escpos, in a thread under a deadline."""

    def __init__(self, config: PrinterConfig, timing: PrinterTiming = DEFAULT_TIMING) -> None:
        self.config = config
        self.timing = timing
        self._where = config.describe()

    def _open(self) -> Any:
        escpos_import.load()
        from escpos import printer as ep  # type: ignore[import-untyped]

        c = self.config
        profile = c.profile.escpos_profile
        try:
            if c.kind == "usb":
                dev = ep.Usb(c.vendor_id, c.product_id, timeout=int((c.timeout or self.timing.io_timeout) * 1000), profile=profile)
            elif c.kind == "serial":
                dev = ep.Serial(devfile=c.device, baudrate=c.baudrate, timeout=self.timing.status_timeout, profile=profile)
            else:
                dev = ep.File(devfile=c.device, profile=profile)
            dev.open()
        except RuntimeError as exc:  # python-escpos: the optional pyusb / pyserial is missing
            raise PrinterConfigError(f"{self._where}: {' '.join(str(exc).split())}") from exc
        except Exception as exc:  # DeviceNotFoundError, USBNotFoundError, OSError...
            raise PrinterUnreachableError(f"cannot open {self._where}: {' '.join(str(exc).split())}") from exc
        return dev

    def _print_blocking(self, data: bytes) -> str:
        dev = self._open()
        try:
            _raise_for(self._query_blocking(dev), self._where)
            try:
                dev._raw(data)
            except Exception as exc:
                raise PrinterUnreachableError(f"writing to {self._where} failed: {exc}") from exc
            return self._query_blocking(dev) or "ok"
        finally:
            try:
                dev.close()
            except Exception:  # closing a device that went away
                log.debug("closing %s failed", self._where, exc_info=True)

    def _query_blocking(self, dev: Any) -> str | None:
        if self.config.kind == "file":
            return None  # a file has no back channel
        try:
            answer = bytes(dev.query_status(STATUS_QUERY[:3])) + bytes(dev.query_status(STATUS_QUERY[3:]))
        except Exception:  # no back channel, read timeout: treat as "does not answer"
            return None
        return status_condition(answer)

    async def print_job(self, data: bytes) -> str:
        deadline = self.timing.connect_timeout + (self.config.timeout or self.timing.io_timeout)
        try:
            with trio.fail_after(deadline):
                return await trio.to_thread.run_sync(self._print_blocking, data, abandon_on_cancel=True)
        except trio.TooSlowError as exc:
            raise PrinterUnreachableError(f"{self._where} did not take the job within {deadline:g} s (stalled)") from exc


class DummyPrinter:
    """python-escpos's ``Dummy``: keeps what it was sent (demos, tests, nodes without a printer)."""

    def __init__(self, config: PrinterConfig) -> None:
        escpos_import.load()
        from escpos.printer import Dummy  # type: ignore[import-untyped]

        self.config = config
        self.dummy = Dummy(profile=config.profile.escpos_profile)
        self.jobs: list[bytes] = []

    @property
    def output(self) -> bytes:
        return bytes(self.dummy.output)

    async def print_job(self, data: bytes) -> str:
        self.dummy._raw(data)
        self.jobs.append(data)
        return "ok"


def open_printer(config: PrinterConfig, timing: PrinterTiming = DEFAULT_TIMING) -> Printer:
    if config.kind == "network":
        return NetworkPrinter(config, timing)
    if config.kind == "dummy":
        return DummyPrinter(config)
    return EscposPrinter(config, timing)
