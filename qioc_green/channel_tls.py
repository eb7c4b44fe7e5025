"""TLSChannel: TLS over any channel, with the stdlib's ``ssl.MemoryBIO`` and ``SSLObject``.
QEMU: ``io/channel-tls.c``.

The facts
---------
* An ``SSLObject`` never touches a socket: ciphertext goes in through an incoming MemoryBIO and
  comes out of an outgoing one.  Its calls never block; they raise ``SSLWantReadError`` when a
  record is incomplete.  They release the GIL while the cipher runs, which is what lets two
  IOThreads decrypt and encrypt at the same time.
* OpenSSL's ``SSL`` object is not safe for two threads at once, yet a reader and a writer may use
  this channel from two IOThreads (DESIGN semantic 3).

The decisions
-------------
* **One lock around the TLS state, never held while parked.**  Each hook takes the lock, does
  only non-blocking work (feed the BIO from the inner channel's non-blocking read hook, run the
  cipher, push ciphertext with the inner's non-blocking write hook), and releases it.  A hook that
  would have to wait raises ``BlockingIOError`` *after* releasing the lock; the base class's one
  loop then parks, and parking is forwarded to the inner channel (``_InnerDirection``), so the
  wait happens on the hub the inner channel's follow flag says (DESIGN semantic 6; QEMU 9.1's fix
  for NBD+TLS in an iothread).  The follow flag itself is the inner channel's: this has none.
* **The handshake** runs in the same hooks, as ``ssl.SSLSocket`` does: a read or write before
  ``handshake()`` first completes it (``handshake()`` is that loop with no data to move).  While
  it runs, a wait is for whichever direction the handshake needs (out while its ciphertext is
  queued, else in), and only one greenlet waits on the inner channel for it: a reader and a
  writer of other threads that both arrive first take turns (``_wait_handshake``) instead of
  meeting as two readers of the inner channel.
* **Ciphertext that the inner channel would not take** stays in ``_out`` and goes first at the
  next write; every write call of this class drains it before returning (parking on the inner
  channel if needed), so a write that returned has handed all its ciphertext to the kernel.
  Readers push what the cipher wants to send (TLS 1.3 key updates) the same non-blocking way.
* **Readable without the fd.**  Plaintext decrypted and not handed out, and whole records in the
  incoming BIO, are what the inner fd cannot show; ``_plaintext_ready`` says so (decrypting a
  record ahead when ciphertext waits), and the read direction's park, ``yield_(IN)``,
  ``wait(IN)`` and IN watches look at it first (QEMU's ``QIOChannelTLSSource`` checks
  ``qcrypto_tls_session_check_pending()``).
* **close()** sends close_notify best effort (it never parks, as every close), then closes the
  inner channel, which wakes whoever is parked on it.  ``shutdown(Shutdown.WRITE)`` sends
  close_notify, drains it (may park) and half-closes the inner channel; reading goes on until the
  peer's close_notify, which reads as EOF.  An EOF from the inner channel without close_notify
  is a truncation attack as far as TLS knows: it raises BrokenChannelError, unless the channel
  was made with ``suppress_ragged_eofs=True`` (``ssl.SSLSocket``'s option; most Python ssl
  clients close without close_notify), where it reads as EOF.  Protocols that frame their
  messages still see a truncated message as UnexpectedEOF.
"""

from __future__ import annotations

import errno
import ssl
import time
from collections.abc import Sequence
from typing import Any

from . import _hub
from .channel import Channel, Direction, Feature, IOCondition, Shutdown, WriteFlag, deadline
from .errors import (
    BrokenChannelError,
    ChannelBusyError,
    ChannelClosedError,
    ChannelError,
    ChannelTimeoutError,
    NotSupportedError,
)
from .sync import Event

_IN = IOCondition.IN
_OUT = IOCondition.OUT
_VERB = {_IN: "read", _OUT: "write"}
_CHUNK = 256 * 1024  # ciphertext read from the inner channel at once
_RECORD = 16 * 1024  # the most plaintext one TLS record carries
_MAX_PLAIN = _RECORD * 16  # plaintext encrypted per hook call (16 records)


class _InnerDirection(Direction):
    """A direction of a TLS channel: its waits are the inner channel's (DESIGN semantic 6), and
    while the handshake runs, whichever direction the handshake needs."""

    __slots__ = ()

    def __init__(self, tls: TLSChannel, cond: IOCondition) -> None:
        super().__init__(tls, cond)
        inner = tls.inner
        self.slot = (inner._rd if cond is _IN else inner._wr).slot  # who waits is the inner's

    def park(self, deadline: float | None) -> None:
        tls: TLSChannel = self.channel  # type: ignore[assignment]
        if not tls._handshaken:
            tls._wait_handshake(deadline)
        elif self.cond is _IN and tls._plaintext_ready():
            return  # the inner fd cannot show it (the base's read prediction parks without trying)
        else:
            tls._park_inner(self.cond, deadline)


class TLSChannel(Channel):
    """A TLS session over ``inner``; build with ``client()`` or ``server()``, then ``handshake()``.

    Features: SHUTDOWN.  Follow flag and blocking mode are the inner channel's.  The inner
    channel belongs to this one from then on (closing this closes it).
    """

    kind = "tls"

    def __init__(self, inner: Channel, ssl_context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None, name: str | None = None,
                 suppress_ragged_eofs: bool = False) -> None:
        super().__init__(name=name or f"tls-{inner.name}", features=Feature.SHUTDOWN)
        self._inner = inner
        self._server_side = server_side
        self._hostname = server_hostname
        self._in = ssl.MemoryBIO()
        self._outbio = ssl.MemoryBIO()
        self._ssl = ssl_context.wrap_bio(self._in, self._outbio, server_side=server_side,
                                         server_hostname=server_hostname)
        self._lock = _hub.OSLock()  # unpatched: a reader and a writer of two threads share it
        self._out = bytearray()  # ciphertext the inner channel has not taken yet
        self._ragged_ok = suppress_ragged_eofs
        self._handshaken = False
        self._hs_error: BrokenChannelError | None = None
        self._hs_driving = False  # a greenlet waits on the inner channel for the handshake
        self._hs_turn = Event()  # set (and replaced) each time that wait ends
        self._sent_close = False
        # Plaintext decrypted and not handed out yet: set aside when close_notify was sent, or
        # decrypted ahead by _plaintext_ready; reads take it first.
        self._plain = bytearray()
        self._ahead_error: OSError | None = None  # what decrypting ahead raised, for the next read
        self._flusher: Any = None  # the watch that pushes queued ciphertext in non-blocking mode
        self._rd = _InnerDirection(self, _IN)
        self._wr = _InnerDirection(self, _OUT)

    @classmethod
    def client(cls, inner: Channel, ssl_context: ssl.SSLContext, server_hostname: str | None = None, *,
               name: str | None = None, suppress_ragged_eofs: bool = False) -> TLSChannel:
        """A client session over ``inner``; ``server_hostname`` is checked against the
        certificate when the context says so.  Never switches (the handshake is ``handshake()``,
        or the first read or write).
        QEMU: ``qio_channel_tls_new_client()``."""
        return cls(inner, ssl_context, server_side=False, server_hostname=server_hostname, name=name,
                   suppress_ragged_eofs=suppress_ragged_eofs)

    @classmethod
    def server(cls, inner: Channel, ssl_context: ssl.SSLContext, *, name: str | None = None,
               suppress_ragged_eofs: bool = False) -> TLSChannel:
        """A server session over ``inner``.  Never switches.  QEMU: ``qio_channel_tls_new_server()``.

        ``suppress_ragged_eofs``: a peer's hang-up without close_notify reads as EOF (as with
        ``ssl.SSLSocket``) instead of raising BrokenChannelError (module docstring).
        """
        return cls(inner, ssl_context, server_side=True, name=name, suppress_ragged_eofs=suppress_ragged_eofs)

    # -- what is the inner channel's -------------------------------------------------------------

    @property
    def inner(self) -> Channel:
        return self._inner

    @property
    def follow_coroutine_ctx(self) -> bool:
        return self._inner.follow_coroutine_ctx

    def set_follow_coroutine_ctx(self, enabled: bool) -> None:
        """Sets the inner channel's flag: waits are the inner channel's (DESIGN semantic 6)."""
        self._inner.set_follow_coroutine_ctx(enabled)

    def set_blocking(self, enabled: bool) -> None:
        super().set_blocking(enabled)
        self._inner.set_blocking(enabled)

    def wake_read(self) -> None:
        self._inner.wake_read()

    def _park_inner(self, cond: IOCondition, dl: float | None) -> None:
        # The inner channel's errors name it; the caller called this one, so these name this.
        timeout = None if dl is None else dl - time.monotonic()
        try:
            self._inner.yield_(cond, timeout=timeout)
        except ChannelClosedError:
            raise ChannelClosedError(f"{self._name}: channel closed while waiting") from None
        except ChannelTimeoutError:
            raise ChannelTimeoutError(f"{self._name}: timed out waiting to {_VERB[cond]}") from None
        except ChannelBusyError:
            raise ChannelBusyError(f"{self._name}: another greenlet is already waiting to {_VERB[cond]}") from None

    def _wait_handshake(self, dl: float | None) -> None:
        """Wait until the handshake may progress: on the inner channel, in the direction it needs,
        for one greenlet at a time; the others wait for that greenlet's turn to end."""
        with self._lock:
            if self._handshaken or self._hs_error is not None:
                return
            turn = self._hs_turn
            driving = not self._hs_driving
            if driving:
                self._hs_driving = True
                cond = _OUT if self._out else _IN
        if not driving:
            if not turn.wait(None if dl is None else max(dl - time.monotonic(), 0.0)):
                raise ChannelTimeoutError(f"{self._name}: timed out waiting for the tls handshake")
            return
        try:
            self._park_inner(cond, dl)
        finally:
            with self._lock:
                self._hs_driving = False
                self._hs_turn = Event()
            turn.set()

    def _io_fd(self, cond: IOCondition) -> int | None:
        return self._inner._io_fd(cond)

    def _ready_in(self) -> bool:
        return bool(self._unread) or self._plaintext_ready()

    def _plaintext_ready(self) -> bool:
        """Whether a read would return without the inner fd: plaintext decrypted and not handed
        out, or a whole record (or EOF, or an error) already in the incoming BIO.

        The inner fd cannot show either: one ``_pull_in`` takes up to 256 KiB of ciphertext, and
        a read takes only what its buffer holds.  QEMU's ``QIOChannelTLSSource`` asks
        ``qcrypto_tls_session_check_pending()`` for the first; the second is ours, so ciphertext
        in the BIO is decrypted ahead, into ``_plain`` (a partial record says not ready: its
        rest comes through the fd).  Takes the lock (its holders never park); never switches.
        """
        if not self._handshaken:
            return False
        with self._lock:
            if self._plain or self._ahead_error is not None or self._ssl.pending():
                return True
            if not self._in.pending:
                return False
            try:
                data = self._ssl.read(_RECORD)  # one record's plaintext at most
            except ssl.SSLWantReadError:
                return False
            except ssl.SSLError as exc:  # a broken session or a truncation: the next read raises it
                self._ahead_error = exc
                return True
            finally:
                if self._outbio.pending:
                    self._push_out_quietly()
            self._plain += data  # b"": close_notify, which every later read sees again
            return True

    @property
    def peer(self) -> str:
        """Who the peer is, for messages: the server name if one was given, else its address."""
        if self._hostname:
            return self._hostname
        return str(getattr(self._inner, "remote_address", self._inner.name))

    @property
    def cipher(self) -> tuple[str, str, int] | None:
        return self._ssl.cipher()

    @property
    def version(self) -> str | None:
        return self._ssl.version()

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._ssl.getpeercert(binary_form)

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._ssl

    # -- moving ciphertext (lock held, never parks) ----------------------------------------------

    def _push_out(self) -> bool:
        """Move the BIO's ciphertext to ``_out`` and write what the inner channel takes.

        Returns True when nothing is left.  Lock held.
        """
        if self._outbio.pending:
            self._out += self._outbio.read()
        inner = self._inner
        out = self._out
        if not out:
            return True
        inner._enter()
        try:
            while out:
                try:
                    n = inner._io_write(memoryview(out))
                except BlockingIOError:
                    return False
                except InterruptedError:
                    continue
                del out[:n]
        finally:
            inner._leave()
        return True

    def _push_out_quietly(self) -> None:
        try:
            self._push_out()
        except (OSError, ChannelClosedError):
            pass

    def _pull_in(self) -> None:
        """Feed the incoming BIO with what the inner channel has.  Lock held.

        Raises BlockingIOError when it has nothing; marks EOF when it is at EOF.
        """
        inner = self._inner
        inner._enter()
        try:
            while True:
                try:
                    # Bytes an interrupted read_all of the inner channel gave back come first
                    # (a STARTTLS-style protocol reads in plain text before it wraps the channel).
                    data = inner._take_unread(_CHUNK) if inner._unread else inner._io_read(_CHUNK, 0)
                    break
                except InterruptedError:
                    continue
        finally:
            inner._leave()
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    # -- handshake -------------------------------------------------------------------------------

    def handshake(self, timeout: float | None = None) -> None:
        """Run the TLS handshake to its end (the first read or write does it too).  May park (on
        the inner channel).

        Raises BrokenChannelError naming the peer when verification fails or the peer breaks
        off, TimeoutError after ``timeout``, WouldBlock in non-blocking mode when it would wait.
        QEMU: ``qio_channel_tls_handshake()``.
        """
        self._retry(self._rd, deadline(timeout), self._handshake_hook)

    def _handshake_hook(self) -> None:
        with self._lock:
            if not self._handshaken:
                self._handshake_step()

    def _handshake_step(self) -> None:
        """Drive the handshake as far as it goes without waiting (lock held).

        Returns once it is done; BlockingIOError when it must wait (the base loop then parks in
        ``_InnerDirection``); BrokenChannelError when it failed (for every later call too).
        """
        if self._hs_error is not None:
            raise BrokenChannelError(str(self._hs_error)) from self._hs_error.__cause__
        if self._hs_driving:
            # Another greenlet waits on the inner channel for the handshake: only it may take
            # the next step, so the handshake cannot end while it still waits (and then meet the
            # next reader as a second greenlet parked to read the inner channel).
            raise BlockingIOError(11, "tls: another greenlet waits for the handshake")
        try:
            while True:
                try:
                    self._ssl.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                except ssl.SSLCertVerificationError as exc:
                    self._push_out_quietly()  # the alert, best effort
                    raise BrokenChannelError(
                        f"{self._name}: certificate verification of {self.peer} failed: "
                        f"{exc.verify_message or exc.reason}"
                    ) from exc
                except ssl.SSLError as exc:
                    self._push_out_quietly()
                    raise BrokenChannelError(
                        f"{self._name}: tls handshake with {self.peer} failed: {exc.reason or exc}"
                    ) from exc
                try:
                    if not self._push_out():
                        raise BlockingIOError(11, "tls: handshake ciphertext still queued")
                    if done:
                        self._handshaken = True
                        return
                    self._pull_in()  # BlockingIOError: nothing from the peer yet
                except OSError as exc:
                    if isinstance(exc, BlockingIOError):
                        raise
                    raise self._broken(exc, "tls handshake") from exc
                if self._in.eof:
                    raise BrokenChannelError(f"{self._name}: {self.peer} closed the connection during the tls handshake")
        except BrokenChannelError as exc:
            self._hs_error = exc
            raise

    # -- hooks -----------------------------------------------------------------------------------

    def _io_readinto(self, buf: memoryview, flags: int) -> int:
        with self._lock:
            if not self._handshaken:
                self._handshake_step()
            if self._plain:  # set aside by _send_close_notify, or decrypted ahead
                k = min(len(buf), len(self._plain))
                buf[:k] = self._plain[:k]
                del self._plain[:k]
                return k
            if self._ahead_error is not None:
                exc, self._ahead_error = self._ahead_error, None
                raise exc
            while True:
                try:
                    n: int = self._ssl.read(len(buf), buf)  # type: ignore[assignment]
                except ssl.SSLWantReadError:
                    if self._outbio.pending or self._out:
                        self._push_out()
                    if self._in.eof:
                        if self._ragged_ok:
                            return 0
                        raise self._truncated() from None
                    self._pull_in()  # BlockingIOError: the base loop parks on the inner channel
                    continue
                except ssl.SSLZeroReturnError:
                    return 0  # close_notify: a clean EOF
                except ssl.SSLEOFError:
                    if self._ragged_ok:
                        return 0
                    raise self._truncated() from None
                # One SSL_read gives one record (16 KiB at most); take the other records that
                # already arrived in the same call, rather than one base-loop turn each.
                size = len(buf)
                while n < size and self._in.pending:
                    try:
                        n += self._ssl.read(size - n, buf[n:])  # type: ignore[operator]
                    except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
                        break  # the next call sees it again
                if self._outbio.pending:
                    self._push_out()
                return n

    def _truncated(self) -> OSError:
        # EPROTO rather than ECONNRESET: the message must say what TLS knows (a truncation).
        return OSError(errno.EPROTO, f"{self.peer} closed the connection without close_notify")

    def _io_readv(self, buffers: list[memoryview], max_fds: int, flags: int) -> tuple[int, list[int]]:
        if max_fds or flags:
            raise NotSupportedError(f"{self._name}: tls channels pass neither fds nor MSG_PEEK")
        return self._io_readinto(buffers[0], 0), []

    def _io_write(self, buf: memoryview) -> int:
        with self._lock:
            if not self._handshaken:
                self._handshake_step()
            if self._sent_close:
                raise OSError(errno.ESHUTDOWN, "close_notify already sent (shut down for writing)")
            if self._out and not self._push_out():
                raise BlockingIOError(11, "tls: ciphertext still queued")
            n = self._ssl.write(buf[:_MAX_PLAIN])
            self._push_out()  # what the inner channel does not take now goes first next time
            return n

    def _io_writev(self, buffers: list[memoryview], fds: Sequence[int], flags: int) -> int:
        if len(buffers) == 1:
            return self._io_write(buffers[0])
        # Join small buffers into one record's worth rather than one record per buffer.
        joined = bytearray()
        for b in buffers:
            joined += b
            if len(joined) >= _MAX_PLAIN:
                break
        return self._io_write(memoryview(joined))

    def _drain(self, dl: float | None) -> None:
        """Park (on the inner channel) until every queued byte of ciphertext has been written.

        In non-blocking mode it never parks: the plaintext is already accepted (the caller was
        told so), so what the inner channel will not take now is pushed by a watch on the inner
        channel, in the calling context, as soon as it is writable.
        """
        if self._blocking:
            self._retry(self._wr, dl, self._drain_hook)
            return
        with self._lock:
            try:
                if self._push_out():
                    return
            except OSError as exc:
                raise self._broken(exc, "write") from exc
            if self._flusher is None:
                self._flusher = self._inner.add_watch(_OUT, self._flush_when_writable)

    def _drain_hook(self) -> None:
        with self._lock:
            if not self._push_out():
                raise BlockingIOError(11, "tls: ciphertext still queued")

    def _flush_when_writable(self, inner: Channel, cond: IOCondition) -> bool:
        # Runs inside a hub: never wait.  The lock's holders never park, but do not even queue
        # behind one: try again at the next readiness.
        if not self._lock.acquire(blocking=False):
            return True
        try:
            try:
                done = self._push_out()
            except (OSError, ChannelClosedError):
                done = True  # the next write reports the broken channel
            if done:
                self._flusher = None
            return not done
        finally:
            self._lock.release()

    def writev_full(self, buffers: Sequence[Any], fds: Sequence[int] = (), flags: WriteFlag = WriteFlag.NONE,
                    *, timeout: float | None = None) -> int:
        dl = deadline(timeout)
        n = super().writev_full(buffers, fds, flags, timeout=timeout)
        self._drain(dl)
        return n

    def writev_full_all(self, buffers: Sequence[Any], fds: Sequence[int] = (),
                        flags: WriteFlag = WriteFlag.NONE, *, timeout: float | None = None) -> None:
        dl = deadline(timeout)
        super().writev_full_all(buffers, fds, flags, timeout=timeout)
        self._drain(dl)

    def write_all(self, data: Any, *, timeout: float | None = None) -> None:
        self.writev_full_all((data,), timeout=timeout)

    # -- closing ---------------------------------------------------------------------------------

    def _send_close_notify(self) -> None:
        """Queue close_notify (lock held).  Idempotent."""
        if self._sent_close or not self._handshaken:
            return
        self._sent_close = True
        # The stdlib's unwrap() calls SSL_shutdown() a second time, to read the peer's
        # close_notify, and OpenSSL discards any application data that call meets (records in
        # the incoming BIO, plaintext left in a record a short read did not take).  Reading goes
        # on after our close_notify, so move both out of its way first and give them back after.
        while self._ssl.pending():
            self._plain += self._ssl.read(self._ssl.pending())
        ciphertext = self._in.read()
        try:
            self._ssl.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass  # it waits for the peer's close_notify; ours is in the BIO already
        if ciphertext:
            self._in.write(ciphertext)

    def shutdown(self, how: Shutdown = Shutdown.BOTH) -> None:
        """As the base, and for WRITE first sends close_notify and drains it, so it may park."""
        how = Shutdown(how)
        self._enter()
        try:
            if how & Shutdown.WRITE:
                with self._lock:
                    try:
                        self._send_close_notify()
                    except ChannelError:
                        raise
                    except OSError as exc:  # the peer already hung up: translate, as everywhere
                        raise self._broken(exc, "tls shutdown") from exc
                self._drain(None)
            self._inner.shutdown(how)
        finally:
            self._leave()

    def close(self) -> None:
        """Send close_notify (best effort, never parks), close this channel and the inner one."""
        if not self._closed and self._handshaken:
            acquired = self._lock.acquire(timeout=1.0)  # holders never park, so this is short
            if acquired:
                try:
                    self._send_close_notify()
                    try:
                        self._push_out()
                    except (OSError, ChannelClosedError):
                        pass
                finally:
                    self._lock.release()
        super().close()
        self._inner.close()


__all__ = ["TLSChannel"]
