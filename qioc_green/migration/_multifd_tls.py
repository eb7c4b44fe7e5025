"""How a listener's connections are taken before anyone knows what they are: the TLS handshake
of each connection of a multifd migration, and the watcher that names a multifd source which a
plain receiver was not told of.

With ``tls-creds``, a QEMU source does a TLS handshake on every connection it opens, the main
channel and each multifd channel alike, with the same credentials, and only then sends the
first bytes that say what the connection is (``QEVM``, or the multifd magic). QEMU's destination
then cannot peek at those bytes, and takes the first connection whose handshake ends for the
main one (the source finishes the main channel's handshake before it opens any other). Here
every connection is handshaken in the IOThread that will read it, in parallel, and its first
bytes are read after it: the order does not matter. A handshake that fails (a plaintext peer,
a certificate either side refuses, a hang-up in the middle) is one line naming the connection,
and it ends the whole migration as any bad channel does.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from qioc_green import Channel, ChannelError, current_context

from ._multifd import sniff_channel
from ._multifd_events import MultifdError
from ._tls import TlsError, accept_tls

FIRST_BYTES_TIMEOUT = 10.0  # s for a new connection to say what it is (or to finish its handshake)
MAX_EXTRA = 4  # connections beyond the N + 1 that are read (and refused) before we stop taking them
_TICK = 0.5  # s between the watcher's looks at whether it should stop


def accept_connection(ch: Channel, ctx: ssl.SSLContext, name: str,
                      timeout: float | None) -> Channel:
    """The TLS session of connection ``name`` of a multifd migration, before its first bytes are
    read. May park. Raises MultifdError (``name``, offset 0, the one-line reason); ``ch`` is
    closed then. A hang-up without close_notify reads as EOF (``_tls``: QEMU 7.2's channels)."""
    try:
        return accept_tls(ch, ctx, timeout=timeout, ragged_eof=True)
    except TlsError as exc:
        raise MultifdError(name, 0, str(exc)) from None


class StrayWatcher:
    """While a plain (not multifd) migration runs on a listener, take further connections and
    refuse the migration, with a line saying what to do, if one is a multifd channel.

    QEMU's destination stops listening once its channels are in, so a multifd source meeting a
    destination not told of multifd sees its second connection refused and gives up without
    sending a byte on the first: the destination learns nothing. Taking that connection instead
    lets the receiver say why. Other connections are closed at once; at most ``MAX_EXTRA`` are
    looked at. ``on_multifd(reason)`` (``Receiver.stop``) is called from this watcher's greenlet.
    ``tls``: the connections are TLS (a TLS source waits for each channel's handshake before it
    sends the main stream, so without one here both ends would wait for ever).
    """

    def __init__(self, accept: Callable[[float], Channel], on_multifd: Callable[[str], None],
                 *, tls: ssl.SSLContext | None = None) -> None:
        self._accept = accept
        self._on_multifd = on_multifd
        self._tls = tls
        self._stopping = False
        self._seen = 0
        self._future = current_context().spawn(self._run)

    def _run(self) -> None:
        ctx = current_context()
        while not self._stopping and self._seen < MAX_EXTRA:
            try:
                ch = self._accept(_TICK)
            except TimeoutError:
                continue
            except (EOFError, ChannelError):
                return
            self._seen += 1
            if self._stopping:
                ch.close()
                return
            ctx.spawn(self._look, ch, self._seen)

    def _look(self, ch: Channel, k: int) -> None:
        try:
            if self._tls is not None:
                ch = accept_connection(ch, self._tls, f"connection {k}", FIRST_BYTES_TIMEOUT)
            first = ch.read_all_eof(4, timeout=FIRST_BYTES_TIMEOUT)
        except (ChannelError, TimeoutError, MultifdError):
            return
        finally:
            ch.close()
        if first is None or self._stopping:
            return
        try:
            kind = sniff_channel(first)
        except MultifdError:
            return
        if kind == "multifd":
            self._on_multifd(
                f"connection {k} is a multifd channel (magic 0x11223344), but the receiver "
                "was not told to expect any: start it with --multifd-channels N (the "
                "source's multifd-channels)")

    def stop(self) -> None:
        """Stop taking connections (the greenlet ends within a tick). Never parks."""
        self._stopping = True
