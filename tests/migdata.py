"""The captured migrations in tests/data, loaded (see tests/data/README.md)."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

DATA = Path(__file__).parent / "data"

# A capture of several connections in one file (tests/data/*.conns.gz): gzip of b"QIOCMIG\x01",
# be32 count, then per connection (in accept order) be64 length and its bytes.
_CONNS_MAGIC = b"QIOCMIG\x01"


def load(name: str) -> bytes:
    """A single-connection capture, ``tests/data/NAME.mig.gz``, decompressed."""
    return gzip.decompress((DATA / f"{name}.mig.gz").read_bytes())


def pack_connections(conns: Sequence[bytes]) -> bytes:
    parts = [_CONNS_MAGIC, len(conns).to_bytes(4, "big")]
    for data in conns:
        parts += [len(data).to_bytes(8, "big"), data]
    return b"".join(parts)


def unpack_connections(blob: bytes) -> list[bytes]:
    if blob[:8] != _CONNS_MAGIC:
        raise ValueError("not a connections capture (magic)")
    count = int.from_bytes(blob[8:12], "big")
    out, pos = [], 12
    for _ in range(count):
        n = int.from_bytes(blob[pos : pos + 8], "big")
        out.append(blob[pos + 8 : pos + 8 + n])
        pos += 8 + n
    if pos != len(blob) or any(len(c) == 0 for c in out):
        raise ValueError("connections capture is cut or has trailing bytes")
    return out


def load_connections(name: str) -> list[bytes]:
    """A multi-connection capture, ``tests/data/NAME.conns.gz``: each connection's bytes."""
    return unpack_connections(gzip.decompress((DATA / f"{name}.conns.gz").read_bytes()))
