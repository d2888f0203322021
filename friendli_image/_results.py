"""Call results: `ImageResult` (the picture and its metadata), saving it, and its notebook display.

Results are frozen attrs classes: immutable, slotted, safe to share between threads.
"""

from __future__ import annotations

import binascii
import builtins
import importlib.util
import io
import json
import os
import pathlib
import types
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

import attrs
import pybase64

from ._exceptions import FriendliUsageError, FriendliValidationError
from ._formats import (
    EXTENSIONS,
    FORMATS_BY_EXTENSION,
    MIME_TYPES,
    PIL_NAMES,
    image_dimensions,
    sniff_format,
)
from ._requests import pick_fields

if TYPE_CHECKING:
    from PIL import Image as PILImage
    from typing_extensions import Self

__all__ = [
    "ImageResult",
    "save_target",
]


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
    endpoint: str | None = None
    """The endpoint that served it, when the client has several (None: ``server_url``)."""

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
        endpoint: str | None = None,
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
            endpoint=endpoint,
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
        """Write the image to ``path`` in the format its extension names; return the path.

        Without an extension, the one of the image's format is added (``out`` →
        ``out.jpg``). An extension naming another format (``x.png`` for a JPEG) converts
        the image with Pillow (``pip install 'friendli-image[pil]'``). Without Pillow, for
        an extension that names no image format, or into a directory that does not exist,
        `FriendliUsageError` is raised and nothing is written. The format written is
        ``FORMATS_BY_EXTENSION[path.suffix]`` of the path returned.
        """
        target, fmt = save_target(path, self.format)
        data = self.data if fmt == self.format else _convert(self.data, fmt, target)
        target.write_bytes(data)
        return target

    def to_pil(self) -> PILImage.Image:
        """Open the image with Pillow (``pip install 'friendli-image[pil]'``)."""
        try:
            from PIL import Image  # noqa: PLC0415  (Pillow is an optional extra)
        except ImportError:
            raise FriendliUsageError(
                "to_pil() needs Pillow: pip install 'friendli-image[pil]'"
            ) from None
        picture = Image.open(io.BytesIO(self.data))
        picture.load()
        return picture

    #: The official model's one field (``ContainerImageGenerateSuccess.model_fields``).
    model_fields: ClassVar[Mapping[str, str]] = types.MappingProxyType(
        {"image": "The base64-encoded image."}
    )

    def model_dump(
        self,
        *,
        mode: Literal["python", "json"] | str = "python",
        include: Iterable[str] | Mapping[str, Any] | None = None,
        exclude: Iterable[str] | Mapping[str, Any] | None = None,
        **_pydantic: Any,
    ) -> dict[str, Any]:
        """The official SDK's pydantic dump: ``{"image": <base64 bytes>}``.

        ``mode="json"`` gives the base64 as text, as pydantic does. ``include`` and
        ``exclude`` pick fields; pydantic's other keywords (``exclude_none``,
        ``by_alias``, ``exclude_unset``, ...) are taken and change nothing: the one
        field is always set and never None.
        """
        if mode not in ("python", "json"):
            raise FriendliValidationError("mode", f"must be 'python' or 'json', got {mode!r}")
        image = self.image
        return pick_fields(
            {"image": image.decode("ascii") if mode == "json" else image}, include, exclude
        )

    def model_dump_json(self, *, indent: int | None = None, **keywords: Any) -> str:
        """The official SDK's JSON: ``{"image":"<base64>"}`` (pydantic's compact form).

        Takes ``model_dump``'s keywords (``include``, ``exclude``, ``exclude_none``, ...).
        """
        separators = (",", ":") if indent is None else (",", ": ")
        dumped = self.model_dump(**{**keywords, "mode": "json"})
        return json.dumps(dumped, indent=indent, separators=separators)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy (results are immutable, so ``deep`` changes nothing); ``update={"image":
        <base64>}`` replaces the image."""
        if not update:
            return attrs.evolve(self)
        if set(update) != {"image"}:
            raise FriendliValidationError(
                "update", f"only 'image' can be updated, got {sorted(update)!r}"
            )
        return type(self)(image=update["image"])

    #: pydantic's bookkeeping, as the official model has it: no config, no computed or
    #: extra fields, and its one field always set.
    model_config: ClassVar[Mapping[str, Any]] = types.MappingProxyType({})
    model_computed_fields: ClassVar[Mapping[str, Any]] = types.MappingProxyType({})
    model_extra: ClassVar[None] = None

    @property
    def model_fields_set(self) -> set[str]:
        """The fields set on the result: always ``{"image"}``."""
        return {"image"}

    @classmethod
    def model_json_schema(cls, **_pydantic: Any) -> dict[str, Any]:
        """The official model's JSON schema (``{"image": <base64 text>}``)."""
        return {
            "properties": {"image": {"format": "binary", "title": "Image", "type": "string"}},
            "required": ["image"],
            "title": "ContainerImageGenerateSuccess",
            "type": "object",
        }

    @classmethod
    def model_construct(cls, _fields_set: object = None, **values: Any) -> Self:
        """Build a result from ``image=<base64>`` (checked: the bytes are decoded)."""
        return cls.model_validate(values)

    def dict(self, **keywords: Any) -> builtins.dict[str, Any]:
        """pydantic v1's name for `model_dump`."""
        return self.model_dump(**keywords)

    def json(self, **keywords: Any) -> str:
        """pydantic v1's name for `model_dump_json`."""
        return self.model_dump_json(**keywords)

    def copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """pydantic v1's name for `model_copy`."""
        return self.model_copy(update=update, deep=deep)

    @classmethod
    def parse_obj(cls, obj: Any) -> Self:
        """pydantic v1's name for `model_validate`."""
        return cls.model_validate(obj)

    @classmethod
    def parse_raw(cls, text: str | bytes, **_pydantic: Any) -> Self:
        """pydantic v1's name for `model_validate_json`."""
        return cls.model_validate_json(text)

    def keys(self) -> list[str]:
        """The official model's field names, so ``dict(res)`` is ``{"image": res.image}``."""
        return ["image"]

    def __getitem__(self, key: str) -> bytes:
        if key != "image":
            raise KeyError(key)
        return self.image

    @classmethod
    def model_validate(cls, obj: Any, **_pydantic: Any) -> Self:
        """Build a result from ``{"image": <base64>}`` (or a result), as the official model does."""
        if isinstance(obj, cls):
            return obj
        if not isinstance(obj, Mapping) or "image" not in obj:
            raise FriendliValidationError("image", "expected a mapping with an 'image' key")
        return cls(image=obj["image"])

    @classmethod
    def model_validate_json(cls, text: str | bytes, **_pydantic: Any) -> Self:
        """Build a result from the JSON ``{"image": "<base64>"}`` of an API answer."""
        try:
            parsed = json.loads(text)
        except ValueError:
            raise FriendliValidationError("image", "the text is not JSON") from None
        return cls.model_validate(parsed)

    @classmethod
    def __get_pydantic_core_schema__(cls, _source: Any, _handler: Any) -> Any:
        """The schema that lets pydantic models (and FastAPI) use this type as a field.

        Called by pydantic only, so pydantic is imported only where it is installed. The
        field validates and serializes as the official model: ``{"image": <base64>}``.
        """
        from pydantic_core import core_schema  # noqa: PLC0415  (only pydantic calls this)

        fields = core_schema.typed_dict_schema(
            {"image": core_schema.typed_dict_field(core_schema.bytes_schema())}
        )
        from_fields = core_schema.no_info_after_validator_function(cls.model_validate, fields)
        return core_schema.json_or_python_schema(
            json_schema=from_fields,
            python_schema=core_schema.union_schema(
                [core_schema.is_instance_schema(cls), from_fields]
            ),
            serialization=core_schema.plain_serializer_function_ser_schema(
                _pydantic_serialize, info_arg=True
            ),
        )

    def __repr__(self) -> str:
        size = f"{self.width}x{self.height}, " if self.width and self.height else ""
        rid = f", request_id={self.request_id!r}" if self.request_id else ""
        dup = ", maybe_duplicated=True" if self.maybe_duplicated else ""
        return (
            f"ImageResult(format={self.format!r}, {size}{_human_size(len(self.data))}"
            f"{rid}, attempts={self.attempts}, elapsed={self.elapsed:.2f}s{dup})"
        )

    __str__ = __repr__

    def _repr_mimebundle_(
        self, include: object = None, exclude: object = None
    ) -> builtins.dict[str, str]:
        return _image_mimebundle(self)  # Jupyter shows the picture, no Pillow needed

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageResult):
            return NotImplemented
        return self.data == other.data and self.format == other.format

    def __hash__(self) -> int:
        return hash((self.data, self.format))


def _pydantic_serialize(result: ImageResult, info: Any) -> dict[str, Any]:
    return result.model_dump(mode="json" if info.mode_is_json() else "python")


def save_target(path: str | os.PathLike[str], fmt: str) -> tuple[pathlib.Path, str]:
    """Where saving an image of format ``fmt`` to ``path`` writes, and in which format.

    Raises `FriendliUsageError`, before anything is written or sent, when the
    directory does not exist, the extension names no image format, or the image must
    be converted and Pillow is not installed.
    """
    target = pathlib.Path(path)
    if not target.parent.is_dir():
        raise FriendliUsageError(
            f"cannot save {str(target)!r}: the directory {str(target.parent)!r} does not "
            "exist; create it first"
        )
    if not target.suffix:
        return target.with_name(target.name + EXTENSIONS.get(fmt, "")), fmt
    wanted = FORMATS_BY_EXTENSION.get(target.suffix.lower())
    if wanted is None:
        known = ", ".join(sorted(FORMATS_BY_EXTENSION))
        raise FriendliUsageError(
            f"cannot save {str(target)!r}: {target.suffix!r} names no image format; use one "
            f"of {known}, or write the bytes yourself with Path(...).write_bytes(result.data)"
        )
    if wanted != fmt and importlib.util.find_spec("PIL") is None:
        raise FriendliUsageError(
            f"cannot save {str(target)!r}: the image is {fmt} and converting it to {wanted} "
            f"needs Pillow (pip install 'friendli-image[pil]'); or save it as "
            f"{target.stem}{EXTENSIONS.get(fmt, '')}"
        )
    return target, wanted


def _convert(data: bytes, fmt: str, target: pathlib.Path) -> bytes:
    """The image re-encoded as ``fmt`` with Pillow (checked to be installed)."""
    from PIL import Image  # noqa: PLC0415  (Pillow is an optional extra)

    try:
        picture: PILImage.Image = Image.open(io.BytesIO(data))
        picture.load()
        if fmt == "jpeg" and picture.mode not in ("RGB", "L", "CMYK"):
            picture = picture.convert("RGB")
        buffer = io.BytesIO()
        picture.save(buffer, format=PIL_NAMES[fmt])
    except (OSError, ValueError) as exc:
        raise FriendliUsageError(
            f"cannot save {str(target)!r} as {fmt}: Pillow could not convert the image "
            f"({exc}); save it with the extension of its own format"
        ) from None
    return buffer.getvalue()


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


#: Formats Jupyter front ends draw from a display bundle.
_NOTEBOOK_IMAGE_TYPES: Final = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
}


def _image_mimebundle(result: ImageResult) -> dict[str, str]:
    """The display bundle of an image: its bytes under its MIME type, and its repr."""
    bundle = {"text/plain": repr(result)}
    mime = _NOTEBOOK_IMAGE_TYPES.get(result.format)
    if mime is not None:
        bundle[mime] = result.image.decode("ascii")  # already the base64 text
    return bundle
