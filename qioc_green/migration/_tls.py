"""TLS for migration channels: QEMU's ``tls-creds-x509`` directories, and one accept and one
connect that every channel goes through (the main channel, each multifd channel, and each of
their ``--forward`` connections).

The facts (QEMU's ``crypto/tlscredsx509.c``, ``migration/tls.c``; checked against QEMU 10.0
and 7.2 sources and destinations)
------------------------------------------------------------------------------------------------

- A ``tls-creds-x509`` object is a directory of PEM files with fixed names: ``ca-cert.pem``
  (always required), then for a *server* endpoint (a destination) ``server-cert.pem`` and
  ``server-key.pem``, for a *client* endpoint (a source) optionally ``client-cert.pem`` and
  ``client-key.pem``; optional ``ca-crl.pem`` and ``dh-params.pem``. ``verify-peer`` (default
  on) makes a server require and check a client certificate, a client check the server's.
- A source with ``tls-creds`` set starts a TLS client handshake on every channel it opens,
  before any byte of the stream, and checks the server certificate against ``ca-cert.pem`` and
  the name ``tls-hostname`` (else the host of the URI: with ``tcp:127.0.0.1:PORT`` the
  certificate needs ``IP:127.0.0.1``). The return path is the main channel's other direction,
  inside the same session.
- A destination handshakes every accepted connection first. A plaintext source sends ``QEVM``
  (or a multifd channel its magic 0x11223344) where the ClientHello (a handshake record, first
  byte 0x16) should be; a source whose CA does not know our certificate aborts its handshake
  with an alert.

The decisions
-------------
- :func:`accept_tls` peeks at the first byte (without taking it) where the channel can peek, so
  a plaintext peer is refused with one line naming what it sent, not with OpenSSL's "wrong
  version number"; then it runs the handshake under a deadline (a peer that says nothing is
  not waited for forever). :func:`connect_tls` is the client side (``--forward`` to a TLS
  destination). Both return the :class:`~qioc_green.TLSChannel`; every failure is one
  :class:`TlsError` line.
- **No TLS 1.3 session tickets** from the server side. A TLS 1.3 server sends tickets after
  the handshake, unasked; a source without a return path never reads its socket, so they stay
  unread there, and a socket closed with unread data is reset by the kernel instead of shut:
  the reset discards whatever of the stream was still in flight to us. Seen with QEMU 10.0 at
  256 MiB: the last 1.7 MB lost, every time. Migration does not resume sessions anyway.
- A ``TLSChannel`` reads EOF without close_notify as a truncation (BrokenChannelError). QEMU's
  sources end the main channel without it; the receiver accepts such an EOF once the stream
  has ended (``_destination``), as QEMU's destination does.
- **Multifd channels** each do a handshake of their own with the same credentials. QEMU 10.0
  ends them with close_notify; 7.2 does not (a 10.0 destination tolerates that only on a <= 9.2
  machine type, ``multifd-clean-tls-termination`` off). A multifd receiver accepts every
  connection with ``ragged_eof=True`` (a hang-up without close_notify reads as EOF): each
  channel's parser still refuses an end inside a packet, and the sync points one that ends
  early, so nothing truncated passes for complete. With TLS the channel kind cannot be peeked
  (QEMU then takes the first connection for the main one); the receiver reads each
  connection's first bytes after its handshake, so the order does not matter.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from qioc_green import BrokenChannelError, Channel, Feature, ReadFlag, TLSChannel

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
DH_PARAMS = "dh-params.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
HANDSHAKE_TIMEOUT = 30.0  # s, when the caller gives none

_TLS_HANDSHAKE_RECORD = 0x16
_PLAINTEXT = {0x51: "a plaintext migration stream (QEVM)",
              0x11: "a plaintext multifd channel (magic 0x11223344)"}


class TlsError(Exception):
    """A TLS setup failed; the message is one line fit for the user."""


@dataclass(frozen=True)
class TlsCreds:
    """A ``tls-creds-x509`` object: ``dir`` in QEMU's layout, the ``endpoint`` it serves
    (``server`` for a destination, ``client`` for a source), and ``verify_peer``."""

    dir: str
    endpoint: str = "server"
    verify_peer: bool = True

    def context(self) -> ssl.SSLContext:
        """The ssl context these credentials make. Raises TlsError naming the file at fault."""
        if self.endpoint not in ("server", "client"):
            raise TlsError(f"tls-creds endpoint {self.endpoint!r}: expected server or client")
        server = self.endpoint == "server"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        if server:
            ctx.num_tickets = 0  # see the module notes: a source may never read its socket
        else:
            ctx.check_hostname = self.verify_peer
        self._load(ctx, CA_CERT, ctx.load_verify_locations)
        crl = os.path.join(self.dir, CA_CRL)
        if os.path.exists(crl):
            self._load(ctx, CA_CRL, ctx.load_verify_locations)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        cert, key = (SERVER_CERT, SERVER_KEY) if server else (CLIENT_CERT, CLIENT_KEY)
        have = [os.path.exists(os.path.join(self.dir, f)) for f in (cert, key)]
        if server or any(have):
            if not all(have):
                missing = cert if not have[0] else key
                raise TlsError(f"tls-creds {self.dir}: {missing}: no such file (it needs "
                               f"{cert} and {key})")
            self._load(ctx, cert, lambda path: ctx.load_cert_chain(
                path, os.path.join(self.dir, key)))
        dh = os.path.join(self.dir, DH_PARAMS)
        if server and os.path.exists(dh):
            self._load(ctx, DH_PARAMS, ctx.load_dh_params)
        return ctx

    def _load(self, ctx: ssl.SSLContext, name: str, load: object) -> None:
        path = os.path.join(self.dir, name)
        try:
            load(path)  # type: ignore[operator]
        except FileNotFoundError:
            raise TlsError(f"tls-creds {self.dir}: {name}: no such file") from None
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise TlsError(f"tls-creds {self.dir}: {name}: {_reason(exc)}") from None


def accept_tls(channel: Channel, ctx: ssl.SSLContext, *, peer: str = "the source",
               timeout: float | None = HANDSHAKE_TIMEOUT, ragged_eof: bool = False) -> TLSChannel:
    """The server side of a migration channel: refuse a plaintext peer, handshake, return the
    session. May park (on ``channel``). Raises TlsError (one line); ``channel`` is closed then.
    ``ragged_eof``: a hang-up without close_notify reads as EOF (multifd channels, above).
    """
    try:
        if channel.has_feature(Feature.READ_MSG_PEEK):
            first = channel.read(1, flags=ReadFlag.MSG_PEEK, timeout=timeout)
            if not first:
                raise TlsError(f"{peer} closed the connection before its TLS handshake")
            if first[0] != _TLS_HANDSHAKE_RECORD:
                what = _PLAINTEXT.get(first[0], f"byte 0x{first[0]:02x}, not a TLS ClientHello")
                raise TlsError(f"{peer} sent {what} where a TLS handshake should begin: set "
                               "tls-creds on the source too, or run without --tls-creds")
        tls = TLSChannel.server(channel, ctx, name=f"tls-{channel.name}",
                                suppress_ragged_eofs=ragged_eof)
        _handshake(tls, peer, timeout)
        return tls
    except BaseException:
        channel.close()
        raise


def connect_tls(channel: Channel, ctx: ssl.SSLContext, hostname: str | None, *,
                peer: str = "the destination",
                timeout: float | None = HANDSHAKE_TIMEOUT) -> TLSChannel:
    """The client side: handshake as ``hostname`` (checked against the server's certificate
    when the context verifies). May park. Raises TlsError (one line); ``channel`` is closed."""
    try:
        tls = TLSChannel.client(channel, ctx, hostname, name=f"tls-{channel.name}")
        _handshake(tls, peer, timeout)
        return tls
    except BaseException:
        channel.close()
        raise


def early_close(channel: Channel, received: int) -> str | None:
    """What to say when a TLS peer hangs up before the stream's first byte: QEMU checks the
    server's certificate only after the handshake, so a source that refuses ours closes then."""
    if received or not isinstance(channel, TLSChannel):
        return None
    return ("the source closed its TLS session before the stream began: did it refuse our "
            "certificate? (its ca-cert.pem must have signed ours, and its tls-hostname, or "
            "the host of its URI, must be in it)")


def _handshake(tls: TLSChannel, peer: str, timeout: float | None) -> None:
    try:
        tls.handshake(timeout=timeout)
    except TimeoutError:
        raise TlsError(f"TLS handshake with {peer}: no answer in {timeout} s") from None
    except (BrokenChannelError, ssl.SSLError, OSError) as exc:
        raise TlsError(f"TLS handshake with {peer} failed: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """The useful part of an ssl/OS error, on one line (OpenSSL's reason when there is one)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            verify = getattr(cause, "verify_message", None)
            return verify or cause.reason or str(cause)
        cause = cause.__cause__
    return " ".join(str(exc).split())
