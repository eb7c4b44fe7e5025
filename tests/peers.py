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


def need_qemu10() -> dict[str, object]:
    """QEMU 10's ``binary`` and ``data_dirs`` (keyword arguments of ``qioc_green.migration.qemu``'s
    ``Qemu`` and ``capture*``), or skip (fail under QIOC_REQUIRE_PEERS=1). It lives beside the
    system's 7.2, unpacked by ``.ci/install-qemu10``; ``QIOC_QEMU10`` says where."""
    from qioc_green.migration.qemu import QEMU10_DIR, qemu10

    found = qemu10()
    if found is None:
        msg = f"QEMU 10 not found in {QEMU10_DIR} (set QIOC_QEMU10, or run .ci/install-qemu10)"
        if REQUIRED:
            pytest.fail(msg + " (QIOC_REQUIRE_PEERS=1)", pytrace=False)
        pytest.skip(msg)
    return found


QEMU_VERSIONS = ("7.2", "10.0")


def need_qemu_version(version: str) -> dict[str, object]:
    """Keyword arguments for ``qioc_green.migration.qemu.Qemu`` that run QEMU ``version``
    ("7.2": the system's, "10.0": the one beside it), or skip (fail under QIOC_REQUIRE_PEERS=1).
    Every live migration test runs against both where both apply."""
    if version == "10.0":
        return need_qemu10()
    need("qemu-system-x86_64")
    return {}
