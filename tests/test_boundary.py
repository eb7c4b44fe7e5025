"""The layout's promises, checked on the parsed source (no import, no run).

* Only ``_hub`` and ``_context`` touch gevent and greenlet, hubs, loops and inboxes, and the
  ``threading`` module that gevent's monkey patching replaces.
* The core (contexts, waiting, the channel base, errors, sync) never imports a channel kind.
* No import cycle among the library's modules, and no module reaches into another's private names.
* Every module's ``__all__`` is sorted and names every public top-level name it defines (and
  nothing it neither defines nor imports).
* The tool packages (``qioc_green/migration``, ``qioc_green/nbd``, where they exist) use only the
  library's public names.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "qioc_green"
TOOL_PACKAGES = ("migration", "nbd")
HUB_MODULES = {"_hub", "_context"}  # the hub boundary: nothing else touches gevent or a hub
KINDS = {"channel_socket", "channel_file", "channel_command", "channel_tls", "channel_buffer"}
ABOVE_KINDS = {"__init__", "net_listener", "testing"}  # may use the kinds
HUB_ATTRIBUTES = {"loop", "hub", "_inbox"}
NOT_API = {"TypeVar", "ParamSpec"}  # module-level assignments that are not public names


def _library_modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PKG.glob("*.py"))}


MODULES = _library_modules()
CORE = set(MODULES) - KINDS - ABOVE_KINDS


def _imports(tree: ast.Module) -> list[tuple[str, str | None, int]]:
    """Every import anywhere in the module: (module, imported name or None, relative level)."""
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, None, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.extend((node.module or "", alias.name, node.level) for alias in node.names)
    return out


def _sibling_deps(tree: ast.Module) -> set[str]:
    """The library modules this one imports (``from . import x``, ``from .x import y``)."""
    deps = set()
    for module, name, level in _imports(tree):
        if level == 1:
            deps.add(module.split(".")[0] if module else str(name))
        elif module == "qioc_green" or module.startswith("qioc_green."):
            parts = module.split(".")
            deps.add(parts[1] if len(parts) > 1 else str(name))
    return {d for d in deps if d in MODULES}


def test_only_the_hub_modules_import_gevent_or_greenlet():
    bad = []
    for name, tree in MODULES.items():
        if name in HUB_MODULES:
            continue
        for module, _, level in _imports(tree):
            if level == 0 and module.split(".")[0] in ("gevent", "greenlet"):
                bad.append(f"{name}: imports {module}")
    assert bad == []


def test_only_the_hub_modules_use_threading_which_monkey_patching_replaces():
    # gevent's patch_all() makes threading's threads, locks and locals greenlet-based; the
    # library takes the unpatched ones from _hub (OSLock, OSThread, ThreadLocal, ...).
    bad = [f"{name}: imports {module}" for name, tree in MODULES.items() if name not in HUB_MODULES
           for module, _, level in _imports(tree) if level == 0 and module in ("threading", "_thread")]
    assert bad == []


def test_no_installed_module_imports_psutil():
    # psutil is in the test and bench extras only: the library and its tools (the receiver's
    # exec: process trees are read from /proc) run without it.
    bad = [str(p.relative_to(PKG)) for p in sorted(PKG.rglob("*.py"))
           for module, _, level in _imports(ast.parse(p.read_text(), str(p)))
           if level == 0 and module.split(".")[0] == "psutil"]
    assert bad == []


def test_only_the_hub_modules_touch_hubs_loops_and_inboxes():
    bad = []
    for name, tree in MODULES.items():
        if name in HUB_MODULES:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in HUB_ATTRIBUTES:
                bad.append(f"{name}:{node.lineno}: .{node.attr}")
    assert bad == []


def test_the_core_never_imports_a_channel_kind():
    bad = {name: sorted(_sibling_deps(tree) & (KINDS | ABOVE_KINDS))
           for name, tree in MODULES.items() if name in CORE}
    assert {k: v for k, v in bad.items() if v} == {}


def test_no_import_cycle():
    graph = {name: _sibling_deps(tree) - {name} for name, tree in MODULES.items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, path + [node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_no_module_imports_another_modules_private_names():
    bad = []
    for name, tree in MODULES.items():
        for module, imported, level in _imports(tree):
            if level == 1 and module and imported is not None and imported.startswith("_"):
                bad.append(f"{name}: from .{module} import {imported}")
        aliases = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and node.level == 1 and not node.module for alias in node.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")):
                bad.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert bad == []


def _declared_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            assert isinstance(node.value, (ast.List, ast.Tuple)), "__all__ must be a literal list"
            names = []
            for elt in node.value.elts:
                assert isinstance(elt, ast.Constant) and isinstance(elt.value, str), "__all__ holds strings"
                names.append(elt.value)
            return names
    return None


def _public_top_level(tree: ast.Module, *, reexports: bool) -> set[str]:
    names: set[str] = set()

    def add_target(t: ast.expr) -> None:
        if isinstance(t, ast.Name):
            names.add(t.id)
        elif isinstance(t, (ast.Tuple, ast.List)):
            for elt in t.elts:
                add_target(elt)

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            value = node.value
            if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                    and value.func.id in NOT_API):
                continue
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                add_target(t)
        elif reexports and isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update(alias.asname or alias.name for alias in node.names)
    return {n for n in names if not n.startswith("_")}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_all_is_sorted_and_complete(name):
    tree = MODULES[name]
    declared = _declared_all(tree)
    assert declared is not None, f"{name} has no __all__"
    assert declared == sorted(set(declared)), f"{name}.__all__ is not sorted (or repeats a name)"
    public = _public_top_level(tree, reexports=name == "__init__")
    imported = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}  # may be re-exported on purpose, if listed
    missing, unknown = public - set(declared), set(declared) - public - imported
    assert not missing and not unknown, f"{name}.__all__: missing {sorted(missing)}, not defined {sorted(unknown)}"


def _public_api() -> dict[str, set[str]]:
    """Public module name -> its __all__ ("" is the package itself)."""
    api = {"": set(_declared_all(MODULES["__init__"]) or ())}
    for name, tree in MODULES.items():
        if not name.startswith("_"):
            api[name] = set(_declared_all(tree) or ())
    return api


def _tool_packages() -> list[tuple[pathlib.Path, pathlib.Path]]:
    """(package directory, the directory its relative imports climb to for the library).

    The tool packages live in ``qioc_green/`` (where ``from .. import X`` is the library); until
    they move there they are ``examples/migration`` and ``examples/nbdlib``, held to the same
    rule."""
    found = [(PKG / name, PKG) for name in TOOL_PACKAGES if (PKG / name).is_dir()]
    examples = PKG.parent / "examples"
    found += [(examples / name, examples) for name in ("migration", "nbdlib") if (examples / name).is_dir()]
    return found


def tool_package_violations(package: pathlib.Path, root: pathlib.Path, api: dict[str, set[str]]) -> list[str]:
    """What the files of ``package`` import from qioc_green beyond its public API.

    ``root``: the directory a relative import climbing out of the package reaches (the library's,
    for a package inside ``qioc_green/``)."""
    bad = []
    library_reachable = root == PKG
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        depth = len(path.relative_to(root).parts) - 1  # how many package levels below root
        where = f"{path.relative_to(root)}"
        module_aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "qioc_green" or alias.name.startswith("qioc_green."):
                        mod = alias.name.removeprefix("qioc_green").lstrip(".")
                        if mod and mod not in api:
                            bad.append(f"{where}:{node.lineno}: import {alias.name}")
                        module_aliases.add(alias.asname or alias.name.split(".")[0])
                continue
            if not isinstance(node, ast.ImportFrom):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id in module_aliases and node.attr.startswith("_")):
                    bad.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
                continue
            if node.level == 0 and (node.module or "").split(".")[0] == "qioc_green":
                mod = (node.module or "").removeprefix("qioc_green").lstrip(".")
            elif node.level > depth and library_reachable:
                mod = node.module or ""
            else:
                continue  # within the tool package, or not the library at all
            if mod.split(".")[0] in TOOL_PACKAGES:
                continue
            for alias in node.names:
                if mod not in api:
                    bad.append(f"{where}:{node.lineno}: from qioc_green.{mod} (not a public module)")
                elif alias.name not in api[mod]:
                    bad.append(f"{where}:{node.lineno}: {alias.name} is not public in qioc_green{'.' + mod if mod else ''}")
    return bad


@pytest.mark.parametrize("package,root", _tool_packages(), ids=[p.name for p, _ in _tool_packages()])
def test_tool_packages_use_only_the_public_api(package, root):
    assert tool_package_violations(package, root, _public_api()) == []


def test_the_tool_package_check_catches_private_names(tmp_path):
    lib = tmp_path / "qioc_green"
    (lib / "nbd").mkdir(parents=True)
    (lib / "nbd" / "server.py").write_text(
        "from .. import SocketChannel, Waiter\n"
        "from .._hub import sleep\n"
        "from ..channel import _Hidden\n"
        "from qioc_green.channel_tls import TLSChannel\n"
        "from .protocol import Reply\n"
        "import qioc_green as q\n"
        "q._context\n"
    )
    api = {"": {"SocketChannel"}, "channel": {"Channel"}, "channel_tls": {"TLSChannel"}}
    global PKG
    saved, PKG = PKG, lib
    try:
        found = tool_package_violations(lib / "nbd", lib, api)
    finally:
        PKG = saved
    assert [f.split(": ", 1)[1] for f in found] == [
        "Waiter is not public in qioc_green",
        "from qioc_green._hub (not a public module)",
        "_Hidden is not public in qioc_green.channel",
        "q._context",
    ]
