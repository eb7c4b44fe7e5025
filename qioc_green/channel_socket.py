"""SocketChannel: TCP (IPv4/IPv6), UNIX (with fd passing), vsock.  QEMU: ``io/channel-socket.c``.

The channel owns a plain stdlib socket in non-blocking mode, never a gevent socket (a gevent
socket is bound to the hub that made it): sockets are made with the unpatched class even after
``gevent.monkey.patch_all()``, and ``from_socket()`` unwraps a gevent socket it is given.  Only
stream sockets are accepted.  The hooks call the socket's methods directly; the base class parks
on EAGAIN.  OSErrors from making, binding and connecting sockets are translated here, naming
the address.

Accept errors: ECONNABORTED and EPROTO mean one client went away during the handshake and are
retried; EMFILE/ENFILE/ENOBUFS/ENOMEM are resource limits and are raised to the caller (the
listener backs off); anything else is raised too.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

from . import _hub, _native
from .address import SocketAddress, format_sockaddr, parse_address
from .channel import Channel, Feature, IOCondition, Shutdown, deadline
from .errors import BrokenChannelError, ChannelClosedError, NotSupportedError, from_os_error
from .task import run_in_thread

MAX_FDS = 16  # QEMU's limit of fds in one message
_INT_SIZE = array.array("i").itemsize
_MSG_ZEROCOPY = getattr(socket, "MSG_ZEROCOPY", 0x4000000)
_SO_ZEROCOPY = getattr(socket, "SO_ZEROCOPY", 60)
_SO_EE_ORIGIN_ZEROCOPY = 5
_RETRY_ACCEPT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR})
# The compiled hot path (None without it): recv/send/recvmsg/sendmsg on the fd with the GIL
# held, a return code for "would block" (the hooks turn it into BlockingIOError, their contract).
# Only for transfers up to _SMALL bytes: larger ones go through the socket module, which
# releases the GIL for the whole copy (measured: NBD's large replies lost 5-20 % otherwise).
_sp = _native.speedups
_SMALL = 65536


def _fd_room(max_fds: int) -> int:
    # CMSG_LEN, not CMSG_SPACE: the kernel fills the control buffer with as many fds as fit,
    # and CMSG_SPACE's alignment padding has room for one more when max_fds is odd.  With
    # exactly max_fds' room it installs that many and closes the rest (MSG_CTRUNC).
    return socket.CMSG_LEN(max_fds * _INT_SIZE)


def _parse_fds(ancdata: list[tuple[int, int, bytes]], max_fds: int) -> list[int]:
    """The fds of SCM_RIGHTS messages, ``max_fds`` at most: any beyond are closed."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _INT_SIZE
            fds.extend(array.array("i", data[:usable]))
    for extra in fds[max_fds:]:
        os.close(extra)
    return fds[:max_fds]


class SocketChannel(Channel):
    """A channel over a stream socket.  Features: SHUTDOWN, READ_MSG_PEEK; FD_PASS for UNIX;
    LISTEN for listening sockets; WRITE_ZERO_COPY after ``set_zero_copy(True)`` on Linux TCP.
    """

    kind = "socket"

    def __init__(self, sock: socket.socket, *, name: str | None = None, unlink_on_close: str | None = None) -> None:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"{name or 'socket'}: a SocketChannel needs a stream socket, "
                             f"not {socket.SocketKind(sock.type).name}")
        if not isinstance(sock, _hub.PlainSocket):  # a gevent socket (monkey patching): unwrap it
            sock = _hub.PlainSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        features = Feature.SHUTDOWN | Feature.READ_MSG_PEEK
        if sock.family == socket.AF_UNIX:
            features |= Feature.FD_PASS
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                features |= Feature.LISTEN
        except OSError:
            pass
        super().__init__(name=name, features=features)
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        if _sp is not None:
            self._sock_fd = self._fd  # the base class's hot paths call recv/send on it directly
        else:
            self._io_write = sock.send  # type: ignore[method-assign,assignment]  # the same signature: skip a frame per write
        self._family = sock.family
        self._unlink = unlink_on_close
        self._zc_sent = 0
        self._zc_done = 0

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_socket(cls, sock: socket.socket, *, name: str | None = None) -> SocketChannel:
        """Wrap an existing stream socket; the channel takes ownership (and makes it non-blocking).

        ValueError for a datagram (or any non-stream) socket.
        """
        return cls(sock, name=name)

    @classmethod
    def socketpair(cls, *, name: str | None = None) -> tuple[SocketChannel, SocketChannel]:
        """Two connected UNIX stream channels."""
        base = name or "socketpair"
        try:
            a, b = _hub.plain_socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise from_os_error(exc, base, "socketpair") from exc
        return cls(a, name=f"{base}-a"), cls(b, name=f"{base}-b")

    @classmethod
    def connect(cls, addr: Any, *, timeout: float | None = None, name: str | None = None,
                follow: bool = False) -> SocketChannel:
        """Connect to ``addr`` (QEMU spelling or ``(host, port)``); may park.

        A host name is resolved in a worker thread (QIOTask); each resolved address is tried in
        turn.  Raises BrokenChannelError naming the address on failure, TimeoutError after
        ``timeout``.  QEMU: ``qio_channel_socket_connect_sync()``.
        """
        sa = parse_address(addr)
        dl = deadline(timeout)
        label = name or f"socket-{sa}"
        if sa.kind == "fd":
            try:
                dup = os.dup(sa.fd)
            except OSError as exc:
                raise from_os_error(exc, label, f"connect to {sa}") from exc
            try:
                sock = _hub.PlainSocket(fileno=dup)  # ENOTSOCK for a pipe or a file
            except OSError as exc:
                os.close(dup)
                raise from_os_error(exc, label, f"connect to {sa}") from exc
            try:
                fd_ch = cls(sock, name=name)  # ValueError for a datagram socket
            except BaseException:
                sock.close()
                raise
            fd_ch.set_follow_coroutine_ctx(follow)
            return fd_ch
        if sa.kind == "unix":
            targets: list[tuple[int, Any]] = [(socket.AF_UNIX, sa.path)]
        elif sa.kind == "vsock":
            targets = [(socket.AF_VSOCK, (sa.cid, sa.port))]
        else:
            targets = [(fam, sockaddr) for fam, sockaddr in _resolve(sa, passive=False, deadline=dl)]
        last: Exception | None = None
        for family, sockaddr in targets:
            try:
                sock = _hub.PlainSocket(family, socket.SOCK_STREAM)
            except OSError as exc:
                raise from_os_error(exc, label, "connect") from exc
            ch = cls(sock, name=label)
            ch.set_follow_coroutine_ctx(follow)
            try:
                ch._connect(sockaddr, dl)
                return ch
            except (BrokenChannelError, ChannelClosedError) as exc:
                ch.close()
                last = exc
            except BaseException:
                ch.close()
                raise
        if len(targets) == 1 and last is not None:
            raise last  # it already names the channel and the reason
        raise BrokenChannelError(f"{label}: connect failed on every address: {last}") from last

    def _connect(self, sockaddr: Any, deadline: float | None) -> None:
        try:
            err = self._sock.connect_ex(sockaddr)
        except OSError as exc:  # an address the kernel refuses outright (a UNIX path too long)
            raise self._broken(exc, "connect") from exc
        # On a UNIX socket EAGAIN means "the listener's backlog is full", not "in progress":
        # nothing is pending, so retry with a short back-off until the deadline.
        backoff = 0.001
        while err == errno.EAGAIN and self._family == socket.AF_UNIX:
            if deadline is not None and time.monotonic() + backoff > deadline:
                raise TimeoutError(f"{self.name}: timed out connecting (listen backlog full)")
            _hub.sleep(backoff)
            backoff = min(backoff * 2, 0.05)
            err = self._sock.connect_ex(sockaddr)
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            self._enter()
            try:
                self._wr.park(deadline)
            finally:
                self._leave()
            err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            cause = OSError(err, os.strerror(err))
            raise self._broken(cause, "connect") from cause
        if self._family in (socket.AF_INET, socket.AF_INET6):
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def listen(cls, addr: Any, backlog: int = 128, *, name: str | None = None,
               reuse_port: bool = False) -> SocketChannel:
        """A listening channel on ``addr``; port 0 picks a free port (see ``local_address``).

        A UNIX socket path is created (replacing a stale socket file) and unlinked on close.
        ``fd:N`` takes over an inherited listening socket.  Never switches.
        """
        chans = cls.listen_all(addr, backlog, name=name, reuse_port=reuse_port)
        for extra in chans[1:]:
            extra.close()
        return chans[0]

    @classmethod
    def listen_all(cls, addr: Any, backlog: int = 128, *, name: str | None = None,
                   reuse_port: bool = False) -> list[SocketChannel]:
        """Like ``listen``, but one channel per resolved address (a name may give IPv4 and IPv6).

        Raises BrokenChannelError naming the address when it cannot listen (address in use, a
        path too long, a bad ``fd:N``), the OSError in ``__cause__``.
        """
        sa = parse_address(addr)
        label = name or f"listen-{sa}"
        try:
            return cls._listen_all(sa, backlog, name, reuse_port)
        except OSError as exc:
            raise from_os_error(exc, label, "listen") from exc

    @classmethod
    def _listen_all(cls, sa: SocketAddress, backlog: int, name: str | None,
                    reuse_port: bool) -> list[SocketChannel]:
        if sa.kind == "fd":
            sock = _hub.PlainSocket(fileno=sa.fd)
            return [cls(sock, name=name or f"listen-fd{sa.fd}")]
        if sa.kind == "unix":
            sock = _hub.PlainSocket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if os.path.exists(sa.path) and _is_socket(sa.path):
                    os.unlink(sa.path)
                sock.bind(sa.path)
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
            return [cls(sock, name=name or f"listen-{sa}", unlink_on_close=sa.path)]
        if sa.kind == "vsock":
            sock = _hub.PlainSocket(socket.AF_VSOCK, socket.SOCK_STREAM)
            try:
                sock.bind((sa.cid, sa.port))
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
            return [cls(sock, name=name or f"listen-{sa}")]
        out: list[SocketChannel] = []
        port = sa.port
        try:
            for family, sockaddr in _resolve(sa, passive=True, deadline=None):
                sock = _hub.PlainSocket(family, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if reuse_port:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    if port == 0 and out:  # the same ephemeral port on every address, as QEMU does
                        sockaddr = (sockaddr[0], out[0].local_port) + tuple(sockaddr[2:])
                    sock.bind(sockaddr)
                    sock.listen(backlog)
                except BaseException:
                    sock.close()
                    raise
                ch = cls(sock, name=name)
                if name is None:
                    ch.set_name(f"listen-{ch.local_address}")
                out.append(ch)
        except BaseException:
            for ch in out:
                ch.close()
            raise
        return out

    def accept(self, *, timeout: float | None = None, name: str | None = None) -> SocketChannel:
        """Accept one client; may park.  The new channel inherits this one's follow flag.

        QEMU: ``qio_channel_socket_accept()``.  See the module docstring for the errno policy.
        """
        if not self._features & Feature.LISTEN:
            raise NotSupportedError(f"{self.name}: not a listening socket")
        sock = self._retry(self._rd, deadline(timeout), self._accept_once)
        ch = SocketChannel(sock, name=name)
        if ch._family in (socket.AF_INET, socket.AF_INET6):
            ch._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if name is None:
            ch.set_name(f"socket-{ch.remote_address}")
        ch.set_follow_coroutine_ctx(self._follow)
        return ch

    def _accept_once(self) -> socket.socket:
        # The accept hook for _retry: BlockingIOError parks; one client gone mid-handshake is
        # retried at once; anything else is this call's error.
        while True:
            try:
                # socket.accept() wraps the new fd with whatever ``socket.socket`` is now (gevent's,
                # under monkey patching); wrap it ourselves with the plain class.
                fd, _ = self._sock._accept()  # type: ignore[attr-defined]
                return _hub.PlainSocket(self._family, socket.SOCK_STREAM, self._sock.proto, fileno=fd)
            except BlockingIOError:
                raise
            except OSError as exc:
                if exc.errno in _RETRY_ACCEPT:
                    continue
                raise self._broken(exc, "accept") from exc

    # -- properties ------------------------------------------------------------------------------

    @property
    def socket(self) -> socket.socket:
        """The underlying stdlib socket (non-blocking; do not close it yourself)."""
        return self._sock

    def fileno(self) -> int:
        return self._fd

    def _sockname(self) -> Any:
        try:
            return self._sock.getsockname()
        except OSError as exc:
            raise self._broken(exc, "getsockname") from exc

    @property
    def local_address(self) -> str:
        return format_sockaddr(self._family, self._sockname())

    @property
    def local_port(self) -> int:
        return int(self._sockname()[1])

    @property
    def remote_address(self) -> str:
        try:
            return format_sockaddr(self._family, self._sock.getpeername())
        except OSError:
            return "unconnected"

    # -- hooks -----------------------------------------------------------------------------------

    def _io_fd(self, cond: IOCondition) -> int | None:
        return self._fd

    def _io_readinto(self, buf: memoryview, flags: int) -> int:
        if _sp is not None and buf.nbytes <= _SMALL:
            n: int = _sp.recv_into(self._fd, buf, socket.MSG_PEEK if flags else 0)
            if n < 0:
                raise BlockingIOError
            return n
        return self._sock.recv_into(buf, 0, socket.MSG_PEEK if flags else 0)

    def _io_read(self, n: int, flags: int) -> bytes:
        if _sp is not None and n <= _SMALL:
            data: bytes | None = _sp.recv(self._fd, n, socket.MSG_PEEK if flags else 0)
            if data is None:
                raise BlockingIOError
            return data
        return self._sock.recv(n, socket.MSG_PEEK if flags else 0)

    def _io_readv(self, buffers: list[memoryview], max_fds: int, flags: int) -> tuple[int, list[int]]:
        sflags = socket.MSG_PEEK if flags else 0
        if _sp is not None and (len(buffers) == 1 or sum(b.nbytes for b in buffers) <= _SMALL):
            if len(buffers) == 1 and not max_fds:
                return self._io_readinto(buffers[0], flags), []
            got: tuple[int, list[int]] | None = _sp.recvmsg(self._fd, buffers, min(max_fds, MAX_FDS), sflags)
            if got is None:
                raise BlockingIOError
            return got
        if not max_fds:
            if len(buffers) == 1:
                return self._sock.recv_into(buffers[0], 0, sflags), []
            return self._sock.recvmsg_into(buffers, 0, sflags)[0], []
        max_fds = min(max_fds, MAX_FDS)
        n, ancdata, msg_flags, _ = self._sock.recvmsg_into(buffers, _fd_room(max_fds), sflags | socket.MSG_CMSG_CLOEXEC)
        return n, _parse_fds(ancdata, max_fds)

    def _io_write(self, buf: memoryview) -> int:
        if _sp is not None and len(buf) <= _SMALL:
            n: int = _sp.send(self._fd, buf)
            if n < 0:
                raise BlockingIOError
            return n
        return self._sock.send(buf)

    def _io_writev(self, buffers: list[memoryview], fds: Sequence[int], flags: int) -> int:
        if fds and len(fds) > MAX_FDS:
            raise ValueError(f"{self.name}: at most {MAX_FDS} fds in one message, not {len(fds)}")
        if _sp is not None and sum(b.nbytes for b in buffers) <= _SMALL:
            n: int = _sp.sendmsg(self._fd, buffers, fds, _MSG_ZEROCOPY if flags else 0)
            if n < 0:
                raise BlockingIOError
            if flags:
                self._zc_sent += 1
            return n
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            return self._sock.sendmsg(buffers, anc)
        if flags:
            n = self._sock.sendmsg(buffers, [], _MSG_ZEROCOPY)
            self._zc_sent += 1
            return n
        if len(buffers) == 1:
            return self._sock.send(buffers[0])
        return self._sock.sendmsg(buffers)

    def _io_close(self) -> None:
        self._sock.close()
        if self._unlink:
            try:
                os.unlink(self._unlink)
            except FileNotFoundError:
                pass

    def _io_shutdown(self, how: Shutdown) -> None:
        mode = {Shutdown.READ: socket.SHUT_RD, Shutdown.WRITE: socket.SHUT_WR}.get(how, socket.SHUT_RDWR)
        self._sock.shutdown(mode)

    def _io_set_delay(self, enabled: bool) -> None:
        if self._family in (socket.AF_INET, socket.AF_INET6):
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0 if enabled else 1)

    def _io_set_cork(self, enabled: bool) -> None:
        if self._family in (socket.AF_INET, socket.AF_INET6):
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if enabled else 0)

    # -- zero copy -------------------------------------------------------------------------------

    def set_zero_copy(self, enabled: bool) -> bool:
        """Ask the kernel for MSG_ZEROCOPY sends; returns whether WRITE_ZERO_COPY is now on.

        With it, ``writev_full(..., flags=WriteFlag.ZERO_COPY)`` may be used, the buffers must
        stay unchanged until ``flush()`` returns.
        """
        if self._family not in (socket.AF_INET, socket.AF_INET6):
            return False
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, _SO_ZEROCOPY, 1 if enabled else 0)
        except OSError:
            return False
        if enabled:
            self._set_feature(Feature.WRITE_ZERO_COPY)
        else:
            self._features &= ~Feature.WRITE_ZERO_COPY
        return enabled

    def _io_flush(self) -> None:
        # Completions arrive on the socket's error queue as ranges of send numbers.  Reading
        # the error queue never blocks.  QEMU waits for G_IO_ERR; a libev watcher cannot wait
        # for the error queue alone (it reports a readable socket as ready too), so we look
        # every 0.5 ms, parked in between, for at most 30 s.
        deadline = time.monotonic() + 30.0
        while self._zc_done < self._zc_sent:
            try:
                _, anc, _, _ = self._sock.recvmsg(1, socket.CMSG_SPACE(64), socket.MSG_ERRQUEUE)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BrokenChannelError(f"{self.name}: zero-copy completions never arrived") from None
                _hub.sleep(0.0005)
                continue
            except OSError as exc:
                raise self._broken(exc, "flush") from exc
            for _level, _kind, data in anc:
                if len(data) >= 16:
                    ee_errno, origin, _t, _c, _p, lo, hi = struct.unpack_from("=IBBBBII", data)
                    if origin == _SO_EE_ORIGIN_ZEROCOPY:
                        self._zc_done += hi - lo + 1
                    elif ee_errno:
                        raise BrokenChannelError(f"{self.name}: zero-copy send failed: {os.strerror(ee_errno)}")


def _is_socket(path: str) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _resolve(sa: SocketAddress, *, passive: bool, deadline: float | None) -> list[tuple[int, Any]]:
    host = sa.host or (None if passive else "localhost")
    flags = socket.AI_PASSIVE if passive else 0
    getaddrinfo = _hub.plain_getaddrinfo  # the OS's, in a worker thread, even under monkey patching
    try:  # a numeric host resolves without DNS, on the spot
        infos = getaddrinfo(host, sa.port, 0, socket.SOCK_STREAM, 0, flags | socket.AI_NUMERICHOST)
    except socket.gaierror:
        fut = run_in_thread(getaddrinfo, host, sa.port, 0, socket.SOCK_STREAM, 0, flags, name="qioc-dns")
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            infos = fut.result(timeout)
        except socket.gaierror as exc:
            raise BrokenChannelError(f"cannot resolve {sa}: {exc.strerror}") from exc
    seen = set()
    out: list[tuple[int, Any]] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        key = (family, sockaddr[:2])
        if key not in seen:
            seen.add(key)
            out.append((family, sockaddr))
    return out


__all__ = ["MAX_FDS", "SocketChannel"]
