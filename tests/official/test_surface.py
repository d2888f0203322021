"""The official SDK's surface, computed from the installed ``friendli`` 0.16.3 package.

Every public name of ``friendli``, ``friendli.models`` and ``friendli.utils``, and every
public attribute of the client, ``client.container``, ``client.container.image``, the
result and the errors that container-image code can reach, exists in friendli_image or is
covered by an entry of the one table of unsupported names (``_compat.UNSUPPORTED``). The
names container-image code itself touches (the resource module's ``models.*`` references,
the types of their fields, the error classes, the ``utils`` names in the signatures) must
exist here or be named one by one: a family entry (``models.*``) does not excuse them.
The porting guide (docs/guides/porting.md) shows the tables as ``porting_markdown`` renders
them; tests/test_docs.py checks it, without the official package.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("friendli", reason="the surface test reads friendli==0.16.3")

import friendli
import friendli.models as official_models
import friendli.utils as official_utils
from friendli.core import container_image

import friendli_image
from friendli_image import SyncFriendli, models, utils
from friendli_image._compat import DIFFERENCES, UNSUPPORTED
from friendli_image._exceptions import (
    FriendliAPIStatusError,
    FriendliConnectionError,
    FriendliResponseError,
)
from friendli_image._results import ImageResult

_TINY_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


def _public(obj: object) -> set[str]:
    return {name for name in dir(obj) if not name.startswith("_")}


def _own_names(module: types.ModuleType) -> set[str]:
    """A module's public names, without the modules and typing helpers it imported."""
    names = set()
    for name in _public(module):
        value = getattr(module, name)
        if isinstance(value, types.ModuleType) or name in {"TYPE_CHECKING", "annotations"}:
            continue
        origin = getattr(value, "__module__", None)
        if callable(value) and origin is not None and not origin.startswith("friendli"):
            continue  # hashlib.sha256, typing.cast, ...
        names.add(name)
    return names


def _official_instances() -> dict[str, object]:
    import httpx

    client = friendli.SyncFriendli(token="surface")
    response = httpx.Response(422, request=httpx.Request("POST", "http://localhost/"))
    return {
        "SyncFriendli": client,
        "AsyncFriendli": friendli.AsyncFriendli(token="surface"),
        "container": client.container,
        "container.image": client.container.image,
        "result": official_models.ContainerImageGenerateSuccess(image=_TINY_PNG_B64.encode()),
        "SDKError": official_models.SDKError("x", response),
        "FriendliCoreError": official_models.FriendliCoreError("x", response),
        "NoResponseError": official_models.NoResponseError("x"),
        "ResponseValidationError": official_models.ResponseValidationError(
            "x", response, ValueError("x")
        ),
    }


def _our_instances(client: SyncFriendli) -> dict[str, object]:
    status = FriendliAPIStatusError("x", status=422)
    return {
        "SyncFriendli": client,
        "AsyncFriendli": friendli_image.AsyncFriendli(token="surface"),
        "container": client.container,
        "container.image": client.container.image,
        "result": ImageResult(image=_TINY_PNG_B64),
        "SDKError": status,
        "FriendliCoreError": status,
        "NoResponseError": FriendliConnectionError("x"),
        "ResponseValidationError": FriendliResponseError("x", status=200),
    }


def official_surface() -> dict[str, bool]:
    """Every official qualified name, mapped to whether container-image code touches it."""
    surface: dict[str, bool] = {}
    touched = _touched_models()
    for name in _own_names(official_models):
        surface[f"models.{name}"] = name in touched
    touched_utils = _touched_utils()
    for name in _own_names(official_utils):
        surface[f"utils.{name}"] = name in touched_utils
    for name in _own_names(friendli):
        surface[name] = True
    for prefix, instance in _official_instances().items():
        for name in _public(instance):
            surface[f"{prefix}.{name}"] = True
    return surface


def _touched_models() -> set[str]:
    """``models.X`` referenced by the container image resource, the types of their fields
    (transitively), their ``TypedDict`` twins, and the error classes."""
    names = set(re.findall(r"models\.(\w+)", inspect.getsource(container_image)))
    names |= {
        name
        for name in _own_names(official_models)
        if isinstance(getattr(official_models, name), type)
        and issubclass(getattr(official_models, name), BaseException)
        and name
        in {"FriendliCoreError", "NoResponseError", "ResponseValidationError"}
        | {"SDKError", "HTTPValidationError"}
    }
    pending = list(names)
    while pending:
        name = pending.pop()
        value = getattr(official_models, name, None)
        twin = f"{name}TypedDict"
        found = {twin} if hasattr(official_models, twin) else set()
        if isinstance(value, type):
            for hint in typing.get_type_hints(value).values():
                found |= set(re.findall(r"\b[A-Z]\w+", repr(hint)))
            data = getattr(value, "__annotations__", {}).get("data")
            if data:
                found.add(str(data).strip("'\""))
        for candidate in found & _own_names(official_models) - names:
            names.add(candidate)
            pending.append(candidate)
    return names


def _touched_utils() -> set[str]:
    """``utils`` names in the signatures ported code calls (client, generate, edit, retry)."""
    callables: list[Any] = [
        friendli.SyncFriendli.__init__,
        container_image.SyncContainerImage.generate,
        container_image.SyncContainerImage.edit,
        official_utils.RetryConfig.__init__,
    ]
    text = " ".join(str(inspect.signature(call)) for call in callables)
    return {name for name in _own_names(official_utils) if re.search(rf"\b{name}\b", text)}


def _ours_has(name: str, instances: dict[str, object]) -> bool:
    prefix, _, attribute = name.rpartition(".")
    if prefix == "":
        return hasattr(friendli_image, attribute)
    if prefix == "models":
        return hasattr(models, attribute)
    if prefix == "utils":
        return hasattr(utils, attribute)
    return hasattr(instances[prefix], attribute)


@pytest.fixture(scope="module")
def compared() -> Iterator[tuple[dict[str, bool], set[str]]]:
    """The official surface, and the names of it that friendli_image lacks."""
    surface = official_surface()
    with SyncFriendli(token="surface") as client:
        instances = _our_instances(client)
        yield surface, {name for name in surface if not _ours_has(name, instances)}


def test_every_official_name_exists_or_is_declared_unsupported(
    compared: tuple[dict[str, bool], set[str]],
) -> None:
    """Nothing the official SDK offers is missing without an entry saying why."""
    surface, missing = compared
    assert len(surface) > 800  # the whole of friendli.models is read, not a sample
    undeclared = sorted(name for name in missing if not any(e.covers(name) for e in UNSUPPORTED))
    assert undeclared == [], f"add these to friendli_image or to _compat.UNSUPPORTED: {undeclared}"


def test_what_container_image_code_touches_is_offered(
    compared: tuple[dict[str, bool], set[str]],
) -> None:
    """A name container-image code reaches is here, or named one by one (never by a
    family pattern such as ``models.*``)."""
    surface, missing = compared
    touched = {name for name, is_touched in surface.items() if is_touched}
    assert {"models.SDKError", "models.ImageInput", "utils.RetryConfig"} <= touched
    assert {"models.ValidationError", "models.ContainerImageEditBodyTypedDict"} <= touched
    excused_by_family = sorted(
        name
        for name in touched & missing
        if not any(entry.covers(name) and not entry.family for entry in UNSUPPORTED)
    )
    assert excused_by_family == []


def test_every_unsupported_entry_still_covers_something_missing(
    compared: tuple[dict[str, bool], set[str]],
) -> None:
    """The table stays true: each pattern names something official that is not here."""
    _surface, missing = compared
    for entry in UNSUPPORTED:
        for pattern in entry.names:
            single = type(entry)((pattern,), entry.reason)
            assert any(single.covers(name) for name in missing), f"{pattern!r} is offered now"


def test_programs_declare_known_differences() -> None:
    """Each differential program's ``# differs:`` names a declared difference."""
    keys = {difference.key for difference in DIFFERENCES}
    programs = Path(__file__).parent / "programs"
    for path in sorted(programs.glob("*.py")):
        for match in re.finditer(r"^#\s*differs:\s*(\S+)", path.read_text(), re.MULTILINE):
            assert match.group(1) in keys, f"{path.name}: {match.group(1)!r} is not declared"
