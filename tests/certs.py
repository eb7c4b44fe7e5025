"""Certificates for the TLS tests, made with the openssl command (no Python crypto package).

``make_certs(dir)`` writes a CA, a server certificate it signs for ``localhost`` and 127.0.0.1, and
an unrelated self-signed certificate (for verification failures), and returns their paths.
"""

from __future__ import annotations

import os
import ssl
import subprocess

from tests.peers import need


def _run(*argv: str, cwd: str) -> None:
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: str) -> dict[str, str]:
    openssl = need("openssl")["openssl"]
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _run(openssl, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
         "-subj", "/CN=qioc test CA", cwd=d)
    _run(openssl, "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _run(openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    _run(openssl, "req", "-x509", *ec, "-keyout", "other.key", "-out", "other.pem", "-days", "2",
         "-subj", "/CN=somebody else", cwd=d)
    return {name: os.path.join(d, name) for name in
            ("ca.pem", "server.pem", "server.key", "other.pem", "other.key")}


def server_context(certs: dict[str, str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs["server.pem"], certs["server.key"])
    return ctx


def client_context(certs: dict[str, str], ca: str = "ca.pem") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs[ca])
    return ctx
