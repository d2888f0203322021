"""Batch types: options, items, progress, results and endpoint snapshots, and their display.

Models are frozen attrs classes: immutable, slotted, safe to share between threads.
"""

from __future__ import annotations

import collections
import importlib.util
import math
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias

import attrs

from ._config import CallOverrides, check_count
from ._exceptions import (
    FriendliAPIError,
    FriendliBatchAborted,
    FriendliError,
    FriendliValidationError,
)
from ._results import ImageResult
from ._secrets import hide_credentials

__all__ = [
    "NOTEBOOK_ROWS",
    "OUTPUT_FORMATS",
    "BatchItem",
    "BatchOptions",
    "BatchProgress",
    "BatchResult",
    "BatchStatus",
    "OutputFormat",
    "resumed_item",
]


BatchStatus: TypeAlias = Literal["ok", "failed", "skipped", "resumed"]
#: The order of the statuses in a `BatchResult`'s summary.
_STATUS_ORDER: Final[tuple[BatchStatus, ...]] = ("ok", "resumed", "failed", "skipped")
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


def _location_or_none(value: str | os.PathLike[str] | None) -> pathlib.Path | str | None:
    """A local path as a `pathlib.Path`; an fsspec URL (``s3://``, ``memory://``) as text."""
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise FriendliValidationError(
            "out_dir", f"must be a path, an fsspec URL or None, got {type(value).__name__}"
        )
    if isinstance(value, str) and "://" in value:
        protocol, _, rest = value.partition("://")
        if protocol in ("file", "local"):
            return pathlib.Path(rest)
        if not rest.strip("/"):
            raise FriendliValidationError("out_dir", f"names no location: {value!r}")
        return value.rstrip("/")
    return pathlib.Path(value)


def _storage_options(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise FriendliValidationError(
            "storage_options", f"must be a mapping or None, got {type(value).__name__}"
        )
    return dict(value)


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
        out_dir: write each image to this location as it arrives (the items then hold
            where it is, not the bytes) and record every finished item in its
            ``manifest.jsonl``: a local directory, or any fsspec URL (``s3://bucket/x``,
            ``gs://...``, ``memory://...``; the file system's package must be installed).
            One batch at a time per location: a local directory is locked; an object
            store has no lock, so do not run two batches into one URL at once. On a URL
            the manifest is written when the run ends (a killed run's published shards
            are found again from the shards themselves).
        storage_options: passed to fsspec for an ``out_dir`` URL (credentials,
            ``endpoint_url``...); never shown in a repr.
        resume: with ``out_dir``, skip items an earlier run into it already finished:
            the same request (and the same occurrence among identical requests), its
            file present with the recorded sha256, wherever it sits in the input now;
            False sends every request again. Unordered, a rerun sends its new requests
            first: the finished items are yielded as ``resumed`` while those are in
            flight and after the input is read (their requests meanwhile wait in a
            temporary file, about 130 bytes an item). Either way, images of earlier
            runs that match no item are kept and listed in ``unmatched.jsonl`` (see
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
        n: images per request, each its own item (``variant`` 0 to ``n - 1``, index
            ``request position * n + variant``) with its own seed: the request's seed,
            when it has one, for variant 0, and for the others (all of them, when the
            request has none) a seed derived from the item's identity (`variant_seed`),
            so a rerun makes the same pictures. With ``n=1`` the request is sent as it
            is. The server makes one image per request: ``n`` images are ``n`` requests.
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
    out_dir: pathlib.Path | str | None = attrs.field(default=None, converter=_location_or_none)
    storage_options: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_storage_options, repr=False
    )
    resume: bool = attrs.field(default=True, converter=_flag)
    output_format: OutputFormat = attrs.field(default="files", validator=_output_format)
    shard_size: int = attrs.field(default=1000, validator=_positive_int)
    n: int = attrs.field(default=1, validator=_positive_int)
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
    """The position of the request in the input (0-based); with ``n`` variants per
    request, ``position * n + variant``."""
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
    """Where the image was written (the file, or the shard holding it), when the batch
    has a local ``out_dir``."""
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
    variant: int = 0
    """Which of the request's ``n`` images this is (with ``id`` and ``occurrence``, the
    item's identity)."""
    uri: str | None = None
    """Where the image is stored (the file, or the shard holding it) as a path or an
    fsspec URL, when the batch has an ``out_dir``; ``key`` names it in a shard."""
    key: str | None = None
    """The item's name in ``out_dir``: its file's stem, its sample key in a WebDataset
    shard, its ``key`` column in a Parquet shard."""

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
        elif self.uri is not None:
            parts.append(f"uri={self.uri!r}")
        elif self.result is not None:
            parts.append(f"result={self.result!r}")
        if self.error is not None:
            parts.append(f"error={type(self.error).__name__}")
        parts.append(f"attempts={self.attempts}")
        parts.append(f"elapsed={self.elapsed:.2f}s")
        return f"BatchItem({', '.join(parts)})"


#: Each field's slot setter, in `attrs.fields` order: `resumed_item` fills them directly.
_SLOT_SETTERS: Final = tuple(
    getattr(BatchItem, field.name).__set__ for field in attrs.fields(BatchItem)
)


def resumed_item(
    *,
    index: int,
    item_id: str,
    occurrence: int,
    variant: int,
    key: str,
    request: Mapping[str, Any],
    path: pathlib.Path | None,
    uri: str,
    fmt: str | None,
    sha256: str | None,
    request_id: str | None,
) -> BatchItem:
    """``BatchItem(status="resumed", ...)``, the same item at half the cost: a frozen
    class's ``__init__`` sets each of its 17 fields through ``object.__setattr__`` (a
    resume makes one item per finished request; a million of them took 4 s)."""
    if type(request) is not dict or "http_headers" in request:
        request = _request_as_kept(request)
    item: BatchItem = object.__new__(BatchItem)
    (
        set_index, set_id, set_request, set_status, set_result, set_path, set_format,
        set_sha256, set_error, set_attempts, set_elapsed, set_request_id,
        set_maybe_duplicated, set_occurrence, set_variant, set_uri, set_key,
    ) = _SLOT_SETTERS  # fmt: skip
    set_index(item, index)
    set_id(item, item_id)
    set_request(item, request)
    set_status(item, "resumed")
    set_result(item, None)
    set_path(item, path)
    set_format(item, fmt)
    set_sha256(item, sha256)
    set_error(item, None)
    set_attempts(item, 0)
    set_elapsed(item, 0.0)
    set_request_id(item, request_id)
    set_maybe_duplicated(item, False)
    set_occurrence(item, occurrence)
    set_variant(item, variant)
    set_uri(item, uri)
    set_key(item, key)
    return item


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
    unmatched_listing: pathlib.Path | str | None = None
    """``out_dir/unmatched.jsonl``, the manifest lines of those images (None: none); a
    URL when ``out_dir`` is one."""

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

    def __repr__(self) -> str:
        # A summary, not the items: a batch of millions prints on one short line.
        counts = collections.Counter(item.status for item in self.items)
        statuses = ", ".join(
            f"{counts[status]:,} {status}" for status in _STATUS_ORDER if counts[status]
        )
        parts = [f"{len(self.items):,} items" + (f": {statuses}" if statuses else "")]
        parts.append(f"elapsed={self.elapsed:.2f}s")
        if self.aborted is not None:
            parts.append(f"aborted={type(self.aborted.cause).__name__}")
        if self.unmatched:
            parts.append(f"unmatched={self.unmatched}")
        return f"BatchResult({', '.join(parts)})"

    def _repr_html_(self) -> str:
        return _batch_html(self)  # Jupyter shows a table of the items


# -- display in notebooks: pictures without Pillow, batches as tables --------------------

#: Rows shown for a large batch: the first ones, then a line saying how many more.
NOTEBOOK_ROWS: Final = 20
_PROMPT_CHARS: Final = 80


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
