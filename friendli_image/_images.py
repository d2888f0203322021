"""Image inputs: coercion of what users pass (URL, data: URI, base64, bytes, path, file, PIL).

Inputs become the wire's ``{"image": <str>}``: URLs pass through (the server fetches
them, the SDK never does), ``data:`` URIs and base64 text are checked and pass through,
local data (bytes, paths, files, PIL images) becomes a ``data:`` URI with the sniffed
MIME type. Everything is checked before it is encoded, and nothing over 50 MiB is read.
"""

from __future__ import annotations

import binascii
import io
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import IO, Any, Final, Protocol, TypeAlias, runtime_checkable

import attrs
import pybase64

from ._config import MAX_IMAGE_BYTES
from ._exceptions import FriendliInvalidValueError, FriendliValidationError
from ._formats import MIME_TYPES, sniff_format

__all__ = [
    "ImageInput",
    "ImageSource",
    "as_list",
    "coerce_edit_images",
    "coerce_image",
    "coerce_images",
]


def _text(value: object) -> object:
    """Bytes as the text they hold, as pydantic takes bytes for a ``str`` field.

    So ``ImageInput(image=res.image)`` (a result's base64, as bytes) holds its text.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise FriendliValidationError("image", "bytes that are not UTF-8 text") from None
    return value


@attrs.frozen
class ImageInput:
    """One input image on the wire: a URL, a ``data:`` URI, or base64 text.

    Build it from local data with the SDK's coercion (pass bytes, a path, a file object
    or a PIL image straight to ``image=`` / ``control_images=``); this class is the
    already-encoded form, kept for code ported from the official SDK. Bytes are taken as
    their text, as the official model takes them: ``ImageInput(image=res.image)``.
    """

    image: str = attrs.field(converter=_text)
    """The URL, ``data:`` URI or base64 text of the image."""

    @image.validator
    def _check(self, _attribute: object, value: object) -> None:
        if not isinstance(value, str) or not value:
            raise FriendliValidationError("image", "must be a non-empty string")


@runtime_checkable
class _PILImageLike(Protocol):
    def save(self, fp: Any, format: str | None = ...) -> None: ...


#: Everything ``image=`` and ``control_images=`` accept for one image.
ImageSource: TypeAlias = (
    "str | bytes | bytearray | memoryview | os.PathLike[str] | IO[bytes] | Mapping[str, Any]"
    " | ImageInput | _PILImageLike"
)


_LIMIT_TEXT: Final = f"{MAX_IMAGE_BYTES // (1024 * 1024)} MiB"


def _check_image_bytes(data: bytes | bytearray | memoryview, field: str) -> str:
    """Check size and content of image bytes; return the sniffed MIME type."""
    size = len(data)
    if size == 0:
        raise FriendliValidationError(field, "the image is empty (0 bytes)")
    if size > MAX_IMAGE_BYTES:
        raise FriendliValidationError(
            field, f"the image is {size:,} bytes; the API accepts at most {_LIMIT_TEXT}"
        )
    fmt = sniff_format(data)
    if fmt == "unknown":
        raise FriendliValidationError(
            field,
            "the bytes are not an image (expected JPEG, PNG, WebP, GIF, BMP or TIFF data)",
        )
    return MIME_TYPES[fmt]


def _data_uri(data: bytes | bytearray | memoryview, field: str) -> str:
    mime = _check_image_bytes(data, field)
    return f"data:{mime};base64,{pybase64.b64encode(data).decode('ascii')}"


def _decode_base64(text: str, field: str) -> bytes:
    # Decoded size is 3/4 of the text; refuse oversized text before decoding it.
    if len(text) * 3 // 4 > MAX_IMAGE_BYTES + 3:
        raise FriendliValidationError(field, f"the base64 image decodes to more than {_LIMIT_TEXT}")
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FriendliValidationError(field, f"invalid base64 data ({exc})") from None


def _coerce_text(text: str, field: str) -> str:
    stripped = text.strip()
    lowered = stripped[:16].lower()
    if lowered.startswith(("http://", "https://")):
        return stripped
    if lowered.startswith("data:"):
        header, comma, payload = stripped.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise FriendliValidationError(
                field, "a data: URI must look like 'data:image/png;base64,<base64 data>'"
            )
        _check_image_bytes(_decode_base64(payload, field), field)
        return stripped
    if "://" in lowered:
        scheme = lowered.split("://", 1)[0]
        raise FriendliValidationError(
            field, f"{scheme}:// URLs are not accepted; pass an http(s) URL, bytes or a path"
        )
    if len(stripped) < 4096 and os.path.isfile(stripped):
        return _read_path(pathlib.Path(stripped), field)
    try:
        decoded = _decode_base64(stripped, field)
    except FriendliValidationError:
        raise FriendliValidationError(
            field,
            "a string must be an http(s) URL, a data: URI, base64 image data or the path "
            f"of an existing file; got {stripped[:40]!r}",
        ) from None
    _check_image_bytes(decoded, field)
    return stripped


def _read_path(path: pathlib.Path, field: str) -> str:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise FriendliValidationError(field, f"cannot read {path}: {exc.strerror}") from None
    if size > MAX_IMAGE_BYTES:
        raise FriendliValidationError(
            field, f"{path} is {size:,} bytes; the API accepts at most {_LIMIT_TEXT}"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FriendliValidationError(field, f"cannot read {path}: {exc.strerror}") from None
    return _data_uri(data, field)


def _read_file_object(stream: IO[bytes], field: str) -> str:
    try:
        data: object = stream.read(MAX_IMAGE_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise FriendliValidationError(field, f"cannot read the file object: {exc}") from None
    if isinstance(data, str):
        raise FriendliValidationError(field, "the file is open in text mode; open it with 'rb'")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FriendliValidationError(field, f"read() returned {type(data).__name__}, not bytes")
    return _data_uri(data, field)


def _pil_to_uri(image: _PILImageLike, field: str) -> str:
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="PNG")
    except (OSError, ValueError) as exc:
        mode = getattr(image, "mode", None)
        raise FriendliValidationError(
            field,
            f"cannot encode the PIL image{f' of mode {mode}' if mode else ''} as PNG ({exc}); "
            "convert it first, e.g. image.convert('RGB') (or 'RGBA' to keep transparency)",
        ) from None
    return _data_uri(buffer.getbuffer(), field)


def coerce_image(value: object, field: str) -> str:
    """Turn one accepted image input into the wire string (URL, data: URI or base64).

    Raises:
        FriendliValidationError: the input is empty, not an image, over 50 MiB, a
            missing file, a non-http URL, or of a type that is not accepted.
    """
    if isinstance(value, ImageInput):
        value = value.image
    elif isinstance(value, Mapping):
        if set(value) != {"image"}:
            raise FriendliValidationError(
                field, f"a dict must have exactly one key 'image', got keys {sorted(value)!r}"
            )
        value = value["image"]
    if isinstance(value, str):
        try:
            return _coerce_text(value, field)
        except FriendliValidationError as exc:
            # The official SDK sends any string and the server refuses it with 422.
            raise FriendliInvalidValueError(exc.field, exc.reason) from None
    if isinstance(value, bytes | bytearray | memoryview):
        if sniff_format(value) == "unknown":
            # Not image bytes: maybe a result's ``image``, the base64 text as bytes.
            try:
                return _coerce_text(bytes(value).decode("ascii"), field)
            except (UnicodeDecodeError, FriendliValidationError):
                pass  # not that either: refused as bytes below
        return _data_uri(value, field)
    if isinstance(value, os.PathLike):
        return _read_path(pathlib.Path(value), field)
    if hasattr(value, "read"):
        return _read_file_object(value, field)  # type: ignore[arg-type]
    if type(value).__module__.startswith("PIL.") and isinstance(value, _PILImageLike):
        return _pil_to_uri(value, field)
    raise FriendliValidationError(
        field,
        "expected a URL, data: URI, base64 text, bytes, a path, a binary file object, "
        f"a PIL image or {{'image': ...}}; got {type(value).__name__}",
    )


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


def coerce_images(value: object, field: str) -> list[ImageInput]:
    """Turn a list (any iterable) of accepted image inputs into wire images."""
    items = as_list(value, field, "images")
    return [ImageInput(coerce_image(item, f"{field}[{index}]")) for index, item in enumerate(items)]


def _is_image_list(value: object) -> bool:
    """True for a list, tuple, generator, ... of images; False for one image."""
    if isinstance(value, list | tuple):
        return True
    return not (
        isinstance(value, str | bytes | bytearray | memoryview | Mapping | os.PathLike)
        or hasattr(value, "read")
        or not isinstance(value, Iterable)
    )


def coerce_edit_images(value: object) -> ImageInput | list[ImageInput]:
    """The ``image`` of an edit: a list (any iterable) is several images, anything else one.

    One image is sent as one object, as the official SDK does.
    """
    if value is None:
        raise FriendliValidationError("image", "is required: pass the image(s) to edit")
    if _is_image_list(value):
        return coerce_images(value, "image")
    return ImageInput(coerce_image(value, "image"))
