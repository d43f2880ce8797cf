"""The durable receipt spool and the trio worker that empties it into the printer.

A sale never waits for paper. The node renders the receipt and calls
:meth:`Spool.enqueue` (a small local write: temp file, fsync, rename, fsync of
the folder) right after the sale is durable; the job survives a crash or a
power cut from then on. :func:`run_printer_worker` prints the jobs in order,
deletes a job only once the printer has taken all of its bytes, and backs off
while the printer is unreachable, stalled, out of paper or open. Its
:class:`PrinterStatus` goes into the node status.

Files: ``NODE_DIR/spool/<seq>-<sale>-<copy>.job``, canonical JSON holding the
sale id, the copy, the ESC/POS bytes (base64) and the ReceiptData they were
rendered from. ``.*.tmp`` files are unfinished writes and are removed at
start-up; a job file that does not parse is moved to ``spool/corrupt/`` so it
cannot block the queue.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from meshpos.infra.durable import fsync_dir, write_atomically
from meshpos.infra.clock import Clock
from meshpos.domain.errors import EncodingError, PrinterError, StoreError
from meshpos.wire import canonical
from meshpos.devices.printers import (
    DEFAULT_TIMING,
    Printer,
    PrinterConfig,
    PrinterConfigError,
    PrinterTiming,
    PrinterUnreachableError,
    load_printer_config,
    open_printer,
)
from meshpos.devices.receipts import COPIES, ReceiptData, ReceiptOptions, render_bytes

log = logging.getLogger(__name__)

SPOOL_DIRNAME = "spool"
JOB_SUFFIX = ".job"
JOB_VERSION = 1
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_-]+")

PrinterFactory = Callable[[PrinterConfig, PrinterTiming], Printer]


@dataclass(frozen=True)
class PrintJob:
    job_id: str  # the file's stem; sorts in print order
    sale_id: str
    copy: str
    created_at_ms: int
    data: bytes  # ESC/POS, exactly what goes to the printer
    receipt: ReceiptData | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JOB_VERSION,
            "sale_id": self.sale_id,
            "copy": self.copy,
            "created_at_ms": self.created_at_ms,
            "escpos": base64.b64encode(self.data).decode("ascii"),
            "receipt": self.receipt.to_json() if self.receipt is not None else None,
        }

    @classmethod
    def from_json(cls, job_id: str, obj: Any) -> PrintJob:
        try:
            if obj["version"] != JOB_VERSION:
                raise EncodingError(f"print job version {obj['version']!r} is not {JOB_VERSION}")
            receipt = ReceiptData.from_json(obj["receipt"]) if obj["receipt"] is not None else None
            return cls(
                job_id=job_id,
                sale_id=str(obj["sale_id"]),
                copy=str(obj["copy"]),
                created_at_ms=int(obj["created_at_ms"]),
                data=base64.b64decode(obj["escpos"], validate=True),
                receipt=receipt,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EncodingError(f"print job {job_id} is malformed: {exc}") from exc


class Spool:
    """The folder of pending print jobs. Owned by one node process; used from its trio thread."""

    def __init__(self, node_dir: str | os.PathLike[str]) -> None:
        self.path = Path(node_dir) / SPOOL_DIRNAME
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            # unfinished writes: infra.durable's, and those of versions before it (".tmp-*")
            for stale in [*self.path.glob(".*.tmp"), *self.path.glob(".tmp-*")]:
                stale.unlink()
            names = sorted(p.name for p in self.path.glob(f"*{JOB_SUFFIX}"))
        except OSError as exc:
            raise StoreError(f"receipt spool {self.path} cannot be opened: {exc}") from exc
        self._names: list[str] = names
        self._next_seq = max((self._seq(n) for n in names), default=0) + 1
        self._changed = trio.Event()

    @staticmethod
    def _seq(name: str) -> int:
        head = name.split("-", 1)[0]
        return int(head) if head.isascii() and head.isdigit() else 0  # "²".isdigit(), but int("²") raises

    def __len__(self) -> int:
        return len(self._names)

    def job_ids(self) -> list[str]:
        return [n[: -len(JOB_SUFFIX)] for n in self._names]

    def enqueue(self, *, sale_id: str, copy: str, data: bytes, created_at_ms: int,
                receipt: ReceiptData | None = None) -> PrintJob:
        """Write one job durably; returns once it is on disk. Never touches the printer."""
        if copy not in COPIES:
            raise PrinterError(f"receipt copy must be one of {', '.join(COPIES)}")
        job_id = f"{self._next_seq:012d}-{_UNSAFE_RE.sub('_', sale_id)[:40]}-{copy}"
        job = PrintJob(job_id=job_id, sale_id=sale_id, copy=copy, created_at_ms=created_at_ms,
                       data=data, receipt=receipt)
        name = job_id + JOB_SUFFIX
        try:
            write_atomically(self.path / name, canonical.encode(job.to_json()), mode=0o600)
        except OSError as exc:
            raise StoreError(f"cannot write print job for sale {sale_id} into {self.path}: {exc}") from exc
        self._next_seq += 1
        self._names.append(name)
        self._notify()
        return job

    def enqueue_receipt(self, data: ReceiptData, options: ReceiptOptions, copy: str, clock: Clock) -> PrintJob:
        """Render with the terminal's profile and language, then :meth:`enqueue`."""
        return self.enqueue(sale_id=data.sale_id, copy=copy, data=render_bytes(data, options, copy),
                            created_at_ms=clock.now_ms(), receipt=data)

    def peek(self) -> PrintJob | None:
        """The oldest job; unreadable job files are moved aside, never printed."""
        while self._names:
            name = self._names[0]
            try:
                return PrintJob.from_json(name[: -len(JOB_SUFFIX)], canonical.decode((self.path / name).read_bytes()))
            except (OSError, EncodingError) as exc:
                log.error("receipt spool: moving unreadable job %s aside: %s", name, exc)
                self._quarantine(name)
        return None

    def remove(self, job_id: str) -> None:
        name = job_id + JOB_SUFFIX
        try:
            (self.path / name).unlink(missing_ok=True)
            self._fsync_dir()
        except OSError as exc:
            raise StoreError(f"cannot remove printed job {job_id} from {self.path}: {exc}") from exc
        if name in self._names:
            self._names.remove(name)
        self._notify()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _quarantine(self, name: str) -> None:
        self._names.remove(name)
        try:
            corrupt = self.path / "corrupt"
            corrupt.mkdir(exist_ok=True)
            os.replace(self.path / name, corrupt / name)
            self._fsync_dir()
        except OSError:
            log.exception("receipt spool: cannot move %s aside", name)

    def _fsync_dir(self) -> None:
        fsync_dir(self.path)


# --- the worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class PrinterStatus:
    """What the node status shows about the printer."""

    state: str  # ok | unreachable | paper_out | cover_open | misconfigured: <reason>
    queued: int
    printer: str | None = None  # PrinterConfig.describe()
    last_error: str | None = None
    last_error_at_ms: int | None = None
    last_printed_at_ms: int | None = None
    printed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state, "queued": self.queued, "printer": self.printer,
            "last_error": self.last_error, "last_error_at_ms": self.last_error_at_ms,
            "last_printed_at_ms": self.last_printed_at_ms, "printed": self.printed,
        }


@dataclass
class PrinterWorker:
    spool: Spool
    printer_cfg: Mapping[str, Any] | PrinterConfig
    clock: Clock
    timing: PrinterTiming = DEFAULT_TIMING
    printer_factory: PrinterFactory = open_printer
    _state: str = "ok"
    _describe: str | None = None
    _last_error: str | None = None
    _last_error_at_ms: int | None = None
    _last_printed_at_ms: int | None = None
    _printed: int = 0
    _printer: Printer | None = None
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def printer(self) -> Printer | None:
        return self._printer

    def status(self) -> PrinterStatus:
        return PrinterStatus(
            state=self._state, queued=len(self.spool), printer=self._describe,
            last_error=self._last_error, last_error_at_ms=self._last_error_at_ms,
            last_printed_at_ms=self._last_printed_at_ms, printed=self._printed,
        )

    async def wait_until(self, predicate: Callable[[PrinterStatus], bool]) -> PrinterStatus:
        """Wait (no polling) until the status satisfies ``predicate``; for the node and tests."""
        while not predicate(status := self.status()):
            async with trio.open_nursery() as nursery:
                for wait in (self._changed.wait, self.spool.wait_changed):
                    nursery.start_soon(_cancel_after, wait, nursery.cancel_scope)
        return status

    def _set(self, state: str, error: str | None = None) -> None:
        self._state = state
        if error is not None:
            self._last_error = error
            self._last_error_at_ms = self.clock.now_ms()
        self._changed.set()
        self._changed = trio.Event()

    def _get_printer(self) -> Printer:
        if self._printer is None:
            cfg = self.printer_cfg
            config = cfg if isinstance(cfg, PrinterConfig) else load_printer_config(cfg)
            self._describe = config.describe()
            self._printer = self.printer_factory(config, self.timing)
        return self._printer

    async def run(self, *, task_status: trio.TaskStatus[PrinterWorker] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            self._get_printer()  # report a bad config in the status at once, not at the first sale
        except PrinterConfigError as exc:
            self._set(f"misconfigured: {exc}", str(exc))
        task_status.started(self)
        backoff = self.timing.backoff_initial
        while True:
            job = self.spool.peek()
            if job is None:
                await self.spool.wait_changed()
                continue
            try:
                printer = self._get_printer()
                with trio.fail_after(self.timing.job_timeout):
                    condition = await printer.print_job(job.data)
            except PrinterConfigError as exc:
                self._printer = None  # reload the config next time: a device may get plugged in
                self._set(f"misconfigured: {exc}", str(exc))
                await trio.sleep(self.timing.backoff_max)
                continue
            except (PrinterError, trio.TooSlowError) as exc:
                if isinstance(exc, trio.TooSlowError):
                    exc = PrinterUnreachableError(f"printer did not finish the job within {self.timing.job_timeout:g} s")
                self._set(getattr(exc, "state", "unreachable"), str(exc))
                log.warning("receipt for sale %s not printed yet: %s", job.sale_id, exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.timing.backoff_max)
                continue
            except Exception as exc:  # a bug in a driver must not take the node down
                log.exception("printer driver failed on job %s", job.job_id)
                self._printer = None
                self._set("unreachable", f"unexpected printer error: {exc!r}")
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.timing.backoff_max)
                continue
            backoff = self.timing.backoff_initial
            self._printed += 1
            self._last_printed_at_ms = self.clock.now_ms()
            self.spool.remove(job.job_id)
            self._set(condition if condition in ("ok", "paper_out", "cover_open") else "ok")


async def _cancel_after(wait: Callable[[], Any], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


async def run_printer_worker(
    spool: Spool,
    printer_cfg: Mapping[str, Any] | PrinterConfig,
    clock: Clock,
    *,
    timing: PrinterTiming = DEFAULT_TIMING,
    printer_factory: PrinterFactory = open_printer,
    task_status: trio.TaskStatus[PrinterWorker] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Print spooled jobs forever. ``await nursery.start(run_printer_worker, ...)`` gives the
    :class:`PrinterWorker`, whose ``status()`` goes into the node status."""
    worker = PrinterWorker(spool, printer_cfg, clock, timing=timing, printer_factory=printer_factory)
    await worker.run(task_status=task_status)
