#!/usr/bin/env python3
"""A migration receiver inside a program of one's own: take one live migration, keep a summary.

    python examples/embedded_receiver.py [tcp:127.0.0.1:0]
    # then, in the source QEMU's monitor:  migrate tcp:127.0.0.1:PORT

The package's public API does the work: ``Incoming`` listens where a destination QEMU's
``-incoming`` would, ``Receiver`` reads and parses the stream in a greenlet of an IOThread (here
with a hook of our own on every parsed event), and the ``Outcome`` says how it went. Exit status
0 when the stream was complete and well formed.
"""

from __future__ import annotations

import sys
from collections import Counter

import qioc_green
from qioc_green.migration import NEED_DATA, Incoming, Outcome, Receiver, StreamParser, parse_uri


class CountingParser(StreamParser):
    """The stock parser, counting events by kind as they come out (the hot path stays theirs)."""

    counts: Counter[str] = Counter()

    def next_event(self):  # the signature is the parent's
        ev = super().next_event()
        if ev is not NEED_DATA:
            CountingParser.counts[type(ev).__name__] += 1
        return ev


def receive_one(uri: str) -> Outcome:
    incoming = Incoming(parse_uri(uri))
    incoming.open()
    print(f"listening on {incoming.listening}", flush=True)
    with qioc_green.IOThread("receiver") as thread:
        def run() -> Outcome:
            channel = incoming.next_channel()  # parks this greenlet until QEMU connects
            incoming.close()
            return Receiver(parser_factory=CountingParser).receive(channel)

        return thread.context.spawn(run).result()


def main(argv: list[str]) -> int:
    qioc_green.main_context()
    out = receive_one(argv[0] if argv else "tcp:127.0.0.1:0")
    d = out.summary
    print(f"{'complete' if out.ok else 'failed: ' + str(out.error)}: {d['bytes_total']} bytes, "
          f"machine {d['machine']}, {len(d['devices'])} devices")
    for name, n in sorted(CountingParser.counts.items()):
        print(f"  {n:8} {name}")
    return 0 if out.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
