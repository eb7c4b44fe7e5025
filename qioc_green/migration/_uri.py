"""Where migrations come from and go to: QEMU's URI spelling (``-incoming`` / ``migrate``)
turned into qioc_green channels.

``tcp:[HOST]:PORT``, ``unix:PATH``, ``fd:N``, ``exec:CMDLINE``, ``file:PATH[,offset=N]``. A
listening source gives one channel per accepted sender; every channel given out follows the
calling greenlet's context.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass

from qioc_green import Channel, CommandChannel, FileChannel, SocketChannel, parse_address


@dataclass(frozen=True)
class Endpoint:
    """A URI in QEMU's ``-incoming`` / ``migrate`` spelling, parsed."""

    kind: str  # tcp, unix, fd, exec, file
    address: str = ""  # tcp/unix/fd: the socket address in qioc_green's spelling
    path: str = ""  # unix, file
    command: str = ""  # exec
    fd: int = -1  # fd
    offset: int = 0  # file

    def __str__(self) -> str:
        if self.kind == "exec":
            return f"exec:{self.command}"
        if self.kind == "file":
            return f"file:{self.path}" + (f",offset={self.offset}" if self.offset else "")
        return self.address


def parse_uri(uri: str) -> Endpoint:
    """Parse ``tcp:[HOST]:PORT``, ``unix:PATH``, ``fd:N``, ``exec:CMDLINE``, ``file:PATH[,offset=N]``.

    Raises ValueError with a message fit for the user.
    """
    kind, sep, rest = uri.partition(":")
    if not sep:
        raise ValueError(f"{uri!r}: expected tcp:[HOST]:PORT, unix:PATH, fd:N, exec:CMDLINE "
                         "or file:PATH[,offset=N]")
    if kind == "tcp":
        sa = parse_address(uri)  # validates host and port
        return Endpoint("tcp", address=str(sa))
    if kind == "unix":
        if not rest:
            raise ValueError(f"{uri!r}: empty path")
        if len(rest.encode()) > 107:
            raise ValueError(f"{uri!r}: a UNIX socket path must be under 108 bytes")
        return Endpoint("unix", address=uri, path=rest)
    if kind == "fd":
        try:
            fd = int(rest)
        except ValueError:
            raise ValueError(f"{uri!r}: fd must be a number") from None
        if fd < 0:
            raise ValueError(f"{uri!r}: fd must not be negative")
        return Endpoint("fd", address=uri, fd=fd)
    if kind == "exec":
        if not rest.strip():
            raise ValueError(f"{uri!r}: empty command line")
        return Endpoint("exec", command=rest)
    if kind == "file":
        path, _, opts = rest.partition(",")
        offset = 0
        for opt in filter(None, opts.split(",")):
            key, _, value = opt.partition("=")
            if key != "offset":
                raise ValueError(f"{uri!r}: unknown option {key!r} (only offset=N)")
            try:
                offset = int(value, 0)
            except ValueError:
                raise ValueError(f"{uri!r}: offset {value!r} is not a number") from None
            if offset < 0:
                raise ValueError(f"{uri!r}: offset must not be negative")
        if not path:
            raise ValueError(f"{uri!r}: empty path")
        return Endpoint("file", path=path, offset=offset)
    raise ValueError(f"{uri!r}: unknown kind {kind!r} (tcp, unix, fd, exec, file)")


class Incoming:
    """Where migrations come from: a listener (tcp, unix, a listening fd) or a single stream.

    ``open()`` never parks (it binds and listens); ``next_channel()`` may park (accept). Every
    channel it gives out follows the calling greenlet's context. ``close()`` from any thread
    wakes a greenlet parked in ``next_channel()`` with ChannelClosedError. ``backlog``: the
    listen queue (a multifd source opens all its connections at once: give it room for them).
    """

    def __init__(self, endpoint: Endpoint, backlog: int = 1) -> None:
        self.endpoint = endpoint
        self.backlog = backlog
        self.listener: SocketChannel | None = None
        self._used = False

    @property
    def listening(self) -> str | None:
        """The address actually listened on (``tcp:127.0.0.1:40219``), or None."""
        if self.listener is None:
            return None
        return self.listener.local_address

    @property
    def can_repeat(self) -> bool:
        return self.listener is not None

    def open(self) -> None:
        ep = self.endpoint
        if ep.kind in ("tcp", "unix"):
            self.listener = SocketChannel.listen(ep.address, self.backlog, name=f"incoming-{ep}")
        elif ep.kind == "fd" and is_listening_socket(ep.fd):
            self.listener = SocketChannel.listen(ep.address, name=f"incoming-{ep}")
        if self.listener is not None:
            self.listener.set_follow_coroutine_ctx(True)

    def next_channel(self, *, timeout: float | None = None) -> Channel:
        """The next incoming stream. May park (accept). Raises EOFError when there is none."""
        ep = self.endpoint
        if self.listener is not None:
            ch: Channel = self.listener.accept(timeout=timeout)
            ch.set_follow_coroutine_ctx(True)
            return ch
        if self._used:
            raise EOFError(f"{ep} gives one stream only")
        self._used = True
        if ep.kind == "exec":
            ch = CommandChannel.spawn(["/bin/sh", "-c", ep.command], "r", name="exec-source")
        elif ep.kind == "file":
            ch = FileChannel.open(ep.path, os.O_RDONLY)
            if ep.offset:
                ch.seek(ep.offset)
        elif ep.kind == "fd":
            ch = _channel_from_fd(ep.fd, "fd-source")
        else:
            raise AssertionError(ep.kind)
        ch.set_follow_coroutine_ctx(True)
        return ch

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()


def is_listening_socket(fd: int) -> bool:
    """Is ``fd`` a socket that listens (an ``fd:`` source that gives many connections)?"""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    with s:
        try:
            return bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        except OSError:
            return False


def _channel_from_fd(fd: int, name: str) -> Channel:
    """A socket fd becomes a SocketChannel, anything else (pipe, file) a FileChannel."""
    if stat.S_ISSOCK(os.fstat(fd).st_mode):
        return SocketChannel.from_socket(socket.socket(fileno=fd), name=name)
    return FileChannel.from_fd(fd, name=name)


def open_outgoing(endpoint: Endpoint, *, timeout: float | None = 30.0) -> Channel:
    """Connect to a forwarding destination: tcp, unix, fd, exec (its stdin) or file. May park."""
    ep = endpoint
    if ep.kind in ("tcp", "unix"):
        ch: Channel = SocketChannel.connect(ep.address, timeout=timeout, name=f"forward-{ep}",
                                            follow=True)
    elif ep.kind == "fd":
        ch = _channel_from_fd(ep.fd, f"forward-{ep}")
    elif ep.kind == "exec":
        ch = CommandChannel.spawn(["/bin/sh", "-c", ep.command], "w", name="forward-exec")
    elif ep.kind == "file":
        ch = FileChannel.open(ep.path, os.O_WRONLY | os.O_CREAT, name=f"forward-{ep}")
        ch.seek(ep.offset)
    else:
        raise AssertionError(ep.kind)
    ch.set_follow_coroutine_ctx(True)
    return ch

