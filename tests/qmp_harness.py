"""What the QMP tests share: ``RecordingTarget``, a MigrationTarget that keeps what it is told
and refuses what a receiver would refuse (so the monitor can be driven without a migration),
and a private asyncio loop for qemu.qmp's blocking client.

The monitor itself is the receiver's (``qioc_green.migration.Monitor``): the tests serve this
target with it, exactly as ``qioc-migration-receiver --qmp`` serves its settings.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from qioc_green.migration import DEFAULT_PARAMETERS, CommandError, IncomingInfo


class RecordingTarget:
    """A MigrationTarget that records calls; it refuses what a receiver would not do."""

    def __init__(self) -> None:
        self.caps: dict[str, bool] = {}
        self.params: dict[str, Any] = dict(DEFAULT_PARAMETERS)
        self.info = IncomingInfo()
        self.state = "inmigrate"
        self.calls: list[tuple[str, Any]] = []
        self.quitted = False
        self.objects: dict[str, dict[str, Any]] = {}

    def incoming_info(self) -> IncomingInfo:
        return self.info

    def run_state(self) -> str:
        return self.state

    def capabilities(self) -> Mapping[str, bool]:
        return self.caps

    def set_capabilities(self, changes: Mapping[str, bool]) -> None:
        for name, state in changes.items():
            if state and name in ("xbzrle", "x-colo", "mapped-ram"):
                raise CommandError(f"Capability '{name}' is not supported by this receiver")
        self.calls.append(("caps", dict(changes)))
        self.caps.update(changes)

    def parameters(self) -> Mapping[str, Any]:
        return self.params

    def set_parameters(self, changes: Mapping[str, Any]) -> None:
        if changes.get("multifd-compression") in ("qpl", "uadk", "qatzip"):
            raise CommandError(f"multifd-compression '{changes['multifd-compression']}' is not "
                               "supported by this receiver")
        self.calls.append(("params", dict(changes)))
        self.params.update(changes)

    def migrate_incoming(self, uri: str, exit_on_error: bool) -> None:
        if self.info.status is not None:
            raise CommandError("The incoming migration has already been started")
        if not uri.startswith(("tcp:", "unix:")):
            raise CommandError(f"unknown migration protocol: {uri}")
        self.calls.append(("incoming", (uri, exit_on_error)))
        self.info = IncomingInfo("setup", [{"type": "inet", "host": "127.0.0.1", "port": "4444"}])

    def quit(self) -> None:
        self.quitted = True

    def object_add(self, qom_type: str, id: str, props: Mapping[str, Any]) -> None:
        if id in self.objects:
            raise CommandError(f"attempt to add duplicate property '{id}' to object "
                               "(type 'container')")
        self.calls.append(("object-add", (qom_type, id, dict(props))))
        self.objects[id] = dict(props)

    def object_del(self, id: str) -> None:
        if self.objects.pop(id, None) is None:
            raise CommandError(f"object '{id}' not found")


@contextlib.contextmanager
def event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A private asyncio loop for qemu.qmp's sync client in this thread, closed afterwards (so
    its epoll fd and self-pipe do not outlive the test)."""
    lp = asyncio.new_event_loop()
    asyncio.set_event_loop(lp)
    try:
        yield lp
    finally:
        asyncio.set_event_loop(None)
        lp.close()
