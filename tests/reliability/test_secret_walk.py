"""Scenario 55: no public class of the package lets a token reach a repr, str, pickle or log.

The classes are found, not listed: every public module of ``friendli_image`` (and of the
bundled server), every class in its ``__all__``. Each is built from samples chosen by
parameter name (then by annotation), with the token wherever a parameter can carry one
(``token``, ``http_headers``, ``client_options``, a server's ``config``...). A class whose
required parameters have no sample fails the test until one is added, so a new class
cannot slip past. Every object built is checked: repr, str, pickle (refused, or without
the token), a log record that formats it, and its attributes, where a credential may
live only inside the secret types.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import pickle
import pkgutil
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import friendli_image
from friendli_image import AsyncFriendli, SyncFriendli

from .harness import TINY_PNG, TOKEN, Figures

BEARER = f"Bearer {TOKEN}"
HEADERS = {"Authorization": BEARER, "X-Trace": "t"}
URL = "http://127.0.0.1:9"

#: Samples by parameter name: the ones that can carry a credential get the token.
SAMPLES: dict[str, Callable[[], Any]] = {
    "token": lambda: TOKEN,
    "http_headers": lambda: dict(HEADERS),
    "client_options": lambda: {"token": TOKEN, "http_headers": dict(HEADERS)},
    "url": lambda: URL,
    "message": lambda: "boom",
    "loc": lambda: ["body", "prompt"],
    "field": lambda: "prompt",
    "status": lambda: 500,
    "prompt": lambda: "a lighthouse",
    "image": lambda: "https://example.com/a.png",
    "kind": lambda: "ok",
    "cause": lambda: friendli_image.FriendliServerError("boom", status=500),
    "error": lambda: friendli_image.FriendliServerError("boom", status=500),
    "result": lambda: friendli_image.ImageResult(data=b"\xff\xd8\xff\xe0 a jpeg"),
    "index": lambda: 0,
    "id": lambda: "id",
    "request": lambda: {"prompt": "p", "http_headers": dict(HEADERS)},
    "items": list,
    "initial_interval": lambda: 500,
    "max_interval": lambda: 8000,
    "exponent": lambda: 2.0,
    "max_elapsed_time": lambda: 60000,
    "per_endpoint": lambda: 1,
    "endpoints": lambda: 1,
    "done": lambda: 0,
    "total": lambda: 1,
}
#: Samples by the annotation's text, for the rest.
BY_ANNOTATION = (
    ("Mapping", dict),
    ("dict", dict),
    ("bool", lambda: False),
    ("float", lambda: 0.0),
    ("int", lambda: 0),
    ("str", lambda: "x"),
    ("tuple", tuple),
    ("Sequence", tuple),
    ("list", list),
)
#: Classes built another way than their constructor: as users get them.
Builder = Callable[[contextlib.ExitStack], Iterator[object]]
BUILDERS: dict[str, Builder] = {}


def builder(name: str) -> Callable[[Builder], Builder]:
    def register(function: Builder) -> Builder:
        BUILDERS[name] = function
        return function

    return register


@builder("Batch")
def _batch(stack: contextlib.ExitStack) -> Iterator[object]:
    # The input iterable stays the caller's object (read lazily); each item's request is
    # checked as the BatchItem it becomes.
    client = AsyncFriendli(server_url=URL, token=TOKEN)
    yield client.container.image.generate_batch([{"prompt": "p"}], http_headers=dict(HEADERS))


@builder("SyncBatch")
def _sync_batch(stack: contextlib.ExitStack) -> Iterator[object]:
    client = stack.enter_context(SyncFriendli(server_url=URL, token=TOKEN))
    yield client.container.image.generate_batch(["p"], http_headers=dict(HEADERS))


@builder("ImageResult")
def _image_result(stack: contextlib.ExitStack) -> Iterator[object]:
    from friendli_image import ImageResult

    yield ImageResult(data=TINY_PNG, request_id="r")


@builder("FriendliUnprocessableEntityError")
def _unprocessable(stack: contextlib.ExitStack) -> Iterator[object]:
    from friendli_image import FriendliUnprocessableEntityError

    yield FriendliUnprocessableEntityError(
        "boom", status=422, details=[{"loc": ["body", "prompt"], "msg": "bad"}]
    )


@builder("Credential")
def _credential(stack: contextlib.ExitStack) -> Iterator[object]:
    from friendli_image.server import Credential

    yield Credential(BEARER)


@builder("RequestRecord")
def _request_record(stack: contextlib.ExitStack) -> Iterator[object]:
    from friendli_image.server import RequestRecord

    yield RequestRecord.arriving("/v1/images/generations", "POST", HEADERS)


@builder("LocalServer")
def _local_server(stack: contextlib.ExitStack) -> Iterator[object]:
    from friendli_image.server import LocalServer, ServerConfig

    server = stack.enter_context(LocalServer(ServerConfig(token=TOKEN, static_image=TINY_PNG)))
    client = stack.enter_context(SyncFriendli(server_url=server.url, token=TOKEN))
    client.container.image.generate(prompt="recorded")
    yield server
    yield server.records
    yield server.config


@builder("ServerConfig")
def _server_config(stack: contextlib.ExitStack) -> Iterator[object]:
    from friendli_image.server import ServerConfig

    yield ServerConfig(token=TOKEN)
    yield ServerConfig(token_env="FRIENDLI_SERVER_TOKEN")


def public_modules() -> list[str]:
    """The package and its public submodules (no component starting with ``_``)."""
    names = ["friendli_image"]
    for info in pkgutil.walk_packages(friendli_image.__path__, "friendli_image."):
        parts = info.name.split(".")[1:]
        if not any(part.startswith("_") for part in parts):
            names.append(info.name)
    return sorted(names)


def _sample(cls: type, parameter: inspect.Parameter) -> Any:
    if parameter.name in SAMPLES:
        return SAMPLES[parameter.name]()
    annotation = str(parameter.annotation)
    for text, make in BY_ANNOTATION:
        if text in annotation:
            return make()
    raise AssertionError(
        f"no sample for parameter {parameter.name!r} of {cls.__module__}.{cls.__qualname__}: "
        "add one to SAMPLES (or a builder), so the class is checked for secrets"
    )


def _construct(cls: type) -> object:
    try:
        signature = inspect.signature(cls)
    except ValueError:
        if issubclass(cls, BaseException):  # Exception's own constructor: any arguments
            return cls("boom")
        raise
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for parameter in signature.parameters.values():
        wanted = parameter.default is inspect.Parameter.empty or parameter.name in (
            "token",
            "http_headers",
            "client_options",
        )
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or not wanted:
            continue
        value = _sample(cls, parameter)
        if parameter.kind is parameter.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[parameter.name] = value
    return cls(*args, **kwargs)


def _build(cls: type, stack: contextlib.ExitStack) -> list[object]:
    if cls.__name__ in BUILDERS:
        return list(BUILDERS[cls.__name__](stack))
    if issubclass(cls, dict) and hasattr(cls, "__total__"):
        return [cls()]  # a TypedDict: a plain dict at run time
    built = _construct(cls)
    close = getattr(built, "close", None)
    if isinstance(built, SyncFriendli) and callable(close):
        stack.callback(close)
    return [built]


def _plain_credentials(value: object, where: str, seen: set[int], depth: int = 0) -> list[str]:
    """Paths under ``value`` where the token sits in a plain str or bytes."""
    from friendli_image._secrets import Secret
    from friendli_image.server import Credential

    if isinstance(value, str):
        return [where] if TOKEN in value else []
    if isinstance(value, bytes | bytearray | memoryview):
        return [where] if TOKEN.encode() in bytes(value) else []
    if (
        depth > 8
        or id(value) in seen
        or isinstance(value, Secret | Credential | type | types.ModuleType)
        or value is None
        or isinstance(value, int | float | logging.Logger | Path)
    ):
        return []
    seen.add(id(value))
    found: list[str] = []
    if isinstance(value, Mapping):
        for key, item in list(value.items()):
            found += _plain_credentials(key, f"{where}[{key!r}]", seen, depth + 1)
            found += _plain_credentials(item, f"{where}[{key!r}]", seen, depth + 1)
        return found
    if isinstance(value, list | tuple | set | frozenset):
        for index, item in enumerate(list(value)):
            found += _plain_credentials(item, f"{where}[{index}]", seen, depth + 1)
        return found
    if isinstance(value, types.FunctionType | types.MethodType):
        cells = getattr(value, "__closure__", None) or ()
        for cell in cells:
            with contextlib.suppress(ValueError):
                found += _plain_credentials(cell.cell_contents, f"{where}.<closure>", seen, depth)
        return found
    attributes: dict[str, Any] = dict(getattr(value, "__dict__", {}))
    for klass in type(value).__mro__:
        for name in getattr(klass, "__slots__", ()):
            if isinstance(name, str) and hasattr(value, name):
                attributes[name] = getattr(value, name)
    for name, item in attributes.items():
        found += _plain_credentials(item, f"{where}.{name}", seen, depth + 1)
    return found


def _leaks(obj: object, label: str) -> list[str]:
    """Where the token shows for ``obj``: repr, str, pickle, a log record, attributes."""
    leaks = []
    if TOKEN in repr(obj):
        leaks.append(f"repr({label})")
    if TOKEN in str(obj):
        leaks.append(f"str({label})")
    try:
        pickled = pickle.dumps(obj)
    except (TypeError, pickle.PicklingError, AttributeError):
        pass  # refusing to be pickled keeps the secret too
    else:
        if TOKEN.encode() in pickled:
            leaks.append(f"pickle({label})")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("friendli_image.tests.secret_walk")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("%s %r", obj, obj)
        log.warning(obj)
    finally:
        log.removeHandler(handler)
    if TOKEN in stream.getvalue():
        leaks.append(f"log({label})")
    leaks += [f"plain text at {path}" for path in _plain_credentials(obj, label, set())]
    return leaks


def public_classes(module_name: str) -> list[type]:
    module = importlib.import_module(module_name)
    classes = []
    for name in getattr(module, "__all__", ()):
        value = getattr(module, name)
        if not inspect.isclass(value) or not value.__module__.startswith("friendli_image"):
            continue
        # A Protocol is an interface, never an instance that could hold a token.
        if typing.Protocol not in value.__mro__:
            classes.append(value)
    return classes


CHECKED: dict[str, int] = {"classes": 0, "objects": 0, "modules": 0}


@pytest.mark.scenario(55)
@pytest.mark.parametrize("module_name", public_modules())
def test_no_public_class_shows_a_secret(module_name: str, figures: Figures) -> None:
    """Every class in the module's ``__all__``, built with the token where it takes one:
    the token is in no repr, str, pickle or log record, nor in a plain attribute."""
    try:
        classes = public_classes(module_name)
    except ImportError as exc:
        if exc.name and not exc.name.startswith("friendli_image"):
            pytest.skip(f"{module_name} needs {exc.name}, not installed here")
        raise
    leaks: list[str] = []
    for cls in classes:
        with contextlib.ExitStack() as stack:
            for index, obj in enumerate(_build(cls, stack)):
                leaks += _leaks(obj, f"{cls.__qualname__}#{index}")
                CHECKED["objects"] += 1
        CHECKED["classes"] += 1
    CHECKED["modules"] += 1
    assert leaks == []
    figures.set(
        "secrets.walk",
        f"{CHECKED['classes']} public classes of {CHECKED['modules']} public modules (found "
        f"through their `__all__`), {CHECKED['objects']} objects built with the token "
        "where they take one: 0 in repr, str, pickle, log records or plain attributes",
    )


def test_the_walk_finds_the_classes_that_hold_tokens() -> None:
    """The discovery reaches what matters: the clients, the Ray spec, the server's."""
    names = {cls.__qualname__ for module in public_modules() for cls in _safe(module)}
    assert {"AsyncFriendli", "SyncFriendli", "BatchOptions", "LocalServer", "ServerConfig"} <= names


def _safe(module_name: str) -> list[type]:
    try:
        return public_classes(module_name)
    except ImportError:
        return []
