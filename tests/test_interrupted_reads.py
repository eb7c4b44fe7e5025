"""No byte lost, none handed over twice, when a ``*_all`` read ends early (the rule in ``Channel``).

Interrupted by ``timeout=``, ``gevent.Timeout``, WouldBlock (non-blocking mode) or ``kill()``,
the bytes it had taken go back to the channel and the next read returns them; only EOF and our
own close hand them over in ``partial`` instead.
"""

from __future__ import annotations

import gevent
import pytest

from qioc_green import (
    ChannelClosedError,
    ChannelTimeoutError,
    FileChannel,
    SocketChannel,
    UnexpectedEOF,
    WouldBlock,
)
from tests.polling import wait_until

CALLS = {
    "read_all": lambda ch, **kw: ch.read_all(10, **kw),
    "read_all_eof": lambda ch, **kw: ch.read_all_eof(10, **kw),
    "readinto_all": lambda ch, **kw: ch.readinto_all(bytearray(10), **kw),
    "readv_all": lambda ch, **kw: ch.readv_all([bytearray(2), bytearray(8)], **kw),
    "readv_all_eof": lambda ch, **kw: ch.readv_all_eof([bytearray(4), bytearray(6)], **kw),
    "readv_full_all": lambda ch, **kw: ch.readv_full_all([bytearray(10)], **kw),
    "readv_full_all_eof": lambda ch, **kw: ch.readv_full_all_eof([bytearray(5), bytearray(5)], **kw),
}
INTERRUPTERS = ["timeout", "gevent.Timeout", "WouldBlock", "kill"]


def _pair(kind):
    if kind == "socket":
        a, b = SocketChannel.socketpair()
    else:
        b, a = FileChannel.pipe()  # read end, write end
    b.set_follow_coroutine_ctx(True)
    return a, b


def _interrupt(how, call, b):
    """Run ``call`` on ``b`` (3 of its 10 bytes available) and end it early with ``how``."""
    if how == "timeout":
        with pytest.raises(ChannelTimeoutError) as info:
            call(b, timeout=0.05)
        return info.value
    if how == "gevent.Timeout":
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(0.05):
                call(b)
        return None
    if how == "WouldBlock":
        b.set_blocking(False)
        try:
            with pytest.raises(WouldBlock) as info:
                call(b)
        finally:
            b.set_blocking(True)
        return info.value
    g = gevent.spawn(call, b)
    assert wait_until(lambda: b.statistics().readers_waiting)
    g.kill()
    assert g.dead
    return None


@pytest.mark.parametrize("kind", ["socket", "pipe"])
@pytest.mark.parametrize("how", INTERRUPTERS)
@pytest.mark.parametrize("call", CALLS, ids=list(CALLS))
def test_an_interrupted_all_read_gives_its_bytes_back(call, how, kind):
    a, b = _pair(kind)
    with a, b:
        a.write_all(b"abc")
        exc = _interrupt(how, CALLS[call], b)
        if exc is not None:  # a ChannelError: it counts the bytes, and does not carry them too
            assert exc.done == 3 and exc.expected == 10 and exc.partial == b""
            assert "after 3 of 10 bytes" in str(exc)
        assert b.statistics().unread == 3
        # Interrupted again while it holds only given-back bytes: still nothing lost.
        exc = _interrupt(how, CALLS[call], b)
        assert b.statistics().unread == 3
        a.write_all(b"defghijklm")
        assert b.read_all(13, timeout=5) == b"abcdefghijklm"  # once each, in order
        assert b.statistics().unread == 0


@pytest.mark.parametrize("call", CALLS, ids=list(CALLS))
def test_given_back_bytes_come_first_for_every_kind_of_read(call):
    a, b = SocketChannel.socketpair()
    with a, b:
        a.write_all(b"abc")
        _interrupt("timeout", CALLS[call], b)
        assert b.read(2) == b"ab"  # a plain read takes them too, and only as many as asked
        buf = bytearray(4)
        a.write_all(b"defg")
        assert b.readinto(buf) == 1 and buf[:1] == b"c"  # then the rest of them, alone
        assert b.read_all(4, timeout=5) == b"defg"


def test_given_back_bytes_make_the_channel_readable():
    from qioc_green import IOCondition

    a, b = SocketChannel.socketpair()
    with a, b:
        a.write_all(b"xy")
        _interrupt("timeout", CALLS["read_all"], b)
        b.yield_(IOCondition.IN, timeout=5)  # returns at once: there is something to read
        b.wait(IOCondition.IN, timeout=5)
        seen = []
        b.add_watch(IOCondition.IN, lambda ch, cond: seen.append(ch.read(10)) and False)
        assert wait_until(lambda: seen)
        assert seen == [b"xy"]


@pytest.mark.parametrize("call", ["read_all", "read_all_eof", "readinto_all", "readv_full_all"])
def test_closed_while_waiting_hands_the_bytes_over_in_partial(call):
    a, b = SocketChannel.socketpair()
    b.set_follow_coroutine_ctx(True)
    with a:
        a.write_all(b"abcd")
        g = gevent.spawn(CALLS[call], b)
        assert wait_until(lambda: b.statistics().readers_waiting)
        b.close()
        with pytest.raises(ChannelClosedError) as info:
            g.get(timeout=5)
        assert info.value.partial == b"abcd" and info.value.done == 4 and info.value.expected == 10


@pytest.mark.parametrize("call", CALLS, ids=list(CALLS))
def test_eof_hands_the_bytes_over_in_partial_and_keeps_none(call):
    a, b = SocketChannel.socketpair()
    with b:
        a.write_all(b"abc")
        a.close()
        with pytest.raises(UnexpectedEOF) as info:
            CALLS[call](b, timeout=5)
        assert info.value.partial == b"abc"
        assert b.statistics().unread == 0 and b.read(10) == b""
