#!/usr/bin/env python3
"""Regenerate the captured QEMU migration streams in this directory (needs qemu-system-x86_64).

Each is a real QEMU source, paused (-S), 16 MiB of untouched (zero) RAM, migrated with QMP
``migrate`` over loopback (``qioc_green.migration.qemu.capture``), gzip-compressed:

    pc.mig.gz               -M pc (i440fx)
    q35.mig.gz              -M q35
    none.mig.gz             -M none (RAM and little else)
    pc-nodesc.mig.gz        -M pc,suppress-vmdesc=on: no VM description JSON after EOF
    pc-ignore-shared.mig.gz -M pc with the x-ignore-shared capability: a capabilities
                            subsection in the configuration, a region address per RAM block
    cmd-return-path-7.2.mig.gz
                            -M pc with the return-path capability, relayed to a real
                            destination QEMU (which answers on the return path) while the
                            forward stream is recorded: OPEN_RETURN_PATH, PING
    cmd-postcopy-7.2.mig.gz -M pc with postcopy-ram, switched to postcopy while precopy runs
                            (relayed to a real destination the same way): POSTCOPY_ADVISE,
                            POSTCOPY_RAM_DISCARD, PACKAGED (holding POSTCOPY_LISTEN and _RUN)
    cmd-postcopy-resume-7.2.mig.gz
                            the same, with the connection cut once postcopy runs and the
                            migration recovered (migrate-recover, migrate resume=true): the
                            resumed connection only (no stream header): RECV_BITMAP per RAM
                            block, POSTCOPY_RESUME, then the rest of RAM
    cmd-colo-7.2.mig.gz     -M pc with x-colo into the sink: ENABLE_COLO, then the whole state
                            (the source is killed once it waits for a COLO secondary)
    cmd-return-path-10.0.mig.gz
                            QEMU 10.0 (``$QIOC_QEMU10``, default /opt/qioc-qemu10), its default
                            -M pc, with return-path: OPEN_RETURN_PATH, PING, SWITCHOVER_START

and the copy of pc.mig.gz that the package ships for the demo
(``qioc_green/migration/data/pc.mig.gz``).

Run: ``python tests/data/make_streams.py [NAME...]`` (from anywhere; needs the package installed
with ``qemu.qmp``: ``pip install -e '.[test]'``). Two captures of one VM differ in a few bytes
(clock state), so tests never pin hashes of these files.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
from typing import Any

from qioc_green.migration.qemu import capture

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
QEMU10 = os.environ.get("QIOC_QEMU10", "/opt/qioc-qemu10")
QEMU10_ARGS: dict[str, Any] = {
    "binary": os.path.join(QEMU10, "usr/bin/qemu-system-x86_64"),
    "data_dirs": [os.path.join(QEMU10, "usr/share/qemu"), os.path.join(QEMU10, "usr/share/seabios")],
}

STREAMS: dict[str, dict[str, Any]] = {
    "pc": {"machine": "pc"},
    "q35": {"machine": "q35"},
    "none": {"machine": "none"},
    "pc-nodesc": {"machine": "pc", "machine_opts": "suppress-vmdesc=on"},
    "pc-ignore-shared": {"machine": "pc", "capabilities": ["x-ignore-shared"]},
    "cmd-return-path-7.2": {"machine": "pc", "capabilities": ["return-path"], "destination": True},
    "cmd-postcopy-7.2": {"machine": "pc", "postcopy": True},
    "cmd-postcopy-resume-7.2": {"machine": "pc", "recover": True},
    "cmd-colo-7.2": {"machine": "pc", "colo": True},
    "cmd-return-path-10.0": {"machine": "pc", "capabilities": ["return-path"], "destination": True,
                             **QEMU10_ARGS},
}


def main(names: list[str]) -> None:
    for name in names or STREAMS:
        data = capture(mem="16M", **STREAMS[name])
        path = os.path.join(HERE, f"{name}.mig.gz")
        with open(path, "wb") as f:
            # mtime=0: regenerating an identical stream gives an identical file
            f.write(gzip.compress(data, 9, mtime=0))
        print(f"{path}: {len(data)} bytes, {os.path.getsize(path)} compressed")
        if name == "pc":
            shipped = os.path.join(ROOT, "qioc_green", "migration", "data", "pc.mig.gz")
            shutil.copyfile(path, shipped)
            print(f"{shipped}: copied from pc.mig.gz")


if __name__ == "__main__":
    main(sys.argv[1:])
