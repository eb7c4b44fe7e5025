"""The QMP commands of a migration destination, sans-IO: a dispatcher over a migration target.

:class:`QmpDispatcher` runs the requests a :class:`~._qmp.QmpConnection` reports against a
:class:`MigrationTarget` (the receiver implements that small interface) and returns what to do,
in order: :class:`SendReply` bytes to that client, :class:`BroadcastEvent` an event to every client,
:class:`CloseClient` that client. No sockets, no threads; the clock is a parameter.

What QEMU 10.0's destination answers (seen on one started ``-incoming defer``)
---------------------------------------------------------------------------

- ``query-status``: ``{"status": "inmigrate", "running": false}`` until the migration ends,
  then the run state the source had (``running``, ``paused``, ``prelaunch``...). 7.2 adds
  ``singlestep``.
- ``query-migrate``: ``{}`` before ``migrate-incoming``; then ``{"status": "setup",
  "socket-address": [{"type": "inet", "host": "127.0.0.1", "port": "45249", "ipv4": true}]}``
  (the port is a string; UNIX: ``{"type": "unix", "path": ...}``), ``active``,
  ``postcopy-active``, and ``{"status": "completed"}`` (the address list is gone by then), or
  ``failed`` with ``error-desc``. A destination reports no ``ram`` counters; this one adds
  them (the issue asks for byte counts; QMP clients ignore members they do not know), in
  QEMU's ``MigrationStats`` shape.
- ``MIGRATION`` events ``{"status": ...}``: setup (at ``migrate-incoming``, before its
  reply), active, postcopy-active (at POSTCOPY_LISTEN), completed or failed; only with the
  ``events`` capability (7.2 sends ``setup`` regardless).
- ``migrate-incoming``: ``need either 'uri' or 'channels' argument``, ``unknown migration
  protocol: X``, ``The incoming migration has already been started``, ``'-incoming' was not
  specified on the command line``. ``migrate-set-capabilities``: an unknown name gets
  ``Parameter 'capability' does not accept value 'X'``; ``Capability 'switchover-ack' requires
  capability 'return-path'``; ``Postcopy is not yet compatible with multifd`` (10.0 cannot
  do both; 7.2 lets them be set, and its destination then aborts at the end of the migration:
  seen here), and the other combinations of ``migrate_caps_check()`` (:func:`caps_conflict`);
  ``Multifd must be set before incoming starts`` (switching it on after ``migrate-incoming``).
  ``migrate-set-parameters``: any parameter QEMU has is accepted (most only matter to a
  source), with type and range checks (``Parameter 'multifd-channels' expects uint8_t``).
- ``quit``: a ``SHUTDOWN`` event ``{"guest": false, "reason": "host-qmp-quit"}`` to every
  monitor, then ``{"return": {}}``, then the connection closes.
- Argument errors are ``GenericError``: ``Parameter 'x' is unexpected``, ``Parameter 'uri' is
  missing``, ``Invalid parameter type for 'uri', expected: string``.

What the receiver can do is the target's to decide: it refuses a capability or a parameter
value by raising :class:`CommandError` naming it, and the client gets that as a
``GenericError``. An exception of any other kind from the target is answered as a
``GenericError`` too (counted in ``internal_errors``): the monitor outlives its bugs.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._format import NEED_DATA
from ._qmp import (
    PAUSED,
    ErrorClass,
    QmpBadRequest,
    QmpClosed,
    QmpConnection,
    QmpError,
    QmpEvent,
    QmpGreeting,
    QmpRequest,
    QmpReturn,
)

__all__ = [
    "CAPABILITIES",
    "DEFAULT_PARAMETERS",
    "SOURCE_ONLY_CAPABILITIES",
    "BroadcastEvent",
    "CloseClient",
    "CommandError",
    "IncomingInfo",
    "MigrationTarget",
    "QmpDispatcher",
    "RamStats",
    "SendReply",
]

#: QEMU 10.0's migration capabilities, in its order (``query-migrate-capabilities``)
CAPABILITIES: tuple[str, ...] = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram",
    "x-colo", "release-ram", "return-path", "pause-before-switchover", "multifd",
    "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt",
    "switchover-ack", "dirty-limit", "mapped-ram",
)

#: capabilities that change nothing a destination receives or sends: a receiver can accept them
SOURCE_ONLY_CAPABILITIES = frozenset({
    "auto-converge", "release-ram", "pause-before-switchover", "zero-copy-send", "dirty-limit",
    "background-snapshot", "late-block-activate", "postcopy-blocktime", "validate-uuid",
})

#: QEMU 10.0's migration parameters and their defaults (``query-migrate-parameters``)
DEFAULT_PARAMETERS: dict[str, Any] = {
    "announce-initial": 50, "announce-max": 550, "announce-rounds": 5, "announce-step": 100,
    "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False, "tls-creds": "", "tls-hostname": "", "tls-authz": "",
    "max-bandwidth": 134217728, "avail-switchover-bandwidth": 0, "downtime-limit": 300,
    "x-checkpoint-delay": 20000, "multifd-channels": 2, "xbzrle-cache-size": 67108864,
    "max-postcopy-bandwidth": 0, "max-cpu-throttle": 99, "multifd-compression": "none",
    "multifd-zlib-level": 1, "multifd-qatzip-level": 1, "multifd-zstd-level": 1,
    "x-vcpu-dirty-limit-period": 1000, "vcpu-dirty-limit": 1, "mode": "normal",
    "zero-page-detection": "multifd", "direct-io": False,
}

try:  # the installed distribution's version (qioc_green.__version__ is not in its __all__)
    _VERSION = importlib.metadata.version("qioc_green")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare tree
    _VERSION = "unknown"

_U64 = (1 << 64) - 1
# name -> (kind, low, high or the enum's values); ranges from QEMU's migrate_params_check()
_PARAMETERS: dict[str, tuple[str, Any, Any]] = {
    "announce-initial": ("size", 0, _U64), "announce-max": ("size", 0, _U64),
    "announce-rounds": ("size", 0, _U64), "announce-step": ("size", 0, _U64),
    "throttle-trigger-threshold": ("uint8", 1, 100), "cpu-throttle-initial": ("uint8", 1, 99),
    "cpu-throttle-increment": ("uint8", 1, 99), "cpu-throttle-tailslow": ("bool", None, None),
    "tls-creds": ("str_or_null", None, None), "tls-hostname": ("str_or_null", None, None),
    "tls-authz": ("str_or_null", None, None), "max-bandwidth": ("size", 0, _U64),
    "avail-switchover-bandwidth": ("size", 0, _U64), "downtime-limit": ("uint64", 0, 2000000),
    "x-checkpoint-delay": ("uint32", 0, (1 << 32) - 1), "multifd-channels": ("uint8", 1, 255),
    "xbzrle-cache-size": ("size", 0, _U64), "max-postcopy-bandwidth": ("size", 0, _U64),
    "max-cpu-throttle": ("uint8", 1, 99),
    "multifd-compression": ("enum", None, ("none", "zlib", "zstd", "qatzip", "qpl", "uadk")),
    "multifd-zlib-level": ("uint8", 0, 9), "multifd-qatzip-level": ("uint8", 1, 9),
    "multifd-zstd-level": ("uint8", 0, 20), "block-bitmap-mapping": ("array", None, None),
    "x-vcpu-dirty-limit-period": ("uint64", 1, 1000), "vcpu-dirty-limit": ("uint64", 1, _U64),
    "mode": ("enum", None, ("normal", "cpr-reboot", "cpr-transfer")),
    "zero-page-detection": ("enum", None, ("none", "legacy", "multifd")),
    "direct-io": ("bool", None, None),
}
_BITS = {"uint8": 8, "uint32": 32, "uint64": 64, "size": 64}
#: the object types ``object-add`` takes here, with their properties (QEMU's QAPI types)
_OBJECT_PROPERTIES: dict[str, dict[str, tuple[str, Any, Any]]] = {
    "tls-creds-x509": {
        "dir": ("str", None, None), "endpoint": ("enum", None, ("client", "server")),
        "verify-peer": ("bool", None, None), "priority": ("str", None, None),
        "sanity-check": ("bool", None, None), "loaded": ("bool", None, None),
        "passwordid": ("str", None, None),
    },
}


class CommandError(Exception):
    """A command refused; the client gets ``error_class`` (GenericError) and ``desc``."""

    def __init__(self, desc: str, error_class: ErrorClass = ErrorClass.GenericError) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass(frozen=True, slots=True)
class RamStats:
    """RAM counters of the incoming migration (bytes and pages, as QEMU's MigrationStats)."""

    transferred: int = 0
    total: int = 0
    duplicate: int = 0  # zero pages
    normal: int = 0  # pages with data
    page_size: int = 4096
    remaining: int = 0
    precopy_bytes: int = 0
    postcopy_bytes: int = 0
    multifd_bytes: int = 0
    mbps: float = 0.0
    pages_per_second: float = 0.0

    def to_qmp(self) -> dict[str, Any]:
        return {
            "transferred": self.transferred, "remaining": self.remaining, "total": self.total,
            "duplicate": self.duplicate, "normal": self.normal,
            "normal-bytes": self.normal * self.page_size, "dirty-pages-rate": 0,
            "mbps": self.mbps, "dirty-sync-count": 0, "postcopy-requests": 0,
            "page-size": self.page_size, "multifd-bytes": self.multifd_bytes,
            "pages-per-second": self.pages_per_second, "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": 0, "postcopy-bytes": self.postcopy_bytes,
            "dirty-sync-missed-zero-copy": 0,
        }


@dataclass(frozen=True, slots=True)
class IncomingInfo:
    """What ``query-migrate`` reports. ``status`` None: no incoming migration started yet.

    ``socket_addresses``: QEMU SocketAddress dicts (``{"type": "inet", "host": ..., "port":
    "N"}``, ``{"type": "unix", "path": ...}``) while listening or receiving.
    """

    status: str | None = None
    socket_addresses: Sequence[Mapping[str, Any]] = ()
    error_desc: str | None = None
    ram: RamStats | None = None


class MigrationTarget(Protocol):
    """The receiver, as the monitor sees it. Its methods run in the monitor's thread; those
    that change something raise :class:`CommandError` to refuse (naming what and why)."""

    def incoming_info(self) -> IncomingInfo: ...

    def run_state(self) -> str:
        """``inmigrate`` until the migration ends, then e.g. ``paused``."""
        ...

    def capabilities(self) -> Mapping[str, bool]:
        """The capabilities' states (missing ones are off)."""
        ...

    def set_capabilities(self, changes: Mapping[str, bool]) -> None: ...

    def parameters(self) -> Mapping[str, Any]:
        """All parameters (start from DEFAULT_PARAMETERS)."""
        ...

    def set_parameters(self, changes: Mapping[str, Any]) -> None: ...

    def migrate_incoming(self, uri: str, exit_on_error: bool) -> None:
        """Start listening on ``uri`` (QEMU's spelling)."""
        ...

    def quit(self) -> None:
        """The monitor was told to quit; the receiver should stop."""
        ...

    def object_add(self, qom_type: str, id: str, props: Mapping[str, Any]) -> None:
        """Create object ``id`` (only ``tls-creds-x509`` here; ``props`` type-checked)."""
        ...

    def object_del(self, id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class SendReply:
    """Write ``data`` to the client whose requests were handled."""

    data: bytes


@dataclass(frozen=True, slots=True)
class BroadcastEvent:
    """Send ``event`` to every client (``QmpConnection.send`` drops it for those negotiating)."""

    event: QmpEvent


@dataclass(frozen=True, slots=True)
class CloseClient:
    """Close the client whose requests were handled (it hung up, or after ``quit``)."""


Action = SendReply | BroadcastEvent | CloseClient
_Handler = Callable[[dict[str, Any]], Any]


@dataclass
class _Run:
    events: list[QmpEvent] = field(default_factory=list)
    close: bool = False


class QmpDispatcher:
    """Run QMP requests against a :class:`MigrationTarget`. Never blocks or switches.

    ``version``: (major, minor, micro) reported by ``query-version`` and the greeting: the QEMU
    release whose destination this behaves as. ``clock``: seconds since the epoch, for event
    timestamps.
    """

    def __init__(self, target: MigrationTarget, *, version: tuple[int, int, int] = (10, 0, 0),
                 package: str = f"qioc-green {_VERSION}",
                 clock: Callable[[], float] = time.time) -> None:
        self.target = target
        self.version = {"qemu": {"micro": version[2], "minor": version[1], "major": version[0]},
                        "package": package}
        self.clock = clock
        self.internal_errors = 0
        self._last_status: str | None = None
        self._run = _Run()
        self._handlers: dict[str, _Handler] = {
            "qmp_capabilities": lambda args: {},
            "query-version": self._query_version,
            "query-commands": self._query_commands,
            "query-status": self._query_status,
            "query-migrate": self._query_migrate,
            "query-migrate-capabilities": self._query_capabilities,
            "query-migrate-parameters": self._query_parameters,
            "migrate-set-capabilities": self._set_capabilities,
            "migrate-set-parameters": self._set_parameters,
            "migrate-incoming": self._migrate_incoming,
            "object-add": self._object_add,
            "object-del": self._object_del,
            "quit": self._quit,
        }

    @property
    def commands(self) -> list[str]:
        return list(self._handlers)

    def greeting(self, conn: QmpConnection) -> bytes:
        """The greeting for a new client (send it before anything else)."""
        return conn.send(QmpGreeting(self.version, ()))

    def migration_status(self, status: str) -> QmpEvent | None:
        """The incoming migration is now in ``status``: the MIGRATION event to broadcast, or
        None (same status as last said, or the ``events`` capability is off)."""
        if status == self._last_status:
            return None
        self._last_status = status
        if not self.target.capabilities().get("events", False):
            return None
        return QmpEvent("MIGRATION", {"status": status}, self.clock())

    def handle(self, conn: QmpConnection) -> list[Action]:
        """Answer everything ``conn`` has ready; return the actions, in order."""
        actions: list[Action] = []
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA or ev is PAUSED:
                return actions
            if isinstance(ev, QmpClosed):
                actions.append(CloseClient())
                return actions
            if isinstance(ev, QmpBadRequest):
                actions.append(SendReply(conn.send(ev.reply())))
                continue
            assert isinstance(ev, QmpRequest)
            self._run = run = _Run()
            reply = self._execute(ev)
            actions.extend(BroadcastEvent(e) for e in run.events)
            actions.append(SendReply(conn.send(reply)))
            if run.close:
                actions.append(CloseClient())
                return actions

    def _execute(self, req: QmpRequest) -> QmpReturn | QmpError:
        handler = self._handlers.get(req.command)
        if handler is None:
            return QmpError(ErrorClass.CommandNotFound, f"The command {req.command} has not been found",
                         req.id)
        try:
            return QmpReturn(handler(req.arguments), req.id)
        except CommandError as exc:
            return QmpError(exc.error_class, exc.desc, req.id)
        except Exception as exc:  # the monitor outlives a bug in the target
            self.internal_errors += 1
            return QmpError(ErrorClass.GenericError, f"internal error: {type(exc).__name__}: {exc}",
                         req.id)

    # -- the commands -------------------------------------------------------------------------

    def _query_version(self, args: dict[str, Any]) -> Any:
        _no_args(args)
        return self.version

    def _query_commands(self, args: dict[str, Any]) -> Any:
        _no_args(args)
        return [{"name": name} for name in self._handlers]

    def _query_status(self, args: dict[str, Any]) -> Any:
        _no_args(args)
        state = self.target.run_state()
        return {"status": state, "running": state == "running"}

    def _query_migrate(self, args: dict[str, Any]) -> Any:
        _no_args(args)
        info = self.target.incoming_info()
        if info.status is None:
            return {}
        out: dict[str, Any] = {"status": info.status}
        if info.socket_addresses:
            out["socket-address"] = [dict(a) for a in info.socket_addresses]
        if info.ram is not None:
            out["ram"] = info.ram.to_qmp()
        if info.error_desc:
            out["error-desc"] = info.error_desc
        return out

    def _query_capabilities(self, args: dict[str, Any]) -> Any:
        _no_args(args)
        caps = self.target.capabilities()
        return [{"capability": c, "state": bool(caps.get(c, False))} for c in CAPABILITIES]

    def _query_parameters(self, args: dict[str, Any]) -> Any:
        _no_args(args)
        return dict(self.target.parameters())

    def _set_capabilities(self, args: dict[str, Any]) -> Any:
        _only(args, "capabilities")
        if "capabilities" not in args:
            raise CommandError("Parameter 'capabilities' is missing")
        items = args["capabilities"]
        if not isinstance(items, list):
            raise CommandError("Invalid parameter type for 'capabilities', expected: array")
        changes: dict[str, bool] = {}
        for i, item in enumerate(items):
            where = f"capabilities[{i}]"
            if not isinstance(item, dict):
                raise CommandError(f"Invalid parameter type for '{where}', expected: object")
            for key in item:
                if key not in ("capability", "state"):
                    raise CommandError(f"Parameter '{where}.{key}' is unexpected")
            for key in ("capability", "state"):
                if key not in item:
                    raise CommandError(f"Parameter '{where}.{key}' is missing")
            name, state = item["capability"], item["state"]
            if not isinstance(name, str):
                raise CommandError(f"Invalid parameter type for '{where}.capability', "
                                   "expected: string")
            if name not in CAPABILITIES:
                raise CommandError(f"Parameter 'capability' does not accept value '{name}'")
            if not isinstance(state, bool):
                raise CommandError(f"Invalid parameter type for '{where}.state', "
                                   "expected: boolean")
            changes[name] = state
        conflict = caps_conflict({**self.target.capabilities(), **changes},
                                 self.target.parameters())
        if conflict is not None:
            raise CommandError(conflict)
        self.target.set_capabilities(changes)
        return {}

    def _set_parameters(self, args: dict[str, Any]) -> Any:
        changes: dict[str, Any] = {}
        for name, value in args.items():
            spec = _PARAMETERS.get(name)
            if spec is None:
                raise CommandError(f"Parameter '{name}' is unexpected")
            changes[name] = _check_parameter(name, value, spec)
        self.target.set_parameters(changes)
        return {}

    def _migrate_incoming(self, args: dict[str, Any]) -> Any:
        _only(args, "uri", "channels", "exit-on-error")
        uri = args.get("uri")
        if uri is not None and not isinstance(uri, str):
            raise CommandError("Invalid parameter type for 'uri', expected: string")
        channels = args.get("channels")
        if channels is not None and not isinstance(channels, list):
            raise CommandError("Invalid parameter type for 'channels', expected: array")
        exit_on_error = args.get("exit-on-error", True)
        if not isinstance(exit_on_error, bool):
            raise CommandError("Invalid parameter type for 'exit-on-error', expected: boolean")
        if (uri is None) == (channels is None):
            raise CommandError("need either 'uri' or 'channels' argument")
        if uri is None:
            raise CommandError("'channels' is not supported by this receiver; give 'uri'")
        self.target.migrate_incoming(uri, exit_on_error)
        status = self.target.incoming_info().status
        if status is not None:
            ev = self.migration_status(status)
            if ev is not None:
                self._run.events.append(ev)  # QEMU sends it before the reply
        return {}

    def _object_add(self, args: dict[str, Any]) -> Any:
        for key in ("qom-type", "id"):
            if key not in args:
                raise CommandError(f"Parameter '{key}' is missing")
            if not isinstance(args[key], str):
                raise CommandError(f"Invalid parameter type for '{key}', expected: string")
        qom_type, oid = args["qom-type"], args["id"]
        spec = _OBJECT_PROPERTIES.get(qom_type)
        if spec is None:
            raise CommandError(f"object type '{qom_type}' is not supported by this receiver "
                               f"(only {', '.join(_OBJECT_PROPERTIES)})")
        props = {k: v for k, v in args.items() if k not in ("qom-type", "id")}
        for name, value in props.items():
            kind = spec.get(name)
            if kind is None:
                raise CommandError(f"Parameter '{name}' is unexpected")
            _check_parameter(name, value, kind)
        self.target.object_add(qom_type, oid, props)
        return {}

    def _object_del(self, args: dict[str, Any]) -> Any:
        _only(args, "id")
        if "id" not in args:
            raise CommandError("Parameter 'id' is missing")
        if not isinstance(args["id"], str):
            raise CommandError("Invalid parameter type for 'id', expected: string")
        self.target.object_del(args["id"])
        return {}

    def _quit(self, args: dict[str, Any]) -> Any:
        _no_args(args)
        self.target.quit()
        self._run.events.append(QmpEvent("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"},
                                      self.clock()))
        self._run.close = True
        return {}


def caps_conflict(caps: Mapping[str, bool], params: Mapping[str, Any]) -> str | None:
    """What QEMU 10.0's ``migrate_caps_check()`` says of capabilities ``caps`` (all of them,
    after a change) that cannot go together, in its order; None when they can. Only what a
    destination checks whatever it supports: what this receiver cannot do is its target's to
    refuse."""
    on = {name for name, state in caps.items() if state}
    if "postcopy-ram" in on:
        if "x-ignore-shared" in on:
            return "Postcopy is not compatible with ignore-shared"
        if "multifd" in on:
            return "Postcopy is not yet compatible with multifd"
    if "zero-copy-send" in on and ("multifd" not in on or "xbzrle" in on
                                   or params.get("multifd-compression", "none") != "none"
                                   or params.get("tls-creds")):
        return "Zero copy only available for non-compressed non-TLS multifd migration"
    if "postcopy-preempt" in on and "postcopy-ram" not in on:
        return "Postcopy preempt requires postcopy-ram"
    if "switchover-ack" in on and "return-path" not in on:
        return "Capability 'switchover-ack' requires capability 'return-path'"
    if "multifd" in on and "xbzrle" in on:
        return "Multifd is not compatible with xbzrle"
    if "mapped-ram" in on and "xbzrle" in on:
        return "Mapped-ram migration is incompatible with xbzrle"
    if "mapped-ram" in on and "postcopy-ram" in on:
        return "Mapped-ram migration is incompatible with postcopy"
    return None


def _no_args(args: dict[str, Any]) -> None:
    _only(args)


def _only(args: dict[str, Any], *names: str) -> None:
    for key in args:
        if key not in names:
            raise CommandError(f"Parameter '{key}' is unexpected")


def _check_parameter(name: str, value: Any, spec: tuple[str, Any, Any]) -> Any:
    kind, low, high = spec
    if kind == "bool":
        if not isinstance(value, bool):
            raise CommandError(f"Invalid parameter type for '{name}', expected: boolean")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise CommandError(f"Invalid parameter type for '{name}', expected: string")
        return value
    if kind == "str_or_null":
        if value is None:
            return ""  # null resets to the default, as QEMU does
        if not isinstance(value, str):
            raise CommandError(f"Invalid parameter type for '{name}', expected: StrOrNull")
        return value
    if kind == "enum":
        if not isinstance(value, str):
            raise CommandError(f"Invalid parameter type for '{name}', expected: string")
        if value not in high:
            raise CommandError(f"Parameter '{name}' does not accept value '{value}'")
        return value
    if kind == "array":
        if not isinstance(value, list):
            raise CommandError(f"Invalid parameter type for '{name}', expected: array")
        return value
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64:
        raise CommandError(f"Parameter '{name}' expects uint64")
    if value >= 1 << _BITS[kind]:
        raise CommandError(f"Parameter '{name}' expects {kind}_t")
    if not low <= value <= high:
        raise CommandError(f"Parameter '{name}' expects a value between {low} and {high}")
    return value
