"""The layout keeps its promises: the library never loads the tool packages, the tools use only
the library's public API and no private name of another file, modules stay h11-sized, and
``pip install .`` into a fresh venv gives the three commands, working from outside the checkout.
"""

from __future__ import annotations

import ast
import configparser
import gzip
import importlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import qioc_green
from tests.peers import need

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qioc_green"
TOOLS = ("migration", "nbd")
MAX_LINES = 600
COMMANDS = {"qioc-migration-receiver", "qioc-nbd-server", "qioc-nbd-copy"}


def tool_modules() -> list[Path]:
    return sorted(p for tool in TOOLS for p in (PACKAGE / tool).glob("*.py"))


def core_modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def test_importing_the_library_loads_neither_tool_package():
    code = ("import sys, qioc_green; "
            "print(sorted(m for m in sys.modules if m.startswith(('qioc_green.migration', "
            "'qioc_green.nbd'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd="/", check=True)
    assert out.stdout.strip() == "[]"


def test_the_core_never_imports_the_tool_packages():
    for path in core_modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                names = {a.name for a in node.names}
                assert not (node.level and (mod.split(".")[0] in TOOLS or names & set(TOOLS))), path
                assert not any(mod.startswith(f"qioc_green.{t}") for t in TOOLS), path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith(("qioc_green.migration", "qioc_green.nbd"))
                               for a in node.names), path


def _imported_modules(tree: ast.Module) -> dict[str, str]:
    """Local names bound to modules: ``import x.y as z`` and ``from . import protocol as p``."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name
        elif isinstance(node, ast.ImportFrom) and node.level and not node.module:
            for a in node.names:
                out[a.asname or a.name] = "." + a.name
    return out


def test_tool_packages_use_only_public_names():
    """From qioc_green only what ``qioc_green.__all__`` lists; from a sibling module only
    names without a leading underscore; no ``module._private`` anywhere."""
    public = set(qioc_green.__all__)
    problems = []
    for path in tool_modules():
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 0 and mod.startswith("qioc_green"):
                    rest = mod.removeprefix("qioc_green").lstrip(".")
                    if rest and rest.split(".")[0] not in TOOLS:
                        problems.append(f"{where}:{node.lineno}: imports qioc_green.{rest}")
                    if not rest:
                        problems += [f"{where}:{node.lineno}: qioc_green.{a.name} is not public"
                                     for a in node.names if a.name not in public]
                if node.level == 2:
                    problems.append(f"{where}:{node.lineno}: reaches into the core relatively")
                problems += [f"{where}:{node.lineno}: imports private {a.name} from {mod or '.'}"
                             for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("qioc_green.") and a.name.split(".")[1] not in TOOLS:
                        problems.append(f"{where}:{node.lineno}: imports {a.name}")
        modules = _imported_modules(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                problems.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and modules.get(node.value.id) == "qioc_green" and node.attr not in public
                    and node.attr not in TOOLS):
                problems.append(f"{where}:{node.lineno}: qioc_green.{node.attr} is not public")
    assert problems == []


def test_tool_modules_are_h11_sized():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in tool_modules()}
    assert {k: n for k, n in sizes.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_package_all_is_sorted_and_complete(tool):
    mod = importlib.import_module(f"qioc_green.{tool}")
    assert mod.__all__ == sorted(mod.__all__)
    assert [n for n in mod.__all__ if not hasattr(mod, n)] == []


def test_console_scripts_point_at_the_programs():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = dict(line.split(" = ") for line in
                   cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert set(scripts) == COMMANDS
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_no_file_edits_the_import_path():
    needle = "sys." + "path"  # spelled apart so this file does not find itself
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    if not tracked:  # not a git checkout (an sdist): look at the files themselves
        tracked = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    hits = []
    for name in tracked:
        path = ROOT / name
        if path.suffix in (".gz", ".png") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        hits += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert hits == []


# -- a pip user's install: a fresh venv outside the checkout ------------------------------------


def _wait_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no line in time"
    return proc.stdout.readline().strip()


@pytest.mark.slow
@pytest.mark.peers
@pytest.mark.timeout(120)
def test_pip_install_into_a_fresh_venv_gives_working_commands(tmp_path):
    """``pip install .`` (not editable) into a new venv; then, from a directory outside the
    checkout, the receiver parses a bundled capture, the demo replays the one the package
    ships, and the NBD server answers ``nbdinfo``."""
    nbdinfo = need("nbdinfo")["nbdinfo"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                          str(ROOT)], capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert pip.returncode == 0, pip.stderr[-2000:]
    bin_ = venv / "bin"
    assert {p.name for p in bin_.iterdir()} >= COMMANDS
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_}:{env.get('PATH', '')}"
    work = tmp_path / "elsewhere"
    work.mkdir()

    stream = work / "pc.mig"
    stream.write_bytes(gzip.decompress((ROOT / "tests" / "data" / "pc.mig.gz").read_bytes()))
    rx = subprocess.run(["qioc-migration-receiver", f"file:{stream}", "--json", "-", "--quiet"],
                        capture_output=True, text=True, timeout=60, cwd=work, env=env)
    assert rx.returncode == 0, rx.stderr
    assert '"complete": true' in rx.stdout and '"machine": "pc-i440fx-7.2"' in rx.stdout

    demo = subprocess.run([str(bin_ / "python"), "-m", "qioc_green.migration.demo", "--no-qemu"],
                          capture_output=True, text=True, timeout=60, cwd=work, env=env)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "complete: True" in demo.stdout

    sock = work / "nbd.sock"
    srv = subprocess.Popen(["qioc-nbd-server", "--listen", f"unix:{sock}", "--memory", "m=1M"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work,
                           env=env)
    try:
        assert _wait_line(srv, 30) == f"listening on unix:{sock}"
        info = subprocess.run([nbdinfo, f"nbd+unix:///m?socket={sock}"], capture_output=True,
                              text=True, timeout=30)
        assert info.returncode == 0, info.stderr
        assert "1048576" in info.stdout
        srv.send_signal(signal.SIGTERM)
        assert srv.wait(15) == 0
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.communicate(timeout=10)
    copy = subprocess.run(["qioc-nbd-copy", "--help"], capture_output=True, text=True, timeout=30,
                          cwd=work, env=env)
    assert copy.returncode == 0 and copy.stdout.startswith("usage: qioc-nbd-copy")
