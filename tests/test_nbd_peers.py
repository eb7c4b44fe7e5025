"""Interop with real NBD peers: our server (``qioc-nbd-server``, a child process) with
qemu-img, qemu-io, nbdinfo and nbdcopy; our client (and ``qioc-nbd-copy``) with qemu-nbd and nbdkit.

Everything on UNIX sockets or 127.0.0.1, every peer bounded by a timeout and stopped by pid.
"""

from __future__ import annotations

import filecmp
import json
import os
import signal

import pytest

import qioc_green
from qioc_green.nbd import Client
from tests.nbdutil import COPY, nbdkit, qemu_nbd, run, server_proc, tcp_uri, unix_uri
from tests.peers import need

MiB = 1 << 20
pytestmark = pytest.mark.peers


def make_image(path, size: int = 16 * MiB, data: list[tuple[int, int]] = ((0, 3 * MiB), (8 * MiB, 2 * MiB))) -> bytes:
    """A sparse file: random data in ``data`` ranges, holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in data:
            f.seek(off)
            f.write(os.urandom(n))
    with open(path, "rb") as f:
        return f.read()


def nbdinfo_map(uri: str) -> list[tuple[int, int, int]]:
    out = run(["nbdinfo", "--map", "--json", uri]).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def merged(extents: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for off, n, t in extents:
        if out and out[-1][2] == t and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, t)
        else:
            out.append((off, n, t))
    return out


# ---------------------------------------------------------------------------------------------
# Our server


@pytest.fixture
def served(tmp_path):
    need("nbdinfo")
    img = tmp_path / "disk.img"
    content = make_image(img)
    ro = tmp_path / "ro.img"
    ro.write_bytes(b"r" * MiB)
    sock = str(tmp_path / "s.sock")
    args = ["--listen", f"unix:{sock}", "--listen", "tcp:127.0.0.1:0", "--iothreads", "2",
            "--export", f"disk={img}", "--export", f"ro={ro},ro", "--memory", "mem=64M"]
    with server_proc(args, n_addresses=2) as srv:
        srv.sock = sock  # type: ignore[attr-defined]
        srv.img = img  # type: ignore[attr-defined]
        srv.content = content  # type: ignore[attr-defined]
        yield srv


def test_our_server_with_qemu_img(served, tmp_path) -> None:
    need("qemu-img")
    uri = unix_uri(served.sock, "disk")
    info = json.loads(run(["qemu-img", "info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == 16 * MiB
    out = tmp_path / "out.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)])
    assert out.read_bytes() == served.content
    # into the export, over TCP: a new image replaces the old one
    src = tmp_path / "new.img"
    new = make_image(src, data=[(MiB, 5 * MiB), (12 * MiB, MiB)])
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), tcp_uri(served.addresses[1], "disk")])
    assert served.img.read_bytes() == new


def test_our_server_with_qemu_io(served) -> None:
    need("qemu-io")
    uri = tcp_uri(served.addresses[1], "mem")
    res = run(["qemu-io", "-f", "raw", uri,
               "-c", "write -P 0xab 1M 3M", "-c", "write -P 0x5c 100 7",
               "-c", "read -P 0xab 1M 3M", "-c", "read -P 0x5c 100 7", "-c", "read -P 0 0 100",
               "-c", "write -z 2M 1M", "-c", "read -P 0 2M 1M", "-c", "read -P 0xab 3M 1M",
               "-c", "flush"])
    assert "Pattern verification failed" not in res.stdout + res.stderr
    # a read-only export: QEMU sees READ_ONLY and refuses to open it for writing; read-only, it reads
    ro = run(["qemu-io", "-f", "raw", unix_uri(served.sock, "ro"), "-c", "write -P 1 0 512"], check=False)
    assert ro.returncode and "Permission denied" in ro.stdout + ro.stderr
    res = run(["qemu-io", "-r", "-f", "raw", unix_uri(served.sock, "ro"), "-c", "read -P 0x72 0 1M"])
    assert "Pattern verification failed" not in res.stdout + res.stderr


def test_our_server_with_nbdinfo(served) -> None:
    listing = run(["nbdinfo", "--list", "--json", unix_uri(served.sock)]).stdout
    names = {e["export-name"] for e in json.loads(listing)["exports"]}
    assert names == {"disk", "ro", "mem"}
    # the server's file paths are not told to clients (qemu-nbd sends no description unless -D)
    described = [e.get("description", "") for e in json.loads(listing)["exports"]]
    assert not any(str(served.img.parent) in d for d in described), described
    assert run(["nbdinfo", "--can", "multi-conn", unix_uri(served.sock, "disk")], check=False).returncode == 0
    assert nbdinfo_map(unix_uri(served.sock, "disk")) == [
        (0, 3 * MiB, 0), (3 * MiB, 5 * MiB, 3), (8 * MiB, 2 * MiB, 0), (10 * MiB, 6 * MiB, 3)]
    assert nbdinfo_map(tcp_uri(served.addresses[1], "mem")) == [(0, 64 * MiB, 3)]


def test_our_server_with_nbdcopy_both_ways(served, tmp_path) -> None:
    need("nbdcopy")
    out = tmp_path / "out.img"
    run(["nbdcopy", "--connections=4", unix_uri(served.sock, "disk"), str(out)])
    assert out.read_bytes() == served.content
    src = tmp_path / "in.img"
    new = make_image(src, data=[(0, MiB), (4 * MiB, 9 * MiB)])
    run(["nbdcopy", "--connections=4", str(src), tcp_uri(served.addresses[1], "disk")])
    assert served.img.read_bytes() == new


def test_our_server_survives_rude_clients_and_stops_on_sigterm(served) -> None:
    import socket

    for payload in (b"garbage" * 10, b"", b"\0" * 3):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(served.sock)
            s.recv(18)
            s.sendall(payload)
    assert nbdinfo_map(unix_uri(served.sock, "disk"))[0] == (0, 3 * MiB, 0)
    assert served.stop(signal.SIGTERM) == 0
    err = served.finish()
    assert "Traceback" not in err, err
    assert err.count("protocol error") <= 2, err


def test_acknowledged_writes_survive_sigkill(tmp_path) -> None:
    """FUA writes, and writes followed by FLUSH, are in the file after the server is killed."""
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    sock = str(tmp_path / "s.sock")
    with server_proc(["--listen", f"unix:{sock}", "--export", f"d={img}"]) as srv:
        qioc_green.main_context()
        c = Client(unix_uri(sock, "d"))
        try:
            c.pwrite(b"F" * MiB, 0, fua=True)
            c.pwrite(b"W" * MiB, 2 * MiB)
            c.pwrite(b"w" * 4096, 5 * MiB)
            c.flush()
        finally:
            os.kill(srv.pid, signal.SIGKILL)  # no goodbye: the server dies with the client attached
            srv.proc.wait(10)
            c.close(timeout=2)
    data = img.read_bytes()
    assert data[:MiB] == b"F" * MiB
    assert data[2 * MiB:3 * MiB] == b"W" * MiB
    assert data[5 * MiB:5 * MiB + 4096] == b"w" * 4096


# ---------------------------------------------------------------------------------------------
# Our client against qemu-nbd and nbdkit


def copy_prog(*args: str) -> dict:
    res = run([*COPY, "--json", "--progress", *args], timeout=60)
    assert res.stderr.endswith("\n") and "100.0%" in res.stderr  # the progress line, finished
    return json.loads(res.stdout)


def test_our_client_with_qemu_nbd(tmp_path) -> None:
    need("qemu-nbd", "nbdinfo")
    img = tmp_path / "q.img"
    content = make_image(img, size=32 * MiB, data=[(0, MiB), (5 * MiB, 7 * MiB), (31 * MiB, MiB)])
    sock = str(tmp_path / "q.sock")
    uri = unix_uri(sock, "exp")
    with qemu_nbd(str(img), sock):
        qioc_green.main_context()
        with qioc_green.IOThreadPool(2, name="cli") as pool, \
                Client(uri, connections=4, contexts=pool.contexts) as c:
            assert c.connections == 4 and c.size == 32 * MiB
            assert [(o, n, f) for o, n, f in c.map()] == merged(nbdinfo_map(uri))
            assert bytes(c.pread(32 * MiB, 0)) == content
        out = tmp_path / "out.img"
        res = copy_prog(uri, str(out), "--connections", "4", "--iothreads", "2", "--requests", "16")
        assert res["data_bytes"] == 9 * MiB
        assert filecmp.cmp(out, img, shallow=False)
        # file -> qemu-nbd
        src = tmp_path / "src.img"
        new = make_image(src, size=32 * MiB, data=[(2 * MiB, 3 * MiB), (20 * MiB, 4 * MiB)])
        copy_prog(str(src), uri, "--connections", "4", "--iothreads", "2")
    assert img.read_bytes() == new


@pytest.mark.parametrize("plugin", ["file", "memory"])
def test_our_client_with_nbdkit(tmp_path, plugin: str) -> None:
    need("nbdkit", "nbdinfo")
    sock = str(tmp_path / "k.sock")
    uri = unix_uri(sock)
    img = tmp_path / "k.img"
    content = make_image(img, size=24 * MiB, data=[(MiB, 2 * MiB), (10 * MiB, 5 * MiB)])
    args = ["file", f"file={img}"] if plugin == "file" else ["memory", "24M"]
    with nbdkit(sock, *args):
        qioc_green.main_context()
        if plugin == "memory":
            copy_prog(str(img), uri, "--connections", "2", "--iothreads", "2")
        with Client(uri, connections=2) as c:
            assert c.map() == merged(nbdinfo_map(uri))
            data_ranges = [(o, n) for o, n, f in c.map() if not f & 2]
            assert sum(n for _, n in data_ranges) >= 7 * MiB
            assert bytes(c.pread(24 * MiB, 0)) == content
        out = tmp_path / "out.img"
        copy_prog(uri, str(out), "--connections", "2", "--iothreads", "2", "--requests", "8")
    assert out.read_bytes() == content


def test_nbd_copy_cli_errors(tmp_path) -> None:
    res = run([*COPY, "a.img", "b.img"], check=False)
    assert res.returncode == 2
    res = run([*COPY, unix_uri(str(tmp_path / "none.sock"), "x"), "null:"], check=False)
    assert res.returncode == 1 and "qioc-nbd-copy:" in res.stderr and "Traceback" not in res.stderr


def test_nbd_copy_failures_name_the_side(tmp_path) -> None:
    """Each failure of qioc-nbd-copy is one line naming the side it came from (a URI or a path):
    a read-only or smaller NBD destination is refused before a byte is written, a missing
    file, a server that is not there, a device that fills up."""
    img = tmp_path / "d.img"
    content = make_image(img, size=4 * MiB, data=[(0, MiB)])
    sock = str(tmp_path / "s.sock")
    with server_proc(["--listen", f"unix:{sock}", "--export", f"ro={img},ro",
                      "--memory", "small=1M"]):
        ro, small = unix_uri(sock, "ro"), unix_uri(sock, "small")
        missing, gone = str(tmp_path / "none.img"), unix_uri(str(tmp_path / "none.sock"), "x")
        cases = [(str(img), ro, f"{ro}: the export is read-only"),
                 (str(img), small, f"{small}: 1048576 bytes, smaller than the source's 4194304"),
                 (missing, small, f"{missing}: No such file or directory"),
                 (gone, "null:", f"{gone}: "),
                 (ro, "/dev/full", "/dev/full: writing "),
                 ("nbds" + small.removeprefix("nbd"), "null:",
                  f"nbds{small.removeprefix('nbd')}: nbd-client-0: server refused STARTTLS: "
                  "ERR_UNSUP")]
        for src, dst, want in cases:
            res = run([*COPY, src, dst], check=False)
            assert res.returncode == 1, res.stderr
            assert res.stderr.startswith(f"qioc-nbd-copy: {want}"), res.stderr
            assert len(res.stderr.splitlines()) == 1, res.stderr
        assert run(["nbdinfo", "--map", small]).stdout.split()[3:] == ["hole,zero"]
    assert img.read_bytes() == content


def test_nbd_server_stops_cleanly_as_soon_as_it_says_it_listens(tmp_path) -> None:
    """SIGTERM right after the "listening on" line (a supervisor's readiness signal) is a clean
    stop, exit status 0: the handlers are in place before the line is printed (it was the
    default action, death by SIGTERM, when it came first)."""
    import subprocess

    from tests.nbdutil import ENV, SERVER

    for _ in range(3):
        proc = subprocess.Popen([*SERVER, "--listen", f"unix:{tmp_path}/s.sock", "--memory", "m=1M"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith("listening on ")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]


def test_nbd_server_cli_errors(tmp_path) -> None:
    from tests.nbdutil import SERVER

    res = run([*SERVER, "--listen", f"unix:{tmp_path}/s.sock"], check=False)
    assert res.returncode == 2 and "--export" in res.stderr
    # bad usage, told before anything is opened: exit status 2
    for argv, why in ((["--listen", "bogus", "--memory", "m=1M"], "--listen bogus: address"),
                      (["--listen", f"unix:{tmp_path}/s.sock", "--memory", "m=1M", "--memory",
                        "m=2M"], "export 'm' given twice")):
        res = run([*SERVER, *argv], check=False, timeout=10)
        assert res.returncode == 2 and why in res.stderr, res.stderr
    # no request could ever be served: every client would hang
    res = run([*SERVER, "--listen", f"unix:{tmp_path}/s.sock", "--memory", "m=1M",
               "--max-requests", "0"], check=False, timeout=10)
    assert res.returncode == 2 and "--max-requests must be at least 1" in res.stderr
    res = run([*SERVER, "--listen", f"unix:{tmp_path}/s.sock", "--export",
               f"d={tmp_path}/missing.img"], check=False)
    assert res.returncode == 1 and "missing.img" in res.stderr and "Traceback" not in res.stderr
    # the TLS files are named with the option, whatever is wrong with them (ssl names neither)
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 4096)
    for cert, key, why in (("missing.pem", "missing.pem", "No such file or directory"),
                           (str(img), str(img), "not a usable PEM file")):
        res = run([*SERVER, "--listen", f"unix:{tmp_path}/s.sock", "--export", f"d={img}",
                   "--tls-cert", cert, "--tls-key", key], check=False)
        assert res.returncode == 1, res.stderr
        assert res.stderr.startswith(f"qioc-nbd-server: --tls-cert/--tls-key {cert} {key}: {why}")
    for prog in (SERVER, COPY):  # plain text, not the reST of the docstrings
        out = run([*prog, "--help"]).stdout
        assert out.startswith("usage:") and "``" not in out and ":func:" not in out, out
