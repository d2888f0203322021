"""Request validation that answers like the real (FastAPI/pydantic) container does."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

import attrs
import orjson

Operation = Literal["generate", "edit"]
ErrorDetail = dict[str, Any]

MAX_SEED = 2**32 - 1
MIN_STEPS, MAX_STEPS = 1, 50


@attrs.frozen(kw_only=True)
class ImageRef:
    """An image input as sent, with the location to blame when it does not decode."""

    loc: tuple[str | int, ...]
    value: str


@attrs.frozen(kw_only=True)
class ParsedRequest:
    """A validated generation or edit request."""

    operation: Operation
    prompt: str
    model: str | None
    steps: int
    guidance: float
    seed: int | None
    image_format: Literal["jpeg", "png"]
    images: tuple[ImageRef, ...]
    """Edit inputs or control images, in request order."""
    weights: tuple[float, ...]
    """One weight per control image (generate); empty for edits."""


class RequestValidationError(Exception):
    """Raised with FastAPI-style error details; the handler answers 422 with them."""

    def __init__(self, errors: list[ErrorDetail]) -> None:
        super().__init__(f"{len(errors)} validation error(s)")
        self.errors = errors


def error(loc: tuple[str | int, ...], msg: str, type_: str) -> ErrorDetail:
    """Build one entry of a 422 ``detail`` list."""
    return {"loc": ["body", *loc], "msg": msg, "type": type_}


class RequestTooComplexError(Exception):
    """The body holds more JSON values than the server parses; the handler answers 413."""


# A JSON string, written so that the regex engine's tight loops do the work (a 60 MiB
# base64 string is one `[^"\\]*` run). An unterminated string runs to the end of the body:
# a match that could fail would be retried from every later quote, in quadratic time.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)


def check_json_items(body: bytes | bytearray, max_items: int) -> None:
    """Refuse a body with more than ``max_items`` list items and object members, unparsed.

    Parsing builds one Python object per value (about 36 bytes per small integer, 14 times
    the two bytes of ``1,``), so a body's item count, not its size, bounds the parse's memory.
    Every item but the first of each container follows a comma outside strings; nesting
    depth is bounded by the parsers (about 1,000). The fast path counts all commas; only a
    body that has more (prompts may hold commas) is scanned for the commas in its strings.
    """
    commas = body.count(b",")
    if commas <= max_items:
        return
    if body.count(b'"') <= 4 * max_items:
        # Few strings: subtract the commas inside them without copying anything.
        inside = sum(body.count(b",", m.start(), m.end()) for m in _JSON_STRING.finditer(body))
        structural = commas - inside
    else:
        structural = _JSON_STRING.sub(b'""', body).count(b",")
    if structural > max_items:
        raise RequestTooComplexError(
            f"request body has {structural + 1} JSON list items and object members; the "
            f"server parses at most {max_items} (a generation or edit request needs a few dozen)"
        )


def parse_json(body: bytes | bytearray, max_items: int | None = None) -> Any:
    """Parse a request body, raising `RequestValidationError` like FastAPI for bad JSON.

    With ``max_items``, first refuse bodies with more items (`check_json_items`).
    """
    if max_items is not None:
        check_json_items(body, max_items)
    if not body.strip():
        raise RequestValidationError(
            [{"loc": ["body"], "msg": "Field required", "type": "missing"}]
        )
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses integers beyond 64 bits and lone surrogates; the stdlib parser takes them,
    # so such bodies reach field validation like they would on the real server.
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise RequestValidationError(
            [{"loc": ["body", 0], "msg": "JSON decode error", "type": "json_invalid"}]
        ) from exc


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(
        value
    )


def _integer(value: object, loc: tuple[str | int, ...], errors: list[ErrorDetail]) -> int | None:
    """The value as an int, or None with the error recorded.

    A float with no fractional part counts: it is an integer to the contract's JSON Schema
    (``20.0`` is valid for ``type: integer``) and to pydantic's lax mode, which the real
    container validates with.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value):
        if value.is_integer():
            return int(value)
        errors.append(
            error(
                loc,
                "Input should be a valid integer, got a number with a fractional part",
                "int_from_float",
            )
        )
        return None
    errors.append(error(loc, "Input should be a valid integer", "int_type"))
    return None


def _image_input(
    value: object, loc: tuple[str | int, ...], errors: list[ErrorDetail]
) -> ImageRef | None:
    if not isinstance(value, dict):
        errors.append(
            error(loc, "Input should be a valid dictionary or instance of ImageInput", "model_type")
        )
        return None
    if "image" not in value:
        errors.append(error((*loc, "image"), "Field required", "missing"))
        return None
    image = value["image"]
    if not isinstance(image, str):
        errors.append(error((*loc, "image"), "Input should be a valid string", "string_type"))
        return None
    if not image.strip():
        errors.append(error((*loc, "image"), "Value error, image must not be empty", "value_error"))
        return None
    return ImageRef(loc=(*loc, "image"), value=image)


def validate_request(body: object, operation: Operation) -> ParsedRequest:
    """Validate a parsed JSON body, raising `RequestValidationError` with every problem found."""
    if not isinstance(body, dict):
        raise RequestValidationError(
            [
                {
                    "loc": ["body"],
                    "msg": "Input should be a valid dictionary or object to extract fields from",
                    "type": "model_attributes_type",
                }
            ]
        )
    errors: list[ErrorDetail] = []

    prompt = body.get("prompt")
    if "prompt" not in body:
        errors.append(error(("prompt",), "Field required", "missing"))
    elif not isinstance(prompt, str):
        errors.append(error(("prompt",), "Input should be a valid string", "string_type"))

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        errors.append(error(("model",), "Input should be a valid string", "string_type"))

    steps = _integer(body.get("num_inference_steps", 20), ("num_inference_steps",), errors)
    if steps is not None and steps < MIN_STEPS:
        errors.append(
            error(
                ("num_inference_steps",),
                f"Input should be greater than or equal to {MIN_STEPS}",
                "greater_than_equal",
            )
        )
    elif steps is not None and steps > MAX_STEPS:
        errors.append(
            error(
                ("num_inference_steps",),
                f"Input should be less than or equal to {MAX_STEPS}",
                "less_than_equal",
            )
        )

    guidance = body.get("guidance_scale", 0.0)
    if not _is_number(guidance):
        errors.append(error(("guidance_scale",), "Input should be a valid number", "float_type"))

    seed = body.get("seed")
    if seed is not None:
        seed = _integer(seed, ("seed",), errors)
        if seed is not None and not 0 <= seed <= MAX_SEED:
            errors.append(
                error(
                    ("seed",),
                    f"Input should be within [0, {MAX_SEED}]",
                    "less_than_equal" if seed > 0 else "greater_than_equal",
                )
            )

    response_format = body.get("response_format")
    if response_format not in (None, "raw", "jpeg"):
        errors.append(
            error(("response_format",), "Input should be 'raw' or 'jpeg'", "literal_error")
        )

    images: list[ImageRef] = []
    weights: list[float] = []
    if operation == "edit":
        if "image" not in body:
            errors.append(error(("image",), "Field required", "missing"))
        else:
            raw = body["image"]
            if isinstance(raw, list):
                if not raw:
                    errors.append(
                        error(
                            ("image",), "Value error, at least one image is required", "value_error"
                        )
                    )
                for index, item in enumerate(raw):
                    ref = _image_input(item, ("image", index), errors)
                    if ref is not None:
                        images.append(ref)
            else:
                ref = _image_input(raw, ("image",), errors)
                if ref is not None:
                    images.append(ref)
    else:
        control = body.get("control_images")
        if control is not None:
            if not isinstance(control, list):
                errors.append(
                    error(("control_images",), "Input should be a valid list", "list_type")
                )
            else:
                for index, item in enumerate(control):
                    ref = _image_input(item, ("control_images", index), errors)
                    if ref is not None:
                        images.append(ref)
        raw_weights = body.get("controlnet_weights")
        if raw_weights is not None:
            if not isinstance(raw_weights, list):
                errors.append(
                    error(("controlnet_weights",), "Input should be a valid list", "list_type")
                )
            else:
                for index, weight in enumerate(raw_weights):
                    loc = ("controlnet_weights", index)
                    if not _is_number(weight):
                        errors.append(error(loc, "Input should be a valid number", "float_type"))
                    elif not 0.0 <= weight <= 1.0:
                        errors.append(error(loc, "Input should be within [0, 1]", "value_error"))
                    else:
                        weights.append(float(weight))
                control_count = len(control) if isinstance(control, list) else 0
                if len(raw_weights) != control_count:
                    errors.append(
                        error(
                            ("controlnet_weights",),
                            "Value error, controlnet_weights must have as many entries as "
                            f"control_images ({len(raw_weights)} != {control_count})",
                            "value_error",
                        )
                    )
        elif isinstance(control, list):
            weights = [1.0] * len(control)

    if errors:
        raise RequestValidationError(errors)
    assert isinstance(prompt, str)  # noqa: S101 -- narrowed by the checks above
    assert steps is not None  # noqa: S101 -- likewise
    return ParsedRequest(
        operation=operation,
        prompt=prompt,
        model=model,
        steps=steps,
        guidance=float(guidance),
        seed=seed,
        image_format="png" if response_format == "raw" else "jpeg",
        images=tuple(images),
        weights=tuple(weights) if operation == "generate" else (),
    )
