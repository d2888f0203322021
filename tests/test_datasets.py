"""The dataset formats, read back with the real readers: ``datasets.load_dataset`` for all
three, the ``webdataset`` library for the tar shards, ``pyarrow.parquet`` for the Parquet
shards. Every row's image is checked by sha256 against the server's own answer to its
request, and every field against the request and the manifest."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import tarfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import anyio
import orjson
import pytest

from friendli_image import AsyncFriendli, FriendliUsageError, FriendliValidationError
from friendli_image._cli import main
from friendli_image._requests import GenerateRequest
from friendli_image._resources import GENERATIONS_PATH
from friendli_image._store import (
    MANIFEST_NAME,
    METADATA_NAME,
    BatchStore,
    item_key,
    request_digest,
)
from friendli_image.server import LocalServer, ServerConfig

datasets = pytest.importorskip("datasets")
webdataset = pytest.importorskip("webdataset")
pq = pytest.importorskip("pyarrow.parquet")

#: Duplicates (two identical requests are two items), seeds given and not, other steps.
REQUESTS: list[dict[str, Any]] = [
    {"prompt": f"a dune no. {i % 5}", "num_inference_steps": 1 + i % 2}
    | ({"seed": i} if i % 3 else {})
    for i in range(13)
]


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer(ServerConfig(image_size=16, max_concurrency=16)) as local:
        yield local


@pytest.fixture
async def client(server: LocalServer) -> AsyncIterator[AsyncFriendli]:
    async with AsyncFriendli(server_url=server.url) as opened:
        yield opened


def _shards(out: Path, pattern: str = "train-*") -> list[str]:
    return sorted(str(path) for path in out.glob(pattern))


def _written(server: LocalServer, out: Path, output_format: str, shard_size: int) -> Any:
    """Run REQUESTS into ``out``; return what each item should hold."""

    async def run() -> dict[str, Any]:
        async with AsyncFriendli(server_url=server.url) as client:
            expected = await _expected(client, REQUESTS)
            await client.container.image.generate_batch(
                REQUESTS, out_dir=out, output_format=output_format, shard_size=shard_size
            )
            return expected

    return asyncio.run(run())


async def _expected(client: AsyncFriendli, requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Per item key: the request and the sha256 of the server's answer to it."""
    answers = await asyncio.gather(*(client.container.image.generate(**r) for r in requests))
    seen: Counter[str] = Counter()
    expected = {}
    for request, answer in zip(requests, answers, strict=True):
        digest = request_digest(GENERATIONS_PATH, GenerateRequest(**request))
        expected[item_key(digest, seen[digest])] = {
            "request": request,
            "sha256": hashlib.sha256(answer.data).hexdigest(),
            "id": digest,
            "occurrence": seen[digest],
        }
        seen[digest] += 1
    return expected


def _check_row(row: dict[str, Any], image: bytes, expected: dict[str, Any]) -> None:
    """One loaded row: the server's image for its request, and every field."""
    want = expected[row["key"]]
    request = want["request"]
    assert hashlib.sha256(image).hexdigest() == want["sha256"] == row["sha256"]
    assert (row["id"], row["occurrence"]) == (want["id"], want["occurrence"])
    assert row["prompt"] == request["prompt"]
    assert row["seed"] == request.get("seed")
    assert row["num_inference_steps"] == request["num_inference_steps"]
    assert orjson.loads(row["request"]) == {"guidance_scale": 0.0, **request}
    assert row["format"] == "jpeg"
    assert row["bytes"] == len(image)
    assert row["attempts"] == 1
    assert isinstance(row["request_id"], str)


def _load(out: Path, output_format: str) -> Any:
    if output_format == "files":
        return datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    return datasets.load_dataset(str(out), split="train")


@pytest.mark.parametrize("output_format", ["files", "webdataset", "parquet"])
async def test_datasets_loads_every_item_with_its_image_and_fields(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path, output_format: str
) -> None:
    expected = await _expected(client, REQUESTS)
    server.reset_stats()
    result = await client.container.image.generate_batch(
        REQUESTS, out_dir=tmp_path, output_format=output_format, shard_size=5
    )
    assert result.ok
    assert server.stats.total_requests == len(REQUESTS)
    loaded = await asyncio.to_thread(_load, tmp_path, output_format)
    assert len(loaded) == len(REQUESTS)
    if output_format == "webdataset":
        loaded = loaded.cast_column("jpg", datasets.Image(decode=False))
        rows = [(row["json"], row["jpg"]["bytes"]) for row in loaded]
        assert all(row["__key__"] == row["json"]["key"] for row in loaded)
    else:
        loaded = loaded.cast_column("image", datasets.Image(decode=False))
        rows = []
        for row in loaded:
            image = row.pop("image")
            data = image["bytes"] or await asyncio.to_thread(Path(image["path"]).read_bytes)
            rows.append((row, data))
    assert sorted(row["key"] for row, _ in rows) == sorted(expected)
    for row, data in rows:
        _check_row(row, data, expected)
    # The items point into the shards (or files) that hold them.
    for item in result:
        assert item.path is not None
        assert item.path.exists()
    if output_format != "files":
        shards = _shards(tmp_path)
        assert len(shards) == 3  # 13 items, 5 per shard
        assert {str(item.path) for item in result} == set(shards)


def test_webdataset_reads_the_shards_in_name_order(server: LocalServer, tmp_path: Path) -> None:
    expected = _written(server, tmp_path, "webdataset", 4)
    shards = _shards(tmp_path, "train-*.tar")
    assert len(shards) == 4
    with warnings.catch_warnings():
        # webdataset leaves its last shard's file to the garbage collector.
        warnings.simplefilter("ignore", ResourceWarning)
        samples = list(webdataset.WebDataset(shards, shardshuffle=False, empty_check=False))
        gc.collect()
    assert [sample["__url__"] for sample in samples] == sorted(s["__url__"] for s in samples)
    assert len(samples) == len(REQUESTS)
    for sample in samples:
        row = orjson.loads(sample["json"])
        assert sample["__key__"] == row["key"]
        _check_row(row, sample["jpg"], expected)


def test_parquet_shards_carry_the_image_feature_schema(server: LocalServer, tmp_path: Path) -> None:
    expected = _written(server, tmp_path, "parquet", 6)
    table = pq.read_table(_shards(tmp_path, "train-*.parquet"))
    assert table.num_rows == len(REQUESTS)
    features = orjson.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    assert str(table.schema.field("seed").type) == "int64"
    for row in table.to_pylist():
        image = row.pop("image")
        assert image["path"] == row["key"] + ".jpg"
        _check_row(row, image["bytes"], expected)


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
async def test_a_rerun_resumes_from_the_shards_and_a_cancel_publishes_the_open_shard(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path, output_format: str
) -> None:
    batch = client.container.image.generate_batch(
        REQUESTS, out_dir=tmp_path, output_format=output_format, shard_size=5, concurrency=1
    )
    done = 0
    async with batch:
        async for _item in batch:
            done += 1
            if done == 7:
                break
    # One full shard, and the open one with the two items finished before the cancel.
    assert len(_shards(tmp_path)) == 2
    server.reset_stats()
    result = await client.container.image.generate_batch(
        REQUESTS, out_dir=tmp_path, output_format=output_format, shard_size=5
    )
    assert Counter(item.status for item in result) == {"resumed": 7, "ok": 6}
    assert server.stats.total_requests == 6
    server.reset_stats()
    again = await client.container.image.generate_batch(
        REQUESTS[::-1], out_dir=tmp_path, output_format=output_format, shard_size=5
    )
    assert all(item.status == "resumed" for item in again)
    assert server.stats.total_requests == 0
    loaded = await asyncio.to_thread(_load, tmp_path, output_format)
    keys = [row["json"]["key"] if "json" in row else row["key"] for row in loaded]
    assert sorted(keys) == sorted(Counter(keys))  # every item once
    assert len(keys) == len(REQUESTS)


def _contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.parametrize("output_format", ["files", "webdataset"])
async def test_a_stopped_batch_keeps_every_image_it_was_writing(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path, output_format: str
) -> None:
    """Stopping a batch while a full shard or a group of images waits for its worker
    thread (the items' tasks are cancelled, the threads are not) keeps every image the
    store was given, with its line, and nothing is written after the store closed; the
    rerun resumes them all."""
    given: list[str] = []
    errors: list[BaseException] = []
    started, finished = threading.Event(), threading.Event()
    real_add, real_publish = BatchStore.add_to_shard, BatchStore.publish
    real_write = BatchStore.write_files

    def add(store: BatchStore, key: str, *args: Any) -> Any:
        given.append(key)
        return real_add(store, key, *args)

    def slow(real: Any) -> Any:
        def write(store: BatchStore, work: Any) -> Any:
            if isinstance(work, list):
                given.extend(Path(name).stem for name, _image, _record in work)
            started.set()
            time.sleep(0.3)  # the stop falls into this wait
            try:
                return real(store, work)
            except BaseException as exc:
                errors.append(exc)
                raise
            finally:
                finished.set()

        return write

    from friendli_image import _batch

    with (
        mock.patch.object(BatchStore, "add_to_shard", add),
        mock.patch.object(BatchStore, "publish", slow(real_publish)),
        mock.patch.object(BatchStore, "write_files", slow(real_write)),
        # Every group of images on a worker thread (tiny ones are written on the loop).
        mock.patch.object(_batch, "_INLINE_BYTES", 0),
    ):
        batch = client.container.image.generate_batch(
            REQUESTS, out_dir=tmp_path, output_format=output_format, shard_size=2, concurrency=4
        )
        async with batch:
            async for _item in batch:
                break
            # The other items' tasks go on meanwhile: a shard fills, a group is written.
            assert await asyncio.to_thread(started.wait, 30)
        written = await asyncio.to_thread(_contents, tmp_path)
        assert await asyncio.to_thread(finished.wait, 30)
    assert await asyncio.to_thread(_contents, tmp_path) == written
    # A write that would start after the close is refused, not done.
    assert all(isinstance(exc, FriendliUsageError) for exc in errors), errors
    lines = [orjson.loads(line) for line in (tmp_path / MANIFEST_NAME).read_bytes().splitlines()]
    assert sorted(item_key(line["id"], line["occurrence"]) for line in lines) == sorted(given)
    for line in lines:
        assert (tmp_path / line["file"]).is_file(), line
    server.reset_stats()
    result = await client.container.image.generate_batch(
        REQUESTS, out_dir=tmp_path, output_format=output_format, shard_size=2
    )
    assert sum(item.status == "resumed" for item in result) == len(given)
    assert sum(item.status == "ok" for item in result) == len(REQUESTS) - len(given)


async def test_a_stopped_batch_keeps_the_images_held_back_by_unwritten_shards(
    client: AsyncFriendli, tmp_path: Path
) -> None:
    """Items whose images arrived while two full shards were still being written wait
    for room; a stop in that wait keeps their images (in the shard the close publishes),
    so the rerun makes none of them again."""
    from friendli_image import _batch

    arrived: list[str] = []
    real_record, real_publish = _batch.manifest_record, BatchStore.publish

    def record(**fields: Any) -> dict[str, Any]:
        arrived.append(item_key(fields["item_id"], fields["occurrence"]))
        return real_record(**fields)

    def slow_publish(store: BatchStore, shard: Any) -> None:
        time.sleep(0.3)  # two shards in writing hold every later image back
        real_publish(store, shard)

    with (
        mock.patch.object(_batch, "manifest_record", record),
        mock.patch.object(BatchStore, "publish", slow_publish),
    ):
        batch = client.container.image.generate_batch(
            REQUESTS, out_dir=tmp_path, output_format="webdataset", shard_size=1, concurrency=8
        )
        async with batch:
            async for _item in batch:
                break
    assert len(arrived) > 3  # some were held back: two shards were being written
    lines = [orjson.loads(line) for line in (tmp_path / MANIFEST_NAME).read_bytes().splitlines()]
    assert sorted(item_key(line["id"], line["occurrence"]) for line in lines) == sorted(arrived)
    for line in lines:
        assert (tmp_path / line["file"]).is_file(), line
    result = await client.container.image.generate_batch(
        REQUESTS, out_dir=tmp_path, output_format="webdataset", shard_size=1
    )
    assert sum(item.status == "resumed" for item in result) == len(arrived)


@pytest.mark.parametrize("leave", ["at the next await", "by break"])
@pytest.mark.parametrize("output_format", ["files", "webdataset"])
async def test_a_batch_stopped_by_a_cancel_scope_still_closes_its_store(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path, output_format: str, leave: str
) -> None:
    """An anyio cancel scope cancels every await inside it again, the batch's cleanup
    included: the store is closed all the same (its lock released, what finished kept
    with its line), the scope catches its own cancellation, and the next batch on the
    folder runs and resumes what was kept."""
    with anyio.CancelScope() as scope:
        batch = client.container.image.generate_batch(
            REQUESTS, out_dir=tmp_path, output_format=output_format, shard_size=2, concurrency=4
        )
        async with batch:
            async for _item in batch:
                scope.cancel()
                if leave == "by break":
                    break
    assert scope.cancelled_caught
    lines = [orjson.loads(line) for line in (tmp_path / MANIFEST_NAME).read_bytes().splitlines()]
    for line in lines:
        assert (tmp_path / line["file"]).is_file(), line
    server.reset_stats()
    result = await client.container.image.generate_batch(
        REQUESTS, out_dir=tmp_path, output_format=output_format, shard_size=2
    )
    assert sum(item.status == "resumed" for item in result) == len(lines) > 0
    # Counted by the client: a request of the stopped batch may reach the server late.
    assert sum(item.status == "ok" for item in result) == len(REQUESTS) - len(lines)


async def test_a_lost_shard_is_made_again_and_a_truncated_manifest_is_survived(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path
) -> None:
    await client.container.image.generate_batch(
        REQUESTS, out_dir=tmp_path, output_format="webdataset", shard_size=5
    )
    lost = _shards(tmp_path)[0]
    with tarfile.open(lost) as tar:
        in_lost = {name.split(".")[0] for name in tar.getnames()}
    await asyncio.to_thread(Path(lost).unlink)
    server.reset_stats()
    result = await client.container.image.generate_batch(
        REQUESTS, out_dir=tmp_path, output_format="webdataset", shard_size=5
    )
    assert {item_key(i.id, i.occurrence) for i in result if i.status == "ok"} == in_lost
    assert server.stats.total_requests == len(in_lost)


async def test_a_location_keeps_one_format(client: AsyncFriendli, tmp_path: Path) -> None:
    await client.container.image.generate_batch(REQUESTS[:2], out_dir=tmp_path)
    with pytest.raises(FriendliUsageError, match="output_format='files'"):
        await client.container.image.generate_batch(
            REQUESTS[:2], out_dir=tmp_path, output_format="parquet"
        )
    shards = tmp_path / "shards"
    await client.container.image.generate_batch(
        REQUESTS[:2], out_dir=shards, output_format="parquet"
    )
    with pytest.raises(FriendliUsageError, match="into new shards too"):
        await client.container.image.generate_batch(
            REQUESTS[:2], out_dir=shards, output_format="parquet", resume=False
        )
    with pytest.raises(FriendliValidationError, match="output_format"):
        client.container.image.generate_batch(REQUESTS, out_dir=tmp_path, output_format="zip")


async def test_metadata_lists_earlier_images_after_the_current_items(
    client: AsyncFriendli, tmp_path: Path
) -> None:
    await client.container.image.generate_batch(REQUESTS[:6], out_dir=tmp_path)
    await client.container.image.generate_batch(REQUESTS[3:9], out_dir=tmp_path)
    rows = [orjson.loads(line) for line in (tmp_path / METADATA_NAME).read_bytes().splitlines()]
    manifest = [orjson.loads(line) for line in (tmp_path / MANIFEST_NAME).read_bytes().splitlines()]
    current = [line["file"] for line in sorted(manifest, key=lambda line: line["index"])]
    assert [row["file_name"] for row in rows][:6] == current
    assert len(rows) == 9  # the three images only the first run wanted are kept
    assert len({row["file_name"] for row in rows}) == 9


def test_the_cli_writes_a_dataset(server: LocalServer, tmp_path: Path) -> None:
    source = tmp_path / "prompts.txt"
    source.write_text("a gull\na kite\na tern\n")
    out = tmp_path / "out"
    code = main(
        ["batch", str(source), "--out-dir", str(out), "--server-url", server.url,
         "--output-format", "parquet", "--shard-size", "2", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    table = pq.read_table(_shards(out))
    assert sorted(table.column("prompt").to_pylist()) == ["a gull", "a kite", "a tern"]


pyarrow = pytest.importorskip("pyarrow")


def _parquet_shard(fields: dict[str, Any], count: int) -> tuple[Any, Any]:
    """A parquet shard of ``count`` items with ``fields``: (its table read back, and the
    table ``pyarrow.table`` makes of the same rows)."""
    from friendli_image._store import (
        _ROW_FIELDS,
        Shard,
        _dataset_row,
        _parquet_schema,
        manifest_record,
    )

    shard = Shard("train-x-00000.parquet", "parquet")
    for number in range(count):
        given = dict(fields)
        record = manifest_record(
            index=number,
            item_id=f"{number:064x}",
            occurrence=number % 2,
            prompt=given.pop("prompt", "a dune"),
            seed=given.pop("seed", None),
            attempts=1,
            elapsed=0.25,
            request_id=None if number % 2 else f"req-{number}",
            file=shard.name,
            fmt="jpeg",
            size=number,
            sha256="0" * 64,
            maybe_duplicated=number % 3 == 0,
            fields={"num_inference_steps": 20, "guidance_scale": 7.5, **given},
        )
        shard.records.append(record)
        shard.images.append((f"{number}.jpg", bytes([number]) * number))
    built = pq.read_table(pyarrow.BufferReader(bytes(shard.build())))
    rows = [_dataset_row(record) for record in shard.records]
    columns = {"image": [{"bytes": data, "path": name} for name, data in shard.images]}
    columns.update({name: [row[name] for row in rows] for name in _ROW_FIELDS})
    return built, pyarrow.table(columns, schema=_parquet_schema())


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "é and ü", "seed": 7},  # built from buffers
        {"prompt": None, "seed": None, "guidance_scale": None},  # nulls, from buffers
        {"seed": -(2**63)},  # the int64 bound, from buffers
        {"guidance_scale": 7},  # an int in a float column: pyarrow converts it
    ],
)
def test_a_parquet_shard_holds_what_pyarrow_table_makes_of_its_rows(fields: dict[str, Any]) -> None:
    table, expected = _parquet_shard(fields, 5)
    assert table.equals(expected, check_metadata=True)
    assert table.to_pylist() == expected.to_pylist()


def test_a_value_parquet_cannot_hold_is_refused_as_pyarrow_refuses_it() -> None:
    with pytest.raises(pyarrow.ArrowTypeError):
        pyarrow.array([5], pyarrow.string())
    with pytest.raises(pyarrow.ArrowTypeError):
        _parquet_shard({"model": 5}, 3)


def test_writing_a_parquet_shard_does_not_import_pandas() -> None:
    """pyarrow.array of a list imports pandas to ask if it is a pandas object: 45 MiB."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from friendli_image._store import Shard, manifest_record\n"
        "shard = Shard('train-x-00000.parquet', 'parquet')\n"
        "record = manifest_record(index=0, item_id='0' * 64, occurrence=0, prompt='p', seed=1,"
        " attempts=1, elapsed=0.0, request_id=None, file=shard.name, fmt='jpeg', size=1,"
        " sha256='0' * 64, fields={'num_inference_steps': 20, 'guidance_scale': 7.5})\n"
        "shard.records.append(record); shard.images.append(('k.jpg', b'x'))\n"
        "assert len(shard.build()) > 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pandas'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
