"""Finding the real peer programs the interop tests drive.

A missing peer skips its test, unless ``QIOC_REQUIRE_PEERS=1`` is set (as ``.ci/run`` does), in
which case it fails: CI must never pass by skipping the very tests that talk to real programs.
"""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRED = os.environ.get("QIOC_REQUIRE_PEERS") == "1"


def need(*programs: str) -> dict[str, str]:
    """Return {name: path} for each program, or skip (fail under QIOC_REQUIRE_PEERS=1)."""
    found = {}
    missing = []
    for prog in programs:
        path = shutil.which(prog)
        if path is None:
            missing.append(prog)
        else:
            found[prog] = path
    if missing:
        msg = "peer program(s) not installed: " + ", ".join(missing)
        if REQUIRED:
            pytest.fail(msg + " (QIOC_REQUIRE_PEERS=1)", pytrace=False)
        pytest.skip(msg)
    return found


def need_qemu10() -> list[str]:
    """The argv prefix that runs QEMU 10.0's system emulator, or skip (fail when required).

    It is unpacked beside 7.2 by ``.ci/install-qemu10`` into ``$QIOC_QEMU10`` (default
    /opt/qioc-qemu10), so its ROMs are found with ``-L``.
    """
    root = os.environ.get("QIOC_QEMU10", "/opt/qioc-qemu10")
    binary = os.path.join(root, "usr", "bin", "qemu-system-x86_64")
    if not os.access(binary, os.X_OK):
        msg = f"QEMU 10.0 not found at {binary} (run .ci/install-qemu10, or set QIOC_QEMU10)"
        if REQUIRED:
            pytest.fail(msg + " (QIOC_REQUIRE_PEERS=1)", pytrace=False)
        pytest.skip(msg)
    return [binary, "-L", os.path.join(root, "usr", "share", "qemu"),
            "-L", os.path.join(root, "usr", "share", "seabios")]
