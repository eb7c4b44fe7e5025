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

Run: ``python tests/data/make_streams.py`` (from anywhere). Two captures of one VM differ in a
few bytes (clock state), so tests never pin hashes of these files.
"""

from __future__ import annotations

import gzip
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from migcapture import capture

STREAMS = {
    "pc": {"machine": "pc"},
    "q35": {"machine": "q35"},
    "none": {"machine": "none"},
    "pc-nodesc": {"machine": "pc", "machine_opts": "suppress-vmdesc=on"},
    "pc-ignore-shared": {"machine": "pc", "capabilities": ["x-ignore-shared"]},
}


def main() -> None:
    for name, kwargs in STREAMS.items():
        data = capture(mem="16M", **kwargs)  # type: ignore[arg-type]
        path = os.path.join(HERE, f"{name}.mig.gz")
        with open(path, "wb") as f:
            # mtime=0: regenerating an identical stream gives an identical file
            f.write(gzip.compress(data, 9, mtime=0))
        print(f"{path}: {len(data)} bytes, {os.path.getsize(path)} compressed")


if __name__ == "__main__":
    main()
