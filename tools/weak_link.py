#!/usr/bin/env python3
"""A weak uplink in userspace: a TCP relay that limits throughput and drops on a schedule.

    python tools/weak_link.py --target 127.0.0.1:8443 --rate-kbit 256 --up-s 20 --down-s 10

It listens on --listen (default 127.0.0.1:0: an ephemeral port) and prints one line
``listening on HOST:PORT`` once it accepts connections. Bytes through it, in each direction and
over all connections together (one SIM, one radio), pass at --rate-kbit (a token bucket holding
--burst bytes). The link is up for --up-s seconds, then down for --down-s, and so on from the
start: when it goes down every open connection is cut (both ends see the connection reset, what
was in flight is lost), and while it is down a new connection is closed as soon as it arrives.
--down-s 0 never drops. Stops on SIGINT/SIGTERM. For the lab without `tc` (tc tbf limits
bandwidth in network namespaces; this relay does it on loopback, between a node and a switch).
"""

from __future__ import annotations

import argparse
import signal
import sys

import trio

CHUNK = 1400


class Bucket:
    """A token bucket: ``take(n)`` returns once ``n`` bytes may pass at ``rate`` bytes/s."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.at = trio.current_time()
        self.lock = trio.Lock()

    async def take(self, n: int) -> None:
        async with self.lock:  # first come, first served: connections share the link
            while True:
                now = trio.current_time()
                self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
                self.at = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await trio.sleep((n - self.tokens) / self.rate)


class Link:
    def __init__(self, target: tuple[str, int], rate_bytes: float, burst: int, up_s: float, down_s: float) -> None:
        self.target = target
        self.up_bucket = Bucket(rate_bytes, burst)
        self.down_bucket = Bucket(rate_bytes, burst)
        self.up_s = up_s
        self.down_s = down_s
        self.start = trio.current_time()
        self.scopes: set[trio.CancelScope] = set()
        self.cuts = 0

    def is_up(self) -> bool:
        if self.down_s <= 0:
            return True
        return (trio.current_time() - self.start) % (self.up_s + self.down_s) < self.up_s

    async def schedule(self) -> None:
        if self.down_s <= 0:
            return
        period = self.up_s + self.down_s
        k = 0
        while True:
            k += 1
            await trio.sleep_until(self.start + (k - 1) * period + self.up_s)
            self.cuts += 1
            for scope in list(self.scopes):
                scope.cancel()

    async def handle(self, client: trio.SocketStream) -> None:
        if not self.is_up():
            await trio.aclose_forcefully(client)
            return
        try:
            server = await trio.open_tcp_stream(*self.target)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        with trio.CancelScope() as scope:
            self.scopes.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.pump, client, server, self.up_bucket, nursery.cancel_scope)
                    nursery.start_soon(self.pump, server, client, self.down_bucket, nursery.cancel_scope)
            finally:
                self.scopes.discard(scope)
        for stream in (client, server):
            _reset(stream)
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def pump(src: trio.SocketStream, dst: trio.SocketStream, bucket: Bucket, done: trio.CancelScope) -> None:
        try:
            while True:
                data = await src.receive_some(CHUNK)
                if not data:
                    break
                await bucket.take(len(data))
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        done.cancel()


def _reset(stream: trio.SocketStream) -> None:
    """Close with RST (SO_LINGER 0), as a connection lost to the radio looks to both ends."""
    import socket
    import struct
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def main_async(args: argparse.Namespace) -> None:
    link = Link(args.target, args.rate_kbit * 1000 / 8, args.burst, args.up_s, args.down_s)
    listeners = await trio.open_tcp_listeners(args.listen[1], host=args.listen[0])
    port = listeners[0].socket.getsockname()[1]
    print(f"listening on {args.listen[0]}:{port}", flush=True)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.schedule)
            nursery.start_soon(trio.serve_listeners, link.handle, listeners)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    print(f"stopped after {link.cuts} drops", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=hostport, required=True, help="HOST:PORT to relay to (the switch)")
    ap.add_argument("--listen", type=hostport, default=("127.0.0.1", 0),
                    help="HOST:PORT to listen on (default 127.0.0.1:0, an ephemeral port, printed)")
    ap.add_argument("--rate-kbit", type=float, default=256.0, help="throughput each way, kbit/s (default 256)")
    ap.add_argument("--burst", type=int, default=4096, help="token bucket size, bytes (default 4096)")
    ap.add_argument("--up-s", type=float, default=20.0, help="seconds up in each cycle (default 20)")
    ap.add_argument("--down-s", type=float, default=10.0, help="seconds down in each cycle; 0: never (default 10)")
    args = ap.parse_args()
    if args.rate_kbit <= 0 or args.up_s <= 0 or args.down_s < 0 or args.burst < 1:
        ap.error("--rate-kbit, --up-s and --burst must be positive, --down-s not negative")
    trio.run(main_async, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
