"""Value models: the request bodies of the wire and the result of a call.

Models are frozen attrs classes: immutable, slotted, safe to share between threads.
Request models validate at construction, so a bad value fails before any I/O.
"""

from __future__ import annotations

import binascii
import json
import math
import numbers
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, TypedDict

import attrs
import pybase64

from ._exceptions import FriendliInvalidValueError, FriendliUsageError, FriendliValidationError
from ._formats import EXTENSIONS, MIME_TYPES, image_dimensions, sniff_format

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "MAX_SEED",
    "ContainerImageEditBodyImage",
    "ContainerImageEditBodyImageTypedDict",
    "EditRequest",
    "GenerateRequest",
    "ImageInput",
    "ImageInputTypedDict",
    "ImageResult",
    "ResponseFormat",
]

ResponseFormat = Literal["raw", "jpeg"]

#: Seeds are unsigned 32-bit integers: the widest range every diffusion backend accepts.
MAX_SEED: Final = 2**32 - 1
MAX_STEPS: Final = 50


@attrs.frozen
class ImageInput:
    """One input image on the wire: a URL, a ``data:`` URI, or base64 text.

    Build it from local data with the SDK's coercion (pass bytes, a path, a file object
    or a PIL image straight to ``image=`` / ``control_images=``); this class is the
    already-encoded form, kept for code ported from the official SDK.
    """

    image: str = attrs.field()
    """The URL, ``data:`` URI or base64 text of the image."""

    @image.validator
    def _check(self, _attribute: object, value: object) -> None:
        if not isinstance(value, str) or not value:
            raise FriendliValidationError("image", "must be a non-empty string")


class ImageInputTypedDict(TypedDict):
    """An input image as a dict, ``{"image": <URL, data: URI or base64>}`` (official name)."""

    image: str


#: The official SDK's type of ``edit(image=...)``: one image or a list of them.
ContainerImageEditBodyImage = ImageInput | list[ImageInput]
ContainerImageEditBodyImageTypedDict = ImageInputTypedDict | list[ImageInputTypedDict]


def check_prompt(value: object) -> str:
    """Return the prompt, or raise if it is not a non-blank string."""
    if not isinstance(value, str):
        raise FriendliValidationError("prompt", f"must be a str, got {type(value).__name__}")
    if not value.strip():
        raise FriendliValidationError("prompt", "must not be empty or only whitespace")
    return value


def check_steps(value: object) -> int | None:
    """Return the step count, or raise unless it is None (omitted) or an int in [1, 50]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FriendliValidationError(
            "num_inference_steps", f"must be an int in [1, {MAX_STEPS}], got {value!r}"
        )
    if not 1 <= value <= MAX_STEPS:
        raise FriendliInvalidValueError(
            "num_inference_steps", f"must be in [1, {MAX_STEPS}], got {value}"
        )
    return value


def check_guidance(value: object) -> float | None:
    """Return the guidance scale as a float, or raise unless it is None or a finite number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FriendliValidationError(
            "guidance_scale", f"must be a finite number, got {type(value).__name__}"
        )
    number = float(value)
    if not math.isfinite(number):
        raise FriendliInvalidValueError("guidance_scale", f"must be finite, got {value!r}")
    return number


def check_seed(value: object) -> int | None:
    """Return the seed, or raise unless it is None or an int in [0, 2**32 - 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FriendliValidationError("seed", f"must be an int in [0, {MAX_SEED}], got {value!r}")
    if not 0 <= value <= MAX_SEED:
        raise FriendliInvalidValueError("seed", f"must be in [0, {MAX_SEED}], got {value}")
    return value


def check_response_format(value: object) -> ResponseFormat | None:
    """Return the response format, or raise unless it is "raw", "jpeg" or None."""
    if value is None or value in {"raw", "jpeg"}:
        return value
    raise FriendliValidationError(
        "response_format", f"must be 'raw', 'jpeg' or None, got {value!r}"
    )


def check_model(value: object) -> str | None:
    """Return the model route, or raise unless it is None or a non-empty string."""
    if value is None or (isinstance(value, str) and value):
        return value
    raise FriendliValidationError("model", f"must be a non-empty str or None, got {value!r}")


def as_list(value: object, field: str, what: str) -> list[Any]:
    """Materialize any iterable (list, tuple, generator, ...) into a list, once.

    Strings, bytes and mappings are refused: they iterate, but are never meant as a list.
    """
    if isinstance(value, str | bytes | bytearray | memoryview | Mapping) or not isinstance(
        value, Iterable
    ):
        raise FriendliValidationError(
            field, f"must be a list of {what}, got {type(value).__name__}"
        )
    return list(value)


def check_weights(value: object, control_images: list[ImageInput] | None) -> list[float] | None:
    """Return the ControlNet weights, or raise unless each is in [0, 1], one per image.

    Any iterable is accepted; it is read once, before any check.
    """
    if value is None:
        return None
    weights = []
    for index, weight in enumerate(as_list(value, "controlnet_weights", "numbers")):
        field = f"controlnet_weights[{index}]"
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise FriendliValidationError(field, f"must be a number in [0, 1], got {weight!r}")
        number = float(weight)
        if not 0.0 <= number <= 1.0:  # NaN fails this too
            raise FriendliInvalidValueError(field, f"must be in [0, 1], got {weight!r}")
        weights.append(number)
    if control_images is None:
        raise FriendliInvalidValueError(
            "controlnet_weights", "given without control_images; pass one weight per image"
        )
    if len(weights) != len(control_images):
        raise FriendliInvalidValueError(
            "controlnet_weights",
            f"has {len(weights)} values for {len(control_images)} control images; "
            "pass exactly one weight per control image",
        )
    return weights


@attrs.frozen(kw_only=True)
class GenerateRequest:
    """The body of ``POST /v1/images/generations``, validated."""

    prompt: str = attrs.field(converter=check_prompt)
    model: str | None = attrs.field(default=None, converter=check_model)
    num_inference_steps: int | None = attrs.field(default=20, converter=check_steps)
    guidance_scale: float | None = attrs.field(default=0.0, converter=check_guidance)
    seed: int | None = attrs.field(default=None, converter=check_seed)
    response_format: ResponseFormat | None = attrs.field(
        default=None, converter=check_response_format
    )
    control_images: list[ImageInput] | None = None
    controlnet_weights: list[float] | None = None

    def __attrs_post_init__(self) -> None:
        if self.control_images is not None and not self.control_images:
            raise FriendliValidationError(
                "control_images", "is empty; pass None or at least one image"
            )
        # Keep the checked floats, so int weights go on the wire as floats (and a tuple
        # or generator given by the caller becomes the list the type promises).
        weights = check_weights(self.controlnet_weights, self.control_images)
        object.__setattr__(self, "controlnet_weights", weights)


@attrs.frozen(kw_only=True)
class EditRequest:
    """The body of ``POST /v1/images/edits``, validated."""

    image: ImageInput | list[ImageInput]
    prompt: str = attrs.field(converter=check_prompt)
    model: str | None = attrs.field(default=None, converter=check_model)
    num_inference_steps: int | None = attrs.field(default=20, converter=check_steps)
    guidance_scale: float | None = attrs.field(default=0.0, converter=check_guidance)
    seed: int | None = attrs.field(default=None, converter=check_seed)
    response_format: ResponseFormat | None = attrs.field(
        default=None, converter=check_response_format
    )

    def __attrs_post_init__(self) -> None:
        if isinstance(self.image, list) and not self.image:
            raise FriendliInvalidValueError("image", "is an empty list; pass at least one image")


def _human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


@attrs.frozen(kw_only=True, repr=False, eq=False, init=False)
class ImageResult:
    """A generated or edited image, with what a user debugging a call wants.

    ``data`` is the decoded image; ``image`` is what the official SDK puts there, the
    base64 text as bytes, so ported code that runs ``base64.b64decode(res.image)`` keeps
    getting the image. Only the decoded bytes are stored (a quarter smaller than the
    base64, and what saving, Pillow and the batch sink read); ``image`` encodes them anew
    on each access and caches nothing, so a batch of results holds no more memory than
    the images themselves.

    Build one as the official SDK does, ``ContainerImageGenerateSuccess(image=<base64>)``,
    or from decoded bytes with ``ImageResult(data=...)``; format and size are read from
    the bytes when not given.
    """

    data: bytes
    """The decoded image bytes."""
    format: str
    """The format sniffed from the bytes: jpeg, png, webp, gif, bmp, tiff or unknown."""
    width: int | None = None
    """Width in pixels, read from the image header (None if the header is unknown)."""
    height: int | None = None
    """Height in pixels, read from the image header (None if the header is unknown)."""
    request_id: str | None = None
    """The request id of the call (sent as ``X-Request-ID``, echoed by the server)."""
    attempts: int = 1
    """How many HTTP attempts the call took."""
    elapsed: float = 0.0
    """Seconds from the call's start to the decoded image, retries included."""
    maybe_duplicated: bool = False
    """True if a request the server may have processed was sent again for this result."""

    def __init__(
        self,
        *,
        data: bytes | None = None,
        image: bytes | str | None = None,
        format: str | None = None,
        width: int | None = None,
        height: int | None = None,
        request_id: str | None = None,
        attempts: int = 1,
        elapsed: float = 0.0,
        maybe_duplicated: bool = False,
    ) -> None:
        if (data is None) == (image is None):
            raise FriendliUsageError(
                "pass exactly one of data= (decoded bytes) or image= (base64, as the "
                "official SDK's ContainerImageGenerateSuccess)"
            )
        if data is None:
            data = _decode_base64_image(image)
        elif not isinstance(data, bytes):
            raise FriendliValidationError("data", f"must be bytes, got {type(data).__name__}")
        if format is None:
            format = sniff_format(data)
            if width is None and height is None:
                size = image_dimensions(data, format)
                width, height = size if size else (None, None)
        self.__attrs_init__(
            data=data,
            format=format,
            width=width,
            height=height,
            request_id=request_id,
            attempts=attempts,
            elapsed=elapsed,
            maybe_duplicated=maybe_duplicated,
        )

    @property
    def image(self) -> bytes:
        """The base64 text of the image, as bytes: the official SDK's ``image`` field.

        Encoded on each access (nothing is cached); use ``data`` for the decoded bytes.
        """
        return pybase64.b64encode(self.data)

    @property
    def content_type(self) -> str:
        """The MIME type of the image (``application/octet-stream`` if unknown)."""
        return MIME_TYPES.get(self.format, "application/octet-stream")

    def save(self, path: str | os.PathLike[str]) -> pathlib.Path:
        """Write the image to ``path`` and return the path written.

        When ``path`` has no extension, the one matching the format is added
        (``out`` → ``out.jpg``). Parent directories must exist.
        """
        target = pathlib.Path(path)
        if not target.suffix and self.format in EXTENSIONS:
            target = target.with_name(target.name + EXTENSIONS[self.format])
        target.write_bytes(self.data)
        return target

    def to_pil(self) -> PILImage.Image:
        """Open the image with Pillow (``pip install 'friendli-image[pil]'``)."""
        try:
            from PIL import Image  # noqa: PLC0415  (Pillow is an optional extra)
        except ImportError:
            raise FriendliUsageError(
                "to_pil() needs Pillow: pip install 'friendli-image[pil]'"
            ) from None
        import io  # noqa: PLC0415

        picture = Image.open(io.BytesIO(self.data))
        picture.load()
        return picture

    def model_dump(self, *, mode: Literal["python", "json"] = "python") -> dict[str, Any]:
        """The official SDK's pydantic dump: ``{"image": <base64 bytes>}``.

        ``mode="json"`` gives the base64 as text, as pydantic does.
        """
        if mode == "json":
            return {"image": self.image.decode("ascii")}
        if mode != "python":
            raise FriendliValidationError("mode", f"must be 'python' or 'json', got {mode!r}")
        return {"image": self.image}

    def model_dump_json(self, *, indent: int | None = None) -> str:
        """The official SDK's JSON: ``{"image":"<base64>"}`` (pydantic's compact form)."""
        separators = (",", ":") if indent is None else (",", ": ")
        return json.dumps(self.model_dump(mode="json"), indent=indent, separators=separators)

    @classmethod
    def model_validate(cls, obj: Mapping[str, Any]) -> ImageResult:
        """Build a result from ``{"image": <base64>}``, as the official model does."""
        if not isinstance(obj, Mapping) or "image" not in obj:
            raise FriendliValidationError("image", "expected a mapping with an 'image' key")
        return cls(image=obj["image"])

    @classmethod
    def model_validate_json(cls, text: str | bytes) -> ImageResult:
        """Build a result from the JSON ``{"image": "<base64>"}`` of an API answer."""
        try:
            parsed = json.loads(text)
        except ValueError:
            raise FriendliValidationError("image", "the text is not JSON") from None
        return cls.model_validate(parsed)

    def __repr__(self) -> str:
        size = f"{self.width}x{self.height}, " if self.width and self.height else ""
        rid = f", request_id={self.request_id!r}" if self.request_id else ""
        dup = ", maybe_duplicated=True" if self.maybe_duplicated else ""
        return (
            f"ImageResult(format={self.format!r}, {size}{_human_size(len(self.data))}"
            f"{rid}, attempts={self.attempts}, elapsed={self.elapsed:.2f}s{dup})"
        )

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageResult):
            return NotImplemented
        return self.data == other.data and self.format == other.format

    def __hash__(self) -> int:
        return hash((self.data, self.format))


def _decode_base64_image(image: object) -> bytes:
    if not isinstance(image, bytes | str) or not image:
        raise FriendliValidationError(
            "image", f"must be non-empty base64 bytes or str, got {type(image).__name__}"
        )
    try:
        return pybase64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise FriendliValidationError(
            "image", "is not valid base64; pass data= for decoded image bytes"
        ) from None


#: The official SDK's name for the result of ``generate`` and ``edit``.
ContainerImageGenerateSuccess = ImageResult


def public_fields(request: GenerateRequest | EditRequest) -> dict[str, Any]:
    """The request's fields as keyword arguments (for logs, manifests and batch items)."""
    return attrs.asdict(request, recurse=False)
