"""Finding the real peer programs the interop tests drive.

A missing peer skips its test, unless ``QIOC_REQUIRE_PEERS=1`` is set (as ``.ci/run`` does), in
which case it fails: CI must never pass by skipping the very tests that talk to real programs.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

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


def qemu_args(version: str = "7.2") -> dict[str, Any]:
    """``binary`` and ``data_dirs`` for ``qioc_green.migration.qemu.Qemu`` (and ``capture``):
    QEMU ``version`` ("7.2", Debian's, or "10", unpacked beside it), or skip (fail when
    required).

    QEMU 10.0 is unpacked by ``.ci/install-qemu10`` into ``$QIOC_QEMU10`` (default
    /opt/qioc-qemu10), so its ROMs are found with ``-L``.
    """
    if version == "7.2":
        return {"binary": need("qemu-system-x86_64")["qemu-system-x86_64"], "data_dirs": []}
    if version != "10":
        raise ValueError(f"QEMU {version!r}: the peers are 7.2 and 10")
    root = os.environ.get("QIOC_QEMU10", "/opt/qioc-qemu10")
    binary = os.path.join(root, "usr", "bin", "qemu-system-x86_64")
    if not os.access(binary, os.X_OK):
        msg = f"QEMU 10.0 not found at {binary} (run .ci/install-qemu10, or set QIOC_QEMU10)"
        if REQUIRED:
            pytest.fail(msg + " (QIOC_REQUIRE_PEERS=1)", pytrace=False)
        pytest.skip(msg)
    return {"binary": binary, "data_dirs": [os.path.join(root, "usr", "share", "qemu"),
                                            os.path.join(root, "usr", "share", "seabios")]}


def need_qemu10() -> list[str]:
    """The argv prefix that runs QEMU 10.0's system emulator, or skip (fail when required)."""
    args = qemu_args("10")
    return [args["binary"], *(a for d in args["data_dirs"] for a in ("-L", d))]
