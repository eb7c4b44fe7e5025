"""Socket addresses in QEMU's spelling: ``tcp:HOST:PORT``, ``unix:PATH``, ``fd:N``, ``vsock:CID:PORT``.

``tcp:[::1]:PORT`` takes an IPv6 literal in brackets; an empty host means every address
(``tcp::PORT`` → ``0.0.0.0`` for listening, ``localhost`` for connecting).  Tuples are accepted
too: ``(host, port)`` for TCP, and a bare path string without a prefix is refused, so a typo
never turns into a file name.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SocketAddress:
    kind: str  # "tcp", "unix", "fd", "vsock"
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1
    cid: int = 0

    def __str__(self) -> str:
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd:{self.fd}"
        return f"vsock:{self.cid}:{self.port}"


def parse_address(addr: Any) -> SocketAddress:
    """Parse an address in QEMU's spelling (or a ``(host, port)`` tuple, or a SocketAddress)."""
    if isinstance(addr, SocketAddress):
        return addr
    if isinstance(addr, tuple) and len(addr) >= 2:
        return SocketAddress("tcp", host=str(addr[0]), port=int(addr[1]))
    if not isinstance(addr, str):
        raise ValueError(f"not a socket address: {addr!r}")
    kind, sep, rest = addr.partition(":")
    if not sep:
        raise ValueError(f"address {addr!r} has no kind: use tcp:HOST:PORT, unix:PATH, fd:N or vsock:CID:PORT")
    if kind in ("tcp", "inet"):
        host, port = _split_host_port(rest, addr)
        return SocketAddress("tcp", host=host, port=port)
    if kind == "unix":
        if not rest:
            raise ValueError(f"address {addr!r} has an empty path")
        return SocketAddress("unix", path=rest)
    if kind == "fd":
        try:
            return SocketAddress("fd", fd=int(rest))
        except ValueError:
            raise ValueError(f"address {addr!r}: fd must be a number") from None
    if kind == "vsock":
        cid, _, vport = rest.partition(":")
        try:
            return SocketAddress("vsock", cid=int(cid), port=int(vport))
        except ValueError:
            raise ValueError(f"address {addr!r}: expected vsock:CID:PORT") from None
    raise ValueError(f"address {addr!r}: unknown kind {kind!r} (tcp, unix, fd, vsock)")


def _split_host_port(rest: str, whole: str) -> tuple[str, int]:
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or not tail.startswith(":"):
            raise ValueError(f"address {whole!r}: expected tcp:[IPV6]:PORT")
        port_s = tail[1:]
    else:
        host, sep, port_s = rest.rpartition(":")
        if not sep:
            raise ValueError(f"address {whole!r}: expected tcp:HOST:PORT")
    port_s = port_s.split(",", 1)[0]  # QEMU options after a comma (",ipv4=on") are ignored
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"address {whole!r}: port {port_s!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"address {whole!r}: port {port} out of range")
    return host, port


def format_sockaddr(family: int, sockaddr: Any) -> str:
    """A socket's address in QEMU's spelling."""
    if family == socket.AF_UNIX:
        path = sockaddr.decode(errors="replace") if isinstance(sockaddr, bytes) else sockaddr
        return f"unix:{path}"
    if family in (socket.AF_INET, socket.AF_INET6):
        return str(SocketAddress("tcp", host=sockaddr[0], port=sockaddr[1]))
    if hasattr(socket, "AF_VSOCK") and family == socket.AF_VSOCK:
        return f"vsock:{sockaddr[0]}:{sockaddr[1]}"
    return repr(sockaddr)


__all__ = ["SocketAddress", "format_sockaddr", "parse_address"]
