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


# QEMU 10.0 lives beside the system's 7.2, unpacked by .ci/install-qemu10 (see PEERS.md): one
# variable says where, and QIOC_REQUIRE_PEERS=1 makes its absence a failure like any peer's.
QEMU10_DIR = os.environ.get("QIOC_QEMU10", "/opt/qioc-qemu10")


def qemu10_command(directory: str | None = None) -> list[str] | None:
    """The argv prefix that runs QEMU 10's qemu-system-x86_64 from its folder, or None."""
    root = directory or QEMU10_DIR
    binary = os.path.join(root, "usr", "bin", "qemu-system-x86_64")
    if not os.access(binary, os.X_OK):
        return None
    return [binary, "-L", os.path.join(root, "usr", "share", "qemu"),
            "-L", os.path.join(root, "usr", "share", "seabios")]


def need_qemu10() -> list[str]:
    """QEMU 10's argv prefix, or skip (fail under QIOC_REQUIRE_PEERS=1)."""
    argv = qemu10_command()
    if argv is None:
        msg = (f"QEMU 10 not found in {QEMU10_DIR} (set QIOC_QEMU10, or run .ci/install-qemu10)")
        if REQUIRED:
            pytest.fail(msg + " (QIOC_REQUIRE_PEERS=1)", pytrace=False)
        pytest.skip(msg)
    return argv
