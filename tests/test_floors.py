"""What sets the aiohttp floor in pyproject.toml, checked on the installed aiohttp.

``nox -s tests_lowest`` runs the whole suite with every dependency at its floor; these
tests say *why* a floor is where it is, so a change that needs a newer aiohttp (or one
that reaches into its private modules) fails here with the name, not deep in a call.
The patch level, 3.10.6, is tests/reliability/test_security.py's: on 3.10.0-3.10.5 HTTPS
calls leave an unclosed TLS transport (a ResourceWarning, an error under our warnings
filter). The cattrs floor is pinned by tests/test_models.py (the request bodies).
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
import inspect
import pathlib
from collections.abc import Iterator

import aiohttp

from friendli_image._transport import Connector

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "friendli_image"

#: The aiohttp modules that are public API (documented, stable across 3.x).
PUBLIC_AIOHTTP_MODULES = frozenset({"aiohttp", "aiohttp.abc", "aiohttp.web"})


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (never run, so free to name anything)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _aiohttp_uses() -> Iterator[tuple[str, str, str]]:
    """``(where, module, name)`` for each aiohttp name the package uses at run time."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = _type_checking_lines(tree)
        for node in ast.walk(tree):
            where = f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', 0)}"
            if getattr(node, "lineno", 0) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiohttp"):
                for alias in node.names:
                    yield where, node.module or "", alias.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("aiohttp."):
                        yield where, alias.name.rpartition(".")[0], alias.name.rpartition(".")[2]
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "aiohttp"
            ):
                yield where, "aiohttp", node.attr


def test_every_aiohttp_name_used_exists_and_is_public() -> None:
    """Each aiohttp name the package uses at run time exists on this aiohttp, from a public
    module. ConnectionTimeoutError and SocketTimeoutError (the transport's connect vs read
    timeouts) are what put the floor at aiohttp 3.10."""
    uses = list(_aiohttp_uses())
    assert ("aiohttp", "ConnectionTimeoutError") in {(m, n) for _, m, n in uses}
    private = [
        f"{where}: {module}" for where, module, _ in uses if module not in PUBLIC_AIOHTTP_MODULES
    ]
    assert private == [], "use aiohttp's public names (private modules only under TYPE_CHECKING)"
    missing = []
    for where, module, name in uses:
        found = importlib.import_module(module)
        if not hasattr(found, name) and importlib.util.find_spec(f"{module}.{name}") is None:
            missing.append(f"{where}: {module}.{name}")
    assert missing == [], (
        f"aiohttp {aiohttp.__version__} lacks these; raise the floor in pyproject.toml"
    )


def test_connect_and_read_timeouts_are_timeouts_of_their_own() -> None:
    """The transport tells a connect timeout from a read timeout by class, and both before
    the generic asyncio timeout: the two are distinct subclasses of it."""
    connect, read = aiohttp.ConnectionTimeoutError, aiohttp.SocketTimeoutError
    assert issubclass(connect, asyncio.TimeoutError)
    assert issubclass(read, asyncio.TimeoutError)
    assert not issubclass(connect, read)
    assert not issubclass(read, connect)


def test_the_connector_overrides_aiohttps_connection_steps_as_they_are() -> None:
    """Connector overrides ``connect`` and the private ``_create_connection`` (a
    TraceConfig would cost ~20 µs a request); both must keep aiohttp's signature."""
    for name in ("connect", "_create_connection"):
        theirs = list(inspect.signature(getattr(aiohttp.TCPConnector, name)).parameters)
        ours = list(inspect.signature(getattr(Connector, name)).parameters)
        assert theirs == ours == ["self", "req", "traces", "timeout"], (
            f"aiohttp {aiohttp.__version__} changed TCPConnector.{name}{theirs}: "
            "update friendli_image._transport.Connector"
        )
