"""The one cattrs converter: request models to the JSON bytes of the wire.

Requests leave out ``None`` fields (the server treats a missing key and ``null`` alike,
and the body stays minimal); JSON is written by orjson. We do not use cattrs' JSON
preset: it writes bytes as base85, while the wire wants base64 strings built by the
image coercion.

The converter is built, and cattrs imported, at the first request serialized, not with
the package: cattrs costs several milliseconds of import time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from ._images import ImageInput
from ._requests import EditRequest, GenerateRequest

if TYPE_CHECKING:
    import cattrs

__all__ = [
    "canonical_request",
    "canonical_wire",
    "converter",
    "dumps_request",
    "unstructure_request",
]

_Unstructure = Callable[[Any], dict[str, Any]]


#: The hook per request model, kept as the converter is built: called directly, with no
#: dispatch per request (and no ``get_unstructure_hook``, which cattrs 23.2 lacks).
_hooks: dict[type[Any], _Unstructure] = {}


@functools.cache
def converter() -> cattrs.Converter:
    """The converter, with a hook per request model that leaves ``None`` fields out."""
    import cattrs  # noqa: PLC0415
    from cattrs.gen import make_dict_unstructure_fn  # noqa: PLC0415

    built = cattrs.Converter()

    def without_none(cls: type[Any]) -> _Unstructure:
        unstructure = make_dict_unstructure_fn(cls, built)

        def hook(instance: Any) -> dict[str, Any]:
            return {key: value for key, value in unstructure(instance).items() if value is not None}

        return hook

    built.register_unstructure_hook(ImageInput, lambda item: {"image": item.image})
    for cls in (GenerateRequest, EditRequest):
        _hooks[cls] = without_none(cls)
        built.register_unstructure_hook(cls, _hooks[cls])
    return built


def unstructure_request(request: GenerateRequest | EditRequest) -> dict[str, Any]:
    """The request model as the dict of the wire (``None`` fields left out)."""
    hook = _hooks.get(type(request))
    if hook is None:
        converter()
        hook = _hooks[type(request)]
    return hook(request)


def dumps_request(request: GenerateRequest | EditRequest) -> bytes:
    """Serialize a request model to the JSON body sent on the wire."""
    return orjson.dumps(unstructure_request(request))


def canonical_request(request: GenerateRequest | EditRequest) -> bytes:
    """The request's canonical JSON (its wire fields, keys sorted): equal requests, equal
    bytes."""
    return canonical_wire(unstructure_request(request))


def canonical_wire(wire: Mapping[str, Any]) -> bytes:
    """The canonical JSON of a request's wire dict: keys sorted."""
    return orjson.dumps(wire, option=orjson.OPT_SORT_KEYS)
