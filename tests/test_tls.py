"""TLSChannel: the conformance routine over TLS, two IOThreads on one session, close_notify,
verification failures, and interop with real ``openssl s_server`` / ``s_client`` on loopback."""

from __future__ import annotations

import socket
import subprocess
import threading

import gevent
import pytest

from qioc_green import (
    BrokenChannelError,
    ChannelClosedError,
    CommandChannel,
    IOThread,
    Shutdown,
    SocketChannel,
    TLSChannel,
)
from qioc_green.testing import pattern_buffers, run_pattern, trace_readiness
from tests.certs import client_context, make_certs, server_context
from tests.peers import need


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(str(tmp_path_factory.mktemp("certs")))


def tls_pair(certs, *, follow=True):
    a, b = SocketChannel.socketpair()
    c = TLSChannel.client(a, client_context(certs), "localhost")
    s = TLSChannel.server(b, server_context(certs))
    for ch in (c, s):
        ch.set_follow_coroutine_ctx(follow)
    g = gevent.spawn(s.handshake, timeout=10)
    c.handshake(timeout=10)
    g.get(timeout=10)
    return c, s


@pytest.mark.parametrize("placement", ["one-hub", "two-iothreads", "iohandler"])
@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "nonblocking"])
def test_pattern_through_tls(certs, placement, blocking):
    c, s = tls_pair(certs)
    with c, s:
        run_pattern(c, s, blocking=blocking, placement=placement)
        s.set_blocking(True)
        run_pattern(s, c, blocking=True, placement=placement)  # and the other way


def test_follow_flag_is_the_inner_channels_and_waits_happen_on_it(certs):
    c, s = tls_pair(certs, follow=False)
    with c, s:
        assert not c.follow_coroutine_ctx and not c.inner.follow_coroutine_ctx
        c.set_follow_coroutine_ctx(True)
        assert c.inner.follow_coroutine_ctx and c.follow_coroutine_ctx
        with IOThread("tls-reader") as t, trace_readiness() as seen:
            fut = t.context.spawn(c.read_all, 5)
            gevent.sleep(0.05)  # let the reader park (nothing to read yet)
            s.write_all(b"hello")
            assert fut.result(10) == b"hello"
        # The wait was on the inner socket's fd, watched by the reader's own hub (follow).
        assert ("tls-reader", c.inner.fileno(), 1) in seen


def test_reader_and_writer_in_two_iothreads_on_one_session(certs):
    c, s = tls_pair(certs)
    src = b"".join(pattern_buffers())

    def echo():
        buf = bytearray(65536)
        while True:
            n = s.readinto(buf)
            if not n:
                break
            s.write_all(buf[:n])
        s.shutdown(Shutdown.WRITE)

    with c, s, IOThread("w") as tw, IOThread("r") as tr:
        peer = gevent.spawn(echo)

        def write():
            c.write_all(src)
            c.shutdown(Shutdown.WRITE)  # close_notify; reading goes on

        def read():
            got = bytearray()
            while True:
                d = c.read(65536)
                if not d:
                    return bytes(got)
                got += d

        fw = tw.context.spawn(write)
        fr = tr.context.spawn(read)
        fw.result(30)
        assert fr.result(30) == src
        peer.get(timeout=10)


def test_close_sends_close_notify_so_the_peer_reads_a_clean_eof(certs):
    c, s = tls_pair(certs)
    with s:
        c.write_all(b"bye")
        c.close()
        assert s.read_all(3, timeout=5) == b"bye"
        assert s.read(10, timeout=5) == b""  # close_notify: EOF, not an error


def test_eof_without_close_notify_is_a_broken_channel(certs):
    c, s = tls_pair(certs)
    with s:
        c.inner.shutdown(Shutdown.WRITE)  # a FIN under the TLS session, no close_notify
        with pytest.raises(BrokenChannelError, match="without close_notify"):
            s.read(10, timeout=5)
        c.close()


def test_shutdown_write_half_closes_and_the_other_way_still_works(certs):
    c, s = tls_pair(certs)
    with c, s:
        c.write_all(b"question")
        c.shutdown(Shutdown.WRITE)
        assert s.read_all(8, timeout=5) == b"question"
        assert s.read(1, timeout=5) == b""
        s.write_all(b"answer")
        s.close()
        assert c.read_all(6, timeout=5) == b"answer"
        assert c.read(1, timeout=5) == b""


def test_close_from_another_thread_wakes_a_parked_reader(certs):
    c, s = tls_pair(certs)
    with s, IOThread("parked") as t:
        fut = t.context.spawn(c.read, 10)
        gevent.sleep(0.05)
        c.close()
        with pytest.raises(ChannelClosedError, match=c.name):
            fut.result(5)


def test_verification_failure_names_the_peer(certs):
    a, b = SocketChannel.socketpair()
    c = TLSChannel.client(a, client_context(certs, ca="other.pem"), "localhost")
    s = TLSChannel.server(b, server_context(certs))
    with c, s:
        g = gevent.spawn(s.handshake, timeout=5)
        with pytest.raises(BrokenChannelError, match="localhost.*certificate verify failed|verification of localhost"):
            c.handshake(timeout=5)
        with pytest.raises(BrokenChannelError):
            g.get(timeout=5)


def test_wrong_hostname_names_the_peer(certs):
    a, b = SocketChannel.socketpair()
    c = TLSChannel.client(a, client_context(certs), "not-the-server.example")
    s = TLSChannel.server(b, server_context(certs))
    with c, s:
        g = gevent.spawn(s.handshake, timeout=5)
        with pytest.raises(BrokenChannelError, match="not-the-server.example"):
            c.handshake(timeout=5)
        with pytest.raises(BrokenChannelError):
            g.get(timeout=5)


def test_handshake_timeout(certs):
    a, b = SocketChannel.socketpair()
    c = TLSChannel.client(a, client_context(certs), "localhost")
    with c, b:
        with pytest.raises(TimeoutError):
            c.handshake(timeout=0.1)  # the peer never answers


# -- real openssl peers --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.peers
def test_client_against_openssl_s_server(certs):
    openssl = need("openssl")["openssl"]
    port = _free_port()
    # s_server stops serving when its stdin ends, so keep a pipe open until we are done.
    proc = subprocess.Popen(
        [openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", certs["server.pem"],
         "-key", certs["server.key"], "-naccept", "1", "-quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ch = None
        for _ in range(200):  # bounded: until s_server listens
            try:
                ch = SocketChannel.connect(f"tcp:127.0.0.1:{port}", timeout=5, follow=True)
                break
            except BrokenChannelError:
                gevent.sleep(0.02)
        assert ch is not None, "openssl s_server did not start listening"
        t = TLSChannel.client(ch, client_context(certs), "localhost")
        with t:
            t.handshake(timeout=10)
            assert t.version == "TLSv1.3"
            t.write_all(b"hello from qioc_green\n")
            proc.stdin.write(b"hello from openssl\n")
            proc.stdin.flush()
            assert t.read_all(19, timeout=10) == b"hello from openssl\n"
            t.shutdown(Shutdown.WRITE)  # close_notify: s_server ends the session
            assert t.read(100, timeout=10) == b""
        out, _ = proc.communicate(timeout=10)
        assert b"hello from qioc_green\n" in out
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f and not f.closed:
                f.close()


@pytest.mark.peers
def test_server_against_openssl_s_client(certs):
    openssl = need("openssl")["openssl"]
    lst = SocketChannel.listen("tcp:127.0.0.1:0")
    lst.set_follow_coroutine_ctx(True)
    seen = {}

    def serve():
        with lst.accept(timeout=10) as raw:
            t = TLSChannel.server(raw, server_context(certs))
            with t:
                t.handshake(timeout=10)
                line = t.read_all(5, timeout=10)
                t.write_all(b"echo:" + line)
                seen["eof"] = t.read(10, timeout=10)  # s_client sends close_notify on stdin EOF

    g = gevent.spawn(serve)
    # -brief keeps certificate chatter off stdout; without -quiet, stdin EOF ends the session.
    argv = [openssl, "s_client", "-connect", f"127.0.0.1:{lst.local_port}", "-CAfile", certs["ca.pem"],
            "-servername", "localhost", "-verify_return_error", "-brief"]
    with lst, CommandChannel.spawn(argv, mode="rw") as cmd:
        cmd.set_follow_coroutine_ctx(True)
        cmd.write_all(b"ping\n")
        assert cmd.read_all(10, timeout=10) == b"echo:ping\n"
        cmd.shutdown(Shutdown.WRITE)  # stdin EOF: s_client sends close_notify and exits
        g.get(timeout=10)
        assert seen["eof"] == b""
    assert cmd.returncode == 0


def test_two_iothreads_decrypt_at_once(certs):
    # Two sessions, each received in its own IOThread: both make progress (the cipher runs
    # without the GIL); this is the property the TLS scaling benchmark measures.
    pairs = [tls_pair(certs) for _ in range(2)]
    data = b"z" * (4 << 20)
    counts = {}
    lock = threading.Lock()

    def drain(ch, key):
        n = 0
        buf = bytearray(1 << 18)
        while True:
            got = ch.readinto(buf)
            if not got:
                break
            n += got
        with lock:
            counts[key] = n

    try:
        with IOThread("d0") as t0, IOThread("d1") as t1:
            futs = [t.context.spawn(drain, s, i) for i, (t, (_, s)) in enumerate(zip((t0, t1), pairs))]

            def send(c):
                c.write_all(data)
                c.shutdown(Shutdown.WRITE)

            senders = [gevent.spawn(send, c) for c, _ in pairs]
            gevent.joinall(senders, timeout=30, raise_error=True)
            for f in futs:
                f.result(30)
        assert counts == {0: len(data), 1: len(data)}
    finally:
        for c, s in pairs:
            c.close()
            s.close()


def test_write_after_shutdown_write_says_so(certs):
    c, s = tls_pair(certs)
    with c, s:
        c.shutdown(Shutdown.WRITE)
        with pytest.raises(BrokenChannelError, match="close_notify already sent"):
            c.write_all(b"late")


def test_shutdown_after_the_peer_vanished_is_a_channel_error(certs):
    c, s = tls_pair(certs)
    with c:
        s.inner.close()  # the peer's socket is gone: our close_notify meets EPIPE or a reset
        s.close()
        with pytest.raises(BrokenChannelError):
            for _ in range(100):  # the first sends may still be taken by the kernel
                c.write_all(b"x" * 65536)
            c.shutdown(Shutdown.WRITE)


# -- without handshake(): the first read or write does it ---------------------------------------


def test_first_read_and_write_handshake_and_close_still_sends_close_notify(certs):
    a, b = SocketChannel.socketpair()
    c = TLSChannel.client(a, client_context(certs), "localhost")
    s = TLSChannel.server(b, server_context(certs))
    for ch in (c, s):
        ch.set_follow_coroutine_ctx(True)
    with c, s:
        g = gevent.spawn(s.read_all, 5, timeout=10)  # neither side called handshake()
        c.write_all(b"hello", timeout=10)
        assert g.get(timeout=10) == b"hello"
        assert c.version == s.version == "TLSv1.3"
        s.write_all(b"world", timeout=10)
        assert c.read_all(5, timeout=10) == b"world"
        c.close()  # close_notify: the server reads a clean EOF, not a truncation
        assert s.read(10, timeout=10) == b""


def test_reader_and_writer_of_two_iothreads_both_arrive_before_the_handshake(certs):
    # The client's first read and first write start at once, in two threads: they take turns
    # waiting for the handshake instead of meeting as two readers of the socket. Repeated: the
    # orders they can meet in are a race.
    with IOThread("R") as tr, IOThread("W") as tw:
        for i in range(30):
            a, b = SocketChannel.socketpair()
            c = TLSChannel.client(a, client_context(certs), "localhost")
            s = TLSChannel.server(b, server_context(certs))
            for ch in (c, s):
                ch.set_follow_coroutine_ctx(True)

            def echo(srv=s):
                while data := srv.read(4096, timeout=10):
                    srv.write_all(data, timeout=10)

            with c, s:
                server = gevent.spawn(echo)
                msg = b"hello, world %2d" % i
                reply = tr.context.spawn(c.read_all, len(msg), timeout=10)
                tw.context.spawn(c.write_all, msg, timeout=10).result(10)
                assert reply.result(10) == msg
                c.close()
                server.get(timeout=10)


def test_handshake_failure_is_every_later_calls_error(certs):
    a, b = SocketChannel.socketpair()
    c = TLSChannel.client(a, client_context(certs, ca="other.pem"), "localhost")
    s = TLSChannel.server(b, server_context(certs))
    for ch in (c, s):
        ch.set_follow_coroutine_ctx(True)
    with c, s:
        g = gevent.spawn(s.read, 10, timeout=10)
        with pytest.raises(BrokenChannelError, match="certificate verification"):
            c.write_all(b"x", timeout=10)
        with pytest.raises(BrokenChannelError, match="certificate verification"):
            c.read(1, timeout=10)
        with pytest.raises(BrokenChannelError):
            g.get(timeout=10)


def test_ragged_eofs_can_read_as_eof(certs):
    # ssl.SSLSocket's suppress_ragged_eofs: a peer that hangs up without close_notify (most
    # Python ssl clients' close()) reads as EOF when asked; by default it is a truncation.
    for suppress in (False, True):
        a, b = SocketChannel.socketpair()
        c = TLSChannel.client(a, client_context(certs), "localhost")
        s = TLSChannel.server(b, server_context(certs), suppress_ragged_eofs=suppress)
        for ch in (c, s):
            ch.set_follow_coroutine_ctx(True)
        with s:
            g = gevent.spawn(lambda srv=s: srv.write_all(srv.read_all(2, timeout=10), timeout=10))
            c.write_all(b"hi", timeout=10)
            assert c.read_all(2, timeout=10) == b"hi"  # (reads the session tickets too: no reset)
            g.get(timeout=10)
            c.inner.close()  # the socket, without close_notify
            if suppress:
                assert s.read(10, timeout=10) == b""
            else:
                with pytest.raises(BrokenChannelError, match="without close_notify"):
                    s.read(10, timeout=10)
        c.close()
