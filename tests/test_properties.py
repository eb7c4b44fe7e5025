"""Property tests: the read and write loops reassemble any chunking into any buffer layout."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qioc_green.testing import ScriptedChannel

steps = st.one_of(st.binary(min_size=1, max_size=40), st.sampled_from(["eagain", "eintr"]))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=1, max_size=300), cuts=st.lists(st.integers(1, 50), max_size=20),
       layout=st.lists(st.integers(1, 60), min_size=1, max_size=8), noise=st.lists(st.sampled_from(["eagain", "eintr"]), max_size=10))
def test_readv_all_reassembles_any_chunking(data, cuts, layout, noise):
    chunks = []
    pos = 0
    for c in cuts:
        if pos >= len(data):
            break
        chunks.append(data[pos:pos + c])
        pos += c
    if pos < len(data):
        chunks.append(data[pos:])
    script: list = []
    for i, chunk in enumerate(chunks):
        if i < len(noise):
            script.append(noise[i])
        script.append(chunk)
    total = sum(layout)
    ch = ScriptedChannel(reads=script)
    bufs = [bytearray(n) for n in layout]
    if total <= len(data):
        ch.readv_all(bufs)
        assert b"".join(bufs) == data[:total]
    else:
        try:
            ch.readv_all(bufs)
        except EOFError as exc:
            assert exc.partial == data and exc.expected == total
        else:
            raise AssertionError("no EOF error for a short stream")


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.binary(min_size=0, max_size=80), min_size=1, max_size=8),
       accept=st.lists(st.one_of(st.integers(0, 30), st.sampled_from(["eagain", "eintr"])), max_size=30))
def test_writev_all_sends_every_byte_in_order(parts, accept):
    ch = ScriptedChannel(writes=accept)
    ch.writev_all(parts)
    assert bytes(ch.written) == b"".join(parts)
