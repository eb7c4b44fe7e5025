"""The QMP monitor of ``qioc-migration-receiver --qmp ADDR``: the sans-IO QMP connection and
dispatcher (``_qmp``, ``_qmp_dispatch``) served with qioc_green channels, in an IOThread of its
own.

How it runs
-----------
A ``NetListener`` on ``unix:PATH`` (or ``tcp:HOST:PORT``) hands every client to a greenlet of
the monitor's IOThread, which reads in blocking style and feeds the client's
:class:`~._qmp.QmpConnection` and the shared :class:`~._qmp_dispatch.QmpDispatcher`, reading
only when the connection says NEED_DATA (so a client's input costs at most one value plus one
read). Whatever goes back to a client (replies, events) goes through that client's bounded
outbox to its own writer greenlet: a broadcast event never writes a channel another greenlet is
writing, and a client that stops reading is dropped once its outbox is full, never waited for.
So one misbehaving client (garbage, a 1 MiB line, a client that never reads) costs itself an
error reply or its connection, and the others and the migration go on. Every greenlet here is
in the monitor's thread, so the list of clients and the dispatcher are touched by one thread
only; the migration tells the monitor about status changes from its own thread through
:meth:`Monitor.status` (a ``schedule`` into the monitor's context, which never blocks).
"""

from __future__ import annotations

import gevent

from qioc_green import (
    BrokenChannelError,
    Channel,
    ChannelClosedError,
    ContextStoppedError,
    IOThread,
    NetListener,
    Queue,
)

from ._qmp import QmpConnection, QmpEvent
from ._qmp_dispatch import BroadcastEvent, MigrationTarget, QmpDispatcher, SendReply

OUTBOX = 64  # messages queued to one client before it is dropped
READ = 65536  # bytes read from a client at once
MAX_CLIENTS = 32


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
        except Exception:  # noqa: BLE001 - closed outbox: the client is leaving
            pass


class Monitor:
    """A QMP monitor for ``target`` on ``address``, in its own IOThread; ``close()`` stops it.

    ``address``: ``unix:PATH`` or ``tcp:HOST:PORT`` (QEMU's ``,server=on,wait=off`` options
    are accepted and ignored: the monitor always serves and never waits). Raises OSError or
    ChannelError when it cannot listen.
    """

    def __init__(self, address: str, target: MigrationTarget, *,
                 max_clients: int = MAX_CLIENTS) -> None:
        self.address = address.split(",", 1)[0]
        self.thread = IOThread("qmp-monitor").start()
        self.dispatcher = QmpDispatcher(target)
        self.served = 0
        self._clients: list[_Client] = []  # only touched in the monitor's thread
        self.listener = NetListener("qmp", max_clients=max_clients)
        try:
            self.addresses = self.listener.open(self.address)
            self.listener.set_client_handler(self._serve, self.thread.context)
        except BaseException:
            self.close()
            raise

    def _serve(self, channel: Channel) -> None:
        client = _Client(channel)
        writer = gevent.spawn(self._write, client)
        self._clients.append(client)
        self.served += 1
        conn = client.conn
        try:
            client.put(self.dispatcher.greeting(conn))
            while True:
                data = channel.read(READ)
                conn.receive_data(data)
                for action in self.dispatcher.handle(conn):
                    if isinstance(action, SendReply):
                        client.put(action.data)
                    elif isinstance(action, BroadcastEvent):
                        self._broadcast(action.event)
                    else:  # CloseClient: it hung up, or after quit
                        return
                if not data:
                    return
        except (BrokenChannelError, ChannelClosedError, ContextStoppedError):
            pass
        finally:
            client.outbox.close()  # the writer sends what is queued (quit's reply), then ends
            writer.join(5)
            channel.close()
            self._clients.remove(client)

    @staticmethod
    def _write(client: _Client) -> None:
        try:
            while True:
                client.channel.write_all(client.outbox.get())
        except Exception:  # noqa: BLE001 - closed outbox, or the client went away
            return

    @property
    def clients(self) -> int:
        """Clients connected now (a client is gone once its connection is closed)."""
        return len(self._clients)

    def _broadcast(self, event: QmpEvent) -> None:
        for client in list(self._clients):
            client.put(client.conn.send(event))

    def status(self, status: str) -> None:
        """The migration is now in ``status``: broadcast ``MIGRATION`` (if the ``events``
        capability is on). Any thread; never blocks."""

        def say() -> None:
            ev = self.dispatcher.migration_status(status)
            if ev is not None:
                self._broadcast(ev)

        try:
            self.thread.context.schedule(say)
        except ContextStoppedError:
            pass  # the monitor is gone: nobody to tell

    def close(self) -> None:
        """Stop listening, let clients' writers flush for a moment, stop the thread."""
        self.listener.close(grace=1)
        self.thread.stop()
