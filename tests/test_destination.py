"""The receiver as a destination, without QEMU: the return path it answers and relays, checked
byte for byte with streams real QEMUs wrote (tests/data) played by a test source that reads its
return path as a source does, and a scripted forwarding destination for what a real one never
sends (bad messages: the error paths).

What a real QEMU source makes of it is in test_destination_live.py.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from pathlib import Path

import pytest

from qioc_green.migration import (
    MigCommand,
    Pong,
    Shut,
    SwitchoverAck,
    encode_message,
    encode_pong,
    encode_shut,
)
from tests.destination_util import WAIT, as_source, connect, load, messages, receivers

pytestmark = pytest.mark.timeout(60)
__all__ = ["receivers"]  # the fixture


def pongs_and_shut(got: bytes) -> list[object]:
    return [m.value if isinstance(m, Pong) else m for m in messages(got)]


def test_precopy_answers_pong_then_shut_after_the_description(receivers, tmp_path):
    """A 7.2 stream with return-path (relayed from a real source to a real destination when it
    was captured): the receiver sends exactly what that destination sent, PONG 1 then SHUT 0,
    and SHUT only once the whole stream (VM description included) is in: the source keeps its
    connection open until it has it."""
    rx = receivers("tcp:127.0.0.1:0", "--json", str(tmp_path / "s.json"))
    got = as_source(rx.address, load("cmd-return-path-7.2"))
    assert got == encode_pong(1) + encode_shut(0)
    assert rx.wait() == 0, rx.stderr
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["complete"] and d["return_path"] == {
        "opened": True, "mode": "answered", "pings": 1, "switchover_ack": False,
        "postcopy": False, "relayed": {}}


@pytest.mark.parametrize("mode", ["auto", "off", "on"])
def test_switchover_ack_by_machine_type_or_option(receivers, mode):
    """Without a monitor nothing says whether the source has switchover-ack on; a 10.0 machine
    type says it knows the message (a 7.2 source fails on it), so ``auto`` sends it there."""
    rx = receivers("tcp:127.0.0.1:0", "--switchover-ack", mode)
    got = pongs_and_shut(as_source(rx.address, load("cmd-return-path-10.0")))
    ack = [SwitchoverAck()] if mode != "off" else []
    assert got == [*ack, 1, Shut(0)]
    assert rx.wait() == 0, rx.stderr
    rx = receivers("tcp:127.0.0.1:0", "--switchover-ack", mode)
    got = pongs_and_shut(as_source(rx.address, load("cmd-return-path-7.2")))
    assert got == ([SwitchoverAck()] if mode == "on" else []) + [1, Shut(0)]
    assert rx.wait() == 0, rx.stderr


def test_postcopy_stream_answered_and_ram_rebuilt(receivers, tmp_path):
    """A 7.2 postcopy stream: a PONG for each PING in stream order (1, 2, then 3 inside the
    package, 4 after it), SHUT 0 at EOF (postcopy sends no description, and no
    --allow-undescribed is needed), RAM rebuilt."""
    rx = receivers("tcp:127.0.0.1:0", "--ram-dir", str(tmp_path / "ram"),
                   "--json", str(tmp_path / "p.json"))
    got = pongs_and_shut(as_source(rx.address, load("cmd-postcopy-7.2")))
    assert got == [1, 2, 3, 4, Shut(0)]
    assert rx.wait() == 0, rx.stderr
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["complete"] and not d["described"] and d["return_path"]["postcopy"]
    assert (tmp_path / "ram" / "pc.ram").stat().st_size == 16 << 20


def test_a_failed_stream_gets_shut_1(receivers):
    """Cut inside RAM: PONG 1 was owed and sent; then SHUT 1, and one line."""
    data = load("cmd-return-path-7.2")
    rx = receivers("tcp:127.0.0.1:0")
    got = as_source(rx.address, data[: len(data) // 2], cut=True)
    assert pongs_and_shut(got) == [1, Shut(1)]
    assert rx.wait() == 1
    assert rx.error_line().startswith(f"offset {len(data) // 2}: ")


def test_a_command_a_destination_refuses(receivers):
    """PING before OPEN_RETURN_PATH fails QEMU's destination; here too, with one line (and
    nothing to answer on, since no return path was opened)."""
    data = load("pc")
    at = 8 + 5 + len("pc-i440fx-7.2")  # after the header and the configuration
    assert data[at] == 0x01  # the first section
    ping = b"\x08" + struct.pack(">HHI", MigCommand.PING, 4, 7)
    rx = receivers("tcp:127.0.0.1:0")
    got = as_source(rx.address, data[:at] + ping + data[at:])
    assert got == b""
    assert rx.wait() == 1
    assert rx.error_line() == f"offset {at}: PING (7) with no return path open"


def test_a_one_way_source_is_parsed_but_not_answered(tmp_path):
    """From a file nobody reads answers: the return-path commands are checked and counted."""
    import subprocess

    from tests.destination_util import PROGRAM

    path = tmp_path / "pc.mig"
    path.write_bytes(load("cmd-postcopy-7.2"))
    r = subprocess.run([*PROGRAM, f"file:{path}", "--json", "-", "--quiet"],
                       capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["complete"] and d["return_path"]["pings"] == 4 and d["return_path"]["postcopy"]


# -- relaying a forwarding destination's return path ------------------------------------------


class ScriptedDestination:
    """A forwarding target on 127.0.0.1 that reads the stream and, once it has read ``after``
    bytes, writes ``reply`` on the return path (what a real QEMU never sends), then keeps
    reading to the end (or closes at once with ``close``)."""

    def __init__(self, reply: bytes, *, after: int = 1, close: bool = False) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(WAIT)
        self.address = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.reply, self.after, self.close = reply, after, close
        self.got = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(WAIT)
            sent = False
            try:
                while data := conn.recv(65536):
                    self.got += len(data)
                    if not sent and self.got >= self.after:
                        conn.sendall(self.reply)
                        sent = True
                        if self.close:
                            return
            except OSError:
                pass

    def join(self) -> None:
        self.thread.join(WAIT)
        self.listener.close()


@pytest.mark.parametrize("reply, message", [
    (struct.pack(">HH", 0x99, 0), "invalid message type 0x0099"),
    (encode_pong(1)[:2] + struct.pack(">H", 9) + b"x" * 9, "PONG message with length 9"),
    (encode_message(5, b"\x06pc.ram") + struct.pack(">Q", 8) + bytes(8)
     + struct.pack(">Q", 0x0123456789ABCDEF), "RecvBitmap: postcopy recovery is not supported"),
    (encode_shut(0) + encode_pong(1), "Pong after SHUT"),
    (b"", "before SHUT"),
], ids=["type", "length", "recovery", "after-shut", "no-shut"])
def test_relayed_return_path_refused_with_one_line(receivers, reply, message):
    """What the source would refuse is not passed on: SHUT 1 goes to it instead, the receiver
    fails with one line naming the message, and the destination's connection is dropped."""
    data = load("cmd-return-path-7.2")
    dst = ScriptedDestination(reply, close=not reply)
    rx = receivers("tcp:127.0.0.1:0", "--forward", dst.address)
    got = as_source(rx.address, data)
    assert rx.wait() == 1
    dst.join()
    line = rx.error_line()
    assert "return path from the destination: " in line and message in line, line
    if reply.startswith(encode_shut(0)):
        assert messages(got) == [Shut(0)]  # relayed; what follows it is refused
    else:
        assert messages(got) == [Shut(1)]


def test_relay_passes_a_destinations_answers_through(receivers, tmp_path):
    """A scripted destination that answers as QEMU's does (PONG 1, SHUT 0 at the end): the
    source gets exactly those bytes, relayed, and the receiver does not answer on its own."""
    data = load("cmd-return-path-7.2")

    class Answering(ScriptedDestination):
        def _run(self) -> None:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(WAIT)
                got = bytearray()
                conn.sendall(encode_pong(1))
                while len(got) < len(data) and (chunk := conn.recv(65536)):
                    got += chunk
                self.got = len(got)
                conn.sendall(encode_shut(0))
                while conn.recv(65536):
                    pass

    dst = Answering(b"")
    rx = receivers("tcp:127.0.0.1:0", "--forward", dst.address, "--json", str(tmp_path / "r.json"))
    got = as_source(rx.address, data)
    assert got == encode_pong(1) + encode_shut(0)
    assert rx.wait() == 0, rx.stderr
    dst.join()
    assert dst.got == len(data)  # everything was passed on before SHUT: nothing held back
    d = json.loads(Path(tmp_path / "r.json").read_text())
    assert d["return_path"]["mode"] == "relayed"
    assert d["return_path"]["relayed"] == {"Pong": 1, "Shut": 1}


def test_usage_errors_of_the_destination_options():
    import subprocess

    from tests.destination_util import PROGRAM

    for argv in (["defer"], ["--qmp", "unix:/tmp/x.qmp", "defer", "--keep-listening"],
                 ["tcp:127.0.0.1:0", "--tls-verify-peer"],
                 ["tcp:127.0.0.1:0", "--forward-tls-creds", "/tmp"],
                 ["tcp:127.0.0.1:0", "--switchover-ack", "maybe"]):
        r = subprocess.run([*PROGRAM, *argv], capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 2, (argv, r.stderr)
        assert "usage:" in r.stderr
    r = subprocess.run([*PROGRAM, "tcp:127.0.0.1:0", "--tls-creds", "/nonexistent"],
                       capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 1
    assert r.stderr == ("qioc-migration-receiver: tls-creds /nonexistent: ca-cert.pem: no "
                        "such file\n")


def test_connect_helper_is_used():  # keep the helper honest: unix paths connect too
    with pytest.raises(OSError):
        connect("unix:/nonexistent/sock")
