"""Value models: the request bodies of the wire and the result of a call.

Models are frozen attrs classes: immutable, slotted, safe to share between threads.
Request models validate at construction, so a bad value fails before any I/O.
"""

from __future__ import annotations

import math
import numbers
import os
import pathlib
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs

from . import _display as display
from ._exceptions import FriendliUsageError, FriendliValidationError
from ._formats import EXTENSIONS, MIME_TYPES

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "MAX_SEED",
    "EditRequest",
    "GenerateRequest",
    "ImageInput",
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


def check_prompt(value: object) -> str:
    """Return the prompt, or raise if it is not a non-blank string."""
    if not isinstance(value, str):
        raise FriendliValidationError("prompt", f"must be a str, got {type(value).__name__}")
    if not value.strip():
        raise FriendliValidationError("prompt", "must not be empty or only whitespace")
    return value


def check_steps(value: object) -> int:
    """Return the step count, or raise unless it is an int in [1, 50]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FriendliValidationError(
            "num_inference_steps", f"must be an int in [1, {MAX_STEPS}], got {value!r}"
        )
    if not 1 <= value <= MAX_STEPS:
        raise FriendliValidationError(
            "num_inference_steps", f"must be in [1, {MAX_STEPS}], got {value}"
        )
    return value


def check_guidance(value: object) -> float:
    """Return the guidance scale as a float, or raise unless it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FriendliValidationError(
            "guidance_scale", f"must be a finite number, got {type(value).__name__}"
        )
    number = float(value)
    if not math.isfinite(number):
        raise FriendliValidationError("guidance_scale", f"must be finite, got {value!r}")
    return number


def check_seed(value: object) -> int | None:
    """Return the seed, or raise unless it is None or an int in [0, 2**32 - 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FriendliValidationError("seed", f"must be an int in [0, {MAX_SEED}], got {value!r}")
    if not 0 <= value <= MAX_SEED:
        raise FriendliValidationError("seed", f"must be in [0, {MAX_SEED}], got {value}")
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


def check_weights(value: object, control_images: list[ImageInput] | None) -> list[float] | None:
    """Return the ControlNet weights, or raise unless each is in [0, 1], one per image."""
    if value is None:
        return None
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise FriendliValidationError(
            "controlnet_weights", f"must be a list of numbers, got {type(value).__name__}"
        )
    weights = []
    for index, weight in enumerate(value):
        field = f"controlnet_weights[{index}]"
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise FriendliValidationError(field, f"must be a number in [0, 1], got {weight!r}")
        number = float(weight)
        if not 0.0 <= number <= 1.0:  # NaN fails this too
            raise FriendliValidationError(field, f"must be in [0, 1], got {weight!r}")
        weights.append(number)
    if control_images is None:
        raise FriendliValidationError(
            "controlnet_weights", "given without control_images; pass one weight per image"
        )
    if len(weights) != len(control_images):
        raise FriendliValidationError(
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
    num_inference_steps: int = attrs.field(default=20, converter=check_steps)
    guidance_scale: float = attrs.field(default=0.0, converter=check_guidance)
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
    num_inference_steps: int = attrs.field(default=20, converter=check_steps)
    guidance_scale: float = attrs.field(default=0.0, converter=check_guidance)
    seed: int | None = attrs.field(default=None, converter=check_seed)
    response_format: ResponseFormat | None = attrs.field(
        default=None, converter=check_response_format
    )

    def __attrs_post_init__(self) -> None:
        if isinstance(self.image, list) and not self.image:
            raise FriendliValidationError("image", "is an empty list; pass at least one image")


def _human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


@attrs.frozen(kw_only=True, repr=False, eq=False)
class ImageResult:
    """A generated or edited image, decoded, with what a user debugging a call wants.

    Only the decoded bytes are kept (never the base64 text), so a batch of results holds
    no more memory than the images themselves.
    """

    image: bytes
    """The decoded image bytes (not base64)."""
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
        target.write_bytes(self.image)
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

        picture = Image.open(io.BytesIO(self.image))
        picture.load()
        return picture

    def __repr__(self) -> str:
        size = f"{self.width}x{self.height}, " if self.width and self.height else ""
        rid = f", request_id={self.request_id!r}" if self.request_id else ""
        dup = ", maybe_duplicated=True" if self.maybe_duplicated else ""
        return (
            f"ImageResult(format={self.format!r}, {size}{_human_size(len(self.image))}"
            f"{rid}, attempts={self.attempts}, elapsed={self.elapsed:.2f}s{dup})"
        )

    __str__ = __repr__

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> dict[str, str]:
        return display.image_mimebundle(self)  # Jupyter shows the picture, no Pillow needed

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageResult):
            return NotImplemented
        return self.image == other.image and self.format == other.format

    def __hash__(self) -> int:
        return hash((self.image, self.format))


#: The official SDK's name for the result of ``generate`` and ``edit``.
ContainerImageGenerateSuccess = ImageResult


def public_fields(request: GenerateRequest | EditRequest) -> dict[str, Any]:
    """The request's fields as keyword arguments (for logs, manifests and batch items)."""
    return attrs.asdict(request, recurse=False)
