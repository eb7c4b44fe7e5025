"""The servers bench/scaling.py measures, one kind per process.

    python bench/servers.py KIND --port P [--mode echo|discard] [--tls CERT KEY] [options]

KIND: qioc (``--iothreads N``, ``--no-follow``, ``--pin on|off|auto``, ``--reuse-port``),
gevent (one hub, ``StreamServer``; ``--reuse-port`` for the multi-process peer), asyncio,
uvloop (streams), uvloop-protocol (an ``asyncio.Protocol`` on uvloop, the fastest Python peer),
threads (``socketserver.ThreadingTCPServer``).  ``echo`` sends back what it reads;
``discard`` reads to EOF and closes.  Prints ``ready PORT`` once listening; SIGTERM stops it.
Loopback only.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import ssl
import sys
from typing import Any

BUF = 256 * 1024


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.tls[0], args.tls[1])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def serve_blocking(sock: Any, mode: str) -> None:
    """The baselines' connection loop in plain blocking calls (gevent's socket or a thread's):
    echo every read back, or discard a bulk stream."""
    if mode == "echo":
        while True:
            data = sock.recv(65536)
            if not data:
                return
            sock.sendall(data)
    buf = bytearray(BUF)
    while sock.recv_into(buf):
        pass


def ready(port: int) -> None:
    print(f"ready {port}", flush=True)


def wait_for_term() -> None:
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def block_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})


def run_qioc(args: argparse.Namespace) -> None:
    from qioc_green import IOThreadPool, NetListener, TLSChannel

    block_signals()
    pin = {"on": True, "off": False, "auto": None}[args.pin]
    sctx = tls_context(args)
    follow = not args.no_follow

    def handler(ch: object) -> None:
        ch.set_follow_coroutine_ctx(follow)  # type: ignore[attr-defined]
        if sctx is not None:
            ch = TLSChannel.server(ch, sctx)  # type: ignore[arg-type]
            ch.handshake(timeout=30)  # type: ignore[attr-defined]
        if args.mode == "echo" and os.environ.get("QIOC_BENCH_RAW"):
            # The floor: the lean loop of PERF-NOTES on the channel's raw socket (experiments only).
            from gevent import get_hub
            from greenlet import getcurrent

            sock = ch.socket  # type: ignore[attr-defined]
            hub = get_hub()
            rw = hub.loop.io(sock.fileno(), 1)
            me = getcurrent()
            while True:
                rw.start(me.switch)
                hub.switch()
                rw.stop()
                data = sock.recv(65536)
                if not data:
                    return
                sock.send(data)
        elif args.mode == "echo":
            read = ch.read  # type: ignore[attr-defined]
            write_all = ch.write_all  # type: ignore[attr-defined]
            while True:
                data = read(65536)
                if not data:
                    return
                write_all(data)
        else:
            buf = bytearray(BUF)
            readinto = ch.readinto  # type: ignore[attr-defined]
            while readinto(buf):
                pass
            ch.close()  # type: ignore[attr-defined]

    with IOThreadPool(args.iothreads, pin=pin) as pool:
        lst = NetListener("bench", reuse_port=args.reuse_port)
        lst.open(f"tcp:127.0.0.1:{args.port}")
        lst.set_client_handler(handler, pool)
        ready(args.port)
        wait_for_term()
        lst.close(grace=0.5)
        if os.environ.get("QIOC_BENCH_STATS"):  # experiments: the placement the pool chose
            from qioc_green import _hub

            print(repr(pool), _hub.placement_stats(), file=sys.stderr, flush=True)


def run_gevent(args: argparse.Namespace) -> None:
    from gevent import ssl as gssl
    from gevent.server import StreamServer

    sctx = tls_context(args)

    def handle(sock: socket.socket, addr: object) -> None:
        try:
            serve(sock)
        except (ConnectionError, OSError):
            pass

    def serve(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sctx is not None:
            g = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
            g.load_cert_chain(args.tls[0], args.tls[1])
            sock = g.wrap_socket(sock, server_side=True)
        serve_blocking(sock, args.mode)

    from gevent import socket as gsocket

    lsock = gsocket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.reuse_port:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    lsock.bind(("127.0.0.1", args.port))
    lsock.listen(1024)
    server = StreamServer(lsock, handle)
    server.start()
    import gevent

    gevent.signal_handler(signal.SIGTERM, server.stop)
    ready(args.port)
    server.serve_forever()


def run_asyncio(args: argparse.Namespace, use_uvloop: bool) -> None:
    import asyncio

    sctx = tls_context(args)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if args.mode == "echo":
                    writer.write(data)
                    await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", args.port, ssl=sctx, backlog=1024,
                                            limit=BUF)
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        ready(args.port)
        await stop
        server.close()

    if use_uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def run_protocol(args: argparse.Namespace) -> None:
    """asyncio's Protocol on uvloop: data_received writes back (echo) or drops (discard)."""
    import asyncio

    import uvloop

    sctx = tls_context(args)
    echo = args.mode == "echo"

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            if echo:
                self.transport.write(data)

        def eof_received(self) -> bool:
            return False

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", args.port, ssl=sctx, backlog=1024)
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        ready(args.port)
        await stop
        server.close()

    uvloop.run(main())


def run_threads(args: argparse.Namespace) -> None:
    import socketserver
    import threading

    sctx = tls_context(args)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                self.serve()
            except (ConnectionError, OSError):
                pass

        def serve(self) -> None:
            sock = self.request
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if sctx is not None:
                sock = sctx.wrap_socket(sock, server_side=True)
            serve_blocking(sock, args.mode)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 1024

    block_signals()
    server = Server(("127.0.0.1", args.port), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    ready(args.port)
    wait_for_term()
    server.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["qioc", "gevent", "asyncio", "uvloop", "uvloop-protocol", "threads"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["echo", "discard"], default="echo")
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    p.add_argument("--iothreads", type=int, default=1)
    p.add_argument("--no-follow", action="store_true")
    p.add_argument("--pin", choices=["on", "off", "auto"], default="auto")
    p.add_argument("--reuse-port", action="store_true")
    args = p.parse_args()
    if args.kind == "qioc":
        run_qioc(args)
    elif args.kind == "gevent":
        run_gevent(args)
    elif args.kind == "uvloop-protocol":
        run_protocol(args)
    elif args.kind in ("asyncio", "uvloop"):
        run_asyncio(args, args.kind == "uvloop")
    else:
        run_threads(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
