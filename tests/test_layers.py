"""The package's structure: imports point down the layers, no module reads another's privates.

Read from the source with ``ast`` (imports under ``TYPE_CHECKING`` and inside functions
count too), so a new upward import or cross-module private access fails here.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "friendli_image"

#: Bottom to top. A module may import modules of its own layer or of lower layers only.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"_version", "_blocking", "_clock", "_exceptions", "_formats"}),
    frozenset({"_secrets"}),
    frozenset({"_config"}),
    frozenset({"_images"}),
    frozenset({"_requests"}),
    frozenset({"_results"}),
    frozenset({"_batch_models"}),
    frozenset({"_request_path"}),
    frozenset({"_serde", "_compat", "models", "testing", "utils"}),
    frozenset({"_retry"}),
    frozenset({"_telemetry"}),
    frozenset({"_transport"}),
    frozenset({"_fleet"}),
    frozenset({"_store"}),
    frozenset({"_batch"}),
    frozenset({"_resources"}),
    frozenset({"_client"}),
    frozenset({"_sync"}),
    frozenset({"_gallery"}),
    frozenset({"ray"}),
    frozenset({"_cli"}),
    frozenset({"__init__", "__main__"}),
)


def _module_name(path: pathlib.Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def _sources() -> Iterator[tuple[str, pathlib.Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield _module_name(path), path, ast.parse(path.read_text(encoding="utf-8"))


def _imported_modules(path: pathlib.Path, tree: ast.Module) -> Iterator[tuple[str, int]]:
    """Top-level package modules this file imports (relative or absolute), with line."""
    depth = len(path.relative_to(PACKAGE).parts) - 1
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 < depth:  # inside the same subpackage
                    continue
                if node.module:
                    yield node.module.split(".")[0], node.lineno
                else:
                    yield from ((alias.name, node.lineno) for alias in node.names)
            elif node.module and node.module.split(".")[0] == "friendli_image":
                parts = node.module.split(".")
                if len(parts) > 1:
                    yield parts[1], node.lineno
                else:
                    yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "friendli_image" and len(parts) > 1:
                    yield parts[1], node.lineno


def _layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if module in layer:
            return index
    raise AssertionError(f"module {module!r} is in no layer; add it to LAYERS")


def test_every_module_is_in_a_layer() -> None:
    """Each module of the package has a place in the layering (the server stands apart)."""
    for module, _path, _tree in _sources():
        if module != "server":
            _layer_of(module)


def test_imports_point_down_the_layers() -> None:
    """No module imports one of a higher layer, not even under TYPE_CHECKING or lazily."""
    upward = []
    for module, path, tree in _sources():
        if module == "server":
            continue
        for target, line in _imported_modules(path, tree):
            if target in {module, "server"}:
                continue
            if _layer_of(target) > _layer_of(module):
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert upward == []


def test_the_bundled_server_imports_nothing_of_the_sdk() -> None:
    """friendli_image.server is a peer for tests: it shares no code with the client."""
    for module, path, tree in _sources():
        if module != "server":
            continue
        targets = {target for target, _line in _imported_modules(path, tree)}
        assert targets <= {"server"}, f"{path} imports {targets}"


def _private_names_defined(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def test_no_module_reads_another_modules_private_names() -> None:
    """A private name (``_x``) is used only in the module that defines it."""
    sources = list(_sources())
    defined = {path: _private_names_defined(tree) for _module, path, tree in sources}
    ours = set().union(*defined.values())
    offences = []
    for module, path, tree in sources:
        if module == "server":
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.ImportFrom) and node.level) or (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("friendli_image")
            ):
                offences.extend(
                    f"{path.relative_to(PACKAGE)}:{node.lineno} imports {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_")
                    and not alias.name.startswith("__")
                    and alias.name not in {"_version"}
                )
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr in ours
                and node.attr not in defined[path]
            ):
                offences.append(f"{path.relative_to(PACKAGE)}:{node.lineno} reads .{node.attr}")
    assert offences == []


@pytest.mark.parametrize(
    ("module", "name"),
    [("_exceptions", "FriendliConnectionError")],
)
def test_retry_flags_are_declared_on_the_error_class(module: str, name: str) -> None:
    """The flags the retry policy reads are constructor arguments of the error class."""
    import importlib
    import inspect

    cls = getattr(importlib.import_module(f"friendli_image.{module}"), name)
    parameters = inspect.signature(cls).parameters
    assert {"permanent", "stale_connection"} <= parameters.keys()
    error = cls("x")
    assert error.permanent is False
    assert error.stale_connection is False


#: Lazy imports (inside functions) that `_sync._before_fork` need not finish, and why.
_NOT_IN_A_FACADE_THREAD = {
    "cattrs": "imported by `converter()`, which the fork hook calls",
    "cattrs.gen": "imported by `converter()`, which the fork hook calls",
    "pydantic_core": "only pydantic calls `ImageResult.__get_pydantic_core_schema__`",
}
#: Modules whose lazy imports run in the command line, the Ray stage or the server only.
_OUTSIDE_THE_FACADE = ("_cli", "ray", "server")


def _lazy_imports() -> Iterator[tuple[str, str]]:
    """(module file, imported module) of each import inside a function of the SDK."""
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0].removesuffix(".py") in _OUTSIDE_THE_FACADE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    yield from ((str(relative), alias.name) for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    yield str(relative), node.module


def test_every_lazy_import_is_finished_before_a_fork() -> None:
    """A fork while a facade thread imports a module leaves the child that module's import
    lock, and its first import of it hangs: `_before_fork` finishes the SDK's lazy
    imports first. Its list is checked against the code here, so a new lazy import
    cannot be left out of it."""
    from friendli_image._sync import _HEAVY_LAZY_MODULES, _LAZY_MODULES

    heavy = {name.partition(".")[0] for name in _HEAVY_LAZY_MODULES}
    missing = [
        f"{where}: {name}"
        for where, name in _lazy_imports()
        if name not in _LAZY_MODULES
        and name.partition(".")[0] not in heavy
        and name not in _NOT_IN_A_FACADE_THREAD
    ]
    assert not missing, f"add to _sync._LAZY_MODULES (or say why not): {missing}"
