"""Serve the sans-IO QMP dispatcher on a UNIX socket with qioc_green's public channels (tests).

``QmpTestServer(path, target)`` runs a monitor in its own IOThread, as the receiver will: a
NetListener hands each client to a greenlet that reads in blocking style and feeds
``QmpConnection`` / ``QmpDispatcher``; what goes back to a client goes through a bounded queue
to that client's writer greenlet, so an event broadcast never writes to a channel another
greenlet is writing, and a client that stops reading is dropped (not waited for) once its queue
is full. ``status(s)`` tells the monitor, from any thread, that the migration is now in ``s``.

``RecordingTarget`` is the MigrationTarget the tests hand it: a small, honest implementation
that keeps what it is told and refuses what a receiver would refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import gevent

from qioc_green import BrokenChannelError, Channel, ChannelClosedError, IOThread, NetListener, Queue
from qioc_green.migration import (
    DEFAULT_PARAMETERS,
    BroadcastEvent,
    CommandError,
    IncomingInfo,
    MigrationTarget,
    QmpConnection,
    QmpDispatcher,
    QmpEvent,
    SendReply,
)

OUTBOX = 64  # messages queued to one client before it is dropped


class RecordingTarget:
    """A MigrationTarget that records calls; it refuses what a receiver would not do."""

    def __init__(self) -> None:
        self.caps: dict[str, bool] = {}
        self.params: dict[str, Any] = dict(DEFAULT_PARAMETERS)
        self.info = IncomingInfo()
        self.state = "inmigrate"
        self.calls: list[tuple[str, Any]] = []
        self.quitted = False

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


class _Client:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.conn = QmpConnection()
        self.outbox: Queue[bytes] = Queue(OUTBOX)

    def put(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.outbox.put(data, timeout=0)
        except TimeoutError:  # it stopped reading: drop it rather than wait for it
            self.channel.close()


class QmpTestServer:
    """A QMP monitor on ``unix:path`` in its own IOThread; ``close()`` stops it."""

    def __init__(self, path: str, target: MigrationTarget) -> None:
        self.thread = IOThread("qmp-monitor").start()
        self.dispatcher = QmpDispatcher(target)
        self.served = 0
        self._clients: list[_Client] = []  # only touched in the monitor's thread
        self.listener = NetListener("qmp-test")
        try:
            self.listener.open(f"unix:{path}")
            self.listener.set_client_handler(self._serve, self.thread.context)
        except BaseException:
            self.close()
            raise

    def _serve(self, channel: Channel) -> None:
        client = _Client(channel)
        writer = gevent.spawn(self._write, client)
        self._clients.append(client)
        self.served += 1
        try:
            client.put(self.dispatcher.greeting(client.conn))
            while True:
                data = channel.read(65536)
                client.conn.receive_data(data)
                for action in self.dispatcher.handle(client.conn):
                    if isinstance(action, SendReply):
                        client.put(action.data)
                    elif isinstance(action, BroadcastEvent):
                        self._broadcast(action.event)
                    else:
                        return
                if not data:
                    return
        except (BrokenChannelError, ChannelClosedError):
            pass
        finally:
            self._clients.remove(client)
            client.outbox.close()
            writer.join(5)

    @staticmethod
    def _write(client: _Client) -> None:
        try:
            while True:
                client.channel.write_all(client.outbox.get())
        except Exception:  # noqa: BLE001 - closed queue, or the client went away
            return

    def _broadcast(self, event: QmpEvent) -> None:
        for client in list(self._clients):
            client.put(client.conn.send(event))

    def status(self, status: str) -> None:
        """The migration is now in ``status``: broadcast MIGRATION (thread-safe, waits)."""

        def say() -> None:
            ev = self.dispatcher.migration_status(status)
            if ev is not None:
                self._broadcast(ev)

        self.thread.context.call(say, timeout=10)

    def close(self) -> None:
        self.listener.close(grace=2)
        self.thread.stop()


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
