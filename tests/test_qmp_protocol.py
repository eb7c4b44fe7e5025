"""The sans-IO QMP server (qioc_green/migration/_qmp.py and _qmp_dispatch.py), with no sockets.

Input goes in whole, one byte at a time and with trailing bytes; garbage, over-long values and
over-deep nesting must each cost one error reply and leave the connection usable; hypothesis
feeds random input and checks that nothing hangs, memory stays bounded, every reply is one
JSON line, and a control character always brings the parser back. The dispatcher is driven
with ``RecordingTarget`` (tests/qmp_harness.py), a small in-test implementation of the
MigrationTarget interface (the collaborator the receiver will be), recording what it was asked.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qioc_green.migration import (
    CAPABILITIES,
    NEED_DATA,
    NO_ID,
    PAUSED,
    BroadcastEvent,
    CloseClient,
    ErrorClass,
    IncomingInfo,
    LocalProtocolError,
    QmpBadRequest,
    QmpClosed,
    QmpConnection,
    QmpDispatcher,
    QmpError,
    QmpEvent,
    QmpGreeting,
    QmpRequest,
    QmpReturn,
    RamStats,
    SendReply,
)
from tests.qmp_harness import RecordingTarget

VERSION = {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": "test"}


def connection(negotiated: bool = False, **kw: Any) -> QmpConnection:
    conn = QmpConnection(**kw)
    conn.send(QmpGreeting(VERSION))
    if negotiated:
        conn.receive_data(b'{"execute": "qmp_capabilities"}')
        ev = conn.next_event()
        assert ev == QmpRequest("qmp_capabilities", {})
        conn.send(QmpReturn({}))
    return conn


def drain(conn: QmpConnection, data: bytes = b"", *, answer: bool = True) -> list[Any]:
    """Feed ``data``; collect events until NEED_DATA, answering each with {} or its error."""
    if data:
        conn.receive_data(data)
    out = []
    for _ in range(100000):
        ev = conn.next_event()
        if ev is NEED_DATA or isinstance(ev, QmpClosed):
            if isinstance(ev, QmpClosed):
                out.append(ev)
            return out
        assert ev is not PAUSED
        out.append(ev)
        if answer:
            conn.send(ev.reply() if isinstance(ev, QmpBadRequest) else QmpReturn({}, ev.id))
    raise AssertionError("next_event() never said NEED_DATA")


def errors(events: list[Any]) -> list[str]:
    return [ev.desc for ev in events if isinstance(ev, QmpBadRequest)]


def commands(events: list[Any]) -> list[str]:
    return [ev.command for ev in events if isinstance(ev, QmpRequest)]


# -- the connection: greeting, negotiation, replies, events ----------------------------------------


def test_greeting_is_one_crlf_line_with_version_and_capabilities():
    conn = QmpConnection()
    line = conn.send(QmpGreeting(VERSION))
    assert line.endswith(b"\r\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"QMP": {"version": VERSION, "capabilities": []}}
    with pytest.raises(LocalProtocolError):
        conn.send(QmpGreeting(VERSION))


def test_nothing_but_the_greeting_first():
    conn = QmpConnection()
    with pytest.raises(LocalProtocolError):
        conn.send(QmpEvent("X", None, 1.0))


def test_commands_before_negotiation_get_command_not_found():
    conn = connection()
    conn.receive_data(b'{"execute": "query-status", "id": 1}{"execute": "nope"}')
    ev = conn.next_event()
    assert ev == QmpBadRequest(ErrorClass.CommandNotFound,
                            "Expecting capabilities negotiation with 'qmp_capabilities'", 1)
    assert json.loads(conn.send(ev.reply())) == {
        "id": 1, "error": {"class": "CommandNotFound",
                           "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    ev = conn.next_event()
    assert isinstance(ev, QmpBadRequest) and ev.id is NO_ID and ev.error_class == "CommandNotFound"
    conn.send(ev.reply())
    assert not conn.negotiated


def test_negotiation_then_second_qmp_capabilities_is_refused():
    conn = connection()
    assert conn.send(QmpEvent("MIGRATION", {"status": "setup"}, 5.0)) == b""  # not delivered yet
    conn.receive_data(b'{"execute": "qmp_capabilities", "id": "n"}')
    ev = conn.next_event()
    assert ev == QmpRequest("qmp_capabilities", {}, "n")
    assert json.loads(conn.send(QmpReturn({}, "n"))) == {"return": {}, "id": "n"}
    assert conn.negotiated
    ev = drain(conn, b'{"execute": "qmp_capabilities", "id": 2}')[0]
    assert ev == QmpBadRequest(ErrorClass.CommandNotFound,
                            "Capabilities negotiation is already complete, command ignored", 2)


def test_negotiation_refused_stays_negotiating():
    conn = connection()
    evs = drain(conn, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}'
                      b'{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}'
                      b'{"execute": "qmp_capabilities", "arguments": {"x": 1}}')
    assert errors(evs) == ["Capability 'oob' not available",
                           "Parameter 'enable' does not accept value 'foo'",
                           "Parameter 'x' is unexpected"]
    assert not conn.negotiated


def test_events_after_negotiation_carry_a_timestamp():
    conn = connection(negotiated=True)
    line = conn.send(QmpEvent("MIGRATION", {"status": "active"}, 1700000000.25))
    assert line.endswith(b"\r\n")
    assert json.loads(line) == {"timestamp": {"seconds": 1700000000, "microseconds": 250000},
                                "event": "MIGRATION", "data": {"status": "active"}}
    assert "data" not in json.loads(conn.send(QmpEvent("RESUME", None, 1.0)))


@pytest.mark.parametrize("rid", [7, "x", {"a": [1, None]}, None, 1.5, [True]])
def test_id_is_echoed_in_returns_and_errors(rid):
    conn = connection(negotiated=True)
    conn.receive_data(json.dumps({"execute": "a", "id": rid}).encode())
    ev = conn.next_event()
    assert ev.id == rid
    assert json.loads(conn.send(QmpReturn([1], ev.id))) == {"return": [1], "id": rid}
    conn.receive_data(json.dumps({"execute": "a", "bogus": 1, "id": rid}).encode())
    ev = conn.next_event()
    assert json.loads(conn.send(ev.reply())) == {
        "id": rid, "error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}


def test_no_id_means_no_id_member():
    conn = connection(negotiated=True)
    conn.receive_data(b'{"execute": "a"}')
    ev = conn.next_event()
    assert "id" not in json.loads(conn.send(QmpError(ErrorClass.GenericError, "no", ev.id)))


def test_one_request_at_a_time():
    conn = connection(negotiated=True)
    conn.receive_data(b'{"execute": "a"}{"execute": "b"}')
    assert conn.next_event() == QmpRequest("a")
    assert conn.next_event() is PAUSED
    conn.send(QmpReturn({}))
    assert conn.next_event() == QmpRequest("b")
    with pytest.raises(LocalProtocolError):
        conn.send(QmpReturn({}))
        conn.send(QmpReturn({}))


def test_output_is_ascii():
    conn = connection(negotiated=True)
    conn.receive_data('{"execute": "a", "id": "é😀"}'.encode())
    ev = conn.next_event()
    line = conn.send(QmpReturn({"k": "ü"}, ev.id))
    assert line.isascii()
    assert json.loads(line) == {"return": {"k": "ü"}, "id": "é😀"}


# -- framing ---------------------------------------------------------------------------------------

SCRIPT = (b'{"execute": "one", "id": 1}\n'
          b'  {"execute": "two",\n "arguments": {"s": "a}b]c{\\"d", "n": [1, {"x": []}]}}'
          b"{'execute': 'three', 'arguments': {'q': 'it\\'s \"quoted\"'}}\r\n"
          b'{"execute": "four", "id": "\\u00e9\\n"}')
EXPECTED = [QmpRequest("one", {}, 1),
            QmpRequest("two", {"s": 'a}b]c{"d', "n": [1, {"x": []}]}),
            QmpRequest("three", {"q": "it's \"quoted\""}),
            QmpRequest("four", {}, "é\n")]


def test_values_not_lines_whole():
    conn = connection(negotiated=True)
    assert drain(conn, SCRIPT) == EXPECTED


def test_values_not_lines_byte_by_byte():
    conn = connection(negotiated=True)
    got: list[Any] = []
    for i in range(len(SCRIPT)):
        got += drain(conn, SCRIPT[i : i + 1])
    assert got == EXPECTED


def test_trailing_bytes_wait_for_the_rest():
    conn = connection(negotiated=True)
    assert drain(conn, SCRIPT + b'{"execute": "fi') == EXPECTED
    assert drain(conn, b've"}') == [QmpRequest("five")]


def test_eof_drops_an_unfinished_value_and_closes_once():
    conn = connection(negotiated=True)
    conn.receive_data(b'{"execute": "a"}{"execute": ')
    conn.receive_data(b"")
    assert drain(conn) == [QmpRequest("a"), QmpClosed()]
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_request_shape_errors_are_qemus():
    conn = connection(negotiated=True)
    evs = drain(conn, b'[1, 2]\n42\n"s"\n{"id": 6}\n{"execute": 5, "id": 5}\n'
                      b'{"execute": "a", "arguments": 5, "id": 4}\n'
                      b'{"exec-oob": "a", "id": 3}\n')
    assert [(ev.desc, ev.id) for ev in evs] == [
        ("QMP input must be a JSON object", NO_ID),
        ("QMP input must be a JSON object", NO_ID),
        ("QMP input must be a JSON object", NO_ID),
        ("QMP input lacks member 'execute'", 6),
        ("QMP input member 'execute' must be a string", 5),
        ("QMP input member 'arguments' must be an object", 4),
        ("QMP input member 'exec-oob' is unexpected", 3),
    ]
    assert all(ev.error_class == "GenericError" for ev in evs)


def test_json_errors_then_usable():
    conn = connection(negotiated=True)
    evs = drain(conn, b'{"execute": }\ngarbage\n{"execute": NaN}\n{"execute": "ok"}\n')
    assert errors(evs) == ["JSON parse error, expecting value",
                           "JSON parse error, invalid keyword 'garbage'",
                           "JSON parse error, invalid keyword 'NaN'"]
    assert commands(evs) == ["ok"]


def test_one_error_per_line_of_garbage():
    conn = connection(negotiated=True)
    evs = drain(conn, b"aaa bbb } ] {x} [,] 1 2 3 \x02 \xff ccc\n"
                      b"more garbage here\n"
                      b'junk {"execute": "still-answered", "id": 1} junk\n')
    assert len(errors(evs)) == 3
    assert commands(evs) == ["still-answered"]


def test_named_requests_are_answered_even_on_a_garbage_line():
    conn = connection()
    evs = drain(conn, b'junk {"execute": "query-status", "id": 9}\n')
    assert [ev.id for ev in evs] == [NO_ID, 9]


def test_control_character_resets_a_half_value():
    conn = connection(negotiated=True)
    assert drain(conn, b'{"execute": "query-status", "id": "half') == []
    evs = drain(conn, b'\x01{"execute": "after", "id": "after"}\n')
    assert errors(evs) == ["JSON parse error, stray '\"half\x01'"]  # QEMU names the token
    assert commands(evs) == ["after"]


def test_0xff_resets_like_a_control_character():
    conn = connection(negotiated=True)
    evs = drain(conn, b'{"execute": "a"}\xff{"execute": "b"}\n')
    assert commands(evs) == ["a", "b"]
    assert errors(evs) == ["JSON parse error, stray '\ufffd'"]


def test_invalid_utf8_in_a_string():
    conn = connection(negotiated=True)
    evs = drain(conn, b'{"execute": "a", "id": "\xc3\x28"}\n{"execute": "b"}\n')
    assert errors(evs) == ["JSON parse error, invalid UTF-8 sequence in string"]
    assert commands(evs) == ["b"]


def test_a_one_mib_value_gets_one_error_and_the_connection_stays():
    conn = connection(negotiated=True)
    big = b'{"execute": "big", "id": "' + b"A" * (1 << 20) + b'"}'
    got: list[Any] = []
    peak = 0
    for i in range(0, len(big), 65536):
        got += drain(conn, big[i : i + 65536])
        peak = max(peak, conn.buffered)
    got += drain(conn, b'\n{"execute": "next", "id": 2}\n')
    assert errors(got) == [f"QMP input over {1 << 20} bytes (the limit of this server)"]
    assert commands(got) == ["next"]
    assert peak <= (1 << 20) + 65536


def test_a_one_mib_line_of_garbage_gets_one_error():
    conn = connection(negotiated=True)
    evs = drain(conn, b"a" * (1 << 20) + b"\n" + b'{"execute": "x"}')
    assert len(errors(evs)) == 1 and errors(evs)[0].endswith("...'")
    assert len(errors(evs)[0]) < 200
    assert commands(evs) == ["x"]


def test_skipping_an_oversize_value_does_not_reparse_its_inside():
    conn = connection(negotiated=True, max_message=100)
    inner = b'{"execute": "inner"}' * 20
    evs = drain(conn, b'{"a": "' + b"x" * 200 + b'", "b": [' + inner + b']}{"execute": "after"}')
    assert commands(evs) == ["after"]
    assert len(errors(evs)) == 1


def test_nesting_limit():
    conn = connection(negotiated=True)
    ok = b'{"execute": "deep", "id": ' + b"[" * 255 + b"]" * 255 + b"}"
    assert commands(drain(conn, ok)) == ["deep"]
    evs = drain(conn, b'{"execute": "deeper", "id": ' + b"[" * 256 + b"]" * 256 + b'}{"execute": "x"}')
    assert errors(evs) == ["JSON nesting depth limit exceeded"]  # one error, not one per bracket
    assert commands(evs) == ["x"]


def test_memory_stays_bounded_under_an_endless_value():
    conn = connection(negotiated=True)
    chunk = b'[{"k": "' + b"v" * 60000 + b'", "l": ['
    peak = 0
    for _ in range(100):  # 6 MB that never closes
        drain(conn, chunk)
        peak = max(peak, conn.buffered)
    assert peak <= (1 << 20) + len(chunk)
    evs = drain(conn, b'\x01\n{"execute": "back"}')
    assert commands(evs) == ["back"]


# -- hypothesis ------------------------------------------------------------------------------------

FRAGMENTS = [b"{", b"}", b"[", b"]", b'"', b"'", b"\\", b":", b",", b"\n", b" ", b"\x01", b"\xff",
             b"\xc3", b'"execute"', b'"id"', b'"arguments"', b'"qmp_capabilities"', b"1", b"null",
             b"true", b'{"execute": "q"}', b"garbage", b"\\'", b"\\u00", b"\x00"]


@st.composite
def qmp_noise(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=20)),
                          max_size=60))
    return b"".join(parts)


def _check_output(line: bytes) -> None:
    assert line.endswith(b"\r\n") and line.count(b"\n") == 1 and line.isascii()
    obj = json.loads(line)
    assert set(obj) <= {"return", "error", "id"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=qmp_noise(), piece=st.integers(1, 64), negotiated=st.booleans())
def test_fuzz_never_hangs_stays_bounded_and_recovers(data, piece, negotiated):
    conn = connection(negotiated=negotiated, max_message=256, max_depth=8)
    for i in range(0, len(data), piece):
        conn.receive_data(data[i : i + piece])
        for _ in range(len(data) + 10):
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            assert isinstance(ev, QmpRequest | QmpBadRequest)
            if isinstance(ev, QmpBadRequest):
                assert ev.error_class in ("GenericError", "CommandNotFound")
                _check_output(conn.send(ev.reply()))
            else:
                _check_output(conn.send(QmpReturn({}, ev.id)))
        else:
            raise AssertionError("next_event() did not settle")
        assert conn.buffered <= 256 + piece + 2
    # the spec's resynchronisation: a control character, then a request is answered
    evs = drain(conn, b'\x01\n{"execute": "qmp_capabilities", "id": "r"}')
    assert [ev.id for ev in evs if isinstance(ev, QmpRequest | QmpBadRequest)][-1] == "r"


# -- the dispatcher, over an in-test migration target -------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1700000000.0

    def __call__(self) -> float:
        self.now += 1.5
        return self.now


def session(target: RecordingTarget | None = None) -> tuple[QmpDispatcher, QmpConnection, RecordingTarget]:
    target = target or RecordingTarget()
    disp = QmpDispatcher(target, clock=Clock(), package="test")
    conn = QmpConnection()
    greeting = json.loads(disp.greeting(conn))
    assert greeting["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 0, "major": 10}
    run(disp, conn, "qmp_capabilities")
    return disp, conn, target


def run(disp: QmpDispatcher, conn: QmpConnection, command: str, **args: Any) -> list[Any]:
    """One request; the actions as (kind, decoded json) tuples."""
    msg: dict[str, Any] = {"execute": command, "id": command}
    if args:
        msg["arguments"] = args
    conn.receive_data(json.dumps(msg).encode())
    out: list[Any] = []
    for action in disp.handle(conn):
        if isinstance(action, SendReply):
            out.append(("send", json.loads(action.data)))
        elif isinstance(action, BroadcastEvent):
            out.append(("event", json.loads(conn.send(action.event))))
        else:
            assert isinstance(action, CloseClient)
            out.append(("close", None))
    return out


def ret(disp: QmpDispatcher, conn: QmpConnection, command: str, **args: Any) -> Any:
    out = run(disp, conn, command, **args)
    assert out[-1][0] == "send" and "return" in out[-1][1], out
    assert out[-1][1]["id"] == command
    return out[-1][1]["return"]


def err(disp: QmpDispatcher, conn: QmpConnection, command: str, **args: Any) -> tuple[str, str]:
    out = run(disp, conn, command, **args)
    assert out[-1][0] == "send" and "error" in out[-1][1], out
    e = out[-1][1]["error"]
    return e["class"], e["desc"]


def test_query_version_commands_status():
    disp, conn, target = session()
    assert ret(disp, conn, "query-version") == {
        "qemu": {"micro": 0, "minor": 0, "major": 10}, "package": "test"}
    names = [c["name"] for c in ret(disp, conn, "query-commands")]
    for name in ("qmp_capabilities", "query-status", "query-migrate", "migrate-set-capabilities",
                 "migrate-set-parameters", "migrate-incoming", "quit"):
        assert name in names
    assert ret(disp, conn, "query-status") == {"status": "inmigrate", "running": False}
    target.state = "running"
    assert ret(disp, conn, "query-status") == {"status": "running", "running": True}
    assert err(disp, conn, "query-status", x=1) == ("GenericError", "Parameter 'x' is unexpected")


def test_unknown_command_is_command_not_found():
    disp, conn, _ = session()
    assert err(disp, conn, "nope") == ("CommandNotFound", "The command nope has not been found")


def test_query_migrate_shapes():
    disp, conn, target = session()
    assert ret(disp, conn, "query-migrate") == {}
    target.info = IncomingInfo("active", [{"type": "unix", "path": "/x"}],
                               ram=RamStats(transferred=1000, total=8192, normal=1, duplicate=1))
    info = ret(disp, conn, "query-migrate")
    assert info["status"] == "active"
    assert info["socket-address"] == [{"type": "unix", "path": "/x"}]
    assert info["ram"]["transferred"] == 1000 and info["ram"]["total"] == 8192
    assert info["ram"]["normal-bytes"] == 4096 and info["ram"]["page-size"] == 4096
    target.info = IncomingInfo("failed", error_desc="offset 12: bad")
    assert ret(disp, conn, "query-migrate") == {"status": "failed", "error-desc": "offset 12: bad"}


def test_set_capabilities():
    disp, conn, target = session()
    caps = [{"capability": "events", "state": True}, {"capability": "return-path", "state": True}]
    assert ret(disp, conn, "migrate-set-capabilities", capabilities=caps) == {}
    assert target.caps == {"events": True, "return-path": True}
    listed = ret(disp, conn, "query-migrate-capabilities")
    assert [c["capability"] for c in listed] == list(CAPABILITIES)
    assert {c["capability"] for c in listed if c["state"]} == {"events", "return-path"}


@pytest.mark.parametrize("caps,desc", [
    (None, "Parameter 'capabilities' is missing"),
    ({"capability": "events"}, "Invalid parameter type for 'capabilities', expected: array"),
    ([5], "Invalid parameter type for 'capabilities[0]', expected: object"),
    ([{"capability": "events"}], "Parameter 'capabilities[0].state' is missing"),
    ([{"capability": "events", "state": "yes"}],
     "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
    ([{"capability": "nope", "state": True}], "Parameter 'capability' does not accept value 'nope'"),
    ([{"capability": "events", "state": True, "x": 1}], "Parameter 'capabilities[0].x' is unexpected"),
    ([{"capability": "switchover-ack", "state": True}],
     "Capability 'switchover-ack' requires capability 'return-path'"),
    ([{"capability": "xbzrle", "state": True}], "Capability 'xbzrle' is not supported by this receiver"),
])
def test_set_capabilities_refusals(caps, desc):
    disp, conn, target = session()
    args = {} if caps is None else {"capabilities": caps}
    assert err(disp, conn, "migrate-set-capabilities", **args) == ("GenericError", desc)
    assert target.caps == {}


def test_set_parameters():
    disp, conn, target = session()
    assert ret(disp, conn, "migrate-set-parameters", **{
        "multifd-channels": 4, "multifd-compression": "zstd", "tls-creds": "tls0",
        "max-bandwidth": 1 << 30}) == {}
    assert ret(disp, conn, "migrate-set-parameters", **{"tls-creds": None}) == {}
    params = ret(disp, conn, "query-migrate-parameters")
    assert params["multifd-channels"] == 4 and params["multifd-compression"] == "zstd"
    assert params["tls-creds"] == "" and params["max-bandwidth"] == 1 << 30


@pytest.mark.parametrize("args,desc", [
    ({"nope": 1}, "Parameter 'nope' is unexpected"),
    ({"multifd-channels": "4"}, "Parameter 'multifd-channels' expects uint64"),
    ({"multifd-channels": True}, "Parameter 'multifd-channels' expects uint64"),
    ({"multifd-channels": 1.5}, "Parameter 'multifd-channels' expects uint64"),
    ({"multifd-channels": 256}, "Parameter 'multifd-channels' expects uint8_t"),
    ({"multifd-channels": 0}, "Parameter 'multifd-channels' expects a value between 1 and 255"),
    ({"multifd-compression": "lz9"}, "Parameter 'multifd-compression' does not accept value 'lz9'"),
    ({"multifd-compression": "qpl"}, "multifd-compression 'qpl' is not supported by this receiver"),
    ({"tls-creds": 5}, "Invalid parameter type for 'tls-creds', expected: StrOrNull"),
    ({"direct-io": 1}, "Invalid parameter type for 'direct-io', expected: boolean"),
    ({"max-bandwidth": -1}, "Parameter 'max-bandwidth' expects uint64"),
])
def test_set_parameters_refusals(args, desc):
    disp, conn, target = session()
    assert err(disp, conn, "migrate-set-parameters", **args) == ("GenericError", desc)
    assert target.calls == []


def test_migrate_incoming_emits_setup_before_its_reply():
    disp, conn, target = session()
    ret(disp, conn, "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    out = run(disp, conn, "migrate-incoming", uri="tcp:127.0.0.1:0")
    assert [kind for kind, _ in out] == ["event", "send"]
    assert out[0][1]["event"] == "MIGRATION" and out[0][1]["data"] == {"status": "setup"}
    assert set(out[0][1]["timestamp"]) == {"seconds", "microseconds"}
    assert out[1][1] == {"return": {}, "id": "migrate-incoming"}
    assert target.calls[-1] == ("incoming", ("tcp:127.0.0.1:0", True))
    assert err(disp, conn, "migrate-incoming", uri="tcp:127.0.0.1:0") == (
        "GenericError", "The incoming migration has already been started")


def test_migrate_incoming_without_events_capability_is_silent():
    disp, conn, _ = session()
    assert [k for k, _ in run(disp, conn, "migrate-incoming", uri="unix:/x")] == ["send"]


@pytest.mark.parametrize("args,desc", [
    ({}, "need either 'uri' or 'channels' argument"),
    ({"uri": 5}, "Invalid parameter type for 'uri', expected: string"),
    ({"uri": "bogus:1"}, "unknown migration protocol: bogus:1"),
    ({"uri": "tcp:x:1", "channels": []}, "need either 'uri' or 'channels' argument"),
    ({"channels": []}, "'channels' is not supported by this receiver; give 'uri'"),
    ({"uri": "tcp:x:1", "exit-on-error": "no"},
     "Invalid parameter type for 'exit-on-error', expected: boolean"),
    ({"uri": "tcp:x:1", "x": 1}, "Parameter 'x' is unexpected"),
])
def test_migrate_incoming_refusals(args, desc):
    disp, conn, _ = session()
    assert err(disp, conn, "migrate-incoming", **args) == ("GenericError", desc)


def test_migration_status_events_once_each_and_only_with_events_on():
    disp, conn, target = session()
    assert disp.migration_status("active") is None  # events off
    target.caps["events"] = True
    assert disp.migration_status("active") is None  # no change
    ev = disp.migration_status("completed")
    assert ev is not None and ev.name == "MIGRATION" and ev.data == {"status": "completed"}
    assert json.loads(conn.send(ev))["timestamp"]["microseconds"] in range(1000000)


def test_quit_says_shutdown_then_returns_then_closes():
    disp, conn, target = session()
    out = run(disp, conn, "quit")
    assert [k for k, _ in out] == ["event", "send", "close"]
    assert out[0][1]["event"] == "SHUTDOWN"
    assert out[0][1]["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert target.quitted


def test_bad_requests_are_answered_by_the_dispatcher_too():
    disp, conn, _ = session()
    conn.receive_data(b"garbage\n")
    (action,) = disp.handle(conn)
    assert isinstance(action, SendReply) and b"invalid keyword" in action.data


def test_hang_up_closes():
    disp, conn, _ = session()
    conn.receive_data(b"")
    assert disp.handle(conn) == [CloseClient()]


def test_a_bug_in_the_target_is_a_generic_error_and_the_monitor_goes_on():
    class Broken(RecordingTarget):
        def incoming_info(self) -> IncomingInfo:
            raise KeyError("oops")

    disp, conn, _ = session(Broken())
    cls, desc = err(disp, conn, "query-migrate")
    assert cls == "GenericError" and "KeyError" in desc
    assert disp.internal_errors == 1
    assert ret(disp, conn, "query-status")["status"] == "inmigrate"
