"""``qioc-migration-receiver``: receive a QEMU live migration where a destination QEMU's
``-incoming`` would stand.

A real QEMU runs ``migrate`` to this program unchanged; it receives the stream in blocking
style in a greenlet of an IOThread, parses it on the fly, and can save it byte for byte, rebuild
the guest's RAM blocks as files, write a JSON summary, and pass the stream on to a real
destination QEMU (which then resumes the VM).

    qioc-migration-receiver tcp:127.0.0.1:0 --save vm.mig --json vm.json
    qioc-migration-receiver tcp::4444 --forward tcp:127.0.0.1:4445
    python -m qioc_green.migration exec:'cat vm.mig' --ram-dir ram/

Exit status: 0 when every migration received was complete and well formed; 1 otherwise (the
one-line error on stderr names the stream offset and what was expected); 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

import qioc_green

from ._receiver import Outcome, Receiver, numbered, stderr_is_terminal
from ._sinks import BUFFERS, CHUNK
from ._uri import Endpoint, Incoming, parse_uri

PROG = "qioc-migration-receiver"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Receive, parse, save and forward a QEMU live-migration stream, standing "
                    "where a destination QEMU's -incoming would.",
        epilog="URI forms (QEMU's -incoming spelling): tcp:[HOST]:PORT (port 0: an ephemeral "
               "port; the first stdout line says 'listening on tcp:HOST:PORT'), unix:PATH, "
               "fd:N (an inherited socket, pipe or file; a listening socket is accepted on), "
               "exec:CMDLINE (reads the command's stdout), file:PATH[,offset=N]. "
               "Exit status: 0 complete and well formed, 1 not, 2 bad usage.")
    p.add_argument("uri", help="where the stream comes from")
    p.add_argument("--save", metavar="FILE", help="write the raw stream, byte for byte")
    p.add_argument("--ram-dir", metavar="DIR",
                   help="rebuild each RAM block as a (sparse) file in DIR")
    p.add_argument("--json", metavar="FILE", help="write the summary as JSON ('-': stdout)")
    p.add_argument("--forward", metavar="URI",
                   help="pass the stream on to a destination while parsing it "
                        "(tcp:HOST:PORT, unix:PATH, exec:CMDLINE, file:PATH, fd:N)")
    p.add_argument("--keep-listening", action="store_true",
                   help="take successive migrations (tcp:/unix:); each is saved under its own "
                        "name: FILE-1.ext, FILE-2.ext... or with {n} in the name replaced")
    p.add_argument("--count", type=int, metavar="N",
                   help="with --keep-listening: stop after N migrations")
    p.add_argument("--allow-undescribed", action="store_true",
                   help="accept a stream that ends without the VM description JSON "
                        "(suppress-vmdesc=on, postcopy)")
    p.add_argument("--digest", action="store_true",
                   help="add the sha256 of the bytes received (and forwarded) to the summary")
    p.add_argument("--idle-timeout", type=float, metavar="S",
                   help="fail when no byte arrives for S seconds")
    p.add_argument("--buffer-size", type=int, default=CHUNK, metavar="BYTES",
                   help=f"receive buffer size (default {CHUNK})")
    p.add_argument("--buffers", type=int, default=BUFFERS, metavar="N",
                   help=f"buffers shared with the forwarding writer: the relay's memory bound "
                        f"(default {BUFFERS})")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary line on stdout")
    return p


def _error(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _report(n: int, out: Outcome, args: argparse.Namespace) -> None:
    d = out.summary
    label = f"migration {n}: " if args.keep_listening else ""
    if out.error is not None:
        _error(f"{label}{out.error}")
    if not args.quiet:
        state = "complete" if d["complete"] else "INCOMPLETE"
        rate = d["bytes_total"] / max(d["elapsed_s"] or 0, 1e-9) / 1e6
        print(f"{label}{state}: {d['bytes_total']} bytes in {d['elapsed_s']:.3f} s "
              f"({rate:.0f} MB/s), machine {d['machine']}, {len(d['sections'])} sections, "
              f"{len(d['ram_blocks'])} RAM blocks, {len(d['devices'])} devices", flush=True)


def _write_json(path: str, d: dict[str, Any]) -> None:
    text = json.dumps(d, indent=1) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def serve(incoming: Incoming, args: argparse.Namespace, forward: Endpoint | None,
          forward_ctx: qioc_green.Context | None) -> list[bool]:
    """Take migrations one after another (in the receiving IOThread); return their verdicts."""
    verdicts: list[bool] = []
    n = 0
    while True:
        n += 1
        try:
            ch = incoming.next_channel()
        except (EOFError, qioc_green.ChannelClosedError, qioc_green.ContextStoppedError):
            break  # one-shot source used, or told to stop while waiting for a sender
        if not args.keep_listening:
            incoming.close()  # one migration per run: later senders are refused, as by QEMU

        def name(path: str | None, n: int = n) -> str | None:
            if path is None or not args.keep_listening or path == "-":
                return path
            return numbered(path, n)

        rx = Receiver(save=name(args.save), ram_dir=name(args.ram_dir), forward=forward,
                      forward_context=forward_ctx, chunk=args.buffer_size, buffers=args.buffers,
                      allow_undescribed=args.allow_undescribed, digest=args.digest,
                      progress=sys.stderr if stderr_is_terminal() else None,
                      idle_timeout=args.idle_timeout)
        out = rx.receive(ch)
        json_path = name(args.json)
        if json_path is not None:
            _write_json(json_path, out.summary)
        _report(n, out, args)
        verdicts.append(out.ok)
        if not args.keep_listening or (args.count is not None and n >= args.count):
            break
    return verdicts


class _Interrupted(SystemExit):
    """SIGINT or SIGTERM."""


def _interrupted(signum: int, frame: object) -> None:
    raise _Interrupted(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        source = parse_uri(args.uri)
        forward = parse_uri(args.forward) if args.forward else None
    except ValueError as exc:
        parser.error(str(exc))
    if args.buffer_size < 65536 or args.buffers < 2:
        parser.error("--buffer-size must be at least 65536 and --buffers at least 2")
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    incoming = Incoming(source)
    try:
        incoming.open()
    except (OSError, qioc_green.ChannelError) as exc:
        _error(f"cannot listen on {source}: {exc}")
        return 1
    if args.keep_listening and not incoming.can_repeat:
        incoming.close()
        parser.error(f"--keep-listening needs a listening URI (tcp:, unix:), not {source}")
    if incoming.listening is not None:
        where = incoming.listening if source.kind != "unix" else f"unix:{source.path}"
        print(f"listening on {where}", flush=True)

    # SIGINT and SIGTERM end the run; whatever was received so far is reported and kept.
    # The handler raises a SystemExit: when it runs inside the main thread's hub, gevent
    # passes that on to the main greenlet without printing a traceback (KeyboardInterrupt
    # it would print).
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    qioc_green.main_context()
    recv_thread = qioc_green.IOThread("mig-recv").start()
    fwd_thread = qioc_green.IOThread("mig-forward").start() if forward is not None else None
    try:
        fut = recv_thread.context.spawn(
            serve, incoming, args, forward, fwd_thread.context if fwd_thread else None)
        try:
            verdicts = fut.result()
        except _Interrupted:
            # Stop taking migrations; a migration in progress is cut short (its greenlet is
            # woken with ContextStoppedError), reported as incomplete, its files kept.
            incoming.close()
            recv_thread.stop()
            try:
                verdicts = fut.result(10)
            except BaseException:  # noqa: BLE001 - stopping; the greenlet's report stands
                verdicts = [False]
    finally:
        incoming.close()
        recv_thread.stop()
        if fwd_thread is not None:
            fwd_thread.stop()
    return 0 if verdicts and all(verdicts) else 1
