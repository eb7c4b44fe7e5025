"""TLS with real QEMU 10.0 and 7.2 peers: certificates made here with openssl, laid out as QEMU's
``tls-creds-x509`` directories; the source gets a ``tls-creds-x509`` object and ``tls-hostname``,
as libvirt sets it up. The receiver takes TLS (client certificates required with
``--tls-verify-peer``), refuses a plaintext source, a source that does not trust it and a client
certificate it does not trust, each with one line; and speaks TLS to a TLS destination.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.destination_util import WAIT, qemu, ram_bytes, receivers, tls_dirs

pytestmark = [pytest.mark.peers, pytest.mark.timeout(90)]
__all__ = ["receivers"]
pytest.importorskip("qemu.qmp")

MEM = 16


@pytest.fixture(scope="module")
def pki(tmp_path_factory: Any) -> dict[str, str]:
    return tls_dirs(tmp_path_factory.mktemp("tls"))


def tls_source(src: Any, creds: str, hostname: str | None = "localhost") -> None:
    src.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": creds,
                             "endpoint": "client"})
    params: dict[str, Any] = {"tls-creds": "tls0"}
    if hostname is not None:
        params["tls-hostname"] = hostname
    src.cmd("migrate-set-parameters", **params)


def failed(src: Any) -> str:
    """The source's migration failed: its error."""
    with pytest.raises(Exception) as info:
        src.wait_migration(WAIT)
    return str(info.value)


@pytest.mark.parametrize("version", ["10", "7.2"])
def test_tls_migration_with_client_certificates(receivers, tmp_path, pki, version):
    ram_file, ram = ram_bytes(tmp_path, MEM)
    rx = receivers("tcp:127.0.0.1:0", "--tls-creds", pki["server"], "--tls-verify-peer",
                   "--ram-dir", str(tmp_path / "ram"))
    with qemu(version, mem=f"{MEM}M", ram_file=ram_file, name="source",
              capabilities=["return-path"]) as src:
        tls_source(src, pki["client"])
        src.migrate(rx.address)
        assert src.wait_migration(WAIT)["status"] == "completed"
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram


def test_tls_without_a_return_path_loses_nothing_at_the_end(receivers, tmp_path, pki):
    """A source without a return path never reads its socket: anything the receiver had sent
    it (TLS 1.3 session tickets, unasked) would make its close a reset, which discards the end
    of the stream in flight. None is sent; the RAM arrives whole."""
    ram_file, ram = ram_bytes(tmp_path, 64)
    rx = receivers("tcp:127.0.0.1:0", "--tls-creds", pki["server"],
                   "--ram-dir", str(tmp_path / "ram"))
    with qemu("10", mem="64M", ram_file=ram_file, name="source") as src:
        tls_source(src, pki["client"])
        src.migrate(rx.address)
        assert src.wait_migration(WAIT)["status"] == "completed"
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram


def test_tls_by_address_without_tls_hostname(receivers, pki):
    """No tls-hostname: QEMU checks the URI's host, 127.0.0.1 (in the certificate's SANs)."""
    rx = receivers("tcp:127.0.0.1:0", "--tls-creds", pki["server"])
    with qemu("10", mem=f"{MEM}M", name="source", capabilities=["return-path"]) as src:
        tls_source(src, pki["client"], hostname=None)
        src.migrate(rx.address)
        assert src.wait_migration(WAIT)["status"] == "completed"
    assert rx.wait() == 0, rx.stderr


def test_a_source_that_does_not_trust_us(receivers, pki):
    """Its CA did not sign our certificate: QEMU hangs up after the handshake; one line."""
    rx = receivers("tcp:127.0.0.1:0", "--tls-creds", pki["server"])
    with qemu("10", mem=f"{MEM}M", name="source") as src:
        tls_source(src, pki["client-other-ca"])
        src.migrate(rx.address)
        assert "known issuer" in failed(src)
    assert rx.wait() == 1
    assert "did it refuse our certificate?" in rx.error_line()


def test_a_client_certificate_we_do_not_trust(receivers, pki):
    """(With TLS 1.3 the client's handshake is over before the server has checked the client's
    certificate: the source learns of the refusal by the reset, on its return path.)"""
    rx = receivers("tcp:127.0.0.1:0", "--tls-creds", pki["server"], "--tls-verify-peer")
    with qemu("10", mem=f"{MEM}M", name="source", capabilities=["return-path"]) as src:
        tls_source(src, pki["client-other-cert"])
        src.migrate(rx.address)
        failed(src)
    assert rx.wait() == 1
    line = rx.error_line()
    assert line.startswith("offset 0: TLS handshake with the source failed: "), line
    assert "certificate" in line


@pytest.mark.parametrize("version", ["10", "7.2"])
def test_a_plaintext_source_is_refused(receivers, pki, version):
    rx = receivers("tcp:127.0.0.1:0", "--tls-creds", pki["server"])
    # with a return path the source waits for an answer, so it always sees the hang-up
    with qemu(version, mem=f"{MEM}M", name="source", capabilities=["return-path"]) as src:
        src.migrate(rx.address)
        failed(src)
    assert rx.wait() == 1
    assert rx.error_line() == (
        "offset 0: the source sent a plaintext migration stream (QEVM) where a TLS handshake "
        "should begin: set tls-creds on the source too, or run without --tls-creds")


def test_forward_over_tls_into_a_tls_destination(receivers, tmp_path, pki):
    """TLS in and TLS out: a TLS source, the receiver, a TLS destination that wants a client
    certificate (verify-peer is on by default for its server endpoint); with a return path,
    relayed inside both sessions. The destination completes and resumes."""
    with qemu("10", mem=f"{MEM}M", paused=False, name="source",
              capabilities=["return-path"]) as src, \
            qemu("10", mem=f"{MEM}M", incoming=True, paused=False, name="destination",
                 capabilities=["return-path"]) as dst:
        dst.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0",
                                 "dir": pki["server"], "endpoint": "server"})
        dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
        rx = receivers("tcp:127.0.0.1:0", "--tls-creds", pki["server"],
                       "--forward", dst.listen(), "--forward-tls-creds", pki["client"],
                       "--forward-tls-hostname", "localhost")
        tls_source(src, pki["client"])
        src.migrate(rx.address)
        assert src.wait_migration(WAIT)["status"] == "completed"
        assert dst.wait_migration(WAIT)["status"] == "completed"
        assert dst.status() == "running"
        assert rx.wait() == 0, rx.stderr


def test_forward_to_a_destination_whose_name_does_not_match(receivers, pki):
    """The source hears of it (SHUT 1 on its return path), and the line names the name."""
    with qemu("10", mem=f"{MEM}M", name="source", capabilities=["return-path"]) as src, \
            qemu("10", mem=f"{MEM}M", incoming=True, name="destination") as dst:
        dst.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0",
                                 "dir": pki["server"], "endpoint": "server"})
        dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
        rx = receivers("tcp:127.0.0.1:0", "--forward", dst.listen(), "--forward-tls-creds",
                       pki["client"], "--forward-tls-hostname", "elsewhere.example")
        src.migrate(rx.address)
        failed(src)
    assert rx.wait() == 1
    line = rx.error_line()
    assert "TLS handshake with the destination failed" in line and "elsewhere.example" in line


def test_tls_set_up_over_qmp_as_libvirt_does(receivers, tmp_path, pki):
    """defer; object-add tls-creds-x509 (endpoint server, verify-peer on: the source must show
    a client certificate); migrate-set-parameters tls-creds; migrate-incoming; a TLS source."""
    from tests.destination_util import QmpClient
    from tests.qmp_harness import event_loop

    ram_file, ram = ram_bytes(tmp_path, MEM)
    path = str(tmp_path / "rx.qmp")
    rx = receivers("--qmp", f"unix:{path}", "defer", "--ram-dir", str(tmp_path / "ram"))
    with event_loop():
        qmp = QmpClient(path)
        try:
            qmp.ok("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0",
                                    "dir": pki["server"], "endpoint": "server"})
            qmp.ok("migrate-set-parameters", **{"tls-creds": "tls0"})
            qmp.ok("migrate-set-capabilities", capabilities=[
                {"capability": c, "state": True} for c in ("events", "return-path")])
            qmp.ok("migrate-incoming", uri="tcp:127.0.0.1:0")
            address = rx.line().removeprefix("listening on ")
            with qemu("10", mem=f"{MEM}M", ram_file=ram_file, name="source",
                      capabilities=["return-path"]) as src:
                tls_source(src, pki["client"])
                src.migrate(address)
                assert src.wait_migration(WAIT)["status"] == "completed"
            assert qmp.statuses("completed") == ["setup", "active", "completed"]
            qmp.ok("quit")
        finally:
            qmp.close()
    assert rx.wait() == 0, rx.stderr
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == ram
