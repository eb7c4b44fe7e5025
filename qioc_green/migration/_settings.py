"""What a destination is set to and where its incoming migration stands: the receiver's
capabilities, parameters and TLS objects, as a QMP monitor sets them (``MigrationTarget``) and
as the command line does, and the one incoming migration's status and counters.

:class:`DestinationSettings` is the monitor's ``MigrationTarget``; the command line fills the
same object (``--tls-creds`` is a ``tls-creds-x509`` object, ``--switchover-ack`` the
capability), so one code path builds each migration's TLS context and return path from it.
Its methods run in the monitor's thread; the receiving thread updates the status with
:meth:`DestinationSettings.set_status` and is read (counters) without locks: plain attribute
reads of values another thread replaces whole.

What can be set, and what is refused (one line naming it, QMP's ``GenericError``):

- Capabilities: ``SUPPORTED`` are taken (the return path is always answered when the source
  opens it, as by QEMU; ``switchover-ack`` and ``postcopy-ram`` then behave as on a QEMU
  destination: SWITCHOVER_ACK only with the former, a postcopy ADVISE refused without the
  latter); ``multifd`` with ``multifd-channels`` and ``multifd-compression`` makes the
  receiver take N channels (``_multifd_receiver``), over TLS too, ``mapped-ram`` a ``file:``
  of that kind. The others are refused with the reason in ``REFUSED``; combinations QEMU
  refuses are refused by the dispatcher with QEMU's words (``postcopy-ram`` with ``multifd``:
  "Postcopy is not yet compatible with multifd"), and, as QEMU 10.0, multifd cannot be
  switched on once ``migrate-incoming`` has run ("Multifd must be set before incoming
  starts"); ``multifd-channels`` and ``multifd-compression`` can, until the source connects.
- Where a migration may come from (:meth:`DestinationSettings.prepare`, for the command line's
  URI and ``migrate-incoming``'s alike): with multifd, a URI that takes many connections
  (``tcp:``, ``unix:``, a listening ``fd:``) or a ``file:`` whose kind carries the channels (a
  mapped-ram file, a migration saved with multifd); else QEMU's "Migration requires
  multi-channel URIs (e.g. tcp)". A ``file:`` is looked at first: saved with multifd, its
  channel count becomes the setting; mapped-ram, it is no stream to save or forward.
- Parameters: all of QEMU's, type-checked by the dispatcher; kept and reported. ``tls-creds``
  must name a ``tls-creds-x509`` object for a server endpoint (QEMU checks that only when the
  source connects; here ``migrate-set-parameters`` says it at once); ``tls-authz`` is refused.
- ``object-add``: ``tls-creds-x509`` only (``dir``, ``endpoint``, ``verify-peer``), loaded and
  checked at once as QEMU does (a missing file is an error then, not at the first
  connection). It is how libvirt sets up TLS: ``object-add``, then ``migrate-set-parameters
  tls-creds``. ``--tls-creds DIR`` on the command line is the object ``cli-tls0``.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from qioc_green import Context

from ._destination import Destination
from ._file_input import input_kind, saved_channels
from ._multifd_compress import COMPRESSIONS, DecompressError, decompressor_for
from ._multifd_receiver import MultifdReceiver
from ._qmp_dispatch import (
    DEFAULT_PARAMETERS,
    SOURCE_ONLY_CAPABILITIES,
    CommandError,
    IncomingInfo,
    RamStats,
)
from ._tls import TlsCreds, TlsError
from ._uri import Endpoint, Incoming, is_listening_socket, parse_uri

if TYPE_CHECKING:
    from ._receiver import Receiver

SUPPORTED = frozenset({"events", "return-path", "switchover-ack", "postcopy-ram",
                       "x-ignore-shared", "zero-blocks", "multifd",
                       "mapped-ram"}) | SOURCE_ONLY_CAPABILITIES
REFUSED = {
    "xbzrle": "XBZRLE-encoded pages are not supported by this receiver",
    "rdma-pin-all": "RDMA is not supported by this receiver",
    "x-colo": "COLO is not supported by this receiver",
    "postcopy-preempt": "postcopy-preempt needs a second channel, which this receiver does "
                        "not take",
    "dirty-bitmaps": "block dirty bitmaps are not migrated by this receiver",
}
CLI_TLS_ID = "cli-tls0"
MULTI_CHANNEL = "Migration requires multi-channel URIs (e.g. tcp)"  # QEMU's words
_LIVE = ("setup", "active", "postcopy-active")


class DestinationSettings:
    """The receiver's settings and its incoming migration's state (see the module notes).

    ``monitored``: a QMP monitor sets the capabilities (then ``switchover-ack`` and
    ``postcopy-ram`` are exactly the capabilities; without one, ``switchover_ack`` (None:
    decide from the source's machine type) and no postcopy check). ``deferred``: started
    with ``defer``, so ``migrate-incoming`` is what starts listening. ``on_incoming(incoming)``
    is called (in the monitor's thread) when it has; ``on_quit()`` on ``quit``.
    ``on_status(status)``: tell the monitor (any thread, never blocks). ``outputs``: the
    command line's ``--save``/``--forward`` if given, ``min_rate`` its ``--min-rate`` (what
    :meth:`prepare` must know of the receiver besides its settings).
    """

    def __init__(self, *, monitored: bool = False, deferred: bool = False,
                 switchover_ack: bool | None = None,
                 on_incoming: Callable[[Incoming], None] | None = None,
                 on_quit: Callable[[], None] | None = None) -> None:
        self.monitored = monitored
        self.deferred = deferred
        self.switchover_ack = switchover_ack
        self.on_incoming = on_incoming
        self.on_quit = on_quit
        self.on_status: Callable[[str], None] | None = None
        self.caps: dict[str, bool] = {}
        self.params: dict[str, Any] = dict(DEFAULT_PARAMETERS)
        self.objects: dict[str, TlsCreds] = {}
        self._contexts: dict[str, ssl.SSLContext] = {}
        # the incoming migration
        self.status: str | None = None
        self.error: str | None = None
        self.addresses: list[dict[str, Any]] = []
        self.receiver: Receiver | MultifdReceiver | None = None
        self.destination_state: Destination | None = None
        self.started_at = 0.0
        self.ended_at: float | None = None
        self.postcopy_from: int | None = None  # bytes received when postcopy began
        self.outputs: str | None = None
        self.min_rate = False
        self.file_kind = "stream"  # what the incoming migration's file: holds (prepare)

    # -- set up by the command line --------------------------------------------------------------

    def use_tls_dir(self, path: str, verify_peer: bool) -> None:
        """``--tls-creds DIR [--tls-verify-peer]``. Raises TlsError (one line)."""
        self.object_add_creds(CLI_TLS_ID, TlsCreds(path, "server", verify_peer))
        self.params["tls-creds"] = CLI_TLS_ID

    def object_add_creds(self, oid: str, creds: TlsCreds) -> None:
        if oid in self.objects:
            raise CommandError(f"attempt to add duplicate property '{oid}' to object "
                               "(type 'container')")
        self._contexts[oid] = creds.context()
        self.objects[oid] = creds

    # -- what one migration is set up with ----------------------------------------------------

    def server_tls(self) -> ssl.SSLContext | None:
        """The TLS context the source's connections are accepted with (None: plaintext)."""
        oid = self.params.get("tls-creds") or ""
        return self._contexts.get(oid) if oid else None

    def backlog(self) -> int:
        """The listen queue a migration needs: the main channel and the multifd channels."""
        return int(self.params["multifd-channels"]) + 1 if self.caps.get("multifd") else 1

    def prepare(self, endpoint: Endpoint) -> str:
        """Check that a migration from ``endpoint`` can be taken as set (see the module notes)
        and say what it is: ``stream``, or for a ``file:`` ``multifd`` (saved with multifd: its
        channel count is now the setting) or ``mapped-ram``. Raises CommandError (one line),
        OSError (a ``file:`` that cannot be read)."""
        kind = input_kind(endpoint) if endpoint.kind == "file" else "stream"
        multifd = bool(self.caps.get("multifd"))
        if kind == "multifd":
            saved = len(saved_channels(endpoint.path))
            if multifd and self.params["multifd-channels"] != saved:
                raise CommandError(f"multifd-channels is {self.params['multifd-channels']}, but "
                                   f"{endpoint.path} has {saved} saved multifd channels beside it")
            self.caps["multifd"] = multifd = True
            self.params["multifd-channels"] = saved
        elif kind == "mapped-ram" and self.outputs:
            raise CommandError(f"{self.outputs} does not apply to a mapped-ram file (RAM at fixed "
                               "offsets, not a stream): copy the file, or restore it with a "
                               "QEMU started -incoming defer and migrate-incoming file:")
        elif multifd and kind == "stream" and not (
                endpoint.kind in ("tcp", "unix")
                or (endpoint.kind == "fd" and is_listening_socket(endpoint.fd))):
            raise CommandError(f"{MULTI_CHANNEL}: multifd takes tcp:, unix:, a listening fd:, a "
                               f"mapped-ram file: or one saved with multifd, not {endpoint}")
        if multifd and kind != "mapped-ram" and self.min_rate:
            raise CommandError("--min-rate does not apply with multifd (its main channel is "
                               "quiet while the channels carry RAM): use --deadline or "
                               "--idle-timeout")
        self.file_kind = kind
        return kind

    def destination(self, context: Context, **kwargs: Any) -> Destination:
        """The return path of the next migration, set as these settings say (``kwargs``:
        ``relay``, ``allow_undescribed``, ``forward_tls``, ``write_timeout``)."""
        if self.monitored:
            ack: bool | None = self.caps.get("switchover-ack", False)
            postcopy: bool | None = self.caps.get("postcopy-ram", False)
        else:
            ack, postcopy = self.switchover_ack, None
        dest = Destination(context, switchover_ack=ack, postcopy_ram=postcopy,
                           status=self.set_status, **kwargs)
        self.destination_state = dest
        return dest

    def set_status(self, status: str) -> None:
        """The incoming migration is now in ``status`` (from the receiving thread)."""
        rx = self.receiver
        if status == "active":
            self.started_at = time.monotonic()
        elif status == "postcopy-active" and rx is not None:
            self.postcopy_from = rx.received
        elif status == "failed" and self.destination_state is not None:
            self.error = self.destination_state.final_error or self.error
        if status in ("completed", "failed"):
            self.ended_at = time.monotonic()
        self.status = status
        if self.on_status is not None:
            self.on_status(status)

    def failed(self, error: str) -> None:
        """The migration failed before it had a return path (a TLS handshake)."""
        self.error = error
        self.set_status("failed")

    # -- MigrationTarget ------------------------------------------------------------------------

    def incoming_info(self) -> IncomingInfo:
        status = self.status
        if status is None:
            return IncomingInfo()
        addresses = self.addresses if status in _LIVE else []
        return IncomingInfo(status, addresses, self.error if status == "failed" else None,
                            self._ram_stats())

    def _ram_stats(self) -> RamStats | None:
        rx = self.receiver
        if rx is None:
            return None
        blocks: list[dict[str, Any]] = []
        for _ in range(3):  # the receiving thread may add a block meanwhile: look again
            try:
                blocks = [dict(b) for b in list(rx.summary.ram_blocks.values())]
                break
            except RuntimeError:
                continue
        normal = sum(b["normal_pages"] for b in blocks)
        zero = sum(b["zero_pages"] for b in blocks)
        multifd_bytes = 0
        if isinstance(rx, MultifdReceiver):  # the channels carry most pages
            normal, zero = (a + b for a, b in zip((normal, zero), rx.channel_pages()))
            multifd_bytes = rx.multifd_bytes
        received = rx.received
        end = self.ended_at if self.ended_at is not None else time.monotonic()
        elapsed = max(end - self.started_at, 1e-9) if self.started_at else 0.0
        post = self.postcopy_from
        return RamStats(
            transferred=received, total=sum(b["size"] for b in blocks),
            duplicate=zero, normal=normal, multifd_bytes=multifd_bytes,
            precopy_bytes=received if post is None else post,
            postcopy_bytes=0 if post is None else received - post,
            mbps=round(received * 8 / elapsed / 1e6, 3) if elapsed else 0.0)

    def run_state(self) -> str:
        dest = self.destination_state
        if self.status != "completed":
            return "inmigrate"
        return (dest.source_runstate if dest is not None else None) or "paused"

    def capabilities(self) -> Mapping[str, bool]:
        return self.caps

    def set_capabilities(self, changes: Mapping[str, bool]) -> None:
        if self.status not in (None, "setup"):
            raise CommandError("There's a migration process in progress")
        if changes.get("multifd") and not self.caps.get("multifd") and self.status is not None:
            raise CommandError("Multifd must be set before incoming starts")  # QEMU 10.0's
        for name, state in changes.items():
            if state and name not in SUPPORTED:
                why = REFUSED.get(name, "not supported by this receiver")
                raise CommandError(f"Capability '{name}': {why}")
        self.caps.update(changes)

    def parameters(self) -> Mapping[str, Any]:
        return self.params

    def set_parameters(self, changes: Mapping[str, Any]) -> None:
        oid = changes.get("tls-creds")
        if oid:
            creds = self.objects.get(oid)
            if creds is None:
                raise CommandError(f"No TLS credentials with id '{oid}'")
            if creds.endpoint != "server":
                raise CommandError("Expected TLS credentials for a server endpoint")
        if changes.get("tls-authz"):
            raise CommandError("tls-authz is not supported by this receiver")
        method = changes.get("multifd-compression")
        if method is not None:
            if method not in COMPRESSIONS:
                raise CommandError(f"multifd-compression '{method}' is not supported by this "
                                   f"receiver ({', '.join(COMPRESSIONS)})")
            try:
                decompressor_for(method)  # zstd: is zstandard there?
            except DecompressError as exc:
                raise CommandError(str(exc)) from None
        self.params.update(changes)

    def object_add(self, qom_type: str, id: str, props: Mapping[str, Any]) -> None:
        if "dir" not in props:
            raise CommandError("Parameter 'dir' is missing (this receiver loads "
                               "credentials from a directory)")
        creds = TlsCreds(props["dir"], props.get("endpoint", "client"),
                         props.get("verify-peer", True))
        try:
            self.object_add_creds(id, creds)
        except TlsError as exc:
            raise CommandError(str(exc)) from None

    def object_del(self, id: str) -> None:
        if id not in self.objects:
            raise CommandError(f"object '{id}' not found")
        if self.params.get("tls-creds") == id and self.status in _LIVE:
            raise CommandError(f"object '{id}' is in use, can not be deleted")
        del self.objects[id]
        del self._contexts[id]

    def migrate_incoming(self, uri: str, exit_on_error: bool) -> None:
        if not self.deferred or self.status is not None:
            raise CommandError("The incoming migration has already been started")
        try:
            endpoint = parse_uri(uri)
        except ValueError as exc:
            kind = uri.partition(":")[0]
            if kind not in ("tcp", "unix", "fd", "exec", "file"):
                raise CommandError(f"unknown migration protocol: {uri}") from None
            raise CommandError(str(exc)) from None
        try:
            self.prepare(endpoint)
        except OSError as exc:
            raise CommandError(f"cannot open {endpoint}: {exc.strerror or exc}") from None
        incoming = Incoming(endpoint, backlog=self.backlog())
        try:
            incoming.open()
        except OSError as exc:
            raise CommandError(f"Failed to listen on {endpoint}: {exc.strerror or exc}") from None
        self.listening(incoming)
        if self.on_incoming is not None:
            self.on_incoming(incoming)

    def listening(self, incoming: Incoming) -> None:
        """``incoming`` is open: status ``setup``, its address in QEMU's SocketAddress shape."""
        self.addresses = socket_addresses(incoming)
        self.set_status("setup")

    def quit(self) -> None:
        if self.on_quit is not None:
            self.on_quit()


def socket_addresses(incoming: Incoming) -> list[dict[str, Any]]:
    """What ``query-migrate`` lists as ``socket-address`` for this source (QEMU's shape)."""
    ep: Endpoint = incoming.endpoint
    where = incoming.listening
    if ep.kind == "unix":
        return [{"type": "unix", "path": ep.path}]
    if where is None or not where.startswith("tcp:"):
        return []
    host, _, port = where.removeprefix("tcp:").rpartition(":")
    v6 = host.startswith("[")
    return [{"type": "inet", "host": host.strip("[]"), "port": port,
             "ipv6" if v6 else "ipv4": True}]
