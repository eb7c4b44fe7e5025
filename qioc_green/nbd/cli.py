"""The NBD commands: ``qioc-nbd-server`` (:func:`server_main`) and ``qioc-nbd-copy``
(:func:`copy_main`, in ``_copy``).

``qioc-nbd-server`` serves files (or memory) over NBD, each connection in an IOThread:

    qioc-nbd-server --listen unix:/tmp/nbd.sock --export disk=/tmp/disk.img
    qioc-nbd-server --listen tcp:127.0.0.1:0 --export a=a.img,ro --memory scratch=1G \\
        --iothreads 2

The first lines on stdout are ``listening on ADDR``, one per bound address (a port 0 shows the
port chosen). SIGINT or SIGTERM stop it: no new clients, requests already received are answered,
then every connection is closed. Exit status 0 after such a stop, 2 for bad arguments, 1 if an
export or address cannot be opened.
"""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import sys

import gevent
import gevent.event

import qioc_green

from ._copy import main as copy_main
from ._exports import Export, FileExport, MemoryExport, parse_size
from ._server import NBDServer

__all__ = ["copy_main", "server_main"]

SERVER = "qioc-nbd-server"


_SERVER_HELP = """Serve files (or memory) over NBD, each connection in an IOThread.

The first lines on stdout are ``listening on ADDR``, one per bound address (a port 0 shows the
port chosen). SIGINT or SIGTERM stop it: no new clients, requests already received are answered,
then every connection is closed. Exit status 0 after such a stop, 2 for bad arguments, 1 if an
export or address cannot be opened."""


def _export(spec: str) -> tuple[str, str, bool]:
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH[,ro], got {spec!r}")
    path, _, opts = rest.partition(",")
    if opts not in ("", "ro", "rw"):
        raise argparse.ArgumentTypeError(f"unknown export option {opts!r} (ro or rw)")
    return name, path, opts == "ro"


def _memory(spec: str) -> tuple[str, int]:
    name, sep, size = spec.partition("=")
    try:
        return name, parse_size(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE (e.g. scratch=256M), got {spec!r}") from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size (e.g. 512M, 1G), got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=SERVER, description=_SERVER_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", action="append", required=True, metavar="ADDR",
                    help="unix:PATH or tcp:HOST:PORT (port 0: any free port); repeatable")
    ap.add_argument("--export", action="append", default=[], type=_export, metavar="NAME=PATH[,ro]",
                    help="serve a file (or block device); repeatable")
    ap.add_argument("--memory", action="append", default=[], type=_memory, metavar="NAME=SIZE",
                    help="serve SIZE bytes of sparse memory; repeatable")
    ap.add_argument("--iothreads", type=int, default=1, metavar="N", help="IOThreads serving clients (1)")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                    help="pin all IOThreads to one CPU, or never (default: IOThreadPool's placement, "
                         "chosen by measurement: file exports' reads release the GIL, so they stay spread)")
    ap.add_argument("--max-requests", type=int, default=16, metavar="N",
                    help="requests served at once per connection (16)")
    ap.add_argument("--max-clients", type=int, default=128, metavar="N",
                    help="connections at once; past them a client is closed at once (128)")
    ap.add_argument("--max-memory", type=_size, default="1G", metavar="SIZE",
                    help="replies waiting to be sent, all connections together; a connection "
                         "stops being read while it is spent (1G; at least 64M)")
    ap.add_argument("--handshake-limit", type=float, default=10.0, metavar="S",
                    help="close a client that has not finished negotiating after S seconds "
                         "(10, as qemu-nbd; 0: no limit)")
    ap.add_argument("--idle-timeout", type=float, metavar="S",
                    help="close a connection with nothing in flight that sends nothing for S "
                         "seconds, or whose replies make no progress for S seconds (default: none)")
    ap.add_argument("--tls-cert", metavar="PEM", help="server certificate")
    ap.add_argument("--tls-key", metavar="PEM", help="server private key")
    ap.add_argument("--tls-ca", metavar="PEM", help="CA that client certificates must chain to")
    ap.add_argument("--tls", choices=("off", "on", "require"),
                    help="offer STARTTLS (on, the default with --tls-cert) or refuse plaintext (require)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    args = ap.parse_args(argv)
    if not args.export and not args.memory:
        ap.error("give at least one --export or --memory")
    if args.iothreads < 1:
        ap.error("--iothreads must be at least 1")
    if args.max_clients < 1:
        ap.error("--max-clients must be at least 1")
    if args.handshake_limit < 0 or (args.idle_timeout is not None and args.idle_timeout <= 0):
        ap.error("--handshake-limit must be at least 0 and --idle-timeout above 0")
    if args.tls is None:
        args.tls = "on" if args.tls_cert else "off"
    if args.tls != "off" and not (args.tls_cert and args.tls_key):
        ap.error("--tls needs --tls-cert and --tls-key")
    return args


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.tls == "off":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_ca:
        ctx.load_verify_locations(args.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{SERVER}: %(message)s", stream=sys.stderr)
    qioc_green.main_context()
    exports: list[Export] = []
    try:
        for name, path, ro in args.export:
            exports.append(FileExport(name, path, readonly=ro))
        for name, size in args.memory:
            exports.append(MemoryExport(name, size))
        server = NBDServer(exports, max_requests=args.max_requests, tls_context=tls_context(args),
                           tls_required=args.tls == "require", max_clients=args.max_clients,
                           max_memory=args.max_memory, handshake_limit=args.handshake_limit,
                           idle_timeout=args.idle_timeout)
    except (OSError, ValueError, ssl.SSLError) as exc:
        print(f"{SERVER}: {exc}", file=sys.stderr)
        for e in exports:
            e.close()
        return 1
    pool = qioc_green.IOThreadPool(args.iothreads, name="nbd-iothread", pin=args.pin)
    acceptor = qioc_green.NetListener("nbd", max_clients=args.max_clients)
    try:
        for addr in args.listen:
            for bound in acceptor.open(addr):
                print(f"listening on {bound}", flush=True)
    except (OSError, ValueError, qioc_green.ChannelError) as exc:
        print(f"{SERVER}: cannot listen: {exc}", file=sys.stderr)
        acceptor.close()
        pool.stop()
        server.close()
        return 1
    stop = qioc_green.Event()  # parks with the main context's inbox ref'd: the hub waits for the signal
    handlers = [gevent.signal_handler(sig, stop.set) for sig in (signal.SIGINT, signal.SIGTERM)]
    acceptor.set_client_handler(server.serve, contexts=pool)
    stop.wait()
    for h in handlers:
        h.cancel()
    logging.getLogger("nbd.server").info("stopping with %d connections", server.connections)
    server.disconnect_all()  # graceful: each connection answers what it received, then ends
    acceptor.close(grace=5.0)
    server.close_all()
    pool.stop()
    server.close()
    return 0
