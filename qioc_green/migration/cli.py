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
import threading
from typing import Any

import qioc_green

from ._receiver import Outcome, Receiver, numbered, stderr_is_terminal
from ._sinks import BUFFERS, CHUNK
from ._uri import Endpoint, Incoming, parse_uri

PROG = "qioc-migration-receiver"
STOP_WAIT = 30.0  # s a stopped migration may take to clean up (end commands, drop a forward)


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
                   help="fail when no byte arrives for S seconds, or a --forward destination "
                        "takes none for S seconds")
    p.add_argument("--deadline", type=float, metavar="S",
                   help="fail a migration that has not ended S seconds after it began")
    p.add_argument("--min-rate", type=_rate, metavar="BYTES[/S]",
                   help="fail when fewer than BYTES a second (K, M, G: binary multiples) "
                        "arrive, averaged over each S seconds (default 10)")
    p.add_argument("--buffer-size", type=int, default=CHUNK, metavar="BYTES",
                   help=f"receive buffer size (default {CHUNK})")
    p.add_argument("--buffers", type=int, default=BUFFERS, metavar="N",
                   help=f"buffers shared with the forwarding writer: the relay's memory bound "
                        f"(default {BUFFERS})")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary line on stdout")
    return p


def _rate(text: str) -> tuple[float, float]:
    """``--min-rate BYTES[/S]`` as (bytes a second, window seconds)."""
    amount, _, window = text.partition("/")
    scale = 1
    if amount[-1:].upper() in ("K", "M", "G"):
        scale = 1 << (10 * "KMG".index(amount[-1].upper()) + 10)
        amount = amount[:-1]
    try:
        rate, secs = float(amount) * scale, float(window) if window else 10.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BYTES[/SECONDS] (e.g. 1M/10), got {text!r}") from None
    if rate <= 0 or secs <= 0:
        raise argparse.ArgumentTypeError(f"the rate and its window must be positive, got {text!r}")
    return rate, secs


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


class _Run:
    """What a signal must reach: the migration being received, or the next one. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: str | None = None
        self._rx: Receiver | None = None

    def attach(self, rx: Receiver) -> None:
        with self._lock:
            self._rx = rx
            reason = self.reason
        if reason is not None:
            rx.stop(reason)

    def stop(self, reason: str) -> None:
        with self._lock:
            self.reason = reason
            rx = self._rx
        if rx is not None:
            rx.stop(reason)


def serve(incoming: Incoming, args: argparse.Namespace, forward: Endpoint | None,
          forward_ctx: qioc_green.Context | None, run: _Run | None = None) -> list[bool]:
    """Take migrations one after another (in the receiving IOThread); return their verdicts."""
    run = run or _Run()
    verdicts: list[bool] = []
    n = 0
    while True:
        n += 1
        try:
            ch = incoming.next_channel()
        except (EOFError, qioc_green.ChannelClosedError, qioc_green.ContextStoppedError):
            break  # one-shot source used, or told to stop while waiting for a sender
        except (OSError, qioc_green.ChannelError) as exc:  # file:/nonexistent, fd:99...
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            _error(f"cannot open {incoming.endpoint}: {getattr(cause, 'strerror', None) or cause}")
            verdicts.append(False)
            break
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
                      idle_timeout=args.idle_timeout, deadline=args.deadline,
                      min_rate=args.min_rate[0] if args.min_rate else None,
                      rate_window=args.min_rate[1] if args.min_rate else 10.0,
                      label=str(incoming.endpoint))
        run.attach(rx)
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

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signame = signal.Signals(signum).name


def _interrupted(signum: int, frame: object) -> None:
    raise _Interrupted(signum)


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
    for opt in ("idle_timeout", "deadline"):
        if getattr(args, opt) is not None and getattr(args, opt) <= 0:
            parser.error(f"--{opt.replace('_', '-')} must be positive")
    incoming = Incoming(source)
    try:
        incoming.open()
    except (OSError, qioc_green.ChannelError) as exc:
        _error(f"cannot listen on {source}: {exc}")
        return 1
    if args.keep_listening and not incoming.can_repeat:
        incoming.close()
        parser.error(f"--keep-listening needs a listening URI (tcp:, unix:), not {source}")
    # SIGINT and SIGTERM end the run; whatever was received so far is reported and kept.
    # The handler raises a SystemExit: when it runs inside the main thread's hub, gevent
    # passes that on to the main greenlet without printing a traceback (KeyboardInterrupt
    # it would print). The migration in progress is stopped where it is parked
    # (Receiver.stop), so it reports one line and ends an exec: command before the threads
    # stop; a second signal, or a clean-up past STOP_WAIT, stops the threads at once. The
    # handlers are in place before "listening on" is printed: a caller may signal right then.
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    qioc_green.main_context()
    recv_thread = qioc_green.IOThread("mig-recv").start()
    fwd_thread = qioc_green.IOThread("mig-forward").start() if forward is not None else None
    run = _Run()
    fut = None
    try:
        try:
            if incoming.listening is not None:
                where = incoming.listening if source.kind != "unix" else f"unix:{source.path}"
                print(f"listening on {where}", flush=True)
            fut = recv_thread.context.spawn(
                serve, incoming, args, forward, fwd_thread.context if fwd_thread else None, run)
            verdicts = fut.result()
        except _Interrupted as sig:
            # Stop taking migrations; one in progress is cut short, reported, its files kept.
            run.stop(f"stopped by {sig.signame}")
            incoming.close()
            try:
                verdicts = fut.result(STOP_WAIT) if fut is not None else []
            except (_Interrupted, TimeoutError):
                recv_thread.stop()  # wakes whatever still waits with ContextStoppedError
                verdicts = [False]
            if not verdicts:
                _error(f"stopped by {sig.signame} before any migration arrived")
    finally:
        incoming.close()
        recv_thread.stop()
        if fwd_thread is not None:
            fwd_thread.stop()
    return 0 if verdicts and all(verdicts) else 1
