"""``qioc-migration-receiver``: receive a QEMU live migration where a destination QEMU's
``-incoming`` would stand.

A real QEMU runs ``migrate`` to this program unchanged; it receives the stream in blocking
style in a greenlet of an IOThread, parses it on the fly, and can save it byte for byte, rebuild
the guest's RAM blocks as files, write a JSON summary, and pass the stream on to a real
destination QEMU (which then resumes the VM).

    qioc-migration-receiver tcp:127.0.0.1:0 --save vm.mig --json vm.json
    qioc-migration-receiver tcp::4444 --forward tcp:127.0.0.1:4445
    qioc-migration-receiver tcp::4444 --multifd-channels 4 --ram-dir ram/
    python -m qioc_green.migration exec:'cat vm.mig' --ram-dir ram/
    qioc-migration-receiver tcp:127.0.0.1:4444 --tls-creds /etc/pki/qemu --ram-dir ram/
    qioc-migration-receiver --qmp unix:/tmp/rx.qmp defer

It answers on the return path as a destination QEMU does (PONG, SWITCHOVER_ACK, SHUT; or, with
--forward, relays the real destination's answers), takes postcopy migrations, speaks TLS, and
with --qmp serves a QMP monitor (``-incoming defer`` then ``migrate-incoming``, as libvirt
drives a destination); see the package README.

Exit status: 0 when every migration received was complete and well formed; 1 otherwise (the
one-line error on stderr names the stream offset and what was expected); 2 for bad usage. With
--qmp the monitor stays up after the migration until ``quit``; then 0 if it completed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

import qioc_green

from ._destination import answers_back
from ._file_input import MappedRamReceiver, replay_channels
from ._incoming import IncomingSettings, plain_stream_checks
from ._monitor import Monitor
from ._multifd_compress import COMPRESSIONS
from ._multifd_next import Handover
from ._multifd_receiver import MultifdReceiver
from ._multifd_tls import StrayWatcher
from ._qmp_dispatch import CommandError
from ._receiver import Outcome, Receiver, numbered, stderr_is_terminal
from ._report import PROG
from ._report import error as _error
from ._report import finish as _finish
from ._settings import DestinationSettings
from ._sinks import BUFFERS, CHUNK, preallocated
from ._summary import Summary
from ._tls import HANDSHAKE_TIMEOUT, TlsCreds, TlsError, accept_tls
from ._uri import Endpoint, Incoming, parse_uri

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
    p.add_argument("uri", help="where the stream comes from; 'defer' (with --qmp): wait for "
                                "QMP migrate-incoming to say")
    p.add_argument("--save", metavar="FILE", help="write the raw stream, byte for byte")
    p.add_argument("--ram-dir", metavar="DIR",
                   help="rebuild each RAM block as a (sparse) file in DIR")
    p.add_argument("--ram-prealloc", metavar="BLOCK=SIZE", action="append", default=[], help=(
        "--ram-dir's BLOCK file allocated and mapped first (pc.ram=1G), as -mem-prealloc"))
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
    p.add_argument("--buffer-size", type=_bytes, default=CHUNK, metavar="BYTES",
                   help=f"receive buffer size (K, M: binary multiples; default {CHUNK})")
    p.add_argument("--buffers", type=int, default=BUFFERS, metavar="N",
                   help=f"buffers shared with the forwarding writer: the relay's memory bound "
                        f"(default {BUFFERS})")
    p.add_argument("--multifd-channels", type=int, metavar="N",
                   help="the source uses multifd with N channels (its multifd-channels): take "
                        "the main channel and N multifd channels, each read in its own "
                        "IOThread; a multifd stream never says how many it has")
    p.add_argument("--multifd-compression", choices=COMPRESSIONS, metavar="METHOD",
                   help="the source's multifd-compression (none, zlib, zstd; zstd needs the "
                        "zstandard package); default: what the packets say, held to on "
                        "every channel")
    p.add_argument("--channel-timeout", type=float, default=10.0, metavar="S",
                   help="with multifd: fail when expected connections have not come S seconds "
                        "after they were needed (default 10)")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary line on stdout")
    g = p.add_argument_group("as a destination QEMU")
    g.add_argument("--qmp", metavar="ADDR",
                   help="serve a QMP monitor on unix:PATH (or tcp:HOST:PORT), as QEMU's -qmp; "
                        "it stays up after the migration until 'quit'")
    g.add_argument("--switchover-ack", choices=("auto", "on", "off"), default="auto",
                   help="without --qmp: answer SWITCHOVER_ACK when the return path opens (auto: "
                        "if the source's machine type is 8.1 or newer; --qmp: the capability)")
    g.add_argument("--tls-creds", metavar="DIR",
                   help="take the source over TLS: DIR in QEMU's tls-creds-x509 layout "
                        "(ca-cert.pem, server-cert.pem, server-key.pem); plaintext is refused")
    g.add_argument("--tls-verify-peer", action="store_true",
                   help="require a client certificate from the source, signed by ca-cert.pem")
    g.add_argument("--forward-tls-creds", metavar="DIR",
                   help="speak TLS to the --forward destination: DIR holds ca-cert.pem "
                        "(and client-cert.pem, client-key.pem if it wants one)")
    g.add_argument("--forward-tls-hostname", metavar="NAME",
                   help="the name the destination's certificate must carry (QEMU's "
                        "tls-hostname; default: the host of the --forward URI)")
    return p


def _bytes(text: str) -> int:
    """A byte count with an optional K, M or G (binary multiples)."""
    scale = 1
    if text[-1:].upper() in ("K", "M", "G"):
        scale, text = 1 << (10 * "KMG".index(text[-1].upper()) + 10), text[:-1]
    try:
        return int(float(text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte count (e.g. 256K), got {text!r}") from None


def _rate(text: str) -> tuple[float, float]:
    """``--min-rate BYTES[/S]`` as (bytes a second, window seconds)."""
    amount, _, window = text.partition("/")
    try:
        rate, secs = float(_bytes(amount)), float(window) if window else 10.0
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected BYTES[/SECONDS] (e.g. 1M/10), got {text!r}") from None
    if rate <= 0 or secs <= 0:
        raise argparse.ArgumentTypeError(f"the rate and its window must be positive, got {text!r}")
    return rate, secs


def _refused(error: str) -> Outcome:
    """The outcome of a migration refused before its first byte (its TLS handshake)."""
    d = Summary().as_dict(elapsed_s=0.0, bytes_total=0)
    d["error"] = error
    return Outcome(d, error)


class _Stoppable(Protocol):  # a Receiver or a MultifdReceiver
    def stop(self, reason: str = ...) -> None: ...


class _Run:
    """What a signal (or QMP quit) must reach: the migration being received, or the next one;
    and (``handover``) the next migration's connections that came while one ran, closed by
    whoever ends the run. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: str | None = None
        self._rx: _Stoppable | None = None
        self.handover = Handover()

    def attach(self, rx: _Stoppable) -> None:
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
          forward_ctx: qioc_green.Context | None, run: _Run | None = None,
          settings: DestinationSettings | None = None, rp_ctx: qioc_green.Context | None = None,
          forward_tls: tuple[Any, str | None] | None = None, *,
          strict_compression: bool = True, file_kind: str = "stream") -> list[bool]:
    """Take migrations one after another (in the receiving IOThread); return their verdicts.

    ``settings``: TLS, the return path (``rp_ctx``: the IOThread that writes it) and multifd
    (its capability and parameters, read when the source connects, as QEMU does;
    ``strict_compression`` false: take the compression the packets say). ``file_kind``: what a
    ``file:`` source holds (``DestinationSettings.prepare``)."""
    run = run or _Run()
    settings = settings or DestinationSettings()
    handover = run.handover if args.keep_listening else None
    verdicts: list[bool] = []
    n = 0
    while True:
        n += 1

        def name(path: str | None, n: int = n) -> str | None:
            if path is None or not args.keep_listening or path == "-":
                return path
            return numbered(path, n)

        def multifd_settings() -> IncomingSettings:
            return IncomingSettings.from_destination(settings.capabilities(),
                                                     settings.parameters(),
                                                     strict_compression=strict_compression)

        mfd = multifd_settings()
        progress = sys.stderr if stderr_is_terminal() else None
        if file_kind == "mapped-ram":
            settings.set_status("active")
            out = MappedRamReceiver(incoming.endpoint, ram_dir=args.ram_dir,
                                    allow_undescribed=args.allow_undescribed,
                                    threads=mfd.channels or 1).receive()
            if out.ok:
                settings.set_status("completed")
            else:
                settings.failed(str(out.error))
            verdicts.append(_finish(n, out, args, name))
            break
        ch = None
        taken = handover.take_all() if handover is not None else []
        if file_kind != "multifd" and not taken:
            try:
                ch = incoming.next_channel()
            except (EOFError, qioc_green.ChannelClosedError, qioc_green.ContextStoppedError):
                break  # one-shot source used, or told to stop while waiting for a sender
            except (OSError, qioc_green.ChannelError) as exc:  # file:/nonexistent, fd:99...
                _error(f"cannot open {incoming.endpoint}: {_why(exc)}")
                verdicts.append(False)
                break
            mfd = multifd_settings()  # as set when the source connected (QMP may change it)
        # One migration per run: later senders are refused, as by QEMU, except that a listener
        # looks at them first: a multifd receiver takes its channels there, a plain one names
        # a multifd source (StrayWatcher).
        accept = _acceptor(incoming) if not args.keep_listening else None
        if not args.keep_listening and accept is None:
            incoming.close()
        dest = None
        if rp_ctx is not None:
            dest = settings.destination(
                rp_ctx, relay=forward is not None and answers_back(forward),
                allow_undescribed=args.allow_undescribed, forward_tls=forward_tls,
                write_timeout=args.idle_timeout)
        tls = settings.server_tls()
        if mfd.multifd:
            multifd = MultifdReceiver(
                mfd, save=name(args.save), ram_dir=name(args.ram_dir), ram=args.prealloc,
                forward=forward, chunk=args.buffer_size, buffers=args.buffers,
                allow_undescribed=args.allow_undescribed, digest=args.digest, progress=progress,
                idle_timeout=args.idle_timeout, deadline=args.deadline,
                channel_timeout=args.channel_timeout, destination=dest,
                tls=tls if file_kind != "multifd" else None, forward_tls=forward_tls,
                handover=handover)
            settings.receiver = multifd
            run.attach(multifd)
            if file_kind == "multifd":
                out = multifd.receive(replay_channels(incoming.endpoint))
            else:
                out = multifd.receive([ch] if ch is not None else list(taken), _acceptor(incoming),
                                      extra=not args.keep_listening)
            if not args.keep_listening:
                incoming.close()
        else:
            assert ch is not None
            rx = Receiver(save=name(args.save), ram_dir=name(args.ram_dir), ram=args.prealloc,
                          forward=forward, forward_context=forward_ctx, chunk=args.buffer_size,
                          buffers=args.buffers, allow_undescribed=args.allow_undescribed,
                          digest=args.digest, progress=progress,
                          idle_timeout=args.idle_timeout, deadline=args.deadline,
                          min_rate=args.min_rate[0] if args.min_rate else None,
                          rate_window=args.min_rate[1] if args.min_rate else 10.0,
                          label=str(incoming.endpoint), destination=dest)
            rx.on_event = plain_stream_checks(rx)
            settings.receiver = rx
            run.attach(rx)
            watcher = StrayWatcher(accept, rx.stop, tls=tls) if accept is not None else None
            try:
                if tls is not None:
                    ch = accept_tls(ch, tls, timeout=args.idle_timeout or HANDSHAKE_TIMEOUT)
            except (TlsError, qioc_green.ChannelError) as exc:  # ChannelError: told to stop
                why = str(exc) if isinstance(exc, TlsError) else "stopped during the TLS handshake"
                out = _refused(f"offset 0: {why}")
                settings.failed(str(out.error))
            else:
                out = rx.receive(ch)
            finally:
                if watcher is not None:
                    watcher.stop()
                if accept is not None:
                    incoming.close()
        verdicts.append(_finish(n, out, args, name))
        if not args.keep_listening or (args.count is not None and n >= args.count):
            break
    return verdicts


def _why(exc: BaseException) -> str:
    return str(getattr(exc.__cause__ if isinstance(exc.__cause__, OSError) else exc,
                       "strerror", None) or exc)


def _acceptor(incoming: Incoming) -> Callable[[float], qioc_green.Channel] | None:
    """``accept(timeout)`` for further connections (None: no listener)."""
    if incoming.listener is None:
        return None
    return lambda timeout: incoming.next_channel(timeout=timeout)


class _Interrupted(SystemExit):
    """SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signame = signal.Signals(signum).name


def _interrupted(signum: int, frame: object) -> None:
    raise _Interrupted(signum)


def _check_destination_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.uri == "defer" and not args.qmp:
        parser.error("defer needs --qmp (migrate-incoming then says where to listen)")
    if args.qmp and args.keep_listening:
        parser.error("--qmp serves one incoming migration: no --keep-listening")
    if args.tls_verify_peer and not args.tls_creds:
        parser.error("--tls-verify-peer needs --tls-creds")
    if (args.forward_tls_creds or args.forward_tls_hostname) and not args.forward:
        parser.error("--forward-tls-creds and --forward-tls-hostname need --forward")
    if args.forward_tls_hostname and not args.forward_tls_creds:
        parser.error("--forward-tls-hostname needs --forward-tls-creds")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_destination_args(parser, args)
    try:
        source = parse_uri(args.uri) if args.uri != "defer" else None
        forward = parse_uri(args.forward) if args.forward else None
    except ValueError as exc:
        parser.error(str(exc))
    if args.buffer_size < 65536 or args.buffers < 2 or args.buffer_size * args.buffers > 1 << 32:
        parser.error("--buffer-size must be at least 65536 and --buffers at least 2, and together "
                     "at most 4 GiB (--buffer-size x --buffers is the relay's memory)")
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    if args.save == "-":  # --json - is stdout; this would have been a file named "-"
        parser.error("--save - : the stream cannot go to stdout; to pipe it, --forward 'exec:CMD'")
    if args.count is not None and not args.keep_listening:
        parser.error("--count needs --keep-listening (without it, one migration is taken)")
    for opt in ("idle_timeout", "deadline", "channel_timeout"):
        if getattr(args, opt) is not None and getattr(args, opt) <= 0:
            parser.error(f"--{opt.replace('_', '-')} must be positive")
    settings = DestinationSettings(
        monitored=bool(args.qmp), deferred=source is None,
        switchover_ack={"auto": None, "on": True, "off": False}[args.switchover_ack])
    forward_tls = None
    try:
        if args.tls_creds:
            settings.use_tls_dir(args.tls_creds, args.tls_verify_peer)
        if args.forward_tls_creds:
            forward_tls = (TlsCreds(args.forward_tls_creds, "client").context(),
                           args.forward_tls_hostname)
    except TlsError as exc:
        return _error(str(exc))
    file_kind = _multifd_args(parser, args, source, settings)
    if file_kind is None:
        return 1
    incoming: Incoming | None = None
    if source is not None:
        incoming = Incoming(source, backlog=settings.backlog())
        try:
            incoming.open()
        except (OSError, qioc_green.ChannelError) as exc:
            return _error(f"cannot listen on {source}: {exc}")
        if args.keep_listening and not incoming.can_repeat:
            incoming.close()
            parser.error(f"--keep-listening needs a listening URI (tcp:, unix:), not {source}")
        settings.listening(incoming)
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
    threads = _Threads(forward is not None)
    args.prealloc = None
    try:
        if args.ram_prealloc:  # before "listening on", as -mem-prealloc: outside the migration
            try:
                args.prealloc = preallocated(args.ram_prealloc, args.ram_dir, one=not (
                    args.keep_listening or source is None or source.kind not in ("tcp", "unix")))
            except ValueError as exc:
                parser.error(f"--ram-prealloc: {exc}")
            except OSError as exc:
                return _error(f"--ram-prealloc: {exc.strerror or exc}")
        return _run(incoming, args, forward, forward_tls, settings, threads)
    finally:
        if incoming is not None:
            incoming.close()
        threads.stop()
        if args.prealloc is not None:
            args.prealloc.close()


def _multifd_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  source: Endpoint | None, settings: DestinationSettings) -> str | None:
    """Set multifd from the command line, as QMP would, then check the source as
    ``migrate-incoming`` does (``DestinationSettings.prepare``: one rule for both) and tell
    what a ``file:`` holds; None (the line said) when it cannot be read."""
    mfd: dict[str, Any] = {}
    if args.multifd_channels is not None:
        if not 1 <= args.multifd_channels <= 255:
            parser.error(f"--multifd-channels expects 1 to 255 (QEMU's range), not "
                         f"{args.multifd_channels}")
        mfd["multifd-channels"] = args.multifd_channels
    if args.multifd_compression is not None:
        if args.multifd_channels is None:
            parser.error("--multifd-compression needs --multifd-channels")
        mfd["multifd-compression"] = args.multifd_compression
    settings.outputs = "--save" if args.save else "--forward" if args.forward else None
    settings.min_rate = bool(args.min_rate)
    try:
        if mfd:
            settings.set_capabilities({"multifd": True})
            settings.set_parameters(mfd)
        return settings.prepare(source) if source is not None else "stream"
    except CommandError as exc:
        parser.error(str(exc))
    except OSError as exc:
        _error(f"cannot open {source}: {_why(exc)}")
    return None


def _say_listening(incoming: Incoming) -> None:
    if incoming.listening is not None:
        ep = incoming.endpoint
        where = incoming.listening if ep.kind != "unix" else f"unix:{ep.path}"
        print(f"listening on {where}", flush=True)


class _Threads:
    """The IOThreads of a run: receiving, the return path, forwarding."""

    def __init__(self, forwarding: bool) -> None:
        self.recv = qioc_green.IOThread("mig-recv").start()
        self.rp = qioc_green.IOThread("mig-return-path").start()
        self.fwd = qioc_green.IOThread("mig-forward").start() if forwarding else None

    def stop(self) -> None:
        for t in (self.recv, self.rp, self.fwd):
            if t is not None:
                t.stop()


def _run(incoming: Incoming | None, args: argparse.Namespace, forward: Endpoint | None,
         forward_tls: tuple[Any, str | None] | None, settings: DestinationSettings,
         threads: _Threads) -> int:
    """Say where we listen, serve QMP if asked, wait for ``migrate-incoming`` (defer), receive,
    then with a monitor wait for ``quit``. Runs in the main thread; every wait lets its hub
    run. A signal, or ``quit`` during the migration, stops it where it is parked
    (``Receiver.stop``): it reports one line and cleans up within STOP_WAIT."""
    started = qioc_green.Event()
    quitting = qioc_green.Event()
    finished = qioc_green.Event()
    opened: list[Incoming] = []

    def on_incoming(inc: Incoming) -> None:  # in the monitor's thread
        opened.append(inc)
        _say_listening(inc)
        started.set()

    def on_quit() -> None:
        quitting.set()
        started.set()
        finished.set()

    settings.on_incoming = on_incoming
    settings.on_quit = on_quit
    run = _Run()
    monitor: Monitor | None = None
    fut: qioc_green.Future[list[bool]] | None = None
    verdicts: list[bool] = []

    def result() -> list[bool]:
        """The migrations' verdicts, waiting STOP_WAIT at most (then their thread is stopped)."""
        assert fut is not None
        try:
            return list(fut.result(STOP_WAIT))
        except TimeoutError:
            threads.recv.stop()  # wakes whatever still waits with ContextStoppedError
        except _Interrupted:
            raise
        except BaseException:  # noqa: BLE001 - stopped; the greenlet has reported what it had
            pass
        return [False]

    try:
        try:
            if incoming is not None:
                _say_listening(incoming)
            if args.qmp:
                try:
                    monitor = Monitor(args.qmp, settings)
                except (OSError, qioc_green.ChannelError) as exc:
                    return _error(f"cannot serve QMP on {args.qmp}: {exc}")
                settings.on_status = monitor.status
                print(f"qmp on {monitor.addresses[0]}", flush=True)
            if incoming is None:
                started.wait()
                if not opened:
                    return 1  # quit before any migration
                incoming = opened[0]

            def receive(incoming: Incoming = incoming) -> list[bool]:
                try:
                    return serve(incoming, args, forward,
                                 threads.fwd.context if threads.fwd else None, run, settings,
                                 threads.rp.context, forward_tls, file_kind=settings.file_kind,
                                 strict_compression=bool(args.qmp)
                                 or args.multifd_compression is not None)
                finally:
                    run.handover.close()
                    finished.set()

            fut = threads.recv.context.spawn(receive)
            finished.wait()
            if quitting.is_set() and not fut.done():
                run.stop("stopped by QMP quit")  # during the migration: cut short, reported
                incoming.close()
            verdicts = result()
            if monitor is not None:
                quitting.wait()
        except _Interrupted as sig:
            # Stop taking migrations; one in progress is cut short, reported, its files kept.
            run.stop(f"stopped by {sig.signame}")
            for inc in (incoming, *opened):
                if inc is not None:
                    inc.close()
            try:
                verdicts = result() if fut is not None else []
            except _Interrupted:
                threads.recv.stop()
                verdicts = [False]
            if not verdicts:
                _error(f"stopped by {sig.signame} before any migration arrived")
    finally:
        for inc in opened:
            inc.close()
        if monitor is not None:
            monitor.close()
    return 0 if verdicts and all(verdicts) else 1
