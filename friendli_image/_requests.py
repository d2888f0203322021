"""Request models: the bodies of ``generate`` and ``edit``, their value checks and typed dicts.

Models are frozen attrs classes: immutable, slotted, safe to share between threads.
Request models validate (and coerce image inputs) at construction, so a bad value fails
before any I/O; they are the one definition of each operation's fields.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal, TypeAlias, TypedDict

import attrs

from ._exceptions import FriendliInvalidValueError, FriendliValidationError
from ._images import ImageInput, ImageSource, as_list, coerce_edit_images, coerce_images

__all__ = [
    "MAX_SEED",
    "ContainerImageEditBodyImage",
    "ContainerImageEditBodyImageTypedDict",
    "ContainerImageEditBodyTypedDict",
    "ContainerImageGenerateSuccessTypedDict",
    "ContainerImageGenerationBodyTypedDict",
    "EditRequest",
    "GenerateRequest",
    "HTTPValidationErrorData",
    "ImageInputTypedDict",
    "Loc",
    "LocTypedDict",
    "RequestModel",
    "RequestSpec",
    "ResponseFormat",
    "ValidationError",
    "ValidationErrorTypedDict",
    "pick_fields",
    "plain_wire",
    "public_fields",
]

ResponseFormat = Literal["raw", "jpeg"]

#: Seeds are unsigned 32-bit integers: the widest range every diffusion backend accepts.
MAX_SEED: Final = 2**32 - 1
MAX_STEPS: Final = 50


class ImageInputTypedDict(TypedDict):
    """An input image as a dict, ``{"image": <URL, data: URI or base64>}`` (official name)."""

    image: str


#: The official SDK's type of ``edit(image=...)``: one image or a list of them.
ContainerImageEditBodyImage = ImageInput | list[ImageInput]
ContainerImageEditBodyImageTypedDict = ImageInputTypedDict | list[ImageInputTypedDict]


class _GenerationRequired(TypedDict):
    prompt: str


class ContainerImageGenerationBodyTypedDict(_GenerationRequired, total=False):
    """``generate``'s arguments as a dict (official name): ``generate(**body)``."""

    model: str | None
    num_inference_steps: int
    guidance_scale: float
    seed: int | None
    response_format: ResponseFormat | None
    control_images: list[ImageInputTypedDict] | None
    controlnet_weights: list[float] | None


class _EditRequired(TypedDict):
    image: ImageInputTypedDict | list[ImageInputTypedDict]
    prompt: str


class ContainerImageEditBodyTypedDict(_EditRequired, total=False):
    """``edit``'s arguments as a dict (official name): ``edit(**body)``."""

    model: str | None
    num_inference_steps: int
    guidance_scale: float
    seed: int | None
    response_format: ResponseFormat | None


class ContainerImageGenerateSuccessTypedDict(TypedDict):
    """A result as a dict (official name): ``{"image": <base64 bytes>}``."""

    image: bytes


@attrs.frozen(kw_only=True)
class ValidationError:
    """One entry of a 422's ``detail`` list (the official ``models.ValidationError``).

    ``[ValidationError(**item) for item in json.loads(e.body)["detail"]]`` reads the
    server's (or a local refusal's) details. Not an exception, as in the official SDK.
    """

    loc: list[str | int] = attrs.field(converter=list)
    msg: str
    type: str
    input: Any = None
    ctx: Mapping[str, Any] | None = None

    def model_dump(self, **_pydantic: Any) -> dict[str, Any]:
        """The entry as a dict (``input`` and ``ctx`` only when set)."""
        return attrs.asdict(self, filter=lambda _attribute, value: value is not None)


#: One part of a 422 detail's ``loc`` (official names).
Loc: TypeAlias = str | int
LocTypedDict: TypeAlias = str | int


class ValidationErrorTypedDict(TypedDict):
    """A 422 detail entry as a dict (official name)."""

    loc: list[str | int]
    msg: str
    type: str


def _details(value: Iterable[ValidationError | Mapping[str, Any]] | None) -> list[ValidationError]:
    return [
        item if isinstance(item, ValidationError) else ValidationError(**item)
        for item in value or ()
    ]


@attrs.frozen(kw_only=True)
class HTTPValidationErrorData:
    """A 422 body, ``{"detail": [...]}`` (the official ``models.HTTPValidationErrorData``):
    ``HTTPValidationErrorData(**json.loads(e.body))``."""

    detail: list[ValidationError] = attrs.field(factory=list, converter=_details)


def _text(field: str, value: object) -> str:
    """``value`` as a string field takes it in the official models: a str, or bytes as
    their UTF-8 text (pydantic's lax mode)."""
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise FriendliValidationError(field, "bytes that are not UTF-8 text") from None
    if not isinstance(value, str):
        raise FriendliValidationError(field, f"must be a str, got {type(value).__name__}")
    return value


def check_prompt(value: object) -> str:
    """Return the prompt, or raise if it is not a string (or UTF-8 bytes).

    An empty or blank prompt is allowed by the contract (a blank CSV cell), so it is
    sent; the server judges it.
    """
    return _text("prompt", value)


def _real(value: object) -> float | None:
    """``value`` as a finite float, or None if it is no number.

    Taken as the official SDK's models take it: any real number (NumPy's and
    ``Fraction`` too) and its text, such as a CSV cell ``"3.5"``; a bool is 0 or 1, as
    pydantic's lax mode takes it.
    """
    if isinstance(value, bytes | bytearray):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    elif isinstance(value, numbers.Real):
        number = float(value)
    else:
        return None
    return number if math.isfinite(number) else None


def _integer(value: object) -> int | None:
    """``value`` as an int, or None if it is not a whole number.

    Any integer (NumPy's too), a float with no fractional part (``20.0`` from a JSON or
    YAML config) and the text of either (``"7"`` from a CSV file or an environment
    variable), as the official SDK's models take them; a bool is 0 or 1, as pydantic's
    lax mode takes it.
    """
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str | bytes | bytearray):
        with contextlib.suppress(ValueError):
            return int(value.strip())
    number = _real(value)
    return int(number) if number is not None and number.is_integer() else None


def check_steps(value: object) -> int | None:
    """Return the step count as an int, or raise unless it is None (omitted) or a whole
    number. Its range, [1, 50], is checked once every field has its type (`check_ranges`)."""
    if value is None:
        return None
    steps = _integer(value)
    if steps is None:
        raise FriendliValidationError(
            "num_inference_steps", f"must be an int in [1, {MAX_STEPS}], got {value!r}"
        )
    return steps


def check_guidance(value: object) -> float | None:
    """Return the guidance scale as a float, or raise unless it is None or a number
    (finiteness is checked by `check_ranges`)."""
    if value is None:
        return None
    number = _real(value)
    if number is not None:
        return number
    if isinstance(value, numbers.Real):
        return float(value)  # NaN or infinite: refused by check_ranges
    raise FriendliValidationError(
        "guidance_scale", f"must be a finite number, got {type(value).__name__} {value!r}"
    )


def check_ranges(steps: int | None, guidance: float | None) -> None:
    """Refuse what the contract forbids of values of the right type, as the server's 422.

    Run after every field has its type, so a wrong type anywhere is reported first, as
    the official SDK's pydantic models report it before anything is sent.
    """
    if steps is not None and steps < 1:
        raise FriendliInvalidValueError(
            "num_inference_steps",
            f"must be in [1, {MAX_STEPS}], got {steps}",
            msg="Input should be greater than or equal to 1",
            kind="greater_than_equal",
        )
    if steps is not None and steps > MAX_STEPS:
        raise FriendliInvalidValueError(
            "num_inference_steps",
            f"must be in [1, {MAX_STEPS}], got {steps}",
            msg=f"Input should be less than or equal to {MAX_STEPS}",
            kind="less_than_equal",
        )
    if guidance is not None and not math.isfinite(guidance):
        # JSON has no NaN or infinity: pydantic sends null, which the server refuses.
        raise FriendliInvalidValueError(
            "guidance_scale",
            f"must be finite, got {guidance!r}",
            msg="Input should be a valid number",
            kind="float_type",
        )


def check_seed(value: object) -> int | None:
    """Return the seed, or raise unless it is None or an integer.

    The contract states no bound, so any integer is sent (the server judges it).
    """
    if value is None:
        return None
    seed = _integer(value)
    if seed is None:
        raise FriendliValidationError("seed", f"must be an int, got {value!r}")
    return seed


def check_response_format(value: object) -> ResponseFormat | None:
    """Return the response format, or raise unless it is "raw", "jpeg" or None."""
    if value is None or value in {"raw", "jpeg"}:
        return value
    raise FriendliValidationError(
        "response_format", f"must be 'raw', 'jpeg' or None, got {value!r}"
    )


def check_model(value: object) -> str | None:
    """Return the model route, or raise unless it is None or a string (``""`` is sent)."""
    return None if value is None else _text("model", value)


def weights_as_floats(value: object) -> list[float] | None:
    """The ControlNet weights as floats, or raise if one is not a number.

    Any iterable is accepted; it is read once. Ranges are `check_weights`'.
    """
    if value is None:
        return None
    weights = []
    for index, weight in enumerate(as_list(value, "controlnet_weights", "numbers")):
        number = _real(weight)
        if number is None and isinstance(weight, numbers.Real):
            number = float(weight)  # NaN or infinite: refused by check_weights
        if number is None:
            raise FriendliValidationError(
                f"controlnet_weights[{index}]", f"must be a number in [0, 1], got {weight!r}"
            )
        weights.append(number)
    return weights


def check_weights(weights: list[float] | None, control_images: list[ImageInput] | None) -> None:
    """Raise unless each weight is in [0, 1] and there is one per control image."""
    if weights is None:
        return
    for index, number in enumerate(weights):
        field = f"controlnet_weights[{index}]"
        if not math.isfinite(number):
            raise FriendliInvalidValueError(
                field,
                f"must be a finite number in [0, 1], got {number!r}",
                msg="Input should be a valid number",
                kind="float_type",
            )
        if not 0.0 <= number <= 1.0:
            raise FriendliInvalidValueError(
                field, f"must be in [0, 1], got {number!r}", msg="Input should be within [0, 1]"
            )
    images = 0 if control_images is None else len(control_images)
    if len(weights) != images:
        raise FriendliInvalidValueError(
            "controlnet_weights",
            f"has {len(weights)} values for {images} control images; "
            "pass exactly one weight per control image",
            msg="Value error, controlnet_weights must have as many entries as control_images "
            f"({len(weights)} != {images})",
        )


def _control_images(value: Iterable[ImageSource] | None) -> list[ImageInput] | None:
    return None if value is None else coerce_images(value, "control_images")


def _edit_images(value: ImageSource | Iterable[ImageSource]) -> ImageInput | list[ImageInput]:
    return coerce_edit_images(value)


class _OfficialRequestModel:
    """The official request models' pydantic methods that ported code calls."""

    __slots__ = ()

    def model_dump(
        self,
        *,
        mode: Literal["python", "json"] | str = "python",
        include: Iterable[str] | Mapping[str, Any] | None = None,
        exclude: Iterable[str] | Mapping[str, Any] | None = None,
        exclude_defaults: bool = False,
        **_pydantic: Any,
    ) -> dict[str, Any]:
        """The fields that go on the wire, as the official model dumps them (None left out).

        Images are ``{"image": ...}`` dicts; ``include``, ``exclude`` and
        ``exclude_defaults`` work as in pydantic, its other keywords are taken.
        """
        fields = attrs.asdict(self, filter=lambda _attribute, value: value is not None)  # type: ignore[arg-type]
        if exclude_defaults:
            defaults = {field.name: field.default for field in attrs.fields(type(self))}  # type: ignore[arg-type]
            fields = {key: value for key, value in fields.items() if value != defaults[key]}
        return pick_fields(fields, include, exclude)


@attrs.frozen(kw_only=True)
class GenerateRequest(_OfficialRequestModel):
    """The body of ``POST /v1/images/generations``, validated."""

    prompt: str = attrs.field(converter=check_prompt)
    model: str | None = attrs.field(default=None, converter=check_model)
    num_inference_steps: int | None = attrs.field(default=20, converter=check_steps)
    guidance_scale: float | None = attrs.field(default=0.0, converter=check_guidance)
    seed: int | None = attrs.field(default=None, converter=check_seed)
    response_format: ResponseFormat | None = attrs.field(
        default=None, converter=check_response_format
    )
    control_images: list[ImageInput] | None = attrs.field(default=None, converter=_control_images)
    controlnet_weights: Iterable[float] | None = None

    def __attrs_post_init__(self) -> None:
        # Keep the floats, so int weights go on the wire as floats (and a tuple or
        # generator given by the caller becomes the list the type promises).
        weights = weights_as_floats(self.controlnet_weights)
        object.__setattr__(self, "controlnet_weights", weights)
        check_ranges(self.num_inference_steps, self.guidance_scale)
        check_weights(weights, self.control_images)


@attrs.frozen(kw_only=True)
class EditRequest(_OfficialRequestModel):
    """The body of ``POST /v1/images/edits``, validated."""

    image: ImageInput | list[ImageInput] = attrs.field(converter=_edit_images)
    prompt: str = attrs.field(converter=check_prompt)
    model: str | None = attrs.field(default=None, converter=check_model)
    num_inference_steps: int | None = attrs.field(default=20, converter=check_steps)
    guidance_scale: float | None = attrs.field(default=0.0, converter=check_guidance)
    seed: int | None = attrs.field(default=None, converter=check_seed)
    response_format: ResponseFormat | None = attrs.field(
        default=None, converter=check_response_format
    )

    def __attrs_post_init__(self) -> None:
        check_ranges(self.num_inference_steps, self.guidance_scale)


def public_fields(request: GenerateRequest | EditRequest) -> dict[str, Any]:
    """The request's fields as keyword arguments (for logs, manifests and batch items)."""
    return attrs.asdict(request, recurse=False)


RequestModel: TypeAlias = "GenerateRequest | EditRequest"
#: One request of a batch: a mapping of ``generate`` / ``edit`` keyword arguments (per-call
#: ``retries``, ``server_url``, ``timeout_ms`` and ``http_headers`` included), a request
#: model, or (``generate_batch`` only) a prompt string.
RequestSpec: TypeAlias = "Mapping[str, Any] | GenerateRequest | EditRequest | str"


def pick_fields(
    fields: dict[str, Any],
    include: Iterable[str] | Mapping[str, Any] | None,
    exclude: Iterable[str] | Mapping[str, Any] | None,
) -> dict[str, Any]:
    """``fields`` with pydantic's ``include`` / ``exclude`` applied (top-level names)."""
    if include is not None:
        fields = {key: value for key, value in fields.items() if key in set(include)}
    if exclude is not None:
        fields = {key: value for key, value in fields.items() if key not in set(exclude)}
    return fields


# -- the wire form of a plain mapping, without a model -----------------------------------------


def _plain_text(value: object) -> object:
    return value if type(value) is str else _NOT_PLAIN


def _plain_steps(value: object) -> object:
    return value if type(value) is int and 1 <= value <= MAX_STEPS else _NOT_PLAIN


def _plain_guidance(value: object) -> object:
    return value if type(value) is float and math.isfinite(value) else _NOT_PLAIN


def _plain_seed(value: object) -> object:
    return value if type(value) is int else _NOT_PLAIN


def _plain_format(value: object) -> object:
    return value if type(value) is str and value in ("raw", "jpeg") else _NOT_PLAIN


def _plain_url(value: object) -> object:
    # An http(s) URL is the one image input that goes on the wire as given (stripped).
    if (
        type(value) is str
        and value[:8].lower().startswith(("http://", "https://"))
        and value == value.strip()
    ):
        return {"image": value}
    return _NOT_PLAIN


#: What `plain_wire` returns no wire form for.
_NOT_PLAIN: Final = object()
#: Per field: the wire value of a plain value its converter keeps as it is (and its
#: checks pass), else `_NOT_PLAIN`. A field not here is plain only when None.
_PLAIN_FIELDS: Final = {
    "prompt": _plain_text,
    "model": _plain_text,
    "num_inference_steps": _plain_steps,
    "guidance_scale": _plain_guidance,
    "seed": _plain_seed,
    "response_format": _plain_format,
    "image": _plain_url,
}
_plain_models: dict[type[Any], tuple[dict[str, Any], frozenset[str], frozenset[str]]] = {}


def _plain_model(
    model: type[GenerateRequest] | type[EditRequest],
) -> tuple[dict[str, Any], frozenset[str], frozenset[str]]:
    """The model's defaults on the wire (converted, None left out), required and all fields."""
    known = _plain_models.get(model)
    if known is None:
        fields = attrs.fields(model)
        defaults = {}
        for field in fields:
            if field.default is attrs.NOTHING or field.default is None:
                continue
            value = field.default if field.converter is None else field.converter(field.default)
            if value is not None:
                defaults[field.name] = value
        required = frozenset(field.name for field in fields if field.default is attrs.NOTHING)
        known = _plain_models[model] = (
            defaults,
            required,
            frozenset(field.name for field in fields),
        )
    return known


def plain_wire(
    model: type[GenerateRequest] | type[EditRequest], arguments: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The wire dict ``model(**arguments)`` has (``unstructure_request``), computed without
    building the model, when every argument is a plain value the model keeps as it is:
    a ``str`` prompt or model, an ``int`` step count in range or seed, a finite
    ``float`` guidance scale, ``"raw"``/``"jpeg"``, an http(s) URL as the one image of an
    edit, None for an optional field. None when only the model can tell (any other
    value, an unknown or missing argument): the caller builds the model.

    A resume computes the identity of every finished item; this skips the model's
    validation and conversion for the common case, at a fifth of the cost.
    """
    defaults, required, fields = _plain_model(model)
    wire = dict(defaults)
    for key, value in arguments.items():
        if value is None:
            if key in required or key not in fields:
                return None
            wire.pop(key, None)
            continue
        check = _PLAIN_FIELDS.get(key)
        if check is None or key not in fields:
            return None
        plain = check(value)
        if plain is _NOT_PLAIN:
            return None
        wire[key] = plain
    for key in required:
        if key not in arguments:
            return None
    return wire
