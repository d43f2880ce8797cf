"""``meshpos run``: the node's long-running service.

One trio nursery holds: the mesh (link listener, dialler, discovery), the
forwarder when the node may uplink, the printer worker, the status publisher,
and the terminal API (a component of the layer above, on the node's UNIX
socket and TCP). SIGINT/SIGTERM cancel it; everything closes cleanly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from collections.abc import Sequence
from typing import Any, Awaitable, Callable

import trio

from meshpos.infra.clock import SYSTEM_CLOCK, Clock
from meshpos.infra.heap import freeze_startup_heap
from meshpos.domain.clockskew import ClockSkew
from meshpos.devices.spool import PrinterStatus, PrinterWorker, Spool, run_printer_worker
from meshpos.domain.errors import DiskFullError, InputError, MeshposError, PrinterError
from meshpos.node.core import NodeCore
from meshpos.node.ops import Reprinted, check_copy
from meshpos.node.status import ClockStatus, LocalStatus, Running
from meshpos.node.receipts import copies_for, printer_config, receipt_data, receipt_options

log = logging.getLogger(__name__)

# A part of the running node: started in the service's nursery, says when it is ready.
Component = Callable[..., Awaitable[None]]

# Entries from peers become durable this long after the first of them (storage.md, "Group commit"):
# under load every window ends in a COMMIT, a thread hop and an fdatasync, so a longer one costs
# less per entry; 0.05 s made it 15-20 of each per second on every node of a busy site.
GROUP_COMMIT_S = 0.2
DISK_FULL_RETRY_S = 1.0  # a commit that met a full disk is tried again this often


class NodeService:
    def __init__(self, core: NodeCore, clock: Clock = SYSTEM_CLOCK) -> None:
        self.core = core
        self.clock = clock
        self.spool = Spool(core.dir.path)
        self.printer: PrinterWorker | None = None
        self.printer_problem: str | None = None
        self.started_at = clock.now_ms()
        # this node's clock offset, from its peers' statuses (status_pub) and the switch (runner)
        self.clock_skew = ClockSkew()
        self.nursery: trio.Nursery | None = None
        core.ledger.on_accept.append(self._on_accept)

    def printer_status(self) -> PrinterStatus:
        if self.printer is not None:
            return self.printer.status()
        if self.printer_problem:
            return PrinterStatus(state="misconfigured", queued=len(self.spool), last_error=self.printer_problem)
        return PrinterStatus(state="none", queued=len(self.spool))

    def local_status(self) -> LocalStatus:
        """The node's summary, the process and the printer (the running node adds its links,
        uplink and dashboard)."""
        summary = self.core.status()
        estimate = self.clock_skew.estimate(self.clock.monotonic())
        return LocalStatus(**{f.name: getattr(summary, f.name) for f in dataclasses.fields(summary)},
                           running=Running(since=self.started_at, pid=os.getpid()),
                           printer=self.printer_status(),
                           clock=ClockStatus(now_ms=self.clock.now_ms(), estimate=estimate))

    # -- receipts -------------------------------------------------------------------

    def print_receipts(self, sale: dict[str, Any]) -> None:
        """Queue a new sale's receipt copies (a sale taken through the terminal API)."""
        self._print_sale(sale)

    def _print_sale(self, sale: dict[str, Any], copies: list[str] | None = None) -> None:
        """Queue the receipt copies of a sale; never fails the sale (it is durable already)."""
        if self.core.config.printer is None:
            return
        try:
            data, options = receipt_data(self.core, sale), receipt_options(self.core)
            for copy in copies or copies_for(sale):
                self.spool.enqueue_receipt(data, options, copy, self.clock)
        except (MeshposError, OSError) as exc:  # OSError: a full disk, the spool's directory
            log.warning("receipt of sale %s not queued: %s", sale.get("id"), exc)

    def reprint(self, sale_id: str, copy: str = "customer") -> Reprinted:
        """Queue one more copy of a sale's receipt (``meshpos receipt``, ``POST /v1/sales/{id}/receipt``)."""
        sale = self.core.sale(sale_id)
        check_copy(copy)
        if self.core.config.printer is None:
            raise PrinterError("this node has no printer configured")
        self._print_sale(sale, [copy])
        return Reprinted(sale_id=sale["id"], queued=copy)

    def _on_accept(self, verified: Any) -> None:
        env = verified.env
        if env.type != "result" or not env.body["sale_id"].startswith(self.core.node_id + "-"):
            return
        try:
            sale = self.core.sale(env.body["sale_id"])
        except InputError:
            return
        self._print_sale(sale, ["outcome"])

    async def _run_printer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            cfg = printer_config(self.core)
        except PrinterError as exc:
            self.printer_problem = str(exc)
            log.error("printer misconfigured: %s (the node keeps selling; receipts stay queued)", exc)
            task_status.started()
            return
        if cfg is None:
            task_status.started()
            return
        assert self.nursery is not None
        self.printer = await self.nursery.start(run_printer_worker, self.spool, cfg, self.clock)
        task_status.started()

    async def _group_commit(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Entries that links bring in are made durable together, GROUP_COMMIT_S after the
        first of them: one fsync for many sync messages, waited for on a worker thread so the
        event loop goes on serving links meanwhile (storage.md, "Group commit"). The
        write-ahead log is checkpointed here too, in a worker thread, not inside a commit."""
        store = self.core.store
        dirty = trio.Event()

        def on_dirty() -> None:
            dirty.set()
        store.hold()
        store.on_dirty = on_dirty
        try:
            task_status.started()
            full_since: float | None = None
            while True:
                await dirty.wait()
                dirty = trio.Event()
                await trio.sleep(GROUP_COMMIT_S)
                try:
                    if store.commit():
                        await trio.to_thread.run_sync(store.sync_wal)
                except DiskFullError as exc:
                    # Stay up: sales are refused meanwhile (diskspace), links go on; try again.
                    if full_since is None:
                        log.error("%s", exc)
                        full_since = self.clock.monotonic()
                    dirty.set()
                    await trio.sleep(DISK_FULL_RETRY_S)
                    continue
                if full_since is not None:
                    log.warning("the disk has room again: storing resumed")
                    full_since = None
                if store.checkpoint_due():  # in a thread: the node goes on meanwhile
                    await trio.to_thread.run_sync(store.checkpoint)
                    store.finish_checkpoint()  # what came meanwhile, so the log starts over
        finally:
            store.on_dirty = None
            store.release()

    # -- the service ------------------------------------------------------------------

    async def run(self, *, components: Sequence[Component] = (),
                  task_status: trio.TaskStatus["NodeService"] = trio.TASK_STATUS_IGNORED) -> None:
        """Group commit, the printer, then each component in order (each started before the
        next)."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(self._group_commit)
            await nursery.start(self._run_printer)
            for component in components:
                await nursery.start(component)
            log.info("node %s (%s, %s) running", self.core.config.name, self.core.node_id, self.core.identity.role)
            freeze_startup_heap()  # full collections walk only what is made from now on (infra.heap)
            task_status.started(self)


async def run_until_signal(core: NodeCore, run: Callable[..., Awaitable[None]]) -> None:
    """Run ``run(task_status=...)`` until SIGINT or SIGTERM; the core is closed at the end."""
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(run)
                async for signum in signals:
                    log.info("signal %s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        core.close()
