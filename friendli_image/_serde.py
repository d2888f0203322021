"""The one cattrs converter: request models to the JSON bytes of the wire.

Requests leave out ``None`` fields (the server treats a missing key and ``null`` alike,
and the body stays minimal); JSON is written by orjson. We do not use cattrs' JSON
preset: it writes bytes as base85, while the wire wants base64 strings built by the
image coercion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cattrs
import orjson
from cattrs.gen import make_dict_unstructure_fn

from ._models import EditRequest, GenerateRequest, ImageInput

__all__ = ["converter", "dumps_request"]

converter = cattrs.Converter()


def _without_none(cls: type[Any]) -> Callable[[Any], dict[str, Any]]:
    unstructure = make_dict_unstructure_fn(cls, converter)

    def hook(instance: Any) -> dict[str, Any]:
        return {key: value for key, value in unstructure(instance).items() if value is not None}

    return hook


for _cls in (GenerateRequest, EditRequest):
    converter.register_unstructure_hook(_cls, _without_none(_cls))
converter.register_unstructure_hook(ImageInput, lambda item: {"image": item.image})


def dumps_request(request: GenerateRequest | EditRequest) -> bytes:
    """Serialize a request model to the JSON body sent on the wire."""
    return orjson.dumps(converter.unstructure(request))
