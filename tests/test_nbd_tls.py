"""NBD over TLS (STARTTLS): our server with nbdinfo over ``nbds+unix://``, our client against
``qemu-nbd --object tls-creds-x509``, and ours with ours. Certificates are made here with the
openssl CLI: a CA, a server certificate for localhost / 127.0.0.1, a client certificate."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess

import pytest

import qioc_green
from qioc_green.nbd import Client, MemoryExport
from tests.nbdutil import COPY, InProcessServer, run, server_proc, stop_pid, tcp_uri, unix_uri
from tests.peers import need

pytest.importorskip("qioc_green.channel_tls")

MiB = 1 << 20
pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca-cert.pem, server-cert.pem/-key.pem, client-cert.pem/-key.pem (the names QEMU and libnbd
    look for in a directory)."""
    need("openssl")
    d = tmp_path_factory.mktemp("pki")

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
         "-days", "2", "-subj", "/CN=qioc test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for who, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                     ("client", "extendedKeyUsage=clientAuth")):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}-key.pem", "-out", f"{who}.csr",
             "-subj", f"/CN={'localhost' if who == 'server' else 'qioc client'}")
        (d / f"{who}.ext").write_text(ext + "\nkeyUsage=critical,digitalSignature,keyEncipherment\n")
        ossl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "2", "-extfile", f"{who}.ext")
    return d


def client_context(pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
    ctx.load_cert_chain(str(pki / "client-cert.pem"), str(pki / "client-key.pem"))
    return ctx


def server_context(pki, verify_clients: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki / "server-cert.pem"), str(pki / "server-key.pem"))
    if verify_clients:
        ctx.load_verify_locations(str(pki / "ca-cert.pem"))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def test_our_server_with_nbdinfo_over_tls(pki, tmp_path) -> None:
    need("nbdinfo", "nbdcopy")
    sock = str(tmp_path / "s.sock")
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(2 * MiB))
    args = ["--listen", f"unix:{sock}", "--export", f"d={img}", "--tls-cert", str(pki / "server-cert.pem"),
            "--tls-key", str(pki / "server-key.pem"), "--tls-ca", str(pki / "ca-cert.pem"), "--tls", "require"]
    with server_proc(args) as srv:
        uri = f"nbds+unix:///d?socket={sock}&tls-certificates={pki}"
        info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == 2 * MiB
        out = tmp_path / "out.img"
        run(["nbdcopy", "--connections=2", uri, str(out)])
        assert out.read_bytes() == img.read_bytes()
        # plaintext is refused: TLS is required
        plain = run(["nbdinfo", unix_uri(sock, "d")], check=False)
        assert plain.returncode != 0
        assert srv.proc.poll() is None


def test_our_client_with_qemu_nbd_over_tls(pki, tmp_path) -> None:
    need("qemu-nbd")
    img = tmp_path / "q.img"
    content = os.urandom(3 * MiB)
    img.write_bytes(content)
    with socket.socket() as s:  # a free loopback port for qemu-nbd
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pidfile = str(tmp_path / "q.pid")
    run(["qemu-nbd", "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={pki}",
         "--tls-creds", "tls0", "-f", "raw", "-t", "-x", "exp", "--shared=4", "-b", "127.0.0.1",
         "-p", str(port), "--fork", "--pid-file", pidfile, str(img)])
    pid = int(open(pidfile).read())
    try:
        qioc_green.main_context()
        with qioc_green.IOThreadPool(2, name="tls") as pool, \
                Client(f"nbds://127.0.0.1:{port}/exp", connections=2, contexts=pool.contexts,
                       tls_context=client_context(pki)) as c:
            assert bytes(c.pread(3 * MiB, 0)) == content
            c.pwrite(b"T" * 4096, MiB, fua=True)

            def read_back(k: int) -> bytes:
                return bytes(c.pread(4096, MiB))

            assert [f.result(10) for f in [ctx.spawn(read_back, k) for k, ctx in enumerate(pool.contexts)]] \
                == [b"T" * 4096] * 2
        with pytest.raises(ConnectionError, match="STARTTLS|TLS"):
            Client(f"nbd://127.0.0.1:{port}/exp")  # no TLS: qemu-nbd refuses
    finally:
        stop_pid(pid)
    assert img.read_bytes()[MiB:MiB + 4096] == b"T" * 4096


def test_our_client_with_our_server_over_tls_in_iothreads(pki, tmp_path) -> None:
    export = MemoryExport("m", 8 * MiB)
    with InProcessServer([export], str(tmp_path / "s.sock"), iothreads=2,
                         tls_context=server_context(pki, verify_clients=True), tls_required=True) as srv, \
            qioc_green.IOThreadPool(2, name="req") as pool:
        ctx = client_context(pki)
        ctx.check_hostname = False  # a UNIX socket has no host name to check
        with Client(f"nbds+unix:///m?socket={srv.sock}", connections=2, contexts=pool.contexts,
                    tls_context=ctx) as c:
            def work(k: int) -> None:
                for i in range(k, 32, 2):
                    c.pwrite(bytes([i]) * (128 * 1024), i * 128 * 1024)
                for i in range(k, 32, 2):
                    assert c.pread(128 * 1024, i * 128 * 1024) == bytes([i]) * (128 * 1024)

            for fut in [cx.spawn(work, k) for k, cx in enumerate(pool.contexts)]:
                fut.result(30)
        with pytest.raises(ConnectionError, match="ERR_TLS_REQD"):
            Client(f"nbd+unix:///m?socket={srv.sock}")


def test_nbd_copy_over_tls_checks_the_host_name(pki, tmp_path) -> None:
    """qioc-nbd-copy nbds://HOST takes a server whose certificate (from the CA it is given) names
    HOST, and refuses, with one line and before a byte is copied, one whose certificate is for
    another name, as libnbd and QEMU do: the CA alone does not say which server it is."""
    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True, timeout=30)

    (tmp_path / "other.ext").write_text("subjectAltName=DNS:other.example\n"
                                        "extendedKeyUsage=serverAuth\n")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "other-key.pem", "-out", "other.csr",
         "-subj", "/CN=other.example")
    ossl("x509", "-req", "-in", "other.csr", "-CA", str(pki / "ca-cert.pem"), "-CAkey",
         str(pki / "ca-key.pem"), "-CAcreateserial", "-out", "other-cert.pem", "-days", "2",
         "-extfile", "other.ext")
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(MiB))
    for cert, ok in (("server", True), ("other", False)):
        d = pki if cert == "server" else tmp_path
        args = ["--listen", "tcp:127.0.0.1:0", "--export", f"d={img}", "--tls", "require",
                "--tls-cert", str(d / f"{cert}-cert.pem"), "--tls-key", str(d / f"{cert}-key.pem")]
        with server_proc(args) as srv:
            uri = "nbds" + tcp_uri(srv.addresses[0], "d").removeprefix("nbd")
            out = tmp_path / f"{cert}.img"
            res = run([*COPY, uri, str(out), "--tls-ca", str(pki / "ca-cert.pem")], check=False)
        if ok:
            assert res.returncode == 0, res.stderr
            assert out.read_bytes() == img.read_bytes()
        else:
            assert res.returncode == 1 and not out.exists(), res.stderr
            assert res.stderr.startswith(f"qioc-nbd-copy: {uri}: "), res.stderr
            assert "127.0.0.1" in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
