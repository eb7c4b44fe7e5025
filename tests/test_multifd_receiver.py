"""The receiver with multifd (``--multifd-channels``), mapped-ram files and capabilities, fed the
bytes of real QEMU 10.0.2 migrations (tests/data) over loopback: no QEMU needed.

The captures are a paused ``-M none`` VM whose 4 MiB of RAM is ``qemu.pattern_ram``, migrated
with multifd (2 channels; compression none, zlib, zstd) and with mapped-ram to a file. Every
connection is replayed to the receiver process as QEMU sent it, in any accept order; RAM
rebuilt with ``--ram-dir`` is compared with the pattern byte for byte. Bad input is made by
changing fields of the real packets, found with the parser on the good capture; each run must
end with one line naming the channel and offset, exit status 1, in bounded time and memory.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import socket
import struct
import threading
from pathlib import Path

import pytest

from qioc_green.migration import (
    NEED_BLOCKS,
    NEED_DATA,
    MultifdParser,
    RamPacket,
    SyncPacket,
    packet_size,
    sniff_channel,
)
from qioc_green.migration.qemu import pattern_ram
from tests import test_migration_receiver as _rx
from tests.migdata import DATA, load, load_connections

pytestmark = pytest.mark.timeout(60)


WAIT = _rx.WAIT
receivers = _rx.receivers  # the fixture: a receiver process per call, killed at the end
Rx = _rx.Rx

PATTERN = pattern_ram(4 << 20)
BLOCKS = {"ram": 4 << 20}
COMPRESSIONS = ["none", "zlib", "zstd"]
PROG = "qioc-migration-receiver: "
MAX_RSS = 100 << 20  # bytes (40 MiB seen): 4 MiB per connection, the interpreter, never the input


def conns(compression: str = "none") -> list[bytes]:
    """[main, multifd, multifd] of one capture, as QEMU connected them."""
    return load_connections("none-multifd2" + ("" if compression == "none" else f"-{compression}"))


def split(compression: str = "none") -> tuple[bytes, list[bytes]]:
    parts = conns(compression)
    main = next(c for c in parts if sniff_channel(c) == "main")
    return main, [c for c in parts if sniff_channel(c) == "multifd"]


def packets(channel: bytes) -> list:
    p = MultifdParser(blocks=BLOCKS)
    p.feed(channel)
    p.close()
    out = []
    while (ev := p.next_event()) is not NEED_DATA:
        assert ev is not NEED_BLOCKS
        if isinstance(ev, (RamPacket, SyncPacket)):
            out.append(ev)
    return out


def channel_id(channel: bytes) -> int:
    return channel[24]


def send_connections(address: str, parts: list[bytes], *, reset: frozenset[int] = frozenset(),
                     hold: frozenset[int] = frozenset()) -> list[threading.Thread]:
    """Connect once per part, in order (so the receiver accepts them in that order), then send
    each in a thread of its own and close it: FIN, RST for the indexes in ``reset``; those in
    ``hold`` stay open until the receiver closes them. Refused sends are not errors here."""
    socks = [_rx.connect(address) for _ in parts]

    def run(k: int, sock: socket.socket, data: bytes) -> None:
        with sock:
            try:
                sock.sendall(data)
                if k in reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif k in hold:
                    sock.recv(1)  # until the receiver closes
            except OSError:
                pass

    threads = [threading.Thread(target=run, args=(k, s, d), daemon=True)
               for k, (s, d) in enumerate(zip(socks, parts))]
    for t in threads:
        t.start()
    return threads


def run_multifd(receivers, parts: list[bytes], *args: str, channels: int = 2, **send) -> Rx:
    rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", str(channels), *args)
    threads = send_connections(rx.address, parts, **send)
    rx.wait()
    for t in threads:
        t.join(WAIT)
    return rx


def one_line(rx: Rx) -> str:
    lines = [ln for ln in rx.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, rx.stderr
    assert lines[0].startswith(PROG), lines[0]
    return lines[0].removeprefix(PROG)


def refused(receivers, tmp_path: Path, parts: list[bytes], *args: str, **kw) -> str:
    """Run, expect exit 1 with one line and bounded memory; return the line."""
    summary = tmp_path / "r.json"
    rx = run_multifd(receivers, parts, "--json", str(summary), *args, **kw)
    assert rx.proc.returncode == 1, rx.stderr
    line = one_line(rx)
    d = json.loads(summary.read_text())
    assert d["complete"] is False and d["error"] == line
    assert d["max_rss"] < MAX_RSS, d["max_rss"]
    return line


# -- good migrations ---------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("main_first", [True, False], ids=["main-first", "main-last"])
def test_multifd_capture_rebuilds_ram_saved_and_replayed(receivers, tmp_path, compression,
                                                        main_first):
    main, channels = split(compression)
    parts = [main, *channels] if main_first else [*reversed(channels), main]
    save = tmp_path / "m.mig"
    rx = run_multifd(receivers, parts, "--ram-dir", str(tmp_path / "ram"), "--save", str(save),
                     "--json", str(tmp_path / "m.json"), "--digest")
    assert rx.proc.returncode == 0, rx.stderr
    assert rx.stderr == "" and "2 multifd channels" in rx.stdout
    assert (tmp_path / "ram" / "ram").read_bytes() == PATTERN
    d = json.loads((tmp_path / "m.json").read_text())
    assert d["complete"] and d["machine"] == "none" and d["bytes_total"] == sum(map(len, parts))
    mfd = d["multifd"]
    assert mfd["channels"] == 2 and mfd["compression"] == compression
    got = {c["kind"]: c for c in mfd["connections"] if c["kind"] == "main"}
    assert got["main"]["connection"] == (0 if main_first else 2)
    channel_reports = [c for c in mfd["connections"] if c["kind"] == "multifd"]
    assert sorted(c["channel_id"] for c in channel_reports) == [0, 1]
    # every connection read by an IOThread of its own, and each channel met every sync point
    assert len({c["iothread"] for c in mfd["connections"]}) == 3
    assert all(c["syncs"] == mfd["sync_points"] >= 2 for c in channel_reports)
    for c in mfd["connections"]:
        assert c["sha256_in"] == hashlib.sha256(parts[c["connection"]]).hexdigest()
    # RAM page counts: every page arrived on a channel, every 7th a zero page
    (ram,) = [b for b in d["ram_blocks"] if b["name"] == "ram"]
    assert ram["normal_pages"] + ram["zero_pages"] == 1024
    assert ram["zero_pages"] == sum(1 for i in range(1024) if i % 7 == 3)
    # --save: one file per connection, byte for byte; file: replays them all
    assert save.read_bytes() == main
    saved = sorted(p.read_bytes() for p in tmp_path.glob("m.mig.multifd-*"))
    assert saved == sorted(channels)
    rx = receivers(f"file:{save}", "--ram-dir", str(tmp_path / "ram2"), "--json", "-",
                   listens=False)
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram2" / "ram").read_bytes() == PATTERN
    assert '"channels": 2' in rx.stdout


def test_replayed_save_forwards_every_connection(receivers, tmp_path):
    """file: replay with --forward: the destination gets the main channel and each multifd
    channel on connections of their own, byte for byte (here a loopback sink takes them)."""
    main, channels = split("zstd")
    save = tmp_path / "s.mig"
    save.write_bytes(main)
    for j, c in enumerate(channels):
        (tmp_path / f"s.mig.multifd-{j}").write_bytes(c)
    got: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0), backlog=4) as lst:
        lst.settimeout(WAIT)
        rx = receivers(f"file:{save}", "--forward", f"tcp:127.0.0.1:{lst.getsockname()[1]}",
                       "--json", str(tmp_path / "f.json"), listens=False)
        readers = []

        def read(conn: socket.socket) -> None:
            with conn:
                conn.settimeout(WAIT)
                got.append(b"".join(iter(lambda: conn.recv(1 << 16), b"")))

        for _ in range(3):
            conn, _ = lst.accept()
            t = threading.Thread(target=read, args=(conn,))
            t.start()
            readers.append(t)
        for t in readers:
            t.join(WAIT)
    assert rx.wait() == 0, rx.stderr
    assert sorted(got) == sorted([main, *channels])
    d = json.loads((tmp_path / "f.json").read_text())
    assert sorted(c["forwarded"] for c in d["multifd"]["connections"]) == \
        sorted(map(len, [main, *channels]))


def test_keep_listening_takes_successive_multifd_migrations(receivers, tmp_path):
    from tests.test_migration_receiver import wait_for_file

    rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--keep-listening", "--count",
                   "2", "--ram-dir", str(tmp_path / "ram"), "--json", str(tmp_path / "m.json"))
    for n, compression in enumerate(["zlib", "none"], 1):
        main, channels = split(compression)
        threads = send_connections(rx.address, [*channels, main])
        wait_for_file(tmp_path / f"m-{n}.json")
        for t in threads:
            t.join(WAIT)
    assert rx.wait() == 0, rx.stderr
    for n in (1, 2):
        assert (tmp_path / f"ram-{n}" / "ram").read_bytes() == PATTERN
        assert json.loads((tmp_path / f"m-{n}.json").read_text())["complete"]


def assert_both_rebuilt(tmp_path: Path, compressions: tuple[str | None, str | None] = (None, None)) -> None:
    """Migrations 1 and 2 of a --keep-listening run: each complete, its RAM rebuilt, made of one
    main and two multifd connections (and with the compression named, if one is)."""
    for n, compression in enumerate(compressions, 1):
        assert (tmp_path / f"ram-{n}" / "ram").read_bytes() == PATTERN
        d = json.loads((tmp_path / f"m-{n}.json").read_text())
        assert d["complete"], d.get("error")
        if compression is not None:
            assert d["multifd"]["compression"] == compression
        assert sorted(c["kind"] for c in d["multifd"]["connections"]) == \
            ["main", "multifd", "multifd"]


def sockets_of(pid: int) -> int:
    """How many sockets process ``pid`` holds (its listener and the connections it accepted)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


@pytest.mark.parametrize("next_order", ["main-first", "main-last"])
def test_keep_listening_next_migration_arriving_before_the_first_sync_point(receivers,
                                                                              tmp_path,
                                                                              next_order):
    """--keep-listening: the next source's connections come while the current migration's main
    stream has not reached its first sync point (it has sent only its magic). They belong to
    the next migration (a second QEVM, channel ids already taken), not to this one as extras:
    both migrations complete, each RAM rebuilt."""
    from tests.polling import wait_until

    rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--keep-listening", "--count",
                   "2", "--ram-dir", str(tmp_path / "ram"), "--json", str(tmp_path / "m.json"))
    main1, channels1 = split("none")
    main2, channels2 = split("zlib")
    host, _, port = rx.address.removeprefix("tcp:").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=WAIT) as first:
        first.sendall(main1[:4])  # this main stream stops short of its first sync point
        threads = send_connections(rx.address, channels1)
        nxt = [main2, *channels2] if next_order == "main-first" else [*channels2, main2]
        threads += send_connections(rx.address, nxt)
        # every connection of both taken by the receiver (1 listener + 6) before the first
        # main stream goes on (or the first migration ended on them): a bounded poll of
        # another process's state
        assert wait_until(lambda: sockets_of(rx.proc.pid) >= 7
                          or (tmp_path / "m-1.json").exists(), timeout=WAIT)
        with contextlib.suppress(OSError):
            first.sendall(main1[4:])
    assert (tmp_path / "m-1.json").exists() or wait_until(
        lambda: (tmp_path / "m-1.json").exists(), timeout=WAIT)
    assert json.loads((tmp_path / "m-1.json").read_text())["complete"], rx.stderr
    assert rx.wait() == 0, rx.stderr
    for t in threads:
        t.join(WAIT)
    assert_both_rebuilt(tmp_path, ("none", "zlib"))


def test_keep_listening_next_connection_silent_until_this_migration_ends(receivers, tmp_path):
    """--keep-listening: a connection accepted before the current migration's first sync point
    that has said nothing when that migration ends (the next source still in its handshake)
    goes to the next migration, not closed with this one: the next gets its main stream on
    it, and both complete."""
    from tests.polling import wait_until
    from tests.test_migration_receiver import wait_for_file

    rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--keep-listening", "--count",
                   "2", "--ram-dir", str(tmp_path / "ram"), "--json", str(tmp_path / "m.json"))
    main1, channels1 = split("none")
    main2, channels2 = split("zstd")
    host, _, port = rx.address.removeprefix("tcp:").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=WAIT) as first:
        first.sendall(main1[:4])  # short of the first sync point: the listener is still ours
        threads = send_connections(rx.address, channels1)
        assert wait_until(lambda: sockets_of(rx.proc.pid) >= 4, timeout=WAIT)
        silent = socket.create_connection((host, int(port)), timeout=WAIT)
        # taken (with the listener, 5 sockets) before the first main stream goes on
        assert wait_until(lambda: sockets_of(rx.proc.pid) >= 5, timeout=WAIT)
        first.sendall(main1[4:])
        first.shutdown(socket.SHUT_WR)  # the source hangs up once the migration is over
        wait_for_file(tmp_path / "m-1.json")
        with silent:
            silent.sendall(main2)
            silent.shutdown(socket.SHUT_WR)
            threads += send_connections(rx.address, channels2)
            assert rx.wait() == 0, rx.stderr
    for t in threads:
        t.join(WAIT)
    assert_both_rebuilt(tmp_path, ("none", "zstd"))


def test_a_third_connection_that_is_not_a_source_is_harmless(receivers, tmp_path):
    """A connection beyond the N + 1 that sends nothing (a port probe) does not fail the
    migration; RAM is still rebuilt."""
    main, channels = split()
    rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--ram-dir", str(tmp_path / "r"))
    host, _, port = rx.address.removeprefix("tcp:").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=WAIT):
        threads = send_connections(rx.address, [main, *channels])
        assert rx.wait() == 0, rx.stderr
    for t in threads:
        t.join(WAIT)
    assert (tmp_path / "r" / "ram").read_bytes() == PATTERN


# -- how the pages travel: in the kernel where it can, through buffers where it cannot ----------


def summary_pages(d: dict) -> tuple:
    """What a summary says of the pages and bytes, whichever way they travelled."""
    conns = sorted((c["channel_id"], c["bytes"], c["packets"], c["syncs"], c["normal_pages"],
                    c["zero_pages"]) for c in d["multifd"]["connections"]
                   if c["kind"] == "multifd")
    return d["bytes_total"], tuple(conns), tuple((b["name"], b["normal_pages"], b["zero_pages"])
                                                 for b in d["ram_blocks"])


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("ram", [True, False], ids=["ram-dir", "parse-only"])
def test_pages_dropped_by_the_kernel_or_read_give_the_same_summary(receivers, tmp_path,
                                                                   monkeypatch, compression, ram):
    """Parsing only over TCP, a channel's uncompressed pages are dropped by the kernel
    (MSG_TRUNC) after their header is parsed; QIOC_MIGRATION_PAGES=copy reads them through the
    buffer as --ram-dir, --save, --digest and --forward do: the same summary either way (and
    with --ram-dir the same RAM, byte for byte)."""
    main, channels = split(compression)
    parts = [main, *channels]
    got = {}
    for mode in ("auto", "copy"):
        monkeypatch.setitem(_rx.ENV, "QIOC_MIGRATION_PAGES", mode)
        args = ["--json", str(tmp_path / f"{mode}.json")]
        if ram:
            args += ["--ram-dir", str(tmp_path / mode)]
        rx = run_multifd(receivers, parts, *args)
        assert rx.proc.returncode == 0, rx.stderr
        if ram:
            assert (tmp_path / mode / "ram").read_bytes() == PATTERN, mode
        d = json.loads((tmp_path / f"{mode}.json").read_text())
        assert d["complete"] and d["bytes_total"] == sum(map(len, parts))
        got[mode] = summary_pages(d)
    assert got["auto"] == got["copy"]


# Which runs may leave pages to the kernel: only parsing, over plain TCP, uncompressed, and not
# told to read them (QIOC_MIGRATION_PAGES=copy). Everything that needs the bytes reads them.
DROP_CASES = {
    "tcp": dict(drops=True),
    "ram-dir": dict(ram_dir=True),
    "save": dict(save=True),
    "digest": dict(digest=True),
    "copy-env": dict(env="copy"),
    "zstd": dict(compression="zstd"),
    "zlib": dict(compression="zlib"),
    "unix": dict(unix=True),
}


@pytest.mark.parametrize("case", sorted(DROP_CASES))
def test_which_runs_leave_pages_to_the_kernel(tmp_path, monkeypatch, case):
    """In process: without --ram-dir, --save, --digest (and --forward, whose own tests read
    every byte at the destination) every normal page of an uncompressed TCP channel is dropped
    by the kernel, none read, and the page counts (normal and zero) are the ones the stream
    has; in every other case none is dropped and what needs the bytes has them all: the RAM
    byte for byte, the saved channels, their SHA-256."""
    import hashlib

    from qioc_green import IOThread, SocketChannel
    from qioc_green.migration import IncomingSettings, MultifdReceiver
    from qioc_green.migration._multifd_channel import ChannelReader

    c = DROP_CASES[case]
    dropped: list[int] = []
    drop = ChannelReader._drop

    def counted(self, ch, sock, buf, wait, ev, name):
        dropped.append(ev.remaining)
        return drop(self, ch, sock, buf, wait, ev, name)

    monkeypatch.setattr(ChannelReader, "_drop", counted)
    if "env" in c:
        monkeypatch.setenv("QIOC_MIGRATION_PAGES", c["env"])
    else:
        monkeypatch.delenv("QIOC_MIGRATION_PAGES", raising=False)
    main, channels = split(c.get("compression", "none"))
    where = f"unix:{tmp_path / 'u.sock'}" if c.get("unix") else "tcp:127.0.0.1:0"
    ram_dir = str(tmp_path / "r") if c.get("ram_dir") else None
    save = str(tmp_path / "s.mig") if c.get("save") else None
    lst = SocketChannel.listen(where, 8)
    lst.set_follow_coroutine_ctx(True)
    threads = send_connections(lst.local_address if where.startswith("tcp") else where,
                               [main, *channels])
    try:
        with IOThread("t-coordinator") as t:
            rx = MultifdReceiver(IncomingSettings(multifd_channels=2), ram_dir=ram_dir,
                                 save=save, digest=bool(c.get("digest")))
            out = t.context.spawn(_receive_from, lst, rx).result(WAIT)
    finally:
        lst.close()
        for th in threads:
            th.join(WAIT)
    assert out.ok, out.error
    mfd = [x for x in rx.connections if x.kind == "multifd"]
    normal = sum(x.blocks["ram"][0] for x in mfd)
    zero = sum(x.blocks["ram"][1] for x in mfd)
    # every page of the 4 MiB block arrived on a channel, every 7th a zero page (see split)
    assert (normal, zero) == (1024 - zero, sum(1 for i in range(1024) if i % 7 == 3))
    assert sorted(x.bytes for x in mfd) == sorted(map(len, channels))
    if c.get("drops"):
        assert sum(dropped) == normal * 4096
    else:
        assert not dropped
    if ram_dir is not None:
        assert (tmp_path / "r" / "ram").read_bytes() == PATTERN
    if save is not None:
        saved = sorted(p.read_bytes() for p in tmp_path.glob("s.mig.multifd-*"))
        assert saved == sorted(channels)
    if c.get("digest"):
        assert sorted(x.sha256_in for x in mfd) == sorted(
            hashlib.sha256(ch).hexdigest() for ch in channels)


@pytest.mark.parametrize("pre", ["ram", "other"], ids=["block-mapped", "other-block-mapped"])
@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_pages_received_into_preallocated_ram(tmp_path, monkeypatch, pre, where):
    """In process, with --ram-prealloc's RamDir: each channel receives a preallocated block's
    pages straight into its mapped file (no buffer, no pwritev), those of a block that was
    not preallocated through a packet buffer; the RAM byte for byte either way, every page
    counted, and the file preallocated for a block the stream lacks gone at the end."""
    from qioc_green import IOThread, SocketChannel
    from qioc_green.migration import IncomingSettings, MultifdReceiver
    from qioc_green.migration._sinks import RamDir

    mapped: list[bool] = []
    mapping = RamDir.mapping

    def seen(self, name):
        m = mapping(self, name)
        mapped.append(m is not None)
        return m

    monkeypatch.setattr(RamDir, "mapping", seen)
    monkeypatch.delenv("QIOC_MIGRATION_PAGES", raising=False)
    main, channels = split()
    address = f"unix:{tmp_path / 'u.sock'}" if where == "unix" else "tcp:127.0.0.1:0"
    ram = RamDir(str(tmp_path / "r"), prealloc={pre: 4 << 20 if pre == "ram" else 4096})
    lst = SocketChannel.listen(address, 8)
    lst.set_follow_coroutine_ctx(True)
    threads = send_connections(lst.local_address if where == "tcp" else address,
                               [main, *channels])
    try:
        with IOThread("t-coordinator") as t:
            rx = MultifdReceiver(IncomingSettings(multifd_channels=2), ram_dir=str(tmp_path / "r"),
                                 ram=ram)
            out = t.context.spawn(_receive_from, lst, rx).result(WAIT)
    finally:
        lst.close()
        ram.close()
        for th in threads:
            th.join(WAIT)
    assert out.ok, out.error
    assert mapped and set(mapped) == {pre == "ram"}
    assert (tmp_path / "r" / "ram").read_bytes() == PATTERN
    assert (tmp_path / "r" / "other").exists() is False
    mfd = [x for x in rx.connections if x.kind == "multifd"]
    assert sum(x.blocks["ram"][0] + x.blocks["ram"][1] for x in mfd) == 1024


def test_pages_over_a_unix_socket(receivers, tmp_path):
    """Over UNIX sockets (no low-water mark, no MSG_TRUNC): read through the buffer."""
    main, channels = split()
    for ram in (True, False):
        path = tmp_path / f"rx-{ram}.sock"
        args = ["--ram-dir", str(tmp_path / "ram")] if ram else []
        rx = receivers(f"unix:{path}", "--multifd-channels", "2", "--json",
                       str(tmp_path / "u.json"), *args)
        threads = send_connections(rx.address, [main, *channels])
        assert rx.wait() == 0, rx.stderr
        for t in threads:
            t.join(WAIT)
        d = json.loads((tmp_path / "u.json").read_text())
        assert d["complete"] and d["bytes_total"] == sum(map(len, [main, *channels]))
    assert (tmp_path / "ram" / "ram").read_bytes() == PATTERN


# -- bad input on a multifd channel --------------------------------------------------------------


def test_wrong_first_bytes(receivers, tmp_path):
    main, (a, b) = split()
    line = refused(receivers, tmp_path, [main, b"XXXX" + a[4:], b])
    assert line == ("connection 1: offset 0: first bytes 0x58585858 are neither a main stream "
                    "(QEVM, 0x5145564d) nor a multifd channel (0x11223344)")


def test_wrong_magic_in_a_later_packet(receivers, tmp_path):
    main, (a, b) = split()
    pk = packets(a)[3]
    bad = a[: pk.offset] + b"\xde\xad\xbe\xef" + a[pk.offset + 4 :]
    line = refused(receivers, tmp_path, [main, bad, b])
    assert line == (f"multifd channel {channel_id(a)}: offset {pk.offset}: packet magic "
                    f"0xdeadbeef, expected 0x11223344")


def test_a_channel_of_another_source(receivers, tmp_path):
    main, (a, b) = split()
    bad = b[:8] + bytes(range(16)) + b[24:]  # another source's UUID
    line = refused(receivers, tmp_path, [main, a, bad])
    # the main stream has no UUID (no validate-uuid): the first channel in sets the reference
    zero, other = "00" * 16, bytes(range(16)).hex()
    assert line in (f"connection 2: offset 8: source UUID {other} differs from {zero} "
                    "(another source?)",
                    f"connection 1: offset 8: source UUID {zero} differs from {other} "
                    "(another source?)"), line


def test_a_page_offset_past_its_block(receivers, tmp_path):
    main, (a, b) = split()
    pk = next(e for e in packets(a) if isinstance(e, RamPacket) and e.normal)
    at = pk.offset + 320  # the first page offset
    bad = a[:at] + struct.pack(">Q", 4 << 20) + a[at + 8 :]
    line = refused(receivers, tmp_path, [main, bad, b])
    assert line == (f"multifd channel {channel_id(a)}: offset {pk.offset}: normal page offset "
                    f"0x400000 is past block 'ram' (size 0x400000)")


@pytest.mark.parametrize("ram", ["parse", "prealloc"])
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_a_channel_vanishing_mid_packet(receivers, tmp_path, how, ram):
    main, (a, b) = split()
    pk = next(e for e in packets(a) if isinstance(e, RamPacket) and e.normal)
    cut = pk.offset + packet_size(4096) + 1000
    args = ["--ram-dir", str(tmp_path / "r"), "--ram-prealloc", "ram=4M"] if ram != "parse" else []
    line = refused(receivers, tmp_path, [main, a[:cut], b], *args,
                   reset=frozenset({1}) if how == "rst" else frozenset())
    name = f"multifd channel {channel_id(a)}"
    inside = (f"channel ends inside the payload of the packet at offset {pk.offset} (1000 of "
              f"{len(pk.normal) * 4096} bytes)")
    if how == "fin":
        assert line == f"{name}: offset {cut}: {inside}"
    else:  # an RST may drop bytes not yet read: the offset is what had arrived
        assert line.startswith(f"{name}: offset ") and "connection reset by peer" in line, line


def test_more_channels_than_announced(receivers, tmp_path):
    """Told 1 channel, the source brings 2: whichever comes first, a line says so."""
    main, channels = split()
    # the main stream is held short of its end, so the migration cannot end before the second
    # multifd connection is judged
    line = refused(receivers, tmp_path, [main[:-10], *channels], channels=1, hold=frozenset({0}))
    # whichever is judged first: channel 1's id, or the second multifd connection itself
    assert re.fullmatch(r"(connection [12]: offset 24: channel id 1, but the migration has 1 "
                        r"multifd channels \(0 to 0\)|connection [12]: offset 0: multifd "
                        r"connection 2, but the migration has 1 multifd channels \(the "
                        r"receiver's --multifd-channels\))", line), line


def test_the_same_channel_twice(receivers, tmp_path):
    main, (a, b) = split()
    line = refused(receivers, tmp_path, [main[:-10], a, b, a], hold=frozenset({0}))
    # connections are numbered as accepted, multifd ones counted as they say what they are;
    # whichever is judged first: the third multifd connection, or a channel id seen twice
    assert re.fullmatch(r"connection [123]: offset 0: multifd connection 3, but the migration "
                        r"has 2 multifd channels \(the receiver's --multifd-channels\)|"
                        r"connection [13]: offset 24: channel id \d again \(first on "
                        r"connection [13]\)", line), line


def test_channels_that_never_come(receivers, tmp_path):
    """Told multifd, the source sends a plain stream: the first sync point waits for channels
    that are not there, boundedly."""
    main = load("q35-10")
    line = refused(receivers, tmp_path, [main], "--channel-timeout", "0.5")
    assert line.endswith("waits for multifd channels [0, 1], which never connected in 0.5 s "
                         "(none came: has the source the multifd capability on?)"), line
    assert line.startswith("offset "), line


def test_a_channel_that_never_ends_after_the_main_stream(receivers, tmp_path):
    """Every connection came and sent its part, but one multifd channel is held open after the
    main stream ended: bounded by --channel-timeout, one line that says so."""
    main, (a, b) = split()
    line = refused(receivers, tmp_path, [main, a, b], "--channel-timeout", "0.5",
                   hold=frozenset({2}))
    assert line.endswith("the main stream ended, but the multifd channels did not all end "
                         "within 0.5 s"), line


def test_idle_across_every_connection(receivers, tmp_path):
    main, (a, b) = split()
    line = refused(receivers, tmp_path, [main, a, b[:5000]], "--idle-timeout", "0.5",
                   hold=frozenset({2}))
    assert line.endswith("no data for 0.5 s on any connection"), line


# -- capabilities: refused before RAM, naming them ---------------------------------------------


def test_a_multifd_source_into_a_receiver_not_told(receivers):
    """Without --multifd-channels, a multifd source's main stream is refused at its first
    MULTIFD_FLUSH (before RAM: QEMU sends one right after the block list), and a stray
    multifd connection is named."""
    main, channels = split()
    rx = receivers("tcp:127.0.0.1:0")
    threads = send_connections(rx.address, [main])
    assert rx.wait() == 1
    for t in threads:
        t.join(WAIT)
    line = one_line(rx)
    assert line.startswith("offset ") and line.endswith(
        "MULTIFD_FLUSH: the source uses the multifd capability; start the receiver with "
        "--multifd-channels N (the source's multifd-channels)"), line

    rx = receivers("tcp:127.0.0.1:0")
    threads = send_connections(rx.address, [main[:8], *channels], hold=frozenset({0}))
    assert rx.wait() == 1
    for t in threads:
        t.join(WAIT)
    assert re.fullmatch(r"offset [08]: connection [12] is a multifd channel \(magic 0x11223344\), "
                        r"but the receiver was not told to expect any: start it with "
                        r"--multifd-channels N \(the source's multifd-channels\)", one_line(rx))


def test_an_unknown_capability_in_the_configuration(receivers):
    data = load("pc-ignore-shared")
    at = data.index(b"x-ignore-shared")
    bad = data[:at] + b"x-ignore-sharex" + data[at + 15 :]
    rx = receivers("tcp:127.0.0.1:0")
    send_connections(rx.address, [bad])[0].join(WAIT)
    assert rx.wait() == 1
    line = one_line(rx)
    assert line.startswith("offset ") and line.endswith(
        "capability 'x-ignore-sharex' in the configuration is not supported by this receiver "
        "(switch it off on the source)"), line
    # unknown configuration content: a subsection QEMU does not send
    at = data.index(b"configuration/capabilities")
    bad = data[:at] + b"configuration/capabilitiez" + data[at + 26 :]
    rx = receivers("tcp:127.0.0.1:0")
    send_connections(rx.address, [bad])[0].join(WAIT)
    assert rx.wait() == 1
    assert "unknown configuration subsection 'configuration/capabilitiez'" in one_line(rx)


def test_xbzrle_is_refused_naming_the_capability(receivers):
    """xbzrle is not declared in the stream: it shows at its first encoded page (here the first
    page record of a real stream, re-flagged), which is refused naming it."""
    from tests.test_migstream import _first_zero_continue, parse

    data = bytearray(load("none"))
    at = _first_zero_continue(bytes(data), parse([bytes(data)]))
    (word,) = struct.unpack_from(">Q", data, at)
    struct.pack_into(">Q", data, at, (word & ~0xFFF) | 0x60)  # XBZRLE | CONTINUE
    rx = receivers("tcp:127.0.0.1:0")
    send_connections(rx.address, [bytes(data)])[0].join(WAIT)
    assert rx.wait() == 1
    assert one_line(rx).endswith("XBZRLE-encoded page (RAM flag 0x40) is not supported: switch "
                                 "the xbzrle capability off")


# -- mapped-ram files ----------------------------------------------------------------------------


def mapped_ram_file(tmp_path: Path) -> Path:
    path = tmp_path / "mapped.mig"
    path.write_bytes(gzip.decompress((DATA / "none-mapped-ram.file.gz").read_bytes()))
    return path


@pytest.mark.parametrize("threads", [None, "2"])
def test_mapped_ram_file_rebuilds_ram(receivers, tmp_path, threads):
    path = mapped_ram_file(tmp_path)
    extra = ["--multifd-channels", threads] if threads else []
    rx = receivers(f"file:{path}", "--ram-dir", str(tmp_path / "ram"), "--json",
                   str(tmp_path / "m.json"), *extra, listens=False)
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "ram").read_bytes() == PATTERN
    d = json.loads((tmp_path / "m.json").read_text())
    assert d["complete"] and d["described"] and d["mapped_ram"]["threads"] == int(threads or 1)
    (ram,) = [b for b in d["ram_blocks"] if b["name"] == "ram"]
    assert ram["zero_pages"] == sum(1 for i in range(1024) if i % 7 == 3)


def test_mapped_ram_refused_where_it_cannot_apply(receivers, tmp_path):
    path = mapped_ram_file(tmp_path)
    # as a sequential stream (what exec:cat or a socket gives): refused naming the capability
    rx = receivers(f"exec:cat '{path}'", listens=False)
    assert rx.wait() == 1
    assert one_line(rx).endswith("capability mapped-ram: a mapped-ram migration is a file with "
                                 "RAM at fixed offsets; read it with file:PATH, not as a "
                                 "sequential stream")
    rx = receivers(f"file:{path}", "--save", str(tmp_path / "x"), listens=False)
    assert rx.wait() == 2 and "--save does not apply to a mapped-ram file" in rx.stderr
    # a damaged mapped-ram header: one line with the file offset
    from qioc_green.migration import MappedRamFile

    data = bytearray(path.read_bytes())
    at = MappedRamFile(lambda off, n: bytes(data[off : off + n]), len(data)).block("ram").header_offset
    data[at : at + 4] = b"\0\0\0\x07"
    path.write_bytes(bytes(data))
    rx = receivers(f"file:{path}", "--ram-dir", str(tmp_path / "r"), listens=False)
    assert rx.wait() == 1
    assert one_line(rx) == f"offset {at}: mapped-ram header version 7 of block 'ram', expected 1"


def test_usage_of_the_multifd_options(receivers, tmp_path):
    import subprocess
    import sys

    for argv in (["tcp:127.0.0.1:0", "--multifd-channels", "0"],
                 ["tcp:127.0.0.1:0", "--multifd-channels", "256"],
                 ["tcp:127.0.0.1:0", "--multifd-compression", "zlib"],
                 ["exec:cat x", "--multifd-channels", "2"]):
        r = subprocess.run([sys.executable, "-m", "qioc_green.migration", *argv],
                           capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 2, (argv, r.stderr)
        assert "multifd" in r.stderr.splitlines()[-1], r.stderr


# -- in-process: the settings a monitor sets, and the receiver's threads and fds -----------------


def test_multifd_is_set_as_qmp_sets_it_and_refused_where_it_cannot_go():
    """The command line and a QMP monitor set multifd on DestinationSettings alike; one
    migration takes IncomingSettings from it."""
    from qioc_green.migration import CommandError, DestinationSettings, IncomingSettings

    d = DestinationSettings(monitored=True, deferred=True)
    assert not IncomingSettings.from_destination(d.capabilities(), d.parameters()).multifd
    d.set_capabilities({"multifd": True})
    d.set_parameters({"multifd-channels": 4, "multifd-compression": "zlib"})
    got = IncomingSettings.from_destination(d.capabilities(), d.parameters())
    assert (got.multifd, got.channels, got.multifd_compression) == (True, 4, "zlib")
    # the command line without --multifd-compression: what the packets say
    assert IncomingSettings.from_destination(d.capabilities(), d.parameters(),
                                             strict_compression=False).multifd_compression is None
    for bad, msg in (({"multifd-compression": "qpl"}, "'qpl' is not supported"),
                     ({"tls-authz": "x"}, "tls-authz is not supported")):
        with pytest.raises(CommandError, match=msg):
            d.set_parameters(bad)
    with pytest.raises(CommandError, match="Capability 'rdma-pin-all'"):
        d.set_capabilities({"rdma-pin-all": True})


def test_where_a_multifd_migration_may_come_from_is_one_rule(tmp_path):
    """DestinationSettings.prepare() is what the command line's URI and QMP's migrate-incoming
    both go through; multifd is switched on before migrate-incoming or not at all (QEMU 10.0),
    its channel count may still change until the source connects."""
    from qioc_green.migration import CommandError, DestinationSettings, parse_uri

    d = DestinationSettings(monitored=True, deferred=True)
    d.set_capabilities({"multifd": True})
    for uri in ("exec:cat x", f"file:{tmp_path / 'plain.mig'}"):
        (tmp_path / "plain.mig").write_bytes(load("pc"))
        with pytest.raises(CommandError, match=r"^Migration requires multi-channel URIs \(e\.g\. "
                                               r"tcp\): multifd takes tcp:, unix:, "):
            d.prepare(parse_uri(uri))
    assert d.prepare(parse_uri("unix:/tmp/x.sock")) == "stream"
    # a migration saved with multifd: its channel count is the setting, and must agree
    save = tmp_path / "s.mig"
    save.write_bytes(b"")
    for j in range(3):
        (tmp_path / f"s.mig.multifd-{j}").write_bytes(b"")
    with pytest.raises(CommandError, match="multifd-channels is 2, but .* has 3 saved"):
        d.prepare(parse_uri(f"file:{save}"))
    fresh = DestinationSettings()
    assert fresh.prepare(parse_uri(f"file:{save}")) == "multifd"
    assert fresh.capabilities()["multifd"] and fresh.parameters()["multifd-channels"] == 3
    assert fresh.backlog() == 4
    # mapped-ram: no stream to save or forward
    fresh = DestinationSettings()
    fresh.outputs = "--forward"
    with pytest.raises(CommandError, match="^--forward does not apply to a mapped-ram file"):
        fresh.prepare(parse_uri(f"file:{mapped_ram_file(tmp_path)}"))
    # once migrate-incoming has run: multifd cannot be switched on, its parameters can change
    opened: list = []
    late = DestinationSettings(monitored=True, deferred=True, on_incoming=opened.append)
    late.migrate_incoming("tcp:127.0.0.1:0", True)
    try:
        with pytest.raises(CommandError, match="^Multifd must be set before incoming starts$"):
            late.set_capabilities({"multifd": True})
        late.set_parameters({"multifd-channels": 4})
    finally:
        for incoming in opened:
            incoming.close()
    d.set_capabilities({"multifd": True})  # on already: not a change


def test_multifd_receiver_in_process_stops_its_iothreads(tmp_path):
    """MultifdReceiver inside a program: it reads in IOThreads of its own and leaves none
    behind, nor an fd (the suite's leak check), whether the migration completes or fails."""
    from qioc_green import IOThread, SocketChannel
    from qioc_green.migration import IncomingSettings, MultifdReceiver

    main, channels = split("zstd")
    settings = IncomingSettings(multifd_channels=2)
    for parts, ok in (([*channels, main], True), ([main, channels[0][:5000], channels[1]], False)):
        lst = SocketChannel.listen("tcp:127.0.0.1:0", 8)
        lst.set_follow_coroutine_ctx(True)
        threads = send_connections(lst.local_address, parts)
        try:
            with IOThread("t-coordinator") as t:
                rx = MultifdReceiver(settings, ram_dir=str(tmp_path / f"ram-{ok}"))
                out = t.context.spawn(_receive_from, lst, rx).result(WAIT)
        finally:
            lst.close()
            for th in threads:
                th.join(WAIT)
        assert out.ok is ok, out.error
        if ok:
            assert (tmp_path / "ram-True" / "ram").read_bytes() == PATTERN
        else:
            assert out.error.startswith(f"multifd channel {channel_id(channels[0])}: offset 5000: "
                                        "channel ends inside"), out.error


def _receive_from(lst, rx):
    """In the coordinator's IOThread: the first connection, then the others as they come."""
    first = lst.accept(timeout=WAIT)
    first.set_follow_coroutine_ctx(True)
    return rx.receive([first], lambda timeout: lst.accept(timeout=timeout))


def test_sigterm_stops_a_multifd_migration_with_one_line(receivers, tmp_path):
    import signal

    from tests.polling import wait_until

    main, (a, b) = split()
    save = tmp_path / "s.mig"
    rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--save", str(save))
    # channel a is cut before its second SYNC, so the main stream waits at its second FLUSH
    threads = send_connections(rx.address, [main[:5000], a[:3000], b], hold=frozenset({0, 1}))
    # the whole of channel b arrived (saved as .multifd-0 or -1: numbered as they say what
    # they are), so every connection is in and the main stream waits
    assert wait_until(lambda: len(b) in [p.stat().st_size for p in tmp_path.glob("s.mig.multifd-*")],
                      WAIT)
    rx.proc.send_signal(signal.SIGTERM)
    assert rx.wait() == 1
    for t in threads:
        t.join(WAIT)
    kept = save.read_bytes()
    # the main stream stopped right after its second MULTIFD_FLUSH record (8 bytes)
    second_flush = [i for i in range(200) if main[i : i + 8] == b"\0" * 6 + b"\x02\x00"][1]
    assert one_line(rx) == f"offset {second_flush + 8}: stopped by SIGTERM"
    assert len(kept) > second_flush and main.startswith(kept)  # what came is kept
