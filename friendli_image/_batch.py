"""Fan-out batches: ``generate_batch`` / ``edit_batch``, bounded, adaptive and resumable.

A batch reads its requests lazily, one at a time, and holds at most ``concurrency``
of them in flight (plus, in ordered mode, a bounded window of finished items waiting for
an earlier one), so a generator of a million prompts costs memory for ``concurrency``
items, not for a million. Every request goes through the client's one request path and
its one retry loop (`RequestPath`), so a batch gets the same validation, retries and
typed errors as single calls; on top of it the batch adds:

- **A gate** that admits every attempt: an in-flight limit that shrinks when the server
  answers 429 (at most once per round of requests) and grows back by one per round of
  successes (AIMD), and an optional requests-per-second ceiling. The retry loop tells
  it how each attempt went, so the limit sees every 429, retried ones included.
- **Per-item outcomes**: failures are captured on the item, not raised. A failure that
  every remaining item would meet (401, 403, 404, a redirect, a server unreachable after
  the retries) stops new dispatches and reports the rest as ``skipped`` with
  `FriendliBatchAborted`. Items already in flight then that fail the same way are
  ``skipped`` too, not failed: one problem is reported once, by the item that met it
  first, and a rerun retries the others (skipped items are not in the manifest).
- **A store** (``out_dir``, see ``_store``): images and a ``manifest.jsonl``. An item
  is its request and its occurrence among identical requests, not its index, so a
  rerun resumes every item already stored wherever it sits in the input now. An item
  an earlier run may have made is claimed in the dispatch loop, in groups, with no task
  or thread hop of its own; unordered, a plain request's claim waits until the new
  requests are sent (`_Deferred`). Images are written in groups: small ones for a local
  directory on the loop, others with one thread hop for the items that finished while
  the previous group was written (`_FileWriter`).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import tempfile
import time
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sized,
)
from typing import Any, Final

if sys.platform == "linux":
    import resource

import attrs
import orjson

from ._batch_models import BatchItem, BatchOptions, BatchProgress, BatchResult, resumed_item
from ._blocking import run_blocking
from ._clock import monotonic, pause
from ._config import CallOptions, CallOverrides
from ._exceptions import (
    FriendliAPIError,
    FriendliAPIStatusError,
    FriendliAuthenticationError,
    FriendliBatchAborted,
    FriendliConnectionError,
    FriendliError,
    FriendliNotFoundError,
    FriendliPermissionDeniedError,
    FriendliUsageError,
    FriendliValidationError,
)
from ._formats import EXTENSIONS
from ._request_path import AttemptOutcome, BatchMonitor, RequestPath
from ._requests import EditRequest, GenerateRequest, RequestModel, public_fields
from ._results import ImageResult
from ._store import (
    BatchStore,
    Occurrences,
    Unmatched,
    dataset_fields,
    image_name,
    item_key,
    manifest_record,
    plain_request_digest,
    request_digest,
    variant_seeds,
)

__all__ = ["Batch", "BatchOperation", "BatchStopped", "Gate"]

#: ``on_progress`` is called at most this often (and once more at the end).
_PROGRESS_INTERVAL: Final = 0.1
#: Multiplicative decrease of the in-flight limit on a 429 (CUBIC's factor: halving
#: starves a server whose 429s are sparse and not about load).
_DECREASE: Final = 0.7
#: Full shards written at once (the next items wait): bounds the shards in memory.
_SHARD_BACKLOG: Final = 2
#: A group of images this small, for a local ``out_dir``, is written on the event loop:
#: for tiny images the hop to a worker thread (and the GIL passed back and forth at each
#: system call there) costs several times the write itself.
_INLINE_BYTES: Final = 256 * 1024
#: An inline group that took longer than this per image, or in all, while its thread
#: slept in the kernel (or right after another slow one) met a slow disk: the next groups
#: go to a worker thread for `_THREADED_FOR` seconds, so it never holds the loop for long.
_INLINE_SLOW_PER_IMAGE: Final = 0.0005
_INLINE_SLOW: Final = 0.005
_THREADED_FOR: Final = 10.0
#: Items an earlier run may have made are claimed this many at a time (one thread hop).
_CLAIM_GROUP: Final = 256
#: A resume's finished items waiting to be claimed (`_Deferred`) are held in memory up to
#: this many bytes, then in a temporary file.
_DEFERRED_IN_MEMORY: Final = 1 << 20
#: Per-call option keys a request mapping may carry besides the request fields.
_OPTION_KEYS: Final = frozenset(field.name for field in attrs.fields(CallOverrides))


@attrs.frozen
class BatchOperation:
    """What a batch sends: the route and the request model that validates one request."""

    path: str
    model: type[GenerateRequest] | type[EditRequest]
    accepts_prompt: bool = False
    fields: frozenset[str] = attrs.field(init=False)
    required: frozenset[str] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        fields = attrs.fields(self.model)
        object.__setattr__(self, "fields", frozenset(field.name for field in fields))
        object.__setattr__(
            self,
            "required",
            frozenset(field.name for field in fields if field.default is attrs.NOTHING),
        )

    def request_id(self, model: RequestModel) -> str:
        """The item id: `request_digest` of this route and the request."""
        return request_digest(self.path, model)


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


class _Prepared:
    """One valid request of a batch: what it was given as, its model, options and id."""

    # A plain slotted class: built once per item, and attrs' frozen __init__ costs more.
    __slots__ = ("id", "model", "occurrence", "options", "request", "variant")

    def __init__(
        self, request: Mapping[str, Any], model: RequestModel, options: CallOptions, item_id: str
    ) -> None:
        self.request = request
        self.model = model
        self.options = options
        self.id = item_id
        self.occurrence = 0
        self.variant = 0

    def key(self) -> str:
        """The item's name in the store (`item_key`)."""
        return item_key(self.id, self.occurrence, self.variant)


class _Known:
    """A request a resume identified without building its model (`plain_request_digest`)
    as one an earlier run may have made: enough to claim it. Only if its image is gone
    is its model built (`Batch._prepare`), to send it."""

    __slots__ = ("at", "id", "occurrence", "request", "variant")

    def __init__(self, request: Mapping[str, Any], item_id: str, occurrence: int, at: int) -> None:
        self.request = request
        self.id = item_id
        self.occurrence = occurrence
        self.variant = 0
        self.at = at  # where `BatchStore.earlier_at` found it


class _Deferred:
    """The items a resume identified as made by an earlier run, not claimed yet.

    Unordered, a resume reads its input at full speed: each item is identified from its
    arguments (`Batch._identify`), the new ones are sent at once, and the finished ones
    wait here to be claimed (a read of their manifest line, a look at their image, an
    item to yield) while requests are in flight or once the input is read. So the first
    new request of a rerun does not wait for a million claims before it.

    They wait serialized, in groups of `_CLAIM_GROUP`, first in, first out, in a spooled
    temporary file: in memory up to `_DEFERRED_IN_MEMORY` bytes, then on disk (about
    130 bytes an item), not as objects. Only plain requests are deferred: JSON values
    whose orjson round trip gives an equal mapping back.
    """

    __slots__ = ("_file", "_group", "_read", "_write", "count")

    def __init__(self) -> None:
        # Closed by `close`, from the batch's finally: it outlives any one block.
        self._file = tempfile.SpooledTemporaryFile(max_size=_DEFERRED_IN_MEMORY)  # noqa: SIM115
        self._group: list[tuple[int, int, int, str, Mapping[str, Any]]] = []
        self._read = self._write = 0  # where the oldest group and the file's end are
        self.count = 0

    def __bool__(self) -> bool:
        return self.count > 0

    def add(
        self, index: int, request: Mapping[str, Any], item_id: str, occurrence: int, at: int
    ) -> bool:
        """Hold the item at ``index`` (found at ``at`` by `BatchStore.earlier_at`); True
        when that completed a group (now serialized)."""
        group = self._group
        group.append((index, at, occurrence, item_id, request))
        self.count += 1
        if len(group) < _CLAIM_GROUP:
            return False
        data = orjson.dumps(group)
        try:
            self._file.seek(self._write)
            self._file.write(len(data).to_bytes(4, "little") + data)
        except OSError as exc:
            raise _spill_error(exc) from exc
        self._write += 4 + len(data)
        self._group = []
        return True

    def take(self) -> list[tuple[int, object, _Prepared | _Known, int]]:
        """The oldest group, as `Batch._claim` takes it."""
        if self._read < self._write:
            try:
                self._file.seek(self._read)
                size = int.from_bytes(self._file.read(4), "little")
                group = orjson.loads(self._file.read(size))
                if self._read + 4 + size == self._write:  # all read: the file starts over
                    self._file.truncate(0)
            except OSError as exc:
                raise _spill_error(exc) from exc
            self._read += 4 + size
            if self._read == self._write:
                self._read = self._write = 0
        else:
            group, self._group = self._group, []
        self.count -= len(group)
        return [
            (index, request, _Known(request, item_id, occurrence, at), at)
            for index, at, occurrence, item_id, request in group
        ]

    def close(self) -> None:
        self._file.close()


def _spill_error(exc: OSError) -> FriendliUsageError:
    return FriendliUsageError(
        f"cannot keep the finished items of this resume in a temporary file ({exc}); free "
        f"space in {tempfile.gettempdir()!r} or point TMPDIR at a folder with room (about "
        "130 bytes an item), then run the batch again: nothing stored is lost"
    )


class _Crashed:
    """An item task that raised instead of producing its item (a defect, not a failure)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class BatchStopped(Exception):
    """The gate refuses admission because the batch stopped; the item is ``skipped``."""


class Gate:
    """The in-flight limit (AIMD on 429) and the requests-per-second ceiling.

    The `AttemptGate` of a batch: the client's retry loop admits every attempt of
    every item through it.
    """

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
        """Wait for a slot (and the rate ceiling); return the epoch the attempt starts in."""
        if self._aborted:
            raise BatchStopped
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
                raise BatchStopped
        if self._interval:
            now = monotonic()
            send_at = max(now, self._next_send)
            self._next_send = send_at + self._interval
            if send_at > now:
                try:
                    await pause(send_at - now, "pace")
                except asyncio.CancelledError:
                    self._free()
                    raise
            if self.aborted:
                self._free()
                raise BatchStopped
        return self._epoch

    def release(
        self, epoch: int, outcome: AttemptOutcome, retry_after: float | None = None
    ) -> None:
        """Give the slot back, adapting the limit to how the request went."""
        if outcome == "rate_limited":
            # One decrease per round: 429s answering requests sent before the last
            # decrease, or within the Retry-After the server gave with it, say nothing new.
            now = monotonic()
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


#: An image to write: its name, its bytes and its manifest record.
_Entry = tuple[str, bytes | memoryview, dict[str, Any]]


class _FileWriter:
    """Writes finished items' images and manifest lines in groups: the items that
    finished in one turn of the loop, or while the previous group was being written.

    A small group for a local directory is written on the loop itself: tiny images on a
    local disk take microseconds each, less than the hop to a worker thread. A group over
    `_INLINE_BYTES`, a URL location, and every group for a while after the disk was slow
    (`_INLINE_SLOW`) go to a worker thread, so a large image or a slow disk never holds
    the loop for long.

    `BatchStore.write_files` writes a group's images, then their lines, so grouping
    keeps the store's promise (no line without its image) and a kill loses at most the
    group being written.
    """

    __slots__ = ("_local", "_loop", "_queue", "_slow_before", "_store", "_task", "_threaded_until")

    def __init__(self, store: BatchStore, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self._loop = loop
        self._queue: list[tuple[str, bytes | memoryview, dict[str, Any], asyncio.Future[str]]] = []
        self._task: asyncio.Task[None] | None = None
        self._local = store.local
        # Real time, not the testing clock (`_clock`): how fast the disk is.
        self._threaded_until = 0.0
        self._slow_before = False

    def write(
        self, name: str, image: bytes | memoryview, record: dict[str, Any]
    ) -> asyncio.Future[str]:
        """Queue an image and its record; the future is its sha256 once both are written."""
        future: asyncio.Future[str] = self._loop.create_future()
        self._queue.append((name, image, record, future))
        if self._task is None:
            self._task = self._loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue, []
                entries = [entry[:3] for entry in group]
                try:
                    if self._inline(entries):
                        digests = self._write_here(entries)
                    else:
                        digests = await run_blocking(self._store.write_files, entries)
                except Exception as exc:  # noqa: BLE001  (each waiting item gets it)
                    _answer(group, exc)
                else:
                    _answer(group, digests)
        finally:
            self._task = None

    def _inline(self, entries: list[_Entry]) -> bool:
        """True when this group is written on the loop (see the class docstring)."""
        if not self._local or time.monotonic() < self._threaded_until:
            return False
        return sum(len(image) for _name, image, _record in entries) <= _INLINE_BYTES

    def _write_here(self, entries: list[_Entry]) -> list[str]:
        """Write a group on the loop; a slow disk sends the next groups to a thread."""
        started, sleeps = time.perf_counter(), _sleeps()
        digests = self._store.write_files(entries)
        took = time.perf_counter() - started
        slow = took > _INLINE_SLOW or took > _INLINE_SLOW_PER_IMAGE * len(entries)
        # A slow disk makes the thread sleep in the kernel, or every group slow; a
        # preemption or a garbage collection, one group.
        if slow and (self._slow_before or _sleeps() > sleeps):
            self._threaded_until = time.monotonic() + _THREADED_FOR
        self._slow_before = slow
        return digests

    async def wait(self) -> None:
        """Until every queued image is written (the batch is ending: even when its items
        were cancelled, what finished is kept)."""
        while self._task is not None:
            await asyncio.shield(self._task)

    def write_queued(self) -> None:
        """Write the queued images now, blocking (the batch is ending and cannot wait:
        `wait` was cancelled). A group already on its thread is the store's to finish."""
        group, self._queue = self._queue, []
        if not group:
            return
        try:
            digests = self._store.write_files([entry[:3] for entry in group])
        except Exception as exc:  # noqa: BLE001  (each waiting item gets it)
            _answer(group, exc)
        else:
            _answer(group, digests)


if sys.platform == "linux":

    def _sleeps() -> int:
        """How often this thread has slept in the kernel (voluntary context switches)."""
        return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw

else:  # Not counted here: every slow write counts as one that slept.
    _sleeps = itertools.count().__next__


def _answer(
    group: list[tuple[str, bytes | memoryview, dict[str, Any], asyncio.Future[str]]],
    outcome: list[str] | Exception,
) -> None:
    """Give each waiting item of a written group its sha256, or the group's error."""
    for index, (*_entry, future) in enumerate(group):
        if future.done():
            continue
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome[index])


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
        path: RequestPath,
        operation: BatchOperation,
        requests: Iterable[Any] | AsyncIterable[Any],
        options: BatchOptions,
    ) -> None:
        if isinstance(requests, str | bytes | Mapping) or not isinstance(
            requests, Iterable | AsyncIterable
        ):
            raise FriendliValidationError(
                "requests",
                "must be an iterable or async iterable of requests (mappings of "
                f"arguments, request models or prompts), got {type(requests).__name__}",
            )
        self._path = path
        self._operation = operation
        self._requests = requests
        self._options = options
        self._concurrency = options.concurrency
        self._ordered = options.ordered
        self._window = options.window
        self._on_progress = options.on_progress
        self._total = (
            len(requests)
            if options.total is None and isinstance(requests, Sized)
            else options.total
        )
        self._defaults = CallOverrides(
            retries=options.retries,
            server_url=options.server_url,
            timeout_ms=options.timeout_ms,
            http_headers=options.http_headers,
        )
        self._default_options = path.resolve(self._defaults)
        self._started = False
        self._iterator: AsyncIterator[BatchItem] | None = None
        self._gate = Gate(self._concurrency, options.rps)
        self._store: BatchStore | None = None
        self._writer: _FileWriter | None = None
        # Full shards being written, and the condition their writers signal.
        self._unpublished = 0
        self._published = asyncio.Condition()
        self._occurrences = Occurrences()
        # Resuming with one item per request: plain mappings are identified from their
        # arguments (`_identify`).
        self._plain_resume = False
        self._unmatched: Unmatched | None = None
        self._aborted: FriendliBatchAborted | None = None
        self._counts = {"ok": 0, "failed": 0, "skipped": 0, "resumed": 0}
        self._t0 = 0.0
        self._last_progress = 0.0
        self._monitor: BatchMonitor | None = None

    # -- public surface -------------------------------------------------------------

    @property
    def options(self) -> BatchOptions:
        """The options the batch runs with."""
        return self._options

    @property
    def aborted(self) -> FriendliBatchAborted | None:
        """Set once the batch stopped early (items after it are ``skipped``)."""
        return self._aborted

    @property
    def unmatched(self) -> Unmatched | None:
        """Once a batch with ``out_dir`` has seen its whole input: the images of earlier
        runs that match none of its items (kept; ``count`` and ``listing``)."""
        return self._unmatched

    def progress(self) -> BatchProgress:
        """A snapshot of the batch so far."""
        counts = self._counts
        done = sum(counts.values())
        elapsed = time.monotonic() - self._t0 if self._started else 0.0
        # The rate of this run's work: resumed items were done earlier, skipped ones
        # were not done at all.
        worked = counts["ok"] + counts["failed"]
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
            endpoints=self._path.endpoints(),
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
        unmatched = self._unmatched
        return BatchResult(
            items=items,
            elapsed=time.monotonic() - self._t0,
            aborted=self._aborted,
            unmatched=0 if unmatched is None else unmatched.count,
            unmatched_listing=None if unmatched is None else unmatched.listing,
        )

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

    def _call_options(self, spec: Mapping[str, Any]) -> CallOptions:
        """The call options of an item: the batch's, with the item's own on top."""
        item = CallOverrides(**{key: spec[key] for key in _OPTION_KEYS if key in spec})
        return self._path.resolve(self._defaults.merged(item))

    def _prepare(self, spec: object) -> _Prepared:
        operation = self._operation
        options = self._default_options
        request: Mapping[str, Any]
        # A dict, the common case, skips the checks for the other kinds (an ABC's
        # isinstance costs a microsecond, and resume prepares every finished item).
        if not isinstance(spec, dict) and isinstance(spec, GenerateRequest | EditRequest):
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
            if not isinstance(spec, dict) and not isinstance(spec, Mapping):
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
            model = operation.model(**arguments)
            if has_options:
                options = self._call_options(spec)
        return _Prepared(request, model, options, operation.request_id(model))

    def _identify(self, spec: object) -> _Prepared | _Known | FriendliValidationError:
        """The prepared request with its occurrence, in input order; or why it is invalid.

        When resuming (one item per request), a plain mapping's identity comes first, from
        its arguments (`plain_request_digest`): an item an earlier run may have made is
        then claimed without building its model (`_Known`), which is most of what a
        finished item costs. (Unordered over a sync input, `_defer_finished` does this
        first case for a run of such items, in one loop.)
        """
        if self._plain_resume:
            if type(spec) is str and self._operation.accepts_prompt:
                spec = {"prompt": spec}
            if type(spec) is dict:
                operation = self._operation
                digest = plain_request_digest(operation.path, operation.model, spec)
                if digest is not None:
                    occurrence = self._occurrences.next(digest)
                    assert self._store is not None  # noqa: S101  (resuming has a store)
                    at = self._store.earlier_at(digest, occurrence)
                    if at >= 0:
                        return _Known(spec, digest, occurrence, at)
                    return self._prepared(spec, occurrence, digest)
        return self._prepared(spec)

    def _defer_finished(
        self, source: Iterator[Any], deferred: _Deferred, index: int
    ) -> tuple[int, object, _Prepared | FriendliValidationError | None]:
        """Read the input while its requests are plain ones an earlier run may have made,
        deferring each (`_Deferred`) with nothing built but its identity: `_identify`'s
        first case, for a resume's run of finished items, without a call per item.

        Returns the index after them and what stopped it: `_GROUP` once a group is
        deferred (the caller lets requests in flight go on), `_END`, or the next other
        request with what `_identify` makes of it when its occurrence was counted here
        (else None: `_identify` makes it).
        """
        operation = self._operation
        path, model, prompts = operation.path, operation.model, operation.accepts_prompt
        occurrence_of = self._occurrences.next
        assert self._store is not None  # noqa: S101  (resuming has a store)
        earlier_at = self._store.earlier_at
        defer = deferred.add
        for spec in source:
            request = {"prompt": spec} if prompts and type(spec) is str else spec
            if type(request) is not dict:
                return index, spec, None
            digest = plain_request_digest(path, model, request)
            if digest is None:
                return index, spec, None
            occurrence = occurrence_of(digest)
            at = earlier_at(digest, occurrence)
            if at < 0:
                return index, spec, self._prepared(request, occurrence, digest)
            index += 1
            if defer(index - 1, request, digest, occurrence, at):
                return index, _GROUP, None
        return index, _END, None

    def _prepared(
        self, spec: object, occurrence: int | None = None, digest: str | None = None
    ) -> _Prepared | FriendliValidationError:
        """`_prepare`, with the item's occurrence: counted now unless given (with the
        ``digest`` it was counted under)."""
        try:
            prepared = self._prepare(spec)
        except (FriendliValidationError, TypeError, ValueError) as exc:
            # A value of a type no check expected (e.g. controlnet_weights=5) fails its
            # item like any invalid argument, instead of ending the batch.
            if isinstance(exc, FriendliValidationError):
                return exc
            return FriendliValidationError("request", f"invalid arguments: {exc}")
        if occurrence is None:
            occurrence = self._occurrences.next(prepared.id)
        elif prepared.id != digest:
            raise AssertionError(  # a defect of plain_wire: tests compare the two
                f"plain_request_digest gave {digest} for a request whose id is {prepared.id}"
            )
        prepared.occurrence = occurrence
        return prepared

    def _variants(
        self, prepared: _Prepared | FriendliValidationError
    ) -> list[_Prepared | FriendliValidationError]:
        """The request's ``n`` items, each with its variant's seed (`variant_seeds`)."""
        n = self._options.n
        if n == 1 or isinstance(prepared, FriendliValidationError):
            return [prepared] * n
        seeds = variant_seeds(prepared.id, prepared.occurrence, prepared.model.seed, n)
        items: list[_Prepared | FriendliValidationError] = []
        for variant, seed in enumerate(seeds):
            model = prepared.model
            one = _Prepared(
                prepared.request,
                model if model.seed == seed else attrs.evolve(model, seed=seed),
                prepared.options,
                prepared.id,
            )
            one.occurrence, one.variant = prepared.occurrence, variant
            items.append(one)
        return items

    # -- running ----------------------------------------------------------------------

    async def _run(self, *, ordered: bool) -> AsyncIterator[BatchItem]:
        self._started = True
        self._t0 = time.monotonic()
        self._monitor = self._path.monitor_batch(self.progress)
        loop = asyncio.get_running_loop()
        options = self._options
        if options.out_dir is not None:
            store = BatchStore(
                options.out_dir,
                options.resume,
                options.output_format,
                options.shard_size,
                storage_options=options.storage_options,
            )
            await run_blocking(store.open)
            self._store = store
            self._plain_resume = store.resuming and options.n == 1
            if store.resuming:
                self._occurrences = Occurrences(store.earlier_items)
            if not store.sharded:
                self._writer = _FileWriter(store, loop)
        sync_source: Iterator[Any] | None = None
        async_source: AsyncIterator[Any] | None = None
        if isinstance(self._requests, AsyncIterable):
            async_source = aiter(self._requests)
        else:
            sync_source = iter(self._requests)
        finished: asyncio.Queue[BatchItem | _Crashed] = asyncio.Queue()
        # The variants of the latest request still to dispatch (``n`` > 1).
        variants: deque[tuple[object, _Prepared | FriendliValidationError]] = deque()
        pending: dict[int, asyncio.Task[None]] = {}
        parked: dict[int, BatchItem] = {}
        # Items an earlier run may have made: claimed in groups, without a task each.
        earlier: list[tuple[int, object, _Prepared | _Known, int]] = []
        # Unordered, those a plain request identified are claimed after the new requests
        # are sent (`_Deferred`).
        deferred = _Deferred() if self._plain_resume and not ordered else None
        next_index = 0
        next_out = 0
        exhausted = False
        complete = False
        try:
            while True:
                while (
                    not exhausted
                    and self._aborted is None
                    and len(pending) < self._concurrency
                    and (not ordered or next_index - next_out < self._window)
                ):
                    prepared: _Prepared | _Known | FriendliValidationError | None
                    if variants:
                        spec, prepared = variants.popleft()
                    else:
                        prepared = None
                        if deferred is not None and sync_source is not None:
                            # The finished items of a resume, read and deferred in one
                            # tight loop (`_defer_finished`) up to the next other one.
                            next_index, spec, prepared = self._defer_finished(
                                sync_source, deferred, next_index
                            )
                            if spec is _GROUP:
                                if pending:
                                    await asyncio.sleep(0)  # the requests in flight go on
                                continue
                        elif sync_source is not None:
                            spec = next(sync_source, _END)  # no coroutine per item
                        else:
                            spec = await _next(None, async_source)
                        if spec is _END:
                            exhausted = True
                            # Every item has its occurrence: free the table (16 MB a
                            # million items) before the last shard is built.
                            self._occurrences = Occurrences()
                            break
                        if prepared is None:
                            prepared = self._identify(spec)
                        if self._options.n > 1 and not isinstance(prepared, _Known):
                            first, *rest = self._variants(prepared)
                            prepared = first
                            variants.extend((spec, one) for one in rest)
                    at = -1
                    if isinstance(prepared, _Known):
                        if deferred is not None:
                            if (
                                deferred.add(
                                    next_index,
                                    prepared.request,
                                    prepared.id,
                                    prepared.occurrence,
                                    prepared.at,
                                )
                                and pending
                            ):
                                await asyncio.sleep(0)  # the requests in flight go on
                            next_index += 1
                            continue
                        at = prepared.at
                    elif self._store is not None and isinstance(prepared, _Prepared):
                        at = self._store.earlier_at(
                            prepared.id, prepared.occurrence, prepared.variant
                        )
                    if at >= 0 and not isinstance(prepared, FriendliValidationError):
                        earlier.append((next_index, spec, prepared, at))
                        next_index += 1
                        if len(earlier) < _CLAIM_GROUP:
                            continue
                    else:
                        assert not isinstance(prepared, _Known)  # noqa: S101  (found: at >= 0)
                        pending[next_index] = loop.create_task(
                            self._deliver(next_index, spec, prepared, finished)
                        )
                        next_index += 1
                        continue
                    break
                # Deferred claims when nothing more can be sent and no item is waiting.
                if not earlier and deferred and finished.empty():
                    earlier = deferred.take()
                    if pending:
                        await asyncio.sleep(0)  # the requests in flight go on
                if earlier:
                    group, earlier = earlier, []
                    resumed = await self._claim(group, pending, finished)
                    self._counts["resumed"] += len(resumed)
                    if self._monitor is not None:
                        self._monitor.item("resumed", len(resumed))
                    for item in resumed:
                        if ordered:
                            parked[item.index] = item
                        else:
                            yield item
                    while next_out in parked:
                        yield parked.pop(next_out)
                        next_out += 1
                    self._report()
                    continue
                if not pending:
                    break
                outcome = await finished.get()
                while True:
                    if isinstance(outcome, _Crashed):
                        raise outcome.error
                    item = outcome
                    del pending[item.index]
                    self._count(item)
                    if ordered:
                        parked[item.index] = item
                    else:
                        yield item
                    if finished.empty():
                        break
                    outcome = finished.get_nowait()
                while next_out in parked:
                    yield parked.pop(next_out)
                    next_out += 1
                self._report()
            # Stopped early: what is left of the input is reported, not attempted.
            while not exhausted and self._aborted is not None:
                if variants:
                    spec, _ = variants.popleft()
                    copies = 1
                else:
                    spec = await _next(sync_source, async_source)
                    if spec is _END:
                        break
                    copies = self._options.n
                for _ in range(copies):
                    item = self._skipped(next_index, spec, 0.0)
                    next_index += 1
                    self._count(item)
                    yield item
            complete = self._aborted is None
            self._report(final=True)
        finally:
            if deferred is not None:
                deferred.close()
            for task in pending.values():
                task.cancel()
            try:
                if pending:
                    # Not gather: cancelled while waiting, it raises one of the tasks'
                    # CancelledErrors, whose message is not the canceller's, and anyio
                    # would not recognise its own cancel scope's cancellation.
                    await asyncio.wait(pending.values())
                if self._writer is not None:
                    await self._writer.wait()
            finally:
                # Cancelled again while cleaning up (an anyio cancel scope cancels every
                # await in it): the store is closed all the same, and the images that
                # finished are written first, here, blocking.
                if self._writer is not None:
                    self._writer.write_queued()
                if self._store is not None:
                    # Only a run that saw every item knows which stored images match none.
                    # Blocking: it publishes the open shard, and must, even when cancelled.
                    self._unmatched = self._store.close(complete=complete)
                if self._monitor is not None:
                    self._monitor.close()

    def _shard_room(self) -> bool:
        return self._unpublished < _SHARD_BACKLOG

    def _count(self, item: BatchItem) -> None:
        self._counts[item.status] += 1
        if self._monitor is not None:
            self._monitor.item(item.status)

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

    def _skipped(self, index: int, spec: object, elapsed: float, attempts: int = 0) -> BatchItem:
        request = spec if isinstance(spec, Mapping) else _request_view(spec)
        return BatchItem(
            index=index,
            id="",
            request=request,
            status="skipped",
            error=self._aborted,
            attempts=attempts,
            elapsed=elapsed,
        )

    async def _claim(
        self,
        group: list[tuple[int, object, _Prepared | _Known, int]],
        pending: dict[int, asyncio.Task[None]],
        finished: asyncio.Queue[BatchItem | _Crashed],
    ) -> list[BatchItem]:
        """Claim a group of items an earlier run may have made: those whose image is
        intact are ``resumed`` (returned), the others are started like any item."""
        store = self._store
        assert store is not None  # noqa: S101
        claims = store.claim_group(
            [
                (prepared.id, prepared.occurrence, prepared.variant, at)
                for _i, _s, prepared, at in group
            ]
        )
        unsure = [claim[0] for claim in claims if claim[0] is not None and not claim[1]]
        if unsure:
            # An image whose size and time do not tell: its sha256, on a thread.
            verified = await run_blocking(_verify_all, store, unsure)
            bad = {id(record) for record, ok in zip(unsure, verified, strict=True) if not ok}
            claims = [(None, True, b"", -1) if id(claim[0]) in bad else claim for claim in claims]
        resumed = []
        loop = asyncio.get_running_loop()
        located, append_resumed = store.located, store.append_resumed
        for (index, spec, prepared, _at), (record, _checked, line, number) in zip(
            group, claims, strict=True
        ):
            if record is None:
                # To be made again: a known request gets its model now.
                made = (
                    self._prepared(spec, prepared.occurrence, prepared.id)
                    if isinstance(prepared, _Known)
                    else prepared
                )
                pending[index] = loop.create_task(self._deliver(index, spec, made, finished))
                continue
            append_resumed(index, record, line, number)
            path, uri = located(record["file"])
            item_id, occurrence, variant = prepared.id, prepared.occurrence, prepared.variant
            resumed.append(
                resumed_item(
                    index=index,
                    item_id=item_id,
                    occurrence=occurrence,
                    variant=variant,
                    key=item_key(item_id, occurrence, variant),
                    request=prepared.request,
                    path=path,
                    uri=uri,
                    fmt=record.get("format"),
                    sha256=record.get("sha256"),
                    request_id=record.get("request_id"),
                )
            )
        return resumed

    async def _deliver(
        self,
        index: int,
        spec: object,
        prepared: _Prepared | FriendliValidationError,
        finished: asyncio.Queue[BatchItem | _Crashed],
    ) -> None:
        # The item goes to the queue from the task itself, not from a done callback:
        # that would run one loop iteration later, and the freed slot would stay idle
        # for one more iteration before the next request is dispatched.
        try:
            item = await self._process(index, spec, prepared)
        except BaseException as exc:
            # A defect, or a cancel from outside the batch: re-raised by the iterator,
            # as the task's own result() would.
            finished.put_nowait(_Crashed(exc))
            if not isinstance(exc, Exception):
                raise
            return
        finished.put_nowait(item)

    async def _process(
        self, index: int, spec: object, prepared: _Prepared | FriendliValidationError
    ) -> BatchItem:
        started = time.monotonic()
        if isinstance(prepared, FriendliValidationError):
            request = spec if isinstance(spec, Mapping) else _request_view(spec)
            return self._failed(
                index, item_id="", request=request, error=prepared, attempts=0, started=started
            )
        try:
            result = await self._path.send(
                self._operation.path, prepared.model, prepared.options, self._gate
            )
        except BatchStopped:
            return self._skipped(index, prepared.request, time.monotonic() - started)
        except FriendliAPIError as error:
            if self._options.stop_on_fatal and _fatal(error):
                if self._aborted is not None and type(error) is type(self._aborted.cause):
                    # The problem that stopped the batch, met again by an item that was
                    # already in flight: not a second failure.
                    return self._skipped(
                        index, prepared.request, time.monotonic() - started, error.attempts
                    )
                self._abort(error, index)
            return self._failed(
                index, error=error, attempts=error.attempts, started=started, prepared=prepared
            )
        return await self._succeeded(index, prepared, result, result.attempts, started)

    async def _succeeded(
        self,
        index: int,
        prepared: _Prepared,
        result: ImageResult,
        attempts: int,
        started: float,
    ) -> BatchItem:
        store = self._store
        if store is None:
            return BatchItem(
                index=index,
                id=prepared.id,
                occurrence=prepared.occurrence,
                variant=prepared.variant,
                request=prepared.request,
                status="ok",
                result=result,
                format=result.format,
                attempts=attempts,
                elapsed=time.monotonic() - started,
                request_id=result.request_id,
                maybe_duplicated=result.maybe_duplicated,
            )
        record = manifest_record(
            index=index,
            item_id=prepared.id,
            occurrence=prepared.occurrence,
            prompt=prepared.model.prompt,
            seed=prepared.model.seed,
            attempts=attempts,
            elapsed=time.monotonic() - started,
            request_id=result.request_id,
            fmt=result.format,
            size=len(result.data),
            variant=prepared.variant,
            maybe_duplicated=result.maybe_duplicated,
            fields=dataset_fields(prepared.model),
        )
        key = prepared.key()
        if store.sharded:
            # Items wait while two full shards are not written yet: a shard is built and
            # written slower than tiny images arrive, and without this the shards in
            # memory would grow with the batch.
            extension = EXTENSIONS.get(result.format or "", ".bin")
            if self._unpublished >= _SHARD_BACKLOG:
                try:
                    async with self._published:
                        await self._published.wait_for(self._shard_room)
                except asyncio.CancelledError:
                    # Stopped while held back: the image is here, so it goes into the
                    # open shard all the same (the store's close publishes it) instead
                    # of being made again by the rerun.
                    if not store.closed:
                        store.add_to_shard(key, result.data, extension, record)
                    raise
            name, digest, full = store.add_to_shard(key, result.data, extension, record)
            if full is not None:
                self._unpublished += 1
                try:
                    await run_blocking(store.publish, full)
                finally:
                    self._unpublished -= 1
                    async with self._published:
                        self._published.notify_all()
        else:
            assert self._writer is not None  # noqa: S101
            name = image_name(prepared.id, prepared.occurrence, result.format, prepared.variant)
            digest = await self._writer.write(name, result.data, record)
        elapsed = record["elapsed"]
        # A local path's text is its URI: one path join per item, not two.
        path = store.path_of(name)
        return BatchItem(
            index=index,
            id=prepared.id,
            occurrence=prepared.occurrence,
            variant=prepared.variant,
            key=key,
            request=prepared.request,
            status="ok",
            path=path,
            uri=store.uri_of(name) if path is None else str(path),
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
        occurrence = variant = 0
        if prepared is not None:
            item_id, request, occurrence = prepared.id, prepared.request, prepared.occurrence
            variant = prepared.variant
        assert request is not None  # noqa: S101  (given when prepared is not)
        elapsed = time.monotonic() - started
        request_id = error.request_id if isinstance(error, FriendliAPIError) else None
        if self._store is not None:
            self._store.append(
                manifest_record(
                    index=index,
                    item_id=item_id,
                    occurrence=occurrence,
                    prompt=prepared.model.prompt if prepared is not None else request.get("prompt"),
                    seed=prepared.model.seed if prepared is not None else request.get("seed"),
                    attempts=attempts,
                    elapsed=elapsed,
                    request_id=request_id,
                    variant=variant,
                    error=error,
                    fields=None if prepared is None else dataset_fields(prepared.model),
                )
            )
        return BatchItem(
            index=index,
            id=item_id,
            occurrence=occurrence,
            variant=variant,
            request=request,
            status="failed",
            error=error,
            attempts=attempts,
            elapsed=elapsed,
            request_id=request_id,
        )


def _verify_all(store: BatchStore, records: list[dict[str, Any]]) -> list[bool]:
    return [store.verify(record) for record in records]


#: What `_next` returns when the input is exhausted.
_END: Final = object()
#: `Batch._defer_finished` deferred a whole group.
_GROUP: Final = object()


async def _next(sync_source: Iterator[Any] | None, async_source: AsyncIterator[Any] | None) -> Any:
    """The next request of the input, `_END` when there is none."""
    try:
        if sync_source is not None:
            return next(sync_source)
        assert async_source is not None  # noqa: S101
        return await anext(async_source)
    except (StopIteration, StopAsyncIteration):
        return _END


def _index_of(item: BatchItem) -> int:
    return item.index


def _request_view(spec: object) -> Mapping[str, Any]:
    if isinstance(spec, GenerateRequest | EditRequest):
        return public_fields(spec)
    if isinstance(spec, str):
        return {"prompt": spec}
    return {"request": spec}
