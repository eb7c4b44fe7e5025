"""An echo server across IOThreads: the synchronous-looking handler qioc_green is for.

    python examples/echo_server.py --listen tcp:127.0.0.1:7000 [--listen unix:/tmp/echo.sock] \\
        [--iothreads N] [--tls-cert CERT --tls-key KEY] [--max-clients N] [--idle-timeout S]

Prints ``listening on ADDR`` once per bound address (first), then serves until SIGINT or SIGTERM,
then stops gracefully (``--grace`` seconds for the connections still open) and prints a summary:
connections, bytes, and how many connections each IOThread served.  Exit status: 0 after a
graceful stop, 1 when it cannot listen (or set up TLS), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import sys
import threading
from typing import Any

from qioc_green import (
    BrokenChannelError,
    Channel,
    ChannelClosedError,
    IOThreadPool,
    NetListener,
    TLSChannel,
)


class Stats:
    """Per-IOThread counters, updated once per connection (when it ends) under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connections: dict[str, int] = {}
        self.bytes = 0
        self.idle_closed = 0
        self.tls_failed = 0

    def add(self, thread: str, nbytes: int, idle: bool = False) -> None:
        with self._lock:
            self.connections[thread] = self.connections.get(thread, 0) + 1
            self.bytes += nbytes
            self.idle_closed += idle


def make_handler(stats: Stats, *, idle_timeout: float | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> Any:
    """The handler: a few blocking-style lines per connection (it runs as a greenlet)."""

    def echo(ch: Channel) -> None:
        total = 0
        idle = False
        try:
            if ssl_context is not None:
                # A client that hangs up without close_notify (what Python's ssl clients do on
                # close()) has simply left: an echo has no message a truncation could cut short.
                ch = TLSChannel.server(ch, ssl_context, suppress_ragged_eofs=True)
                ch.handshake(timeout=idle_timeout or 30)
            while True:
                data = ch.read(65536, timeout=idle_timeout)
                if not data:
                    break
                ch.write_all(data)
                total += len(data)
        except TimeoutError:
            idle = True  # the peer said nothing for idle_timeout seconds: drop it
        except BrokenChannelError as exc:
            logging.getLogger("echo").info("%s", exc)  # resets and TLS failures end one client
        finally:
            ch.close()
            stats.add(threading.current_thread().name, total, idle)

    return echo


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Addresses use QEMU's spelling: tcp:HOST:PORT, unix:PATH, fd:N.")
    p.add_argument("--listen", action="append", required=True, metavar="ADDR",
                   help="address to listen on (repeatable); port 0 picks a free port")
    p.add_argument("--iothreads", type=int, default=1, metavar="N", help="IOThreads serving clients (default 1)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    p.add_argument("--max-clients", type=int, metavar="N", help="refuse clients past N at once")
    p.add_argument("--idle-timeout", type=float, metavar="S", help="drop a client silent for S seconds")
    p.add_argument("--grace", type=float, default=5.0, metavar="S",
                   help="on SIGINT/SIGTERM, seconds the open connections get to finish (default 5)")
    p.add_argument("--pin", choices=["auto", "on", "off"], default="auto",
                   help="pin the IOThreads to one CPU (auto: IOThreadPool chooses by measurement; docs/servers.md)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every connection error")
    args = p.parse_args(argv)
    if args.iothreads < 1:
        p.error("--iothreads must be at least 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.max_clients is not None and args.max_clients < 1:
        p.error("--max-clients must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="echo_server: %(message)s")
    sctx = None
    if args.tls_cert:
        try:
            sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            sctx.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"echo_server: cannot load the TLS certificate: {exc}", file=sys.stderr)
            return 1
    # Signals go to the main thread's sigwait, never to a hub thread: block them before the
    # IOThreads start (they inherit the mask).
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    stats = Stats()
    # auto: IOThreadPool's own placement, chosen by measurement (pinned while its hubs wait for
    # each other's GIL, as plain echo makes them; spread where the work releases the GIL, as
    # TLS's cipher does; docs/servers.md).
    pin = {"auto": None, "on": True, "off": False}[args.pin]
    with IOThreadPool(args.iothreads, pin=pin) as pool:
        listener = NetListener("echo", max_clients=args.max_clients)
        try:
            for addr in args.listen:
                try:
                    bound = listener.open(addr)
                except (OSError, ValueError, BrokenChannelError) as exc:
                    print(f"echo_server: cannot listen on {addr}: {exc}", file=sys.stderr)
                    return 1
                for a in bound:
                    print(f"listening on {a}", flush=True)
            listener.set_client_handler(make_handler(stats, idle_timeout=args.idle_timeout, ssl_context=sctx),
                                        pool)
            sig = signal.sigwait(signals)
            print(f"stopping on {signal.Signals(sig).name}", flush=True)
        finally:
            try:
                listener.close(grace=args.grace)
            except ChannelClosedError:
                pass
    st = listener.stats
    print(f"summary: {st['accepted']} connections, {stats.bytes} bytes echoed, {st['refused']} refused, "
          f"{stats.idle_closed} idle closed, {st['handler_errors']} handler errors")
    for name in sorted(set(st["per_context"]) | set(stats.connections)):
        print(f"  {name}: {stats.connections.get(name, 0)} connections")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
