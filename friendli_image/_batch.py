"""Fan-out batches: ``generate_batch`` / ``edit_batch``, bounded, adaptive and resumable.

A batch reads its requests lazily, one at a time, and holds at most ``concurrency``
of them in flight (plus, in ordered mode, a bounded window of finished items waiting for
an earlier one), so a generator of a million prompts costs memory for ``concurrency``
items, not for a million. Every request goes through the client's one request path
(``AsyncFriendli.request``), so a batch gets the same validation, retries and typed
errors as single calls; on top of it the batch adds:

- **A gate** in front of the request path: an in-flight limit that halves when the
  server answers 429 (at most once per round of requests) and grows back by one per
  round of successes (AIMD), and an optional requests-per-second ceiling. Rate-limited
  items are retried by the batch, after the server's ``Retry-After``, so that the limit
  sees every 429.
- **Per-item outcomes**: failures are captured on the item, not raised. A failure that
  every remaining item would meet (401, 403, 404, a redirect, a server unreachable after
  the retries) stops new dispatches and reports the rest as ``skipped`` with
  `FriendliBatchAborted`.
- **A sink** (``out_dir``): each image is written as it arrives (temporary file, then
  ``os.replace``) and dropped from memory; ``manifest.jsonl`` gets one line per finished
  item, written with one ``write`` call per line. A rerun over the same input and
  directory skips items whose line is in the manifest and whose file is present with
  the recorded sha256, so a killed job resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import math
import os
import pathlib
import random
import tempfile
import threading
import time
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sized,
)
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import attrs
import orjson

from ._client import CallOptions
from ._config import RetryConfig
from ._exceptions import (
    FriendliAPIError,
    FriendliAPIStatusError,
    FriendliAuthenticationError,
    FriendliBatchAborted,
    FriendliConnectionError,
    FriendliError,
    FriendliNotFoundError,
    FriendliPermissionDeniedError,
    FriendliRateLimitError,
    FriendliUsageError,
    FriendliValidationError,
)
from ._formats import EXTENSIONS
from ._models import EditRequest, GenerateRequest, ImageResult, public_fields
from ._retry import backoff_delay
from ._serde import converter

if TYPE_CHECKING:
    from ._client import AsyncFriendli
    from ._sync import SyncFriendli

__all__ = [
    "MANIFEST_NAME",
    "Batch",
    "BatchItem",
    "BatchOperation",
    "BatchProgress",
    "BatchResult",
    "BatchStatus",
    "RequestSpec",
    "SyncBatch",
]

#: The manifest's file name inside ``out_dir``.
MANIFEST_NAME: Final = "manifest.jsonl"
#: ``on_progress`` is called at most this often (and once more at the end).
_PROGRESS_INTERVAL: Final = 0.1
#: Multiplicative decrease of the in-flight limit on a 429 (CUBIC's factor: halving
#: starves a server whose 429s are sparse and not about load).
_DECREASE: Final = 0.7
#: Per-call option keys a request mapping may carry besides the request fields.
_OPTION_KEYS: Final = frozenset({"retries", "server_url", "timeout_ms", "http_headers"})
#: Manifest lines longer than this are not remembered for resuming (packing limit).
_MAX_LINE: Final = (1 << 24) - 1
_TEMP_SUFFIX: Final = ".part"

BatchStatus: TypeAlias = Literal["ok", "failed", "skipped", "resumed"]
#: One request of a batch: a mapping of ``generate`` / ``edit`` keyword arguments (per-call
#: ``retries``, ``server_url``, ``timeout_ms`` and ``http_headers`` included), a request
#: model, or (``generate_batch`` only) a prompt string.
RequestSpec: TypeAlias = "Mapping[str, Any] | GenerateRequest | EditRequest | str"
RequestModel: TypeAlias = "GenerateRequest | EditRequest"


@attrs.frozen(kw_only=True, repr=False, eq=False)
class BatchItem:
    """The outcome of one request of a batch."""

    index: int
    """The position of the request in the input (0-based)."""
    id: str
    """sha256 of the request's canonical JSON: equal requests have equal ids ("" if invalid)."""
    request: Mapping[str, Any]
    """The request as given (a model is shown as its fields)."""
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
    """Items finished per second in this run (resumed items excluded)."""
    eta: float | None
    """Seconds until the last item, at the current rate (None when unknown)."""


@attrs.frozen(kw_only=True)
class BatchResult:
    """Every item of a finished batch, in input order."""

    items: list[BatchItem]
    """One item per request, ``items[i].index == i``."""
    elapsed: float
    """Seconds the batch took."""
    aborted: FriendliBatchAborted | None = None
    """Set when the batch stopped early; the items it did not attempt are ``skipped``."""

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


@attrs.frozen
class BatchOperation:
    """What a batch sends: the route, the function that validates one request, its model."""

    path: str
    build: Callable[..., RequestModel]
    model: type[GenerateRequest] | type[EditRequest]
    accepts_prompt: bool = False
    fields: frozenset[str] = attrs.field(init=False)
    required: frozenset[str] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        parameters = inspect.signature(self.build).parameters.values()
        object.__setattr__(self, "fields", frozenset(p.name for p in parameters))
        object.__setattr__(
            self,
            "required",
            frozenset(p.name for p in parameters if p.default is inspect.Parameter.empty),
        )


def _fatal(error: FriendliAPIError) -> bool:
    """Will every other request of the batch fail the same way?"""
    if isinstance(
        error,
        FriendliAuthenticationError | FriendliPermissionDeniedError | FriendliNotFoundError,
    ):
        return True
    if isinstance(error, FriendliAPIStatusError):
        return 300 <= error.status < 400
    # Still unreachable after the retries, and the request never got there.
    return isinstance(error, FriendliConnectionError) and not error.maybe_processed


def _request_id_of(prepared_path: str, model: RequestModel) -> str:
    canonical = orjson.dumps(converter.unstructure(model), option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256(prepared_path.encode())
    digest.update(b"\n")
    digest.update(canonical)
    return digest.hexdigest()


class _Prepared:
    __slots__ = ("id", "model", "options", "request", "retry_429")

    def __init__(
        self,
        request: Mapping[str, Any],
        model: RequestModel,
        options: tuple[CallOptions, bool],
        id_: str,
    ) -> None:
        self.request = request
        self.model = model
        self.options, self.retry_429 = options
        self.id = id_


class _Aborted(Exception):
    """Internal: the gate is closed because the batch stopped."""


class _Gate:
    """The in-flight limit (AIMD on 429) and the requests-per-second ceiling."""

    __slots__ = (
        "_aborted",
        "_ceiling",
        "_epoch",
        "_hold_until",
        "_interval",
        "_limit",
        "_next_send",
        "_waiters",
        "in_flight",
    )

    def __init__(self, ceiling: int, rps: float | None) -> None:
        self._ceiling = ceiling
        self._limit = float(ceiling)
        self._epoch = 0
        self._hold_until = 0.0
        self._interval = 1.0 / rps if rps else 0.0
        self._next_send = 0.0
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._aborted = False
        self.in_flight = 0

    @property
    def limit(self) -> int:
        return max(1, int(self._limit))

    @property
    def aborted(self) -> bool:
        return self._aborted

    async def acquire(self) -> int:
        """Wait for a slot (and the rate ceiling); return the epoch the request starts in."""
        if self._aborted:
            raise _Aborted
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
        else:
            waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                granted = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.result():
                    self._free()
                else:
                    self._waiters.remove(waiter)
                raise
            if not granted:
                raise _Aborted
        if self._interval:
            now = time.monotonic()
            send_at = max(now, self._next_send)
            self._next_send = send_at + self._interval
            if send_at > now:
                try:
                    await asyncio.sleep(send_at - now)
                except asyncio.CancelledError:
                    self._free()
                    raise
            if self.aborted:
                self._free()
                raise _Aborted
        return self._epoch

    def release(
        self,
        epoch: int,
        outcome: Literal["ok", "rate_limited", "other"],
        retry_after: float | None = None,
    ) -> None:
        """Give the slot back, adapting the limit to how the request went."""
        if outcome == "rate_limited":
            # One decrease per round: 429s answering requests sent before the last
            # decrease, or within the Retry-After the server gave with it, say nothing new.
            now = time.monotonic()
            if epoch == self._epoch and now >= self._hold_until:
                self._limit = max(1.0, self._limit * _DECREASE)
                self._epoch += 1
                self._hold_until = now + (retry_after or 0.0)
        elif outcome == "ok" and self._limit < self._ceiling:
            self._limit = min(float(self._ceiling), self._limit + 1.0 / self._limit)
        self._free()

    def _free(self) -> None:
        self.in_flight -= 1
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(True)

    def abort(self) -> None:
        """Refuse every waiting and future acquisition."""
        self._aborted = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(False)


def _pack(offset: int, length: int) -> int:
    return (offset << 24) | length


class _Sink:
    """Writes images into ``out_dir`` and keeps ``manifest.jsonl``; answers resume lookups."""

    def __init__(self, directory: pathlib.Path, resume: bool) -> None:
        self.directory = directory
        self.manifest_path = directory / MANIFEST_NAME
        self._resume = resume
        # index -> (offset << 24 | length) of its latest success line: ~100 bytes per
        # finished item, dropped as the run reaches the item.
        self._done: dict[int, int] = {}
        self._reader: Any = None
        self._reader_lock = threading.Lock()
        self._manifest: Any = None

    # -- opening and closing (blocking; run on a worker thread) ---------------------

    def open(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(f".*{_TEMP_SUFFIX}"):
                stale.unlink(missing_ok=True)
            if self._resume and self.manifest_path.exists():
                self._load()
                self._reader = self.manifest_path.open("rb")
            mode = "ab" if self._resume else "wb"
            self._manifest = self.manifest_path.open(mode, buffering=0)
        except OSError as exc:
            self.close()
            raise FriendliUsageError(
                f"cannot use out_dir {str(self.directory)!r}: {exc}; pass a writable directory"
            ) from exc

    def _load(self) -> None:
        with self.manifest_path.open("r+b") as manifest:
            offset = 0
            for line in manifest:
                length = len(line)
                if not line.endswith(b"\n"):
                    # A crash mid-append leaves one partial last line: cut it, so the
                    # next line does not get glued to it.
                    manifest.truncate(offset)
                    break
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    record = None
                if (
                    isinstance(record, dict)
                    and record.get("status") == "ok"
                    and isinstance(record.get("index"), int)
                    and length <= _MAX_LINE
                ):
                    self._done[record["index"]] = _pack(offset, length)
                offset += length

    def close(self) -> None:
        for handle in (self._manifest, self._reader):
            if handle is not None:
                handle.close()
        self._manifest = self._reader = None

    # -- per item -------------------------------------------------------------------

    def has_previous(self, index: int) -> bool:
        return index in self._done

    def previous(self, index: int, item_id: str) -> dict[str, Any] | None:
        """The manifest record of an earlier success for this very request, if its file
        is intact (blocking: hashes the file)."""
        packed = self._done.pop(index, None)
        if packed is None or self._reader is None:
            return None
        offset, length = packed >> 24, packed & _MAX_LINE
        with self._reader_lock:
            self._reader.seek(offset)
            line = self._reader.read(length)
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(record, dict) or record.get("id") != item_id:
            return None
        name = record.get("file")
        if not isinstance(name, str) or pathlib.PurePath(name).name != name:
            return None
        try:
            digest = _file_sha256(self.directory / name)
        except OSError:
            return None
        return record if digest == record.get("sha256") else None

    def write_image(self, name: str, image: bytes) -> str:
        """Write the image atomically; return its sha256 (blocking)."""
        target = self.directory / name
        try:
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.", suffix=_TEMP_SUFFIX)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(image)
                os.replace(temp, target)
            except BaseException:
                pathlib.Path(temp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise FriendliUsageError(
                f"cannot write {str(target)!r}: {exc}; check that out_dir is writable and "
                "has space, then rerun (finished items are kept)"
            ) from exc
        return hashlib.sha256(image).hexdigest()

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one manifest line with a single write (unbuffered)."""
        try:
            self._manifest.write(orjson.dumps(record) + b"\n")
        except OSError as exc:
            raise FriendliUsageError(
                f"cannot append to {str(self.manifest_path)!r}: {exc}; check that out_dir "
                "is writable and has space, then rerun"
            ) from exc


def _file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_name(index: int, item_id: str, fmt: str) -> str:
    return f"{index:06d}-{item_id[:12]}{EXTENSIONS.get(fmt, '.bin')}"


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FriendliValidationError(name, f"must be an int >= 1, got {value!r}")
    return value


class Batch:
    """A batch of requests, run when it is iterated or awaited (once).

    ``async for item in batch`` yields each `BatchItem` as it finishes (in input order
    with ``ordered=True``); ``await batch`` (or ``await batch.collect()``) runs it to
    the end and returns a `BatchResult` in input order. Leaving an ``async for`` early
    cancels the requests in flight once the iterator is closed: use ``async with batch:``
    (or ``contextlib.aclosing``) to close it at once.

    Create batches with ``client.container.image.generate_batch(...)`` or
    ``edit_batch(...)``; see those methods for the parameters.
    """

    def __init__(
        self,
        client: AsyncFriendli,
        operation: BatchOperation,
        requests: Iterable[RequestSpec] | AsyncIterable[RequestSpec],
        *,
        concurrency: int = 16,
        rps: float | None = None,
        ordered: bool = False,
        reorder_window: int | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        resume: bool = True,
        on_progress: Callable[[BatchProgress], object] | None = None,
        stop_on_fatal: bool = True,
        total: int | None = None,
        retries: RetryConfig | int | None = None,
        server_url: str | None = None,
        timeout_ms: int | None = None,
        http_headers: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(requests, str | bytes | Mapping) or not isinstance(
            requests, Iterable | AsyncIterable
        ):
            raise FriendliValidationError(
                "requests",
                "must be an iterable or async iterable of requests (mappings of "
                f"arguments, request models or prompts), got {type(requests).__name__}",
            )
        self._client = client
        self._operation = operation
        self._requests = requests
        self._concurrency = _positive_int("concurrency", concurrency)
        if rps is not None and (
            isinstance(rps, bool)
            or not isinstance(rps, int | float)
            or not math.isfinite(rps)
            or rps <= 0
        ):
            raise FriendliValidationError("rps", f"must be a positive number or None, got {rps!r}")
        self._rps = rps
        self._ordered = bool(ordered)
        self._window = (
            max(4 * self._concurrency, 64)
            if reorder_window is None
            else _positive_int("reorder_window", reorder_window)
        )
        self._out_dir = None if out_dir is None else pathlib.Path(out_dir)
        self._resume = bool(resume)
        if on_progress is not None and not callable(on_progress):
            raise FriendliValidationError("on_progress", "must be a callable or None")
        self._on_progress = on_progress
        self._stop_on_fatal = bool(stop_on_fatal)
        if total is None and isinstance(requests, Sized):
            total = len(requests)
        elif total is not None and (
            isinstance(total, bool) or not isinstance(total, int) or total < 0
        ):
            raise FriendliValidationError("total", f"must be an int >= 0, got {total!r}")
        self._total = total
        self._batch_retries = retries
        self._batch_server_url = server_url
        self._batch_timeout_ms = timeout_ms
        self._batch_headers = dict(http_headers or {})
        self._default_options = self._call_options({})
        self._rng = random.Random()  # noqa: S311  (jitter, not secrets)
        self._started = False
        self._iterator: AsyncIterator[BatchItem] | None = None
        self._gate = _Gate(self._concurrency, rps)
        self._sink: _Sink | None = None
        self._aborted: FriendliBatchAborted | None = None
        self._counts = {"ok": 0, "failed": 0, "skipped": 0, "resumed": 0}
        self._t0 = 0.0
        self._last_progress = 0.0

    # -- public surface -------------------------------------------------------------

    @property
    def aborted(self) -> FriendliBatchAborted | None:
        """Set once the batch stopped early (items after it are ``skipped``)."""
        return self._aborted

    def progress(self) -> BatchProgress:
        """A snapshot of the batch so far."""
        counts = self._counts
        done = sum(counts.values())
        elapsed = time.monotonic() - self._t0 if self._started else 0.0
        worked = done - counts["resumed"]
        rate = worked / elapsed if elapsed > 0 else 0.0
        eta = None
        if self._total is not None:
            remaining = max(0, self._total - done)
            eta = 0.0 if remaining == 0 else (remaining / rate if rate > 0 else None)
        return BatchProgress(
            total=self._total,
            done=done,
            succeeded=counts["ok"],
            failed=counts["failed"],
            skipped=counts["skipped"],
            resumed=counts["resumed"],
            in_flight=self._gate.in_flight,
            limit=self._gate.limit,
            elapsed=elapsed,
            rate=rate,
            eta=eta,
        )

    def __aiter__(self) -> AsyncIterator[BatchItem]:
        if self._iterator is not None or self._started:
            raise FriendliUsageError(
                "a batch runs once; call generate_batch()/edit_batch() again to rerun it"
            )
        self._iterator = self._run(ordered=self._ordered)
        return self._iterator

    async def collect(self) -> BatchResult:
        """Run the batch to the end; return every item in input order.

        This holds every item (and, without ``out_dir``, every image) in memory; for
        inputs too large for that, iterate with ``async for`` instead.
        """
        async with self:
            items = [item async for item in self]
        items.sort(key=_index_of)
        return BatchResult(items=items, elapsed=time.monotonic() - self._t0, aborted=self._aborted)

    def __await__(self) -> Generator[Any, None, BatchResult]:
        return self.collect().__await__()

    async def __aenter__(self) -> Batch:
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the batch: cancel the requests in flight and close the manifest."""
        iterator = self._iterator
        if iterator is not None:
            await iterator.aclose()  # type: ignore[attr-defined]

    # -- preparing one request --------------------------------------------------------

    def _call_options(self, spec: Mapping[str, Any]) -> tuple[CallOptions, bool]:
        """The call options of an item, and whether its policy retries 429."""
        headers = self._batch_headers
        item_headers = spec.get("http_headers")
        if item_headers:
            if not isinstance(item_headers, Mapping):
                raise FriendliValidationError("http_headers", "must be a mapping of str to str")
            headers = {**headers, **item_headers}
        options = self._client._options(
            retries=spec.get("retries", self._batch_retries),
            server_url=spec.get("server_url", self._batch_server_url),
            timeout_ms=spec.get("timeout_ms", self._batch_timeout_ms),
            http_headers=headers,
        )
        retry = options.retry
        if 429 not in retry.retry_statuses:
            return options, False
        # The batch retries 429s itself, so that the in-flight limit sees each one.
        retry = attrs.evolve(retry, retry_statuses=retry.retry_statuses - {429})
        return CallOptions(options.server_url, options.timeout, retry, options.headers), True

    def _prepare(self, spec: object) -> _Prepared:
        operation = self._operation
        options = self._default_options
        request: Mapping[str, Any]
        if isinstance(spec, GenerateRequest | EditRequest):
            if not isinstance(spec, operation.model):
                raise FriendliValidationError(
                    "request",
                    f"is a {type(spec).__name__}; this batch takes {operation.model.__name__}",
                )
            model: RequestModel = spec
            request = public_fields(spec)
        else:
            if isinstance(spec, str) and operation.accepts_prompt:
                spec = {"prompt": spec}
            if not isinstance(spec, Mapping):
                raise FriendliValidationError(
                    "request",
                    "must be a mapping of arguments or a "
                    f"{operation.model.__name__}, got {type(spec).__name__}",
                )
            request = spec
            arguments: dict[str, Any] = {}
            has_options = False
            for key, value in spec.items():
                if key in operation.fields:
                    arguments[key] = value
                elif key in _OPTION_KEYS:
                    has_options = True
                else:
                    raise FriendliValidationError(
                        str(key),
                        f"is not an argument of this call; expected some of "
                        f"{', '.join(sorted(operation.fields | _OPTION_KEYS))}",
                    )
            for name in operation.required - arguments.keys():
                raise FriendliValidationError(name, "is required")
            model = operation.build(**arguments)
            if has_options:
                options = self._call_options(spec)
        return _Prepared(request, model, options, _request_id_of(operation.path, model))

    # -- running ----------------------------------------------------------------------

    async def _run(self, *, ordered: bool) -> AsyncIterator[BatchItem]:
        self._started = True
        self._t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        if self._out_dir is not None:
            sink = _Sink(self._out_dir, self._resume)
            await loop.run_in_executor(None, sink.open)
            self._sink = sink
        sync_source: Iterator[Any] | None = None
        async_source: AsyncIterator[Any] | None = None
        if isinstance(self._requests, AsyncIterable):
            async_source = aiter(self._requests)
        else:
            sync_source = iter(self._requests)
        finished: asyncio.Queue[asyncio.Task[BatchItem]] = asyncio.Queue()
        pending: set[asyncio.Task[BatchItem]] = set()
        parked: dict[int, BatchItem] = {}
        next_index = 0
        next_out = 0
        exhausted = False
        try:
            while True:
                while (
                    not exhausted
                    and self._aborted is None
                    and len(pending) < self._concurrency
                    and (not ordered or next_index - next_out < self._window)
                ):
                    try:
                        if sync_source is not None:
                            spec = next(sync_source)
                        else:
                            assert async_source is not None  # noqa: S101
                            spec = await anext(async_source)
                    except (StopIteration, StopAsyncIteration):
                        exhausted = True
                        break
                    task = loop.create_task(self._process(next_index, spec))
                    task.add_done_callback(finished.put_nowait)
                    pending.add(task)
                    next_index += 1
                if not pending:
                    break
                task = await finished.get()
                while True:
                    pending.discard(task)
                    item = task.result()
                    self._count(item)
                    if ordered:
                        parked[item.index] = item
                    else:
                        yield item
                    if finished.empty():
                        break
                    task = finished.get_nowait()
                while next_out in parked:
                    yield parked.pop(next_out)
                    next_out += 1
                self._report()
            # Stopped early: what is left of the input is reported, not attempted.
            while not exhausted and self._aborted is not None:
                try:
                    if sync_source is not None:
                        spec = next(sync_source)
                    else:
                        assert async_source is not None  # noqa: S101
                        spec = await anext(async_source)
                except (StopIteration, StopAsyncIteration):
                    break
                item = self._skipped(next_index, spec, 0.0)
                next_index += 1
                self._count(item)
                yield item
            self._report(final=True)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            if self._sink is not None:
                self._sink.close()

    def _count(self, item: BatchItem) -> None:
        self._counts[item.status] += 1

    def _report(self, *, final: bool = False) -> None:
        if self._on_progress is None:
            return
        now = time.monotonic()
        if final or now - self._last_progress >= _PROGRESS_INTERVAL:
            self._last_progress = now
            self._on_progress(self.progress())

    def _abort(self, error: FriendliAPIError, index: int) -> None:
        if self._aborted is None:
            self._aborted = FriendliBatchAborted(error, index)
            self._gate.abort()

    def _skipped(self, index: int, spec: object, elapsed: float) -> BatchItem:
        request = spec if isinstance(spec, Mapping) else _request_view(spec)
        return BatchItem(
            index=index,
            id="",
            request=request,
            status="skipped",
            error=self._aborted,
            elapsed=elapsed,
        )

    async def _process(self, index: int, spec: object) -> BatchItem:
        started = time.monotonic()
        try:
            prepared = self._prepare(spec)
        except (FriendliValidationError, TypeError, ValueError) as exc:
            # A value of a type no check expected (e.g. controlnet_weights=5) fails its
            # item like any invalid argument, instead of ending the batch.
            error = (
                exc
                if isinstance(exc, FriendliValidationError)
                else FriendliValidationError("request", f"invalid arguments: {exc}")
            )
            request = spec if isinstance(spec, Mapping) else _request_view(spec)
            return self._failed(
                index, item_id="", request=request, error=error, attempts=0, started=started
            )
        sink = self._sink
        if sink is not None and sink.has_previous(index):
            record = await asyncio.get_running_loop().run_in_executor(
                None, sink.previous, index, prepared.id
            )
            if record is not None:
                return BatchItem(
                    index=index,
                    id=prepared.id,
                    request=prepared.request,
                    status="resumed",
                    path=sink.directory / record["file"],
                    format=record.get("format"),
                    sha256=record.get("sha256"),
                    attempts=0,
                    elapsed=time.monotonic() - started,
                    request_id=record.get("request_id"),
                )
        attempts = 0
        rate_limited = 0
        gate = self._gate
        while True:
            try:
                epoch = await gate.acquire()
            except _Aborted:
                return self._skipped(index, prepared.request, time.monotonic() - started)
            try:
                result = await self._client.request(
                    self._operation.path, prepared.model, prepared.options
                )
            except FriendliRateLimitError as error:
                gate.release(epoch, "rate_limited", error.retry_after)
                attempts += error.attempts
                rate_limited += 1
                wait = self._rate_limit_wait(error, prepared, rate_limited)
                if wait is None:
                    error.attempts = attempts
                    return self._failed(
                        index, error=error, attempts=attempts, started=started, prepared=prepared
                    )
                await asyncio.sleep(wait)
                continue
            except FriendliAPIError as error:
                gate.release(epoch, "other")
                attempts += error.attempts
                error.attempts = attempts
                if self._stop_on_fatal and _fatal(error):
                    self._abort(error, index)
                return self._failed(
                    index, error=error, attempts=attempts, started=started, prepared=prepared
                )
            except BaseException:
                gate.release(epoch, "other")
                raise
            gate.release(epoch, "ok")
            attempts += result.attempts
            break
        return await self._succeeded(index, prepared, result, attempts, started)

    def _rate_limit_wait(
        self, error: FriendliRateLimitError, prepared: _Prepared, count: int
    ) -> float | None:
        """How long a rate-limited item waits before it is sent again (None: give up)."""
        config = prepared.options.retry
        if not prepared.retry_429:
            return None
        if count >= config.max_attempts:
            return None
        hint = error.retry_after
        if hint is not None:
            if hint > config.max_retry_after:
                return None
            return hint + self._rng.uniform(0.0, min(config.jitter, 0.25))
        return backoff_delay(count, config, self._rng)

    async def _succeeded(
        self,
        index: int,
        prepared: _Prepared,
        result: ImageResult,
        attempts: int,
        started: float,
    ) -> BatchItem:
        sink = self._sink
        if sink is None:
            return BatchItem(
                index=index,
                id=prepared.id,
                request=prepared.request,
                status="ok",
                result=result,
                format=result.format,
                attempts=attempts,
                elapsed=time.monotonic() - started,
                request_id=result.request_id,
                maybe_duplicated=result.maybe_duplicated,
            )
        name = _file_name(index, prepared.id, result.format)
        digest = await asyncio.get_running_loop().run_in_executor(
            None, sink.write_image, name, result.data
        )
        elapsed = time.monotonic() - started
        model = prepared.model
        sink.append(
            {
                "index": index,
                "id": prepared.id,
                "status": "ok",
                "prompt": model.prompt,
                "seed": model.seed,
                "file": name,
                "format": result.format,
                "bytes": len(result.data),
                "sha256": digest,
                "attempts": attempts,
                "elapsed": round(elapsed, 4),
                "request_id": result.request_id,
                "maybe_duplicated": result.maybe_duplicated,
                "error": None,
                "error_type": None,
                "maybe_processed": False,
            }
        )
        return BatchItem(
            index=index,
            id=prepared.id,
            request=prepared.request,
            status="ok",
            path=sink.directory / name,
            format=result.format,
            sha256=digest,
            attempts=attempts,
            elapsed=elapsed,
            request_id=result.request_id,
            maybe_duplicated=result.maybe_duplicated,
        )

    def _failed(
        self,
        index: int,
        *,
        error: FriendliError,
        attempts: int,
        started: float,
        prepared: _Prepared | None = None,
        item_id: str = "",
        request: Mapping[str, Any] | None = None,
    ) -> BatchItem:
        if prepared is not None:
            item_id, request = prepared.id, prepared.request
        assert request is not None  # noqa: S101  (given when prepared is not)
        elapsed = time.monotonic() - started
        maybe_processed = isinstance(error, FriendliAPIError) and error.maybe_processed
        request_id = error.request_id if isinstance(error, FriendliAPIError) else None
        if self._sink is not None:
            prompt = prepared.model.prompt if prepared is not None else request.get("prompt")
            seed = prepared.model.seed if prepared is not None else request.get("seed")
            self._sink.append(
                {
                    "index": index,
                    "id": item_id,
                    "status": "failed",
                    "prompt": prompt if isinstance(prompt, str) else None,
                    "seed": seed if isinstance(seed, int) else None,
                    "file": None,
                    "format": None,
                    "bytes": None,
                    "sha256": None,
                    "attempts": attempts,
                    "elapsed": round(elapsed, 4),
                    "request_id": request_id,
                    "maybe_duplicated": False,
                    "error": str(error),
                    "error_type": type(error).__name__,
                    "maybe_processed": maybe_processed,
                }
            )
        return BatchItem(
            index=index,
            id=item_id,
            request=request,
            status="failed",
            error=error,
            attempts=attempts,
            elapsed=elapsed,
            request_id=request_id,
        )


def _index_of(item: BatchItem) -> int:
    return item.index


def _request_view(spec: object) -> Mapping[str, Any]:
    if isinstance(spec, GenerateRequest | EditRequest):
        return public_fields(spec)
    if isinstance(spec, str):
        return {"prompt": spec}
    return {"request": spec}


# -- the blocking twin --------------------------------------------------------------------


class _Pump:
    """Runs a `Batch` on the loop and hands finished items to another thread in chunks.

    The consumer thread takes everything finished so far at once, and the loop thread
    wakes it only when the buffer goes from empty to non-empty, so a fast batch crosses
    the thread boundary once per chunk, not once per item. When the consumer falls
    ``high_water`` items behind, the pump stops pulling (and the batch stops dispatching).
    """

    def __init__(self, batch: Batch, high_water: int) -> None:
        self._batch = batch
        self._high_water = high_water
        self._items: deque[BatchItem] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._finished = False
        self._cancelled_by_us = False
        self._error: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Event()
        self._task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            async with self._batch:
                async for item in self._batch:
                    with self._cond:
                        self._items.append(item)
                        if len(self._items) == 1:
                            self._cond.notify()
                        full = len(self._items) >= self._high_water
                        if full:
                            self._room.clear()
                    if full:
                        await self._room.wait()
        except asyncio.CancelledError:
            if not self._cancelled_by_us:
                self._error = FriendliUsageError(
                    "the batch was cancelled because its SyncFriendli was closed while it ran"
                )
            raise
        except BaseException as exc:  # noqa: BLE001  (re-raised in the consumer thread)
            self._error = exc
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify()

    def take(self) -> list[BatchItem] | None:
        """Block until items are finished; return them all (None once the batch is over)."""
        with self._cond:
            while not self._items and not self._finished:
                self._cond.wait()
            if not self._items:
                if self._error is not None:
                    raise self._error
                return None
            chunk = list(self._items)
            self._items.clear()
            if not self._room.is_set():
                self._loop.call_soon_threadsafe(self._room.set)
        return chunk

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._finished

    async def cancel(self) -> None:
        """Cancel the batch (requests in flight included) and wait until it stopped."""
        self._cancelled_by_us = True
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class SyncBatch:
    """The blocking twin of `Batch`, from ``SyncFriendli.container.image.generate_batch``.

    ``for item in batch`` yields each `BatchItem` as it finishes (in input order with
    ``ordered=True``); ``batch.collect()`` runs the batch to the end and returns a
    `BatchResult` in input order. Either way the whole batch runs on the client's event
    loop thread: ``collect()`` crosses the thread boundary once, iteration once per
    chunk of finished items. The requests are read, and ``on_progress`` is called, on
    that thread. Arguments are checked when the batch starts. Leaving a ``for`` loop
    early, or Ctrl-C, cancels the requests in flight.
    """

    def __init__(self, client: SyncFriendli, make: Callable[[AsyncFriendli], Batch]) -> None:
        self._client = client
        self._make = make
        self._used = False

    def _claim(self) -> None:
        if self._used:
            raise FriendliUsageError(
                "a batch runs once; call generate_batch()/edit_batch() again to rerun it"
            )
        self._used = True

    def collect(self) -> BatchResult:
        """Run the batch to the end; return every item in input order (see `Batch.collect`)."""
        self._claim()
        make = self._make

        async def run(client: AsyncFriendli) -> BatchResult:
            return await make(client).collect()

        return self._client._run(run)

    def __iter__(self) -> Iterator[BatchItem]:
        self._claim()
        make = self._make

        async def start(client: AsyncFriendli) -> _Pump:
            batch = make(client)
            return _Pump(batch, high_water=max(2 * batch._concurrency, 64))

        pump = self._client._run(start)
        try:
            while (chunk := pump.take()) is not None:
                yield from chunk
        finally:
            if not pump.finished:
                self._client._run(lambda _client: pump.cancel())
