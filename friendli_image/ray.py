"""Image generation as a Ray Data stage (``pip install 'friendli-image[ray]'``).

`ImageStage` is a callable class for ``Dataset.map_batches``: each actor opens one
`AsyncFriendli` lazily on Ray's event loop, sends the rows of every batch concurrently
(bounded per endpoint, the limit divided across the actors), writes each image to
``out_dir`` as it arrives and returns one output row per input row. A bad row becomes
an error row; it never fails the block.

>>> import ray, friendli_image.ray as fr  # doctest: +SKIP
>>> ds = ray.data.read_parquet("s3://bucket/prompts/")  # columns: id, prompt  # doctest: +SKIP
>>> out = fr.generate_images(ds, server_url="http://gpu-1:8000", out_dir="s3://bucket/images",
...                          num_actors=8, per_endpoint_limit=16)  # doctest: +SKIP
>>> out.write_parquet("s3://bucket/manifest/")  # doctest: +SKIP

Ray Data runs a block at least once: an actor that dies has its block run again. The
outputs make that safe. A row is its id together with its request: its image is written
under a name made of both (``<id>-<request digest><ext>``: temporary file then rename
on file systems, never through a link; a single atomic PUT on object stores), and a row
whose image already exists is answered from it without a request, so a retried block,
or a whole job run again, only sends the rows that have no image yet, and a row whose
parameters changed is generated again.

When a row has no seed, the seed is derived from its id (`seed_for`), so a row that has
to be generated again gives the same picture.

With ``output_format="webdataset"`` or ``"parquet"`` each call writes the images of its
batch as shards of its own (``train-<time>-<random>-<n>``, a name no other actor or
retry uses), each published whole (one PUT, or a temporary file then a rename), with
the same samples and columns as ``generate_batch`` writes and a row's key
(`row_key`) for its identity. Before a batch is sent, the stage lists the published
shards and reads the keys of those it has not seen yet, so a row already in a shard is
``resumed``, never written into a second one; a retried block's rows are found in the
shards its first attempt published.

Only pyarrow and fsspec are needed to import this module; Ray itself is imported by
`generate_images` and `actor_pool`, so the same core (`ImageStage.process` /
`ImageStage.run`) also runs under Dask's ``map_partitions`` or Spark's ``mapInArrow``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import attrs
import pyarrow as pa

from ._batch_models import OUTPUT_FORMATS
from ._client import AsyncFriendli
from ._config import check_count
from ._exceptions import FriendliUsageError, FriendliValidationError
from ._fleet import Endpoint, parse_servers
from ._formats import EXTENSIONS
from ._requests import MAX_SEED, EditRequest, GenerateRequest
from ._resources import EDITS_PATH, GENERATIONS_PATH
from ._results import ImageResult
from ._secrets import Secret, hide_credentials
from ._store import (
    Location,
    Shard,
    dataset_fields,
    manifest_record,
    request_digest,
    row_image_name,
    row_key,
    shard_run_name,
)

__all__ = [
    "ACTOR_CPUS",
    "OUTPUT_SCHEMA",
    "ClientSpec",
    "ImageStage",
    "actor_pool",
    "default_num_cpus",
    "generate_images",
    "seed_for",
]

#: The columns `ImageStage` adds to every row (``uri`` or ``image``: see ``out_dir``).
OUTPUT_SCHEMA: Final = pa.schema(
    [
        ("status", pa.string()),
        ("error_type", pa.string()),
        ("error", pa.string()),
        ("attempts", pa.int32()),
        ("endpoint", pa.string()),
        ("latency_s", pa.float64()),
        ("seed", pa.int64()),
        ("uri", pa.string()),
        ("image", pa.binary()),
        ("format", pa.string()),
        ("request_id", pa.string()),
        ("maybe_duplicated", pa.bool_()),
        ("key", pa.string()),
    ]
)

_GENERATE_FIELDS: Final = frozenset(field.name for field in attrs.fields(GenerateRequest))
_EDIT_FIELDS: Final = frozenset(field.name for field in attrs.fields(EditRequest))
_SEED_SALT: Final = b"friendli-image/seed/"


def seed_for(row_id: object) -> int:
    """The seed of a row that has none: a hash of its id, in ``[0, 2**32 - 1]``.

    The first 4 bytes (big-endian) of ``sha256(b"friendli-image/seed/" + str(id))``.
    The same id always gives the same seed (on every machine and Python version), so an
    image generated again for that row is the same picture.
    """
    digest = hashlib.sha256(_SEED_SALT + str(row_id).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:4], "big") & MAX_SEED


def _hidden_options(options: Mapping[str, Any]) -> Mapping[str, Any]:
    hidden = dict(options)
    token = hidden.get("token")
    if isinstance(token, str):
        hidden["token"] = Secret(token)
    headers = hidden.get("http_headers")
    if isinstance(headers, Mapping):
        hidden["http_headers"] = hide_credentials(headers)
    return hidden


@attrs.frozen
class ClientSpec:
    """What a ``client_factory`` gets: the options to build one actor's client with.

    ``client_options`` are the user's `AsyncFriendli` keyword arguments, ``server_url``
    included, passed unchanged. ``per_endpoint`` is this actor's share of the
    per-endpoint in-flight limit, ``max(1, per_endpoint_limit // num_actors)``: a client
    over ``endpoints`` endpoints should hold at most that many requests on each (set its
    per-endpoint limit to it).

    The ``token`` option and an ``Authorization`` in ``http_headers`` are held as
    secrets (no repr, str or pickle shows them); `AsyncFriendli` takes them as they are,
    so ``AsyncFriendli(**spec.client_options)`` still builds the client.
    """

    client_options: Mapping[str, Any] = attrs.field(converter=_hidden_options)
    per_endpoint: int
    endpoints: int


def _default_client(spec: ClientSpec) -> AsyncFriendli:
    options = dict(spec.client_options)
    urls = options.get("server_url")
    if spec.endpoints > 1 and isinstance(urls, list):
        # Over a fleet each endpoint is held to this actor's share, so the cap across
        # all actors holds per endpoint; with one URL (or a per-row server_url) the
        # stage's own per-endpoint slots do it, and the pool must not be smaller.
        options["server_url"] = [_capped(url, spec.per_endpoint) for url in urls]
        options.setdefault("max_connections", spec.per_endpoint * spec.endpoints)
    return AsyncFriendli(**options)


def _capped(url: str | Endpoint, share: int) -> Endpoint:
    """The endpoint held to at most ``share`` requests in flight (its own limit if lower)."""
    if isinstance(url, Endpoint):
        limit = share if url.max_connections is None else min(share, url.max_connections)
        return attrs.evolve(url, max_connections=limit)
    return Endpoint(url, max_connections=share)


class ImageStage:
    """A Ray Data stage that generates (or edits) one image per row.

    Use it with ``ds.map_batches(ImageStage, fn_constructor_kwargs={...},
    batch_format="pyarrow", compute=actor_pool(n))``, or let `generate_images` do that.
    Every argument is picklable: the stage is built in each actor.

    Args:
        server_url: the endpoint (a URL); passed to `AsyncFriendli` with
            ``client_options``. A fleet (a list of URLs or `Endpoint`, or one
            comma-separated string) gets the per-endpoint share on each endpoint.
        out_dir: where images go: a local path or any fsspec URI (``s3://bucket/x``,
            ``gs://...``, ``memory://...``). Each image is named
            ``<id>-<digest><ext>`` from ``id_column`` (quoted for safety) and the first
            16 hex digits of the request's digest (``.jpg``, or ``.png`` for
            ``response_format="raw"``) and written atomically; a row whose image exists
            is not sent again (status ``"resumed"``), while one whose request changed
            (other parameters, another prompt under the same id) is. None: the bytes
            go in the ``image`` column instead.
        id_column: the column with each row's unique id (needed with ``out_dir``; also
            seeds rows that have no seed, see `seed_for`).
        columns: request field -> column name, e.g. ``{"prompt": "text",
            "num_inference_steps": "steps"}``. Default ``prompt`` and ``seed`` from the
            columns of those names, when present (and ``image``). A null cell leaves the
            field to its default. A mapped column the data lacks fails the batch at once
            (`FriendliUsageError`): it is the job's configuration, not a bad row.
            ``server_url`` may be mapped to send rows to a per-row endpoint.
        request: fields sent with every row (``{"num_inference_steps": 30}``); a
            column value wins over them.
        edit: send ``edit`` requests (the ``image`` field: bytes, a URL or a data: URI)
            instead of ``generate``; default: edit the rows that have an image.
        per_endpoint_limit: the most requests in flight on one endpoint, across all
            actors.
        num_actors: how many actors run the stage; each keeps
            ``max(1, per_endpoint_limit // num_actors)`` requests in flight per endpoint,
            so the global cap holds.
        client_options: further `AsyncFriendli` keyword arguments (``token``,
            ``retries``, ``timeout``, ...), passed unchanged.
        client_factory: builds the actor's client from a `ClientSpec` instead of
            ``AsyncFriendli(**client_options)`` (must be picklable: a module-level
            function).
        storage_options: passed to fsspec for ``out_dir`` (credentials, endpoint_url...).
        keep_columns: keep the input columns in the output (default), else only the id.
        output_format: ``"files"`` (one image file per row, above), ``"webdataset"`` or
            ``"parquet"``: each call's images go into shards of its own of at most
            ``shard_size`` rows (see the module's notes), the ``uri`` column names the
            shard and ``key`` the row's sample in it. Needs ``out_dir``.
        shard_size: the most rows per shard.

    Output columns (`OUTPUT_SCHEMA`): ``status`` (``ok``, ``resumed`` or ``failed``),
    ``error_type`` and ``error``, ``attempts``, ``endpoint``, ``latency_s``, ``seed``
    (the one used), ``uri`` or ``image``, ``format``, ``request_id``,
    ``maybe_duplicated``, ``key`` (the row's name in ``out_dir``: its image file's stem, or
    its sample in a shard).
    """

    def __init__(
        self,
        server_url: str | Sequence[str] | None = None,
        *,
        out_dir: str | None = None,
        id_column: str = "id",
        columns: Mapping[str, str] | None = None,
        request: Mapping[str, Any] | None = None,
        edit: bool | None = None,
        per_endpoint_limit: int = 8,
        num_actors: int = 1,
        client_options: Mapping[str, Any] | None = None,
        client_factory: Callable[[ClientSpec], AsyncFriendli] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        keep_columns: bool = True,
        output_format: str = "files",
        shard_size: int = 1000,
    ) -> None:
        check_count("per_endpoint_limit", per_endpoint_limit)
        check_count("shard_size", shard_size)
        if output_format not in OUTPUT_FORMATS:
            raise FriendliValidationError(
                "output_format",
                f"must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}",
            )
        if output_format != "files" and out_dir is None:
            raise FriendliValidationError(
                "output_format", f"{output_format!r} writes shards into out_dir: pass out_dir="
            )
        self._format = output_format
        self._shard_size = shard_size
        # Key -> the published shard holding it, and the shards already read for that.
        self._in_shards: dict[str, str] = {}
        self._shards_read: set[str] = set()
        check_count("num_actors", num_actors)
        options = dict(client_options or {})
        if server_url is not None:
            options["server_url"] = server_url
        urls = options.get("server_url")
        endpoints = 1
        if urls is not None:
            # A fleet is a list or a comma-separated string: either way the per-endpoint
            # share applies to each of its endpoints, not to the fleet as one.
            fleet = (
                [endpoint.url for endpoint in parse_servers(urls)]
                if isinstance(urls, str) and "," in urls
                else urls
            )
            if not isinstance(fleet, str):
                options["server_url"] = urls = list(fleet)
                endpoints = max(1, len(urls))
        self._per_endpoint = max(1, per_endpoint_limit // num_actors)
        self._spec = ClientSpec(options, self._per_endpoint, endpoints)
        self._factory = client_factory or _default_client
        self._mapping = (
            dict(columns)
            if columns is not None
            else {"prompt": "prompt", "seed": "seed", "image": "image"}
        )
        self._edit = edit
        self._explicit = columns is not None
        self._constants = dict(request or {})
        self._id_column = id_column
        self._keep = keep_columns
        self._out = None if out_dir is None else Location(str(out_dir), storage_options or {})
        self._client: AsyncFriendli | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: dict[str, asyncio.Semaphore] = {}

    def __repr__(self) -> str:
        where = "bytes" if self._out is None else self._out.uri
        return f"ImageStage(per_endpoint={self._per_endpoint}, out={where!r})"

    # -- the client, one per actor (per event loop) ----------------------------------

    def _ready_client(self) -> AsyncFriendli:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # Ray Data keeps one loop per actor; another loop (the blocking `run`) gets
            # its own client, as aiohttp sessions belong to the loop that opened them.
            self._client = self._factory(self._spec)
            self._loop = loop
            self._slots = {}
        return self._client

    def _slot(self, endpoint: str) -> asyncio.Semaphore:
        slots = self._slots.get(endpoint)
        if slots is None:
            slots = self._slots[endpoint] = asyncio.Semaphore(
                self._per_endpoint * self._spec.endpoints
                if endpoint == _FLEET
                else self._per_endpoint
            )
        return slots

    async def aclose(self) -> None:
        """Close the actor's client (Ray does it when the actor stops, via ``__del__``)."""
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            await client.close()

    def __del__(self) -> None:
        client = getattr(self, "_client", None)
        loop = getattr(self, "_loop", None)
        if client is None or loop is None or loop.is_closed() or not loop.is_running():
            return
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:  # collected on the loop's own thread
                loop.create_task(client.close())
                return
        future = asyncio.run_coroutine_threadsafe(client.close(), loop)
        with contextlib.suppress(Exception):
            future.result(timeout=5)

    # -- batches ----------------------------------------------------------------------

    async def __call__(self, batch: Any) -> pa.Table:
        """Process one batch (a pyarrow Table, a pandas DataFrame or a dict of columns)."""
        return await self.process(batch)

    async def process(self, batch: Any) -> pa.Table:
        """Send every row of ``batch`` concurrently; return the input with the output columns."""
        table = _as_table(batch)
        self._check_columns(table)
        client = self._ready_client()
        rows = table.to_pylist()
        if self._sharded:
            await asyncio.to_thread(self._read_shards)
        outputs = await asyncio.gather(*(self._row(client, row) for row in rows))
        if self._sharded:
            await asyncio.to_thread(self._publish, outputs)
        return self._assemble(table, outputs)

    @property
    def _sharded(self) -> bool:
        return self._format != "files"

    def _read_shards(self) -> None:
        """Learn the keys of the shards published since the last look (blocking)."""
        assert self._out is not None  # noqa: S101
        files = self._out.files()
        for name in sorted(self._out.shard_names(files).keys() - self._shards_read):
            for key in self._out.shard_keys(name, files):
                self._in_shards.setdefault(key, name)
            self._shards_read.add(name)

    def _publish(self, outputs: list[dict[str, Any]]) -> None:
        """Write the batch's new images as shards of its own, each whole or not at all
        (blocking); a row whose shard cannot be written fails."""
        assert self._out is not None  # noqa: S101
        made = [out for out in outputs if out.get(_IMAGE) is not None]
        run = shard_run_name()
        for number, start in enumerate(range(0, len(made), self._shard_size)):
            rows = made[start : start + self._shard_size]
            shard = Shard.numbered(run, number, self._format)
            for out in rows:
                record = out.pop(_RECORD)
                shard.images.append((record["key"] + _extension(out["format"]), out.pop(_IMAGE)))
                shard.records.append(record)
            try:
                self._out.publish_shard(shard)
            except OSError as exc:
                for out in rows:
                    out.update(status="failed", error_type=type(exc).__name__, error=str(exc))
                continue
            for out in rows:
                out["uri"] = f"{self._out.uri}/{shard.name}"
                self._in_shards[out["key"]] = shard.name

    def run(self, batch: Any) -> pa.Table:
        """`process` for callers without an event loop (Dask, Spark, scripts): blocking."""

        async def once() -> pa.Table:
            try:
                return await self.process(batch)
            finally:
                await self.aclose()

        return asyncio.run(once())

    def _check_columns(self, table: pa.Table) -> None:
        missing = {f: c for f, c in self._mapping.items() if c not in table.column_names}
        if self._explicit and missing:
            # The whole job is misconfigured, not one row: fail before sending anything.
            raise FriendliUsageError(
                f"columns= names {sorted(missing.values())} (for {sorted(missing)}), which the "
                f"data does not have (it has {table.column_names}); fix the mapping"
            )

    def _fields(self, row: Mapping[str, Any]) -> dict[str, Any]:
        fields = dict(self._constants)
        for field, column in self._mapping.items():
            if column not in row:
                continue
            value = row[column]
            if value is not None:
                fields[field] = value
        if isinstance(fields.get("image"), (bytearray, memoryview)):
            fields["image"] = bytes(fields["image"])
        return fields

    def _prepare(
        self, row: Mapping[str, Any]
    ) -> tuple[GenerateRequest | EditRequest, dict[str, Any], str | None]:
        """The row's request (validated as a batch validates it, the seed filled in), its
        fields and its output name (the row id with the request's digest)."""
        row_id = row.get(self._id_column)
        fields = self._fields(row)
        if not isinstance(fields.get("prompt"), str):
            raise FriendliValidationError(
                "prompt", "is null or missing in this row; every row needs a prompt"
            )
        if fields.get("seed") is None and row_id is not None:
            fields["seed"] = seed_for(row_id)
        edit = self._edit if self._edit is not None else "image" in fields
        names = _EDIT_FIELDS if edit else _GENERATE_FIELDS
        arguments = {key: value for key, value in fields.items() if key in names}
        request = EditRequest(**arguments) if edit else GenerateRequest(**arguments)
        if self._out is None:
            return request, fields, None
        if row_id is None:
            raise FriendliValidationError(
                self._id_column,
                "is null or missing; with out_dir every row needs a unique id (pass id_column=)",
            )
        digest = request_digest(EDITS_PATH if edit else GENERATIONS_PATH, request)
        if self._sharded:
            return request, fields, row_key(row_id, digest)
        return request, fields, row_image_name(row_id, digest, request.response_format)

    async def _row(self, client: AsyncFriendli, row: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = dict.fromkeys(OUTPUT_SCHEMA.names)
        out.update(status="failed", attempts=0, maybe_duplicated=False)
        started = time.monotonic()
        try:
            request, fields, name = self._prepare(row)
            out["seed"] = request.seed
            if self._sharded and self._out is not None and name is not None:
                out["key"] = name
                shard = self._in_shards.get(name)
                if shard is not None:
                    out.update(status="resumed", latency_s=0.0, uri=f"{self._out.uri}/{shard}")
                    return out
            elif self._out is not None and name is not None:
                out["uri"] = f"{self._out.uri}/{name}"
                out["key"] = name.rsplit(".", 1)[0]
                if await asyncio.to_thread(self._out.complete, name):
                    out["status"] = "resumed"
                    out["latency_s"] = 0.0
                    return out
            endpoint = fields.get("server_url")
            if isinstance(endpoint, str):
                key = endpoint
            else:
                # Over a fleet the client holds each endpoint to this actor's share.
                key = _FLEET if self._spec.endpoints > 1 else client.server_url
            out["endpoint"] = key if key != _FLEET else None
            image = client.container.image
            call = image.edit if isinstance(request, EditRequest) else image.generate
            async with self._slot(key):
                started = time.monotonic()
                result: ImageResult = await call(**fields)
            out["latency_s"] = time.monotonic() - started
            out.update(
                attempts=result.attempts,
                format=result.format,
                request_id=result.request_id,
                maybe_duplicated=result.maybe_duplicated,
            )
            # A client over a fleet says which endpoint served the call.
            served = getattr(result, "endpoint", None)
            if served is not None:
                out["endpoint"] = str(served)
            if self._sharded and name is not None:
                # Published with the rest of the batch's new images (`_publish`).
                out[_IMAGE] = result.data
                out[_RECORD] = manifest_record(
                    index=0,
                    item_id=request_digest(
                        EDITS_PATH if isinstance(request, EditRequest) else GENERATIONS_PATH,
                        request,
                    ),
                    occurrence=0,
                    prompt=request.prompt,
                    seed=request.seed,
                    attempts=result.attempts,
                    elapsed=out["latency_s"],
                    request_id=result.request_id,
                    fmt=result.format,
                    size=len(result.data),
                    sha256=hashlib.sha256(result.data).hexdigest(),
                    maybe_duplicated=result.maybe_duplicated,
                    fields=dataset_fields(request),
                ) | {"key": name}
            elif self._out is not None and name is not None:
                await asyncio.to_thread(self._out.write, name, result.data)
            else:
                out["image"] = result.data
            out["status"] = "ok"
        except Exception as exc:  # noqa: BLE001  (a bad row is a row, never a failed block)
            out.update(
                status="failed",
                error_type=type(exc).__name__,
                error=str(exc) or repr(exc),
                attempts=int(getattr(exc, "attempts", 0) or 0),
                latency_s=time.monotonic() - started,
                image=None,
            )
            out.pop(_IMAGE, None)
            out.pop(_RECORD, None)
            failed_at = getattr(exc, "endpoint", None)
            if failed_at is not None:
                out["endpoint"] = str(failed_at)
        return out

    def _assemble(self, table: pa.Table, outputs: list[dict[str, Any]]) -> pa.Table:
        if self._keep:
            base = table.drop_columns([n for n in OUTPUT_SCHEMA.names if n in table.column_names])
        elif self._id_column in table.column_names:
            base = table.select([self._id_column])
        else:
            base = pa.table({})
        produced = pa.Table.from_pylist(outputs, schema=OUTPUT_SCHEMA)
        drop = "image" if self._out is not None else "uri"
        produced = produced.drop_columns([drop])
        if base.num_columns == 0:
            return produced
        for field, column in zip(produced.schema, produced.columns, strict=True):
            base = base.append_column(field, column)
        return base


_FLEET: Final = "<fleet>"
#: Where a row's new image and its shard record wait for `ImageStage._publish`.
_IMAGE: Final = "_image"
_RECORD: Final = "_record"


def _extension(fmt: object) -> str:
    return EXTENSIONS.get(fmt if isinstance(fmt, str) else "", ".bin")


def _as_table(batch: Any) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, Mapping):
        return pa.table({name: list(values) for name, values in batch.items()})
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # a pandas DataFrame
        return pa.Table.from_pandas(batch, preserve_index=False)
    raise FriendliUsageError(
        f"ImageStage takes a pyarrow Table, a pandas DataFrame or a dict of columns, "
        f"got {type(batch).__name__}; use map_batches(..., batch_format='pyarrow')"
    )


# -- Ray helpers ------------------------------------------------------------------------


def _ray_data() -> Any:
    try:
        import ray.data  # noqa: PLC0415  (the optional ray extra)
    except ImportError as exc:
        raise FriendliUsageError(
            f"friendli_image.ray needs Ray Data ({exc}): pip install 'friendli-image[ray]'"
        ) from None
    return ray.data


def actor_pool(size: int, calls_per_actor: int = 4) -> Any:
    """The ``ActorPoolStrategy`` for ``size`` actors, ``calls_per_actor`` batches each.

    Ray 2.60 spells it ``max_concurrent_calls_per_actor``; older versions have only
    ``max_tasks_in_flight_per_actor`` (their async UDFs run up to
    ``RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY``, 4, batches at once).
    """
    strategy = _ray_data().ActorPoolStrategy
    parameters = inspect.signature(strategy).parameters
    if "max_concurrent_calls_per_actor" in parameters:
        return strategy(size=size, max_concurrent_calls_per_actor=calls_per_actor)
    return strategy(size=size, max_tasks_in_flight_per_actor=calls_per_actor)


#: The most CPU one actor reserves by default: it waits on the network, not the CPU.
ACTOR_CPUS: Final = 0.25
#: The largest share of the cluster's CPUs the pool reserves by default, so that the
#: tasks reading and transforming the input (1 CPU each) always find one.
_POOL_CPU_SHARE: Final = 0.25
#: Ray's resource granularity.
_RESOLUTION: Final = 10_000


def _ray() -> Any:
    _ray_data()  # says how to install Ray when it is missing
    import ray  # noqa: PLC0415  (the optional ray extra)

    if not ray.is_initialized():
        ray.init()  # what Ray Data itself does on its first run
    return ray


def default_num_cpus(cluster_cpus: float, num_actors: int) -> float:
    """The CPUs each actor reserves when ``map_batches_options`` name none.

    ``min(0.25, cluster_cpus / 4 / num_actors)``, rounded down to Ray's 1/10,000: the
    whole pool reserves at most a quarter of the cluster's CPUs, so it never takes the
    CPUs the tasks that read the input need (on 2 CPUs, 16 actors reserve 0.0312 each).
    """
    share = math.floor(cluster_cpus * _POOL_CPU_SHARE / num_actors * _RESOLUTION) / _RESOLUTION
    return min(ACTOR_CPUS, share)


def _bundle(options: Mapping[str, Any]) -> dict[str, float]:
    """One actor's resources as a placement-group bundle (zero amounts left out)."""
    wanted = {
        "CPU": options.get("num_cpus"),
        "GPU": options.get("num_gpus"),
        "memory": options.get("memory"),
        **dict(options.get("resources") or {}),
    }
    return {name: float(amount) for name, amount in wanted.items() if amount}


def _check_placement(ray: Any, num_actors: int, options: Mapping[str, Any], timeout: float) -> None:
    """Raise `FriendliUsageError` unless the cluster places the pool (and one CPU for the
    tasks that read the input) within ``timeout`` seconds."""
    from ray.util import placement_group, remove_placement_group  # noqa: PLC0415

    actor = _bundle(options)
    bundles = [actor] * num_actors if actor else []
    bundles.append({"CPU": 1.0})
    total = {name: float(amount) for name, amount in ray.cluster_resources().items()}
    needed: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            needed[name] = needed.get(name, 0.0) + amount
    short = any(total.get(name, 0.0) + 1e-9 < amount for name, amount in needed.items())
    if not short:
        group = placement_group(bundles, strategy="PACK")
        try:
            if group.wait(timeout_seconds=timeout):
                return
        finally:
            remove_placement_group(group)
    free = ray.available_resources()

    def shown(resources: Mapping[str, float]) -> str:
        return ", ".join(f"{name} {resources.get(name, 0.0):g}" for name in sorted(needed))

    raise FriendliUsageError(
        f"the Ray cluster cannot place {num_actors} actor(s) of {actor or 'no resources'} "
        f"and 1 CPU for the tasks that read the input"
        f"{'' if short else f' within {timeout:g} s'}: it has {shown(total)} in total, "
        f"{shown(free)} free. Lower num_actors, ask less per actor "
        "(map_batches_options={'num_cpus': 0.1}: an actor mostly waits on the network), add "
        "nodes, or pass placement_timeout=None to wait (an autoscaling cluster)"
    )


def generate_images(
    ds: Any,
    server_url: str | Sequence[str] | None = None,
    *,
    num_actors: int = 2,
    calls_per_actor: int = 2,
    batch_size: int = 64,
    map_batches_options: Mapping[str, Any] | None = None,
    placement_timeout: float | None = 20.0,
    **stage_options: Any,
) -> Any:
    """``ds.map_batches`` with `ImageStage` on an actor pool of ``num_actors``.

    ``stage_options`` are `ImageStage`'s arguments; they are checked here, on the
    driver, before anything runs. ``map_batches_options`` go to ``map_batches``
    (``num_cpus``, ``num_gpus``, ``resources``, ``max_task_retries``...). Without
    ``num_cpus`` each actor reserves `default_num_cpus` (at most 0.25, and the whole pool
    at most a quarter of the cluster's CPUs), so the pool runs on a laptop.

    Before returning, the cluster must be able to place the pool and one CPU for the
    tasks that read the input, within ``placement_timeout`` seconds: otherwise
    `FriendliUsageError` says what it lacks, instead of a job that waits forever for
    actors. None skips the check (an autoscaling cluster that adds nodes on demand).

    Returns the lazy output Dataset; its rows are the manifest: ``.write_parquet(...)``
    it.
    """
    kwargs = {"server_url": server_url, "num_actors": num_actors, **stage_options}
    ImageStage(**kwargs)  # validates the options where the user can see the error
    if placement_timeout is not None and not placement_timeout > 0:
        raise FriendliUsageError(
            f"placement_timeout must be a positive number of seconds or None, got "
            f"{placement_timeout!r}"
        )
    ray = _ray()
    options = dict(map_batches_options or {})
    if options.get("num_cpus") is None:
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
        options["num_cpus"] = default_num_cpus(cpus, num_actors)
    if placement_timeout is not None:
        _check_placement(ray, num_actors, options, placement_timeout)
    return ds.map_batches(
        ImageStage,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=actor_pool(num_actors, calls_per_actor),
        **options,
    )
