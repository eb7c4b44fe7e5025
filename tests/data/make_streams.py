#!/usr/bin/env python3
"""Regenerate the captured QEMU migration streams in this directory (needs qemu-system-x86_64).

Each is a real QEMU 7.2 source, paused (-S), 16 MiB of untouched (zero) RAM, migrated with QMP
``migrate`` to a loopback socket sink (see tests/migcapture.py), gzip-compressed:

    pc.mig.gz               -M pc (i440fx)
    q35.mig.gz              -M q35
    none.mig.gz             -M none (RAM and little else)
    pc-nodesc.mig.gz        -M pc,suppress-vmdesc=on: no VM description JSON after EOF
    pc-ignore-shared.mig.gz -M pc with the x-ignore-shared capability: a capabilities
                            subsection in the configuration, a region address per RAM block

And from QEMU 10.0 (``peers.qemu10_command()``: ``$QIOC_QEMU10``, default /opt/qioc-qemu10),
paused too; ``-M none`` ones back their 4 MiB of RAM with ``migcapture.pattern_ram`` (normal pages
that compress well, every 7th page zero), so a parser test can rebuild RAM and compare it:

    q35-10.mig.gz                 -M q35 (pc-q35-10.0), 16 MiB zero RAM, plain; carries the
                                  SWITCHOVER_START command 10.0 machines send at switchover
    none-multifd2.conns.gz        -M none, multifd, 2 channels, multifd-compression none
    none-multifd2-zlib.conns.gz   the same with zlib
    none-multifd2-zstd.conns.gz   the same with zstd
    none-mapped-ram.file.gz       -M none, mapped-ram capability, migrate file: (with multifd
                                  on too, 10.0.2 wrote a byte-identical file here: a paused VM's
                                  pages land at the same offsets, and no multifd packets go into
                                  a file; tests/test_mapped_ram.py migrates both live)

``*.conns.gz``: every connection of one migration, in accept order (migcapture.pack_connections);
``*.file.gz``: the migration file itself (sparse on disk; gzip keeps it small).

Run: ``python tests/data/make_streams.py`` (from anywhere; ``--qemu10`` for the QEMU 10 ones
only). Two captures of one VM differ in a few bytes (clock state), so tests never pin hashes of
these files.
"""

from __future__ import annotations

import gzip
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from migcapture import capture, capture_connections, capture_file, pack_connections, pattern_ram
from peers import qemu10_command

STREAMS = {
    "pc": {"machine": "pc"},
    "q35": {"machine": "q35"},
    "none": {"machine": "none"},
    "pc-nodesc": {"machine": "pc", "machine_opts": "suppress-vmdesc=on"},
    "pc-ignore-shared": {"machine": "pc", "capabilities": ["x-ignore-shared"]},
}


PATTERN = {"machine": "none", "mem": "4M"}
STREAMS10 = {
    "q35-10.mig.gz": ("conns", 1, {"machine": "q35", "mem": "16M"}),
    "none-multifd2.conns.gz": ("conns", 3, {**PATTERN, "capabilities": ["multifd"],
                                            "parameters": {"multifd-channels": 2}}),
    "none-multifd2-zlib.conns.gz": ("conns", 3, {
        **PATTERN, "capabilities": ["multifd"],
        "parameters": {"multifd-channels": 2, "multifd-compression": "zlib"}}),
    "none-multifd2-zstd.conns.gz": ("conns", 3, {
        **PATTERN, "capabilities": ["multifd"],
        "parameters": {"multifd-channels": 2, "multifd-compression": "zstd"}}),
    "none-mapped-ram.file.gz": ("file", 0, {**PATTERN, "capabilities": ["mapped-ram"]}),
}


def main10() -> None:
    qemu = qemu10_command()
    if qemu is None:
        sys.exit("QEMU 10 not found (set QIOC_QEMU10, or run .ci/install-qemu10)")
    with tempfile.TemporaryDirectory(prefix="make-streams-") as tmp:
        ram = os.path.join(tmp, "ram")
        with open(ram, "wb") as f:
            f.write(pattern_ram(4 << 20))
        for name, (kind, conns, kwargs) in STREAMS10.items():
            kw = dict(kwargs)
            if kw["machine"] == "none":
                kw["ram_file"] = ram
            if kind == "conns":
                parts = capture_connections(qemu, conns, **kw)  # type: ignore[arg-type]
                data = parts[0] if name.endswith(".mig.gz") else pack_connections(parts)
            else:
                out = os.path.join(tmp, "file")
                capture_file(qemu, out, **kw)  # type: ignore[arg-type]
                with open(out, "rb") as f:
                    data = f.read()
            path = os.path.join(HERE, name)
            with open(path, "wb") as f:
                f.write(gzip.compress(data, 9, mtime=0))
            print(f"{path}: {len(data)} bytes, {os.path.getsize(path)} compressed")


def main() -> None:
    if "--qemu10" in sys.argv[1:]:
        main10()
        return
    for name, kwargs in STREAMS.items():
        data = capture(mem="16M", **kwargs)  # type: ignore[arg-type]
        path = os.path.join(HERE, f"{name}.mig.gz")
        with open(path, "wb") as f:
            # mtime=0: regenerating an identical stream gives an identical file
            f.write(gzip.compress(data, 9, mtime=0))
        print(f"{path}: {len(data)} bytes, {os.path.getsize(path)} compressed")
    main10()


if __name__ == "__main__":
    main()
