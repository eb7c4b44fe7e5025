#!/usr/bin/env python3
"""Split-direction echo: each connection is read by a greenlet in one IOThread and written by a
greenlet in another, on the same channel, in plain blocking style.

    python examples/split_echo_demo.py [--clients N] [--seconds S] [--size BYTES]

It listens on 127.0.0.1 (an ephemeral port), connects N clients from the main thread, lets them
echo for S seconds, checks every byte, and prints how many reads and writes each IOThread did.
This is the seed's exact case: the reading greenlet parks on its own thread's hub while the
writing greenlet of another thread parks on its own, on one file descriptor.
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time

import gevent

from qioc_green import ChannelClosedError, IOThread, Queue, QueueClosed, SocketChannel, UnexpectedEOF

counts: collections.Counter[str] = collections.Counter()
counts_lock = threading.Lock()


def count(what: str, n: int = 1) -> None:
    with counts_lock:
        counts[f"{threading.current_thread().name} {what}"] += n


def serve_connection(ch: SocketChannel, reader_thread: IOThread, writer_thread: IOThread) -> None:
    """Read in one IOThread, write in another; a bounded cross-thread queue carries the data."""
    handoff: Queue[bytes] = Queue(maxsize=16)

    def reader() -> None:
        try:
            while data := ch.read(65536):
                count("reads")
                handoff.put(data)
        except ChannelClosedError:
            pass
        handoff.close()

    def writer() -> None:
        try:
            while True:
                ch.write_all(handoff.get())
                count("writes")
        except QueueClosed:
            ch.close()

    ch.set_follow_coroutine_ctx(True)
    reader_thread.context.spawn(reader)
    writer_thread.context.spawn(writer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args(argv)

    lst = SocketChannel.listen("tcp:127.0.0.1:0")
    print(f"listening on {lst.local_address}", flush=True)
    with IOThread("reader-iothread") as rt, IOThread("writer-iothread") as wt:
        def acceptor() -> None:
            try:
                while True:
                    serve_connection(lst.accept(), rt, wt)
            except ChannelClosedError:
                pass

        lst.set_follow_coroutine_ctx(True)
        acc = gevent.spawn(acceptor)
        deadline = time.monotonic() + args.seconds
        totals = {"requests": 0, "bytes": 0}

        def client(i: int) -> None:
            ch = SocketChannel.connect(lst.local_address, follow=True)
            with ch:
                payload = bytes([i % 256]) * args.size
                while time.monotonic() < deadline:
                    ch.write_all(payload)
                    echoed = ch.read_all(len(payload))
                    if echoed != payload:
                        raise SystemExit(f"client {i}: echo differs")
                    totals["requests"] += 1
                    totals["bytes"] += len(payload)

        try:
            gevent.joinall([gevent.spawn(client, i) for i in range(args.clients)], raise_error=True)
        except (UnexpectedEOF, ChannelClosedError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            lst.close()
            acc.join(5)
    secs = args.seconds
    print(f"{args.clients} clients, {totals['requests']} echoes of {args.size} B in {secs:.1f} s "
          f"({totals['requests'] / secs:,.0f}/s), every byte checked")
    for key in sorted(counts):
        print(f"  {key:28} {counts[key]:>9,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
