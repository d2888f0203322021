"""Value models: request bodies, call results, batch outcomes, and the request path.

Models are frozen attrs classes: immutable, slotted, safe to share between threads.
Request models validate (and coerce image inputs) at construction, so a bad value fails
before any I/O; they are the one definition of each operation's fields.
"""

from __future__ import annotations

import binascii
import builtins
import importlib.util
import io
import json
import math
import os
import pathlib
import types
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Protocol, TypeAlias

import attrs
import pybase64

from ._config import CallOptions, CallOverrides, check_count, hide_credentials
from ._exceptions import (
    FriendliAPIError,
    FriendliBatchAborted,
    FriendliError,
    FriendliUsageError,
    FriendliValidationError,
)
from ._formats import (
    EXTENSIONS,
    FORMATS_BY_EXTENSION,
    MIME_TYPES,
    PIL_NAMES,
    image_dimensions,
    sniff_format,
)
from ._images import ImageInput
from ._requests import RequestModel, pick_fields

if TYPE_CHECKING:
    from PIL import Image as PILImage
    from typing_extensions import Self

__all__ = [
    "NOTEBOOK_ROWS",
    "OUTPUT_FORMATS",
    "AttemptGate",
    "AttemptOutcome",
    "BatchItem",
    "BatchMonitor",
    "BatchOptions",
    "BatchProgress",
    "BatchResult",
    "BatchStatus",
    "ImageInput",
    "ImageResult",
    "OutputFormat",
    "RequestPath",
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


# -- batches -------------------------------------------------------------------------------

BatchStatus: TypeAlias = Literal["ok", "failed", "skipped", "resumed"]
#: How a batch stores its images in ``out_dir`` (`BatchOptions.output_format`).
OutputFormat: TypeAlias = Literal["files", "webdataset", "parquet"]


def _positive_int(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    check_count(attribute.name, value)


def _optional_positive_int(
    instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if value is not None:
        _positive_int(instance, attribute, value)


def _rps(_instance: object, _attribute: object, value: Any) -> None:
    if value is not None and (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise FriendliValidationError("rps", f"must be a positive number or None, got {value!r}")


def _total(_instance: object, _attribute: object, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise FriendliValidationError("total", f"must be an int >= 0, got {value!r}")


def _callable_or_none(_instance: object, _attribute: object, value: Any) -> None:
    if value is not None and not callable(value):
        raise FriendliValidationError("on_progress", "must be a callable or None")


def _flag(value: bool) -> bool:
    return bool(value)


def _path_or_none(value: str | os.PathLike[str] | None) -> pathlib.Path | None:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise FriendliValidationError(
            "out_dir", f"must be a path or None, got {type(value).__name__}"
        )
    return pathlib.Path(value)


#: What a batch can write into ``out_dir`` (``output_format``).
OUTPUT_FORMATS: Final = ("files", "webdataset", "parquet")


def _output_format(_instance: object, _attribute: object, value: Any) -> None:
    if value not in OUTPUT_FORMATS:
        raise FriendliValidationError(
            "output_format", f"must be one of {', '.join(OUTPUT_FORMATS)}, got {value!r}"
        )
    if value == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise FriendliValidationError(
            "output_format", "'parquet' needs pyarrow: pip install 'friendli-image[datasets]'"
        )


@attrs.frozen(kw_only=True)
class BatchOptions(CallOverrides):
    """How a batch runs, checked when the batch is created (before anything is sent).

    Attributes:
        concurrency: the most requests in flight at once (also bounded by the client's
            ``max_connections``). After 429s the batch lowers its limit and raises it
            back by one per round of successes.
        rps: a ceiling on requests sent per second (None: no ceiling).
        ordered: iteration yields items in input order instead of as they finish; up to
            ``reorder_window`` finished items then wait for a slower earlier one, and
            dispatch pauses while that window is full.
        reorder_window: see ``ordered`` (default ``max(4 * concurrency, 64)``).
        out_dir: write each image to this directory as it arrives (the items then hold
            the path, not the bytes) and record every finished item in its
            ``manifest.jsonl``. One batch at a time per directory.
        resume: with ``out_dir``, skip items an earlier run into it already finished:
            the same request (and the same occurrence among identical requests), its
            file present with the recorded sha256, wherever it sits in the input now;
            False sends every request again. Either way, images of earlier runs that
            match no item are kept and listed in ``unmatched.jsonl`` (see
            `BatchResult.unmatched`). With a shard format, False is refused when
            ``out_dir`` holds an earlier run (its items would land in two shards).
        output_format: how ``out_dir`` holds the images. ``"files"``: one file per
            item and a ``metadata.jsonl`` (``file_name`` and every field), so
            ``datasets.load_dataset("imagefolder", data_dir=out_dir)`` loads them.
            ``"webdataset"``: tar shards of ``shard_size`` items, each item a
            ``<key>.<ext>`` image and a ``<key>.json`` of its request and outcome.
            ``"parquet"``: Parquet shards, one row per item with the image bytes (an
            ``Image`` feature for ``datasets``) and every field (needs pyarrow). A
            shard is written once full (and at the end), atomically: a kill loses at
            most the items of the open shard, which a rerun makes again.
        shard_size: items per shard (the shard formats); memory holds one open shard.
        on_progress: called with a `BatchProgress` at most ten times a second and once
            at the end, on the event loop: keep it quick.
        stop_on_fatal: after an error every remaining item would meet (401, 403, 404, a
            redirect, the server unreachable after retries), send nothing more and
            report the rest as skipped with `FriendliBatchAborted`; items in flight
            then that meet the same error are skipped too, so the problem counts once.
        total: the number of requests, for the ETA, when ``requests`` has no len().
        retries, server_url, timeout_ms, http_headers: defaults for every item, as for
            a single call; an item's own keys override them. Every attempt of an item,
            rate-limited ones included, goes through the client's one retry loop.
    """

    concurrency: int = attrs.field(default=16, validator=_positive_int)
    rps: float | None = attrs.field(default=None, validator=_rps)
    ordered: bool = attrs.field(default=False, converter=_flag)
    reorder_window: int | None = attrs.field(default=None, validator=_optional_positive_int)
    out_dir: pathlib.Path | None = attrs.field(default=None, converter=_path_or_none)
    resume: bool = attrs.field(default=True, converter=_flag)
    output_format: OutputFormat = attrs.field(default="files", validator=_output_format)
    shard_size: int = attrs.field(default=1000, validator=_positive_int)
    on_progress: Callable[[BatchProgress], object] | None = attrs.field(
        default=None, validator=_callable_or_none
    )
    stop_on_fatal: bool = attrs.field(default=True, converter=_flag)
    total: int | None = attrs.field(default=None, validator=_total)

    @property
    def window(self) -> int:
        """The reorder window in effect."""
        return max(4 * self.concurrency, 64) if self.reorder_window is None else self.reorder_window


def _request_as_kept(request: Mapping[str, Any]) -> Mapping[str, Any]:
    headers = request.get("http_headers") if isinstance(request, Mapping) else None
    if not isinstance(headers, Mapping):
        return request
    return {**request, "http_headers": hide_credentials(headers)}


@attrs.frozen(kw_only=True, repr=False, eq=False)
class BatchItem:
    """The outcome of one request of a batch."""

    index: int
    """The position of the request in the input (0-based)."""
    id: str
    """sha256 of the route and the request's canonical JSON: equal requests have equal
    ids ("" if invalid). With ``occurrence`` it is the item's identity in ``out_dir``."""
    request: Mapping[str, Any] = attrs.field(converter=_request_as_kept)
    """The request as given (a model is shown as its fields; an ``Authorization`` in its
    ``http_headers`` is held as a secret)."""
    status: BatchStatus
    """``ok``; ``failed`` (see ``error``); ``skipped`` (not attempted, the batch stopped);
    ``resumed`` (done by an earlier run into the same ``out_dir``)."""
    result: ImageResult | None = None
    """The image, when the batch keeps images in memory (no ``out_dir``)."""
    path: pathlib.Path | None = None
    """Where the image was written, when the batch has an ``out_dir``."""
    format: str | None = None
    """The image format (``jpeg``, ``png``, ...), for ``ok`` and ``resumed`` items."""
    sha256: str | None = None
    """The sha256 of the file written, when the batch has an ``out_dir``."""
    error: FriendliError | None = None
    """Why the item failed or was skipped."""
    attempts: int = 0
    """HTTP attempts made for this item in this run (rate-limited retries included)."""
    elapsed: float = 0.0
    """Seconds from the item's dispatch to its outcome, waits included."""
    request_id: str | None = None
    """The ``X-Request-ID`` of the last call made for the item."""
    maybe_duplicated: bool = False
    """True when the image came from a resend of a request the server may already have
    run (see ``ImageResult.maybe_duplicated``)."""
    occurrence: int = 0
    """How many identical requests (same ``id``) came before this one in the input."""

    @property
    def ok(self) -> bool:
        """True when the item has an image (made now, or by an earlier run)."""
        return self.status in ("ok", "resumed")

    @property
    def maybe_processed(self) -> bool:
        """True when the item failed but the server may have run the generation."""
        return isinstance(self.error, FriendliAPIError) and self.error.maybe_processed

    def __repr__(self) -> str:
        parts = [f"index={self.index}", f"status={self.status!r}"]
        if self.path is not None:
            parts.append(f"path={str(self.path)!r}")
        elif self.result is not None:
            parts.append(f"result={self.result!r}")
        if self.error is not None:
            parts.append(f"error={type(self.error).__name__}")
        parts.append(f"attempts={self.attempts}")
        parts.append(f"elapsed={self.elapsed:.2f}s")
        return f"BatchItem({', '.join(parts)})"


@attrs.frozen(kw_only=True)
class EndpointStats:
    """A snapshot of one endpoint of a client (``client.endpoints``).

    Attributes:
        url: the endpoint's base URL.
        weight: its routing weight.
        in_flight: requests on it now.
        limit: its current in-flight limit (learned from its latency, lowered on 429/503).
        max_connections: the cap of ``limit``.
        successes: attempts it answered with an image.
        failures: failed attempts by kind: ``connect`` (never reached it), ``timeout``,
            ``dropped`` (the connection broke after the request was sent),
            ``status_429``, ``status_503``, ``status_5xx``, ``status_4xx``, ``response``
            (a 200 without a usable image), ``health`` (a failed active probe).
        latency_p50: median seconds of its recent successful attempts (None: none yet).
        latency_p95: 95th percentile of the same.
        ejected_until: ``time.monotonic()`` when its ejection ends, None if it is not
            ejected.
        ejections: how many times it was ejected.
    """

    url: str
    weight: float
    in_flight: int
    limit: int
    max_connections: int
    successes: int
    failures: Mapping[str, int]
    latency_p50: float | None
    latency_p95: float | None
    ejected_until: float | None
    ejections: int


@attrs.frozen(kw_only=True)
class BatchProgress:
    """A snapshot of a running batch, passed to ``on_progress``."""

    total: int | None
    """How many requests the input holds, when known (a sized input or ``total=``)."""
    done: int
    """Items finished, whatever their status."""
    succeeded: int
    """Items with a new image."""
    failed: int
    """Items that failed."""
    skipped: int
    """Items not attempted because the batch stopped."""
    resumed: int
    """Items done by an earlier run (``out_dir`` with ``resume=True``)."""
    in_flight: int
    """Requests on the wire (or waiting for the rate ceiling) right now."""
    limit: int
    """The current in-flight limit (lower than ``concurrency`` after 429s)."""
    elapsed: float
    """Seconds since the batch started."""
    rate: float
    """Items sent and finished (ok or failed) per second in this run; resumed and skipped
    items are not counted."""
    eta: float | None
    """Seconds until the last item, at the current rate (None when unknown)."""
    endpoints: tuple[EndpointStats, ...] = ()
    """Each endpoint of the client's fleet (see ``client.endpoints``); empty for one URL."""


@attrs.frozen(kw_only=True)
class BatchResult:
    """Every item of a finished batch, in input order."""

    items: list[BatchItem]
    """One item per request, ``items[i].index == i``."""
    elapsed: float
    """Seconds the batch took."""
    aborted: FriendliBatchAborted | None = None
    """Set when the batch stopped early; the items it did not attempt are ``skipped``."""
    unmatched: int = 0
    """Images of earlier runs in ``out_dir`` that match no item of this batch: kept,
    left out of this run's manifest, listed in ``unmatched_listing``."""
    unmatched_listing: pathlib.Path | None = None
    """``out_dir/unmatched.jsonl``, the manifest lines of those images (None: none)."""

    @property
    def ok(self) -> bool:
        """True when every item has an image."""
        return all(item.ok for item in self.items)

    @property
    def succeeded(self) -> list[BatchItem]:
        """The items with an image (``ok`` and ``resumed``)."""
        return [item for item in self.items if item.ok]

    @property
    def failed(self) -> list[BatchItem]:
        """The items that failed."""
        return [item for item in self.items if item.status == "failed"]

    @property
    def skipped(self) -> list[BatchItem]:
        """The items not attempted because the batch stopped."""
        return [item for item in self.items if item.status == "skipped"]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[BatchItem]:
        return iter(self.items)

    def __getitem__(self, index: int) -> BatchItem:
        return self.items[index]

    def _repr_html_(self) -> str:
        return _batch_html(self)  # Jupyter shows a table of the items


# -- the request path ------------------------------------------------------------------------

AttemptOutcome: TypeAlias = Literal["ok", "rate_limited", "other"]


class AttemptGate(Protocol):
    """Admission to each attempt of a call (a batch's adaptive in-flight limit).

    The client's retry loop acquires the gate before every attempt and releases it
    with how the attempt went, so the gate sees every 429, retried ones included.
    ``acquire`` may raise to stop the call (the batch stopped); that exception passes
    through the retry loop unchanged.
    """

    async def acquire(self) -> int:
        """Wait for admission; return a ticket to hand back to `release`."""
        ...

    def release(
        self, ticket: int, outcome: AttemptOutcome, retry_after: float | None = None
    ) -> None:
        """Hand the admission back, with the attempt's outcome."""
        ...


class BatchMonitor(Protocol):
    """What a batch tells the client's telemetry: each finished item, and that it ended."""

    def item(self, status: str) -> None:
        """One item finished with ``status`` (a `BatchItem.status`)."""
        ...

    def close(self) -> None:
        """The batch ended."""
        ...


def _no_monitor(_progress: Callable[[], BatchProgress]) -> BatchMonitor | None:
    return None


@attrs.frozen
class RequestPath:
    """A client's one request path, as the resources and the batch engine use it.

    ``send`` runs one call through the retry loop (every attempt admitted by ``gate``
    when given); ``resolve`` turns per-call options into the call's settings;
    ``endpoints`` reports the client's endpoints.
    """

    send: Callable[[str, RequestModel, CallOptions, AttemptGate | None], Awaitable[ImageResult]]
    resolve: Callable[[CallOverrides], CallOptions]
    endpoints: Callable[[], tuple[EndpointStats, ...]] = tuple
    """A snapshot of the client's endpoints (for the batch progress)."""
    monitor_batch: Callable[[Callable[[], BatchProgress]], BatchMonitor | None] = _no_monitor
    """A monitor for a batch's metrics, given its progress (None: no metric is collected)."""


# -- display in notebooks: pictures without Pillow, batches as tables --------------------

#: Formats Jupyter front ends draw from a display bundle.
_NOTEBOOK_IMAGE_TYPES: Final = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
}
#: Rows shown for a large batch: the first ones, then a line saying how many more.
NOTEBOOK_ROWS: Final = 20
_PROMPT_CHARS: Final = 80


def _image_mimebundle(result: ImageResult) -> dict[str, str]:
    """The display bundle of an image: its bytes under its MIME type, and its repr."""
    bundle = {"text/plain": repr(result)}
    mime = _NOTEBOOK_IMAGE_TYPES.get(result.format)
    if mime is not None:
        bundle[mime] = result.image.decode("ascii")  # already the base64 text
    return bundle


def _escape(text: str) -> str:
    # html (with its entity tables) is imported by the first table shown, not with the
    # package.
    import html  # noqa: PLC0415

    return html.escape(text, quote=True)


def _html_cell(value: object) -> str:
    return f"<td>{_escape(str(value))}</td>"


def _item_prompt(item: BatchItem) -> str:
    prompt = item.request.get("prompt")
    if not isinstance(prompt, str):
        return ""
    return prompt if len(prompt) <= _PROMPT_CHARS else prompt[: _PROMPT_CHARS - 1] + "…"


def _item_outcome(item: BatchItem) -> str:
    if item.error is not None:
        return f"{type(item.error).__name__}: {item.error}"
    if item.path is not None:
        return str(item.path)
    if item.result is not None:
        width, height = item.result.width, item.result.height
        size = f"{width}x{height} " if width and height else ""
        return f"{item.result.format} {size}({len(item.result.data):,} bytes)"
    return ""


def _html_rows(items: Sequence[BatchItem]) -> list[str]:
    rows = []
    for item in items:
        seed = item.request.get("seed")
        rows.append(
            f'<tr class="{_escape(item.status)}">'
            + _html_cell(item.index)
            + _html_cell(item.status)
            + _html_cell(_item_prompt(item))
            + _html_cell("" if seed is None else seed)
            + _html_cell(item.attempts)
            + _html_cell(f"{item.elapsed:.2f}")
            + _html_cell(_item_outcome(item))
            + "</tr>"
        )
    return rows


def _batch_html(result: BatchResult) -> str:
    """A compact HTML table of a batch: a summary line, then one row per item (capped)."""
    items = result.items
    counts: dict[str, int] = {}
    for item in items:
        counts[item.status] = counts.get(item.status, 0) + 1
    summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    attempts = sum(item.attempts for item in items)
    caption = (
        f"BatchResult: {len(items)} items ({summary or 'none'}) in {result.elapsed:.2f} s, "
        f"{attempts} attempts"
    )
    if result.aborted is not None:
        caption += f"; stopped: {result.aborted}"
    body = _html_rows(items[:NOTEBOOK_ROWS])
    if len(items) > NOTEBOOK_ROWS:
        more = len(items) - NOTEBOOK_ROWS
        body.append(f'<tr><td colspan="7">… {more:,} more (index the result to see them)</td></tr>')
    header = "".join(
        f"<th>{name}</th>"
        for name in ("index", "status", "prompt", "seed", "attempts", "elapsed s", "file / error")
    )
    return (
        '<table class="friendli-batch">'
        f'<caption style="text-align:left">{_escape(caption)}</caption>'
        f"<thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )
