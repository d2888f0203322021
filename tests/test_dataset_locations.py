"""Batches into fsspec locations (``memory://`` and a real S3 API) and ``n`` variants.

Every format is written to a URL, read back from there with the real readers, and
resumed; a run that dies at a PUT leaves only whole shards, which the rerun finds from
the shards themselves (no manifest was written), so every item is in exactly one shard.
Variants: ``n`` items per request, each its own identity and seed, the same pictures on
every run.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import fsspec
import orjson
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from input_states import Killed, dies_at_put, shard_samples, small_server
from test_datasets import REQUESTS, _expected

from friendli_image import AsyncFriendli, FriendliUsageError, FriendliValidationError
from friendli_image._batch_models import BatchOptions
from friendli_image._cli import main
from friendli_image._requests import GenerateRequest
from friendli_image._resources import GENERATIONS_PATH
from friendli_image._store import (
    MANIFEST_NAME,
    METADATA_NAME,
    BatchStore,
    image_name,
    item_key,
    manifest_record,
    request_digest,
    stored_key,
    variant_seeds,
)
from friendli_image.server import LocalServer

FORMATS = ["files", "webdataset", "parquet"]


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    yield from small_server(step_latency_ms=0)


@pytest.fixture
async def client(server: LocalServer) -> AsyncIterator[AsyncFriendli]:
    async with AsyncFriendli(server_url=server.url) as opened:
        yield opened


@pytest.fixture
def memory_url() -> Iterator[str]:
    url = f"memory://friendli-test-{uuid.uuid4().hex}/out"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def _stored(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, list[bytes]]:
    """Every stored image by key, read from the location: image files, or every sample
    of every shard (a shard that does not read to its end fails here)."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    images: dict[str, list[bytes]] = {}
    if not fs.exists(root):
        return images
    for path in sorted(fs.ls(root, detail=False, refresh=True)):
        name = path.rsplit("/", 1)[-1]
        data = fs.cat_file(path)
        if name.endswith((".tar", ".parquet")):
            for key, image in shard_samples(name, data):
                images.setdefault(key, []).append(image)
        elif name.endswith(".jpg"):
            images.setdefault(name.removesuffix(".jpg"), []).append(data)
    return images


def _check_stored(images: dict[str, list[bytes]], expected: dict[str, Any]) -> None:
    assert sorted(images) == sorted(expected)
    for key, copies in images.items():
        assert len(copies) == 1, f"{key} is stored {len(copies)} times"
        assert hashlib.sha256(copies[0]).hexdigest() == expected[key]["sha256"]


@pytest.mark.parametrize("output_format", FORMATS)
async def test_a_url_location_holds_every_format_and_resumes(
    client: AsyncFriendli, server: LocalServer, memory_url: str, output_format: str
) -> None:
    expected = await _expected(client, REQUESTS)
    server.reset_stats()
    result = await client.container.image.generate_batch(
        REQUESTS, out_dir=memory_url, output_format=output_format, shard_size=5
    )
    assert result.ok
    assert server.stats.total_requests == len(REQUESTS)
    images = await asyncio.to_thread(_stored, memory_url)
    _check_stored(images, expected)
    fs, root = fsspec.core.url_to_fs(memory_url)
    for item in result:
        assert item.path is None
        assert item.uri is not None
        assert item.uri.startswith(memory_url + "/")
        assert fs.exists(item.uri)
    manifest = [orjson.loads(line) for line in fs.cat_file(f"{root}/{MANIFEST_NAME}").splitlines()]
    assert sorted(line["index"] for line in manifest) == list(range(len(REQUESTS)))
    if output_format == "files":
        rows = [orjson.loads(line) for line in fs.cat_file(f"{root}/{METADATA_NAME}").splitlines()]
        assert len(rows) == len(REQUESTS)
    server.reset_stats()
    again = await client.container.image.generate_batch(
        REQUESTS[::-1], out_dir=memory_url, output_format=output_format, shard_size=5
    )
    assert {item.status for item in again} == {"resumed"}
    assert server.stats.total_requests == 0
    assert await asyncio.to_thread(_stored, memory_url) == images


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
@pytest.mark.parametrize("writes", [0, 1, 2])
async def test_a_run_killed_at_a_put_leaves_whole_shards_that_the_rerun_finds(
    client: AsyncFriendli,
    server: LocalServer,
    memory_url: str,
    output_format: str,
    writes: int,
) -> None:
    expected = await _expected(client, REQUESTS)
    with pytest.raises(Killed), dies_at_put(writes):
        await client.container.image.generate_batch(
            REQUESTS, out_dir=memory_url, output_format=output_format, shard_size=4
        )
    fs, root = fsspec.core.url_to_fs(memory_url)
    listed = [path.rsplit("/", 1)[-1] for path in fs.ls(root, detail=False)] if writes else []
    assert fs.exists(root) == bool(writes)
    assert MANIFEST_NAME not in listed  # the run never got to write its manifest
    assert len(listed) == writes  # whole shards only, nothing half written
    survived = await asyncio.to_thread(_stored, memory_url)
    assert len(survived) == 4 * writes
    server.reset_stats()
    result = await client.container.image.generate_batch(
        REQUESTS, out_dir=memory_url, output_format=output_format, shard_size=4
    )
    resumed = {item.key for item in result if item.status == "resumed"}
    assert resumed == set(survived)
    assert server.stats.total_requests == len(REQUESTS) - len(survived)
    _check_stored(await asyncio.to_thread(_stored, memory_url), expected)


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    """A real S3 API: moto's server on a free port, and s3fs storage options for it."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    moto = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"},
        }
        fs = fsspec.filesystem("s3", **options)
        fs.call_s3("create_bucket", Bucket="datasets")
        yield options
    finally:
        moto.stop()


@pytest.mark.parametrize("output_format", FORMATS)
async def test_an_s3_location_holds_every_format_and_resumes(
    client: AsyncFriendli, server: LocalServer, s3: dict[str, Any], output_format: str
) -> None:
    url = f"s3://datasets/{uuid.uuid4().hex}"
    expected = await _expected(client, REQUESTS)
    result = await client.container.image.generate_batch(
        REQUESTS, out_dir=url, storage_options=s3, output_format=output_format, shard_size=5
    )
    assert result.ok
    _check_stored(await asyncio.to_thread(_stored, url, s3), expected)
    server.reset_stats()
    again = await client.container.image.generate_batch(
        REQUESTS, out_dir=url, storage_options=s3, output_format=output_format, shard_size=5
    )
    assert {item.status for item in again} == {"resumed"}
    assert server.stats.total_requests == 0


def test_storage_options_stay_out_of_the_repr() -> None:
    options = BatchOptions(out_dir="s3://b/x", storage_options={"secret": "hunter2"})
    assert "hunter2" not in repr(options)
    assert options.out_dir == "s3://b/x"
    assert str(BatchOptions(out_dir="file:///data/x").out_dir) == "/data/x"
    with pytest.raises(FriendliValidationError, match="names no location"):
        BatchOptions(out_dir="s3://")


# -- variants ---------------------------------------------------------------------------------


def test_variant_seeds_are_distinct_stable_and_start_with_the_requests_own() -> None:
    digest = "ab" * 32
    seeds = variant_seeds(digest, 0, 7, 4)
    assert seeds[0] == 7
    assert len(set(seeds)) == 4
    assert seeds == variant_seeds(digest, 0, 7, 4)
    assert variant_seeds(digest, 0, None, 4)[1:] == seeds[1:]
    assert variant_seeds(digest, 1, None, 4) != variant_seeds(digest, 0, None, 4)
    assert all(0 <= seed < 2**31 for seed in variant_seeds(digest, 0, None, 50))
    expected = int.from_bytes(
        hashlib.sha256(b"friendli-image/variant/" + f"{digest}-0-1".encode()).digest()[:4], "big"
    ) & (2**31 - 1)
    assert seeds[1] == expected


@pytest.mark.parametrize("output_format", FORMATS)
async def test_n_variants_are_items_of_their_own_with_their_own_seeds(
    client: AsyncFriendli, server: LocalServer, memory_url: str, output_format: str
) -> None:
    requests = [{"prompt": "a kite", "seed": 5}, {"prompt": "a gull"}, {"prompt": "a kite"}]
    server.reset_stats()
    result = await client.container.image.generate_batch(
        requests, out_dir=memory_url, output_format=output_format, n=3, shard_size=4
    )
    assert server.stats.total_requests == 9
    assert [item.index for item in result] == list(range(9))
    assert [item.variant for item in result] == [0, 1, 2] * 3
    # What each variant is: the request with its variant's seed, answered by the server.
    expected: dict[str, Any] = {}
    for position, request in enumerate(requests):
        digest = request_digest(GENERATIONS_PATH, GenerateRequest(**request))
        seeds = variant_seeds(digest, 0, request.get("seed"), 3)
        for variant, seed in enumerate(seeds):
            item = result[position * 3 + variant]
            assert item.key == item_key(digest, 0, variant)
            answer = await client.container.image.generate(**{**request, "seed": seed})
            expected[item.key] = {"sha256": hashlib.sha256(answer.data).hexdigest()}
    _check_stored(await asyncio.to_thread(_stored, memory_url), expected)
    # More variants later: the first three are kept, only the new ones are made.
    server.reset_stats()
    more = await client.container.image.generate_batch(
        requests, out_dir=memory_url, output_format=output_format, n=4, shard_size=4
    )
    assert Counter(item.status for item in more) == {"resumed": 9, "ok": 3}
    assert server.stats.total_requests == 3
    assert len(await asyncio.to_thread(_stored, memory_url)) == 12


async def test_one_variant_sends_the_request_as_it_is(
    client: AsyncFriendli, server: LocalServer
) -> None:
    server.reset_stats()
    result = await client.container.image.generate_batch([{"prompt": "a tern"}], n=1)
    unseeded = await client.container.image.generate(prompt="a tern")
    assert result[0].result is not None
    assert result[0].result.data == unseeded.data
    with pytest.raises(FriendliValidationError, match="n"):
        client.container.image.generate_batch([{"prompt": "a tern"}], n=0)


async def test_invalid_requests_and_a_stopped_batch_account_for_every_variant(
    client: AsyncFriendli,
) -> None:
    result = await client.container.image.generate_batch([{"prompt": "ok"}, {"steps": 3}], n=2)
    assert [(item.index, item.status) for item in result] == [
        (0, "ok"),
        (1, "ok"),
        (2, "failed"),
        (3, "failed"),
    ]


def test_the_cli_makes_variants(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "prompts.txt"
    source.write_text("a gull\na kite\n")
    out = tmp_path / "out"
    common = ["batch", str(source), "--server-url", server.url, "--no-progress"]
    assert main([*common, "--out-dir", str(out), "--variants", "3"]) == 0
    lines = [orjson.loads(line) for line in (out / MANIFEST_NAME).read_bytes().splitlines()]
    assert sorted((line["prompt"], line["variant"]) for line in lines) == [
        (prompt, variant) for prompt in ("a gull", "a kite") for variant in range(3)
    ]
    assert len({line["seed"] for line in lines}) == 6


@pytest.mark.parametrize("output_format", ["files", "webdataset"])
def test_the_cli_writes_to_a_url_and_resumes_there(
    server: LocalServer,
    tmp_path: Path,
    memory_url: str,
    output_format: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = tmp_path / "prompts.txt"
    source.write_text("".join(f"a gull over wave {i}\n" for i in range(7)))
    command = [
        "batch", str(source), "--server-url", server.url, "--no-progress", "--gallery",
        "--out-dir", memory_url, "--output-format", output_format, "--shard-size", "3",
    ]  # fmt: skip
    server.reset_stats()
    assert main(command) == 0
    first = capsys.readouterr().out
    assert server.stats.total_requests == 7
    assert f"manifest  {memory_url}/{MANIFEST_NAME}" in first
    assert "gallery   not written: the gallery needs a local --out-dir" in first
    fs, root = fsspec.core.url_to_fs(memory_url)
    manifest = [orjson.loads(line) for line in fs.cat_file(f"{root}/{MANIFEST_NAME}").splitlines()]
    assert sorted(line["index"] for line in manifest) == list(range(7))
    images = _stored(memory_url)
    _check_stored(images, {stored_key(line): line for line in manifest})
    assert orjson.loads(fs.cat_file(f"{root}/run.json"))["status"] == "completed"
    assert not (tmp_path / "memory:").exists()  # nothing went to a local folder by that name

    server.reset_stats()
    assert main(command) == 0
    assert "resumed   7 from earlier runs" in capsys.readouterr().out
    assert server.stats.total_requests == 0
    assert _stored(memory_url) == images


def test_the_cli_takes_a_file_url_as_its_folder(server: LocalServer, tmp_path: Path) -> None:
    source = tmp_path / "prompts.txt"
    source.write_text("a gull\na kite\n")
    out = tmp_path / "out"
    assert main(["batch", str(source), "--server-url", server.url, "--no-progress",
                 "--out-dir", out.as_uri()]) == 0  # fmt: skip
    assert len((out / MANIFEST_NAME).read_bytes().splitlines()) == 2
    assert (out / "run.json").is_file()


def test_the_cli_says_what_a_url_without_its_file_system_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "prompts.txt"
    source.write_text("a gull\n")
    assert main(["batch", str(source), "--out-dir", "nosuchfs://bucket/x"]) == 2
    assert "package of its file system" in capsys.readouterr().err
    assert main(["batch", str(source), "--out-dir", "memory://b/x", "--no-resume"]) == 2
    assert "pass a new --out-dir" in capsys.readouterr().err


async def test_a_url_location_keeps_one_format_and_says_which(
    client: AsyncFriendli, memory_url: str
) -> None:
    await client.container.image.generate_batch(REQUESTS[:2], out_dir=memory_url)
    with pytest.raises(FriendliUsageError, match=f"{memory_url}.*output_format='files'"):
        await client.container.image.generate_batch(
            REQUESTS[:2], out_dir=memory_url, output_format="parquet"
        )


async def test_an_unknown_protocol_is_a_usage_error(client: AsyncFriendli) -> None:
    with pytest.raises(FriendliUsageError, match="package of its file system"):
        await client.container.image.generate_batch(["a"], out_dir="nosuchfs://bucket/x")


def _group(start: int, count: int) -> list[tuple[str, bytes, dict[str, Any]]]:
    """Images and their records as the batch hands them to `BatchStore.write_files`."""
    group = []
    for index in range(start, start + count):
        digest = hashlib.sha256(str(index).encode()).hexdigest()
        record = manifest_record(
            index=index,
            item_id=digest,
            occurrence=0,
            prompt=str(index),
            seed=None,
            attempts=1,
            elapsed=0.0,
            request_id=None,
            fmt="jpeg",
            size=4,
        )
        group.append((image_name(digest, 0, "jpeg"), b"\xff\xd8" + bytes([index, 0]), record))
    return group


def test_a_url_group_is_one_bulk_put_and_a_failed_one_leaves_no_line_without_its_image(
    memory_url: str,
) -> None:
    """A group of images goes to a URL location in one bulk write (its PUTs at once, not
    one round trip after the other); when it fails part way, the images that made it
    have no line (made again, never named without their bytes), and the other groups'
    items resume."""
    pipe = MemoryFileSystem.pipe
    bulk: list[int] = []

    def half_then_fails(fs: MemoryFileSystem, path: dict[str, bytes]) -> None:
        bulk.append(len(path))
        if len(bulk) == 2:
            first = dict(list(path.items())[:1])
            pipe(fs, first)
            raise OSError("the connection was reset")
        pipe(fs, path)

    groups = [_group(0, 3), _group(3, 3), _group(6, 1)]
    store = BatchStore(memory_url, resume=True)
    store.open()
    with mock.patch.object(MemoryFileSystem, "pipe", half_then_fails):
        store.write_files(groups[0])
        with pytest.raises(FriendliUsageError, match="connection was reset"):
            store.write_files(groups[1])
        store.write_files(groups[2])
    store.close(complete=False)
    assert bulk == [3, 3]  # the group of one is a single PUT
    fs, root = fsspec.core.url_to_fs(memory_url)
    lines = [orjson.loads(line) for line in fs.cat_file(f"{root}/{MANIFEST_NAME}").splitlines()]
    assert sorted(line["index"] for line in lines) == [0, 1, 2, 6]
    assert fs.exists(f"{root}/{groups[1][0][0]}")  # written, but without its line
    rerun = BatchStore(memory_url, resume=True)
    rerun.open()
    claimed = [rerun.claim(record["id"], 0)[0] for group in groups for _n, _i, record in group]
    rerun.close(complete=False)
    assert [record is not None for record in claimed] == [True] * 3 + [False] * 3 + [True]
