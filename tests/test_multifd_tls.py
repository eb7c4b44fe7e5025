"""TLS on every connection of a multifd migration, with what a real source cannot be made to
send: a capture of a QEMU 10.0.2 multifd migration (tests/data, 2 channels) replayed over TLS
sessions of Python's ``ssl`` (certificates made here with openssl, in QEMU's ``tls-creds-x509``
layout), one connection per part, as QEMU connects them. The live sources are in
test_multifd_destination.py; here, fast and exact: the connections in any order (the kind is
read after each handshake), EOF without close_notify after the last packet (QEMU 7.2's), and
one channel among good ones that fails its TLS: a certificate another CA signed, plaintext, a
hang-up mid-handshake, a session cut inside a packet. Each is one line naming the connection,
exit status 1, and nothing waits for the other connections.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest

from qioc_green.migration import sniff_channel
from qioc_green.migration.qemu import pattern_ram
from tests.destination_util import WAIT, receivers, tls_dirs
from tests.migdata import load_connections

pytestmark = [pytest.mark.peers, pytest.mark.timeout(60)]
__all__ = ["receivers"]

PATTERN = pattern_ram(4 << 20)
HOST = "localhost"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: Any) -> dict[str, str]:
    return tls_dirs(tmp_path_factory.mktemp("tls"))


def client_context(creds: str) -> ssl.SSLContext:
    """A source's side of a ``tls-creds-x509`` client directory."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(creds, "ca-cert.pem"))
    cert = os.path.join(creds, "client-cert.pem")
    if os.path.exists(cert):
        ctx.load_cert_chain(cert, os.path.join(creds, "client-key.pem"))
    return ctx


def parts() -> tuple[bytes, list[bytes]]:
    conns = load_connections("none-multifd2")
    main = next(c for c in conns if sniff_channel(c) == "main")
    return main, [c for c in conns if sniff_channel(c) == "multifd"]


def play(address: str, conns: list[tuple[str, bytes]], contexts: dict[str, ssl.SSLContext]
         ) -> list[threading.Thread]:
    """Connect once per ``(how, bytes)``, in order, each handshake done before the next
    connection opens (as QEMU does), then send each in a thread of its own and hang up
    without close_notify. ``how``: a key of ``contexts`` (TLS with that context), ``plain``,
    ``cut-hello`` (half a ClientHello, then a hang-up) or ``cut-<n>`` (TLS, the first n bytes,
    then a hang-up without close_notify). Refused sends are not errors here."""
    host, _, port = address.removeprefix("tcp:").rpartition(":")
    socks: list[Any] = []
    for how, _ in conns:
        raw = socket.create_connection((host, int(port)), timeout=WAIT)
        if how == "cut-hello":
            bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = contexts["good"].wrap_bio(bio_in, bio_out, server_hostname=HOST)
            with pytest.raises(ssl.SSLWantReadError):
                obj.do_handshake()
            hello = bio_out.read()
            raw.sendall(hello[: len(hello) // 2])
            socks.append(raw)
        elif how == "plain":
            socks.append(raw)
        else:
            ctx = contexts["good" if how.startswith("cut-") else how]
            try:
                socks.append(ctx.wrap_socket(raw, server_hostname=HOST))
            except (ssl.SSLError, OSError):  # refused by the receiver
                raw.close()
                socks.append(None)

    def run(sock: Any, how: str, data: bytes) -> None:
        if sock is None:
            return
        with sock:
            try:
                if how == "cut-hello":
                    pass  # half a ClientHello sent: hang up in the middle of the handshake
                elif how.startswith("cut-"):
                    sock.sendall(data[: int(how.removeprefix("cut-"))])
                else:
                    sock.sendall(data)
            except OSError:
                pass

    threads = [threading.Thread(target=run, args=(s, how, data), daemon=True)
               for s, (how, data) in zip(socks, conns)]
    for t in threads:
        t.start()
    return threads


def run(receivers: Any, pki: dict[str, str], tmp_path: Path, conns: list[tuple[str, bytes]],
        *args: str) -> Any:
    rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--tls-creds", pki["server"],
                   "--tls-verify-peer", "--ram-dir", str(tmp_path / "ram"), "--json", "-",
                   *args)
    contexts = {"good": client_context(pki["client"]),
                "other-cert": client_context(pki["client-other-cert"])}
    threads = play(rx.address, conns, contexts)
    rx.wait()
    for t in threads:
        t.join(WAIT)
    return rx


@pytest.mark.parametrize("main_first", [True, False], ids=["main-first", "main-last"])
def test_every_connection_over_tls_in_any_order(receivers, pki, tmp_path, main_first):
    """The kind is read after each handshake, so the main channel may come last (QEMU's
    destination could not tell); EOF without close_notify after a channel's last packet (what
    a 7.2 source does) is its end."""
    main, channels = parts()
    order = [main, *channels] if main_first else [*channels, main]
    rx = run(receivers, pki, tmp_path, [("good", c) for c in order])
    assert rx.proc.returncode == 0, rx.stderr
    assert (tmp_path / "ram" / "ram").read_bytes() == PATTERN
    assert f'"bytes_total": {sum(map(len, order))}' in rx.stdout


@pytest.mark.parametrize("how,why", [
    ("other-cert", r"TLS handshake with the source failed: .*certificate.*"),
    ("plain", r"the source sent a plaintext multifd channel \(magic 0x11223344\) where a TLS "
              r"handshake should begin: set tls-creds on the source too, or run without "
              r"--tls-creds"),
    ("cut-hello", r"TLS handshake with the source failed: .*"),
], ids=["certificate-of-another-ca", "plaintext-channel", "hang-up-mid-handshake"])
def test_one_channel_that_fails_its_tls(receivers, pki, tmp_path, how, why):
    """Main channel and one channel fine, the last one not: one line naming that connection
    (by accept order: it never said which channel it is), exit 1, at once."""
    main, channels = parts()
    rx = run(receivers, pki, tmp_path, [("good", main), ("good", channels[0]),
                                        (how, channels[1])])
    assert rx.proc.returncode == 1
    line = rx.error_line()
    assert re.fullmatch(r"connection 2: offset 0: " + why, line), line


def test_a_tls_channel_cut_inside_a_packet(receivers, pki, tmp_path):
    """A hang-up without close_notify is an end only between packets: inside one it is what it
    always was, a channel cut short."""
    main, channels = parts()
    rx = run(receivers, pki, tmp_path, [("good", main), ("good", channels[0]),
                                        ("cut-100000", channels[1])])
    assert rx.proc.returncode == 1
    assert re.fullmatch(r"multifd channel [01]: offset 100000: .*", rx.error_line())


def test_keep_listening_hands_a_tls_session_to_the_next_migration(receivers, pki, tmp_path):
    """--keep-listening with TLS: a connection of the next source accepted before this
    migration's first sync point, its handshake done but nothing said yet when this one
    completes, goes to the next migration as the TLS session it is (not handshaken again,
    not closed): the next reads its main stream on it, and both complete."""
    from tests.polling import wait_until
    from tests.test_migration_receiver import wait_for_file
    from tests.test_multifd_receiver import assert_both_rebuilt, sockets_of

    rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--tls-creds", pki["server"],
                   "--tls-verify-peer", "--keep-listening", "--count", "2",
                   "--ram-dir", str(tmp_path / "ram"), "--json", str(tmp_path / "m.json"))
    ctx = client_context(pki["client"])
    contexts = {"good": ctx}
    main, channels = parts()
    host, _, port = rx.address.removeprefix("tcp:").rpartition(":")

    def connect() -> ssl.SSLSocket:
        return ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=WAIT),
                               server_hostname=HOST)

    with connect() as first:
        first.sendall(main[:4])  # short of the first sync point: the listener is still ours
        threads = play(rx.address, [("good", c) for c in channels], contexts)
        assert wait_until(lambda: sockets_of(rx.proc.pid) >= 4, timeout=WAIT)
        with connect() as nxt:  # the next source: handshake done, then silent for now
            assert wait_until(lambda: sockets_of(rx.proc.pid) >= 5, timeout=WAIT)
            first.sendall(main[4:])
            first.close()
            wait_for_file(tmp_path / "m-1.json")
            nxt.sendall(main)
            threads += play(rx.address, [("good", c) for c in channels], contexts)
            nxt.close()
            assert rx.wait() == 0, rx.stderr
    for t in threads:
        t.join(WAIT)
    assert_both_rebuilt(tmp_path)


def test_parsing_only_over_tls_reads_every_page(receivers, pki, tmp_path):
    """Without --ram-dir, a plain TCP channel's pages are dropped by the kernel unread; over
    TLS they are records to decrypt, so they are read: the same summary as storing them."""
    main, channels = parts()
    got = {}
    for ram in (True, False):
        summary = tmp_path / f"s-{ram}.json"
        args = ["--ram-dir", str(tmp_path / "ram")] if ram else []
        rx = receivers("tcp:127.0.0.1:0", "--multifd-channels", "2", "--tls-creds",
                       pki["server"], "--tls-verify-peer", "--json", str(summary), *args)
        threads = play(rx.address, [("good", c) for c in [main, *channels]],
                       {"good": client_context(pki["client"])})
        assert rx.wait() == 0, rx.stderr
        for t in threads:
            t.join(WAIT)
        d = json.loads(summary.read_text())
        assert d["complete"] and d["bytes_total"] == sum(map(len, [main, *channels]))
        got[ram] = (sorted((c["bytes"], c["packets"], c["normal_pages"], c["zero_pages"])
                           for c in d["multifd"]["connections"] if c["kind"] == "multifd"),
                    [(b["name"], b["normal_pages"], b["zero_pages"]) for b in d["ram_blocks"]])
    assert got[True] == got[False]
    assert (tmp_path / "ram" / "ram").read_bytes() == PATTERN
