"""The stage writing shards (``output_format``): each call publishes shards of its own,
whole, and a row already in a published shard is never sent or written again, whichever
actor (stage instance) meets it."""

from __future__ import annotations

import asyncio
import pathlib
from collections import Counter

import pytest

from friendli_image import FriendliValidationError
from friendli_image.server import LocalServer

pa = pytest.importorskip("pyarrow")
fsspec = pytest.importorskip("fsspec")

from input_states import shard_samples  # noqa: E402

from friendli_image.ray import ImageStage, seed_for  # noqa: E402

from .test_stage import STEPS, _direct, _table  # noqa: E402


def _samples(url: str) -> dict[str, list[bytes]]:
    fs, root = fsspec.core.url_to_fs(url)
    samples: dict[str, list[bytes]] = {}
    for path in sorted(fs.ls(root, detail=False, refresh=True)):
        if not path.endswith((".tar", ".parquet")):
            continue
        for key, image in shard_samples(path, fs.cat_file(path)):
            samples.setdefault(key, []).append(image)
    return samples


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_each_call_publishes_its_own_shards_and_reruns_find_the_rows_in_them(
    server: LocalServer, output_format: str
) -> None:
    url = f"memory://stage-shards-{output_format}/out"
    stage = ImageStage(
        server.url, out_dir=url, request=STEPS, output_format=output_format, shard_size=8
    )
    first = stage.run(_table(20))
    assert first.column("status").to_pylist() == ["ok"] * 20
    shards = Counter(first.column("uri").to_pylist())
    assert sorted(shards.values()) == [4, 8, 8]
    samples = _samples(url)
    keys = first.column("key").to_pylist()
    assert sorted(samples) == sorted(keys)
    assert all(len(images) == 1 for images in samples.values())
    assert samples[keys[3]][0] == asyncio.run(_direct(server.url, "a lake no. 3", seed_for(3)))
    # Another actor (a retried block, a rerun): the rows in shards are not sent again.
    server.reset_stats()
    other = ImageStage(
        server.url, out_dir=url, request=STEPS, output_format=output_format, shard_size=8
    )
    again = other.run(_table(30))
    assert again.column("status").to_pylist() == ["resumed"] * 20 + ["ok"] * 10
    assert again.column("uri").to_pylist()[:20] == first.column("uri").to_pylist()
    assert server.stats.total_requests == 10
    samples = _samples(url)
    assert len(samples) == 30
    assert all(len(images) == 1 for images in samples.values())
    # Without the shards' hidden key lists, the keys are read from the shards themselves.
    fs, root = fsspec.core.url_to_fs(url)
    lists = [path for path in fs.ls(root, detail=False) if path.endswith(".keys")]
    assert len(lists) == 5
    for path in lists:
        fs.rm_file(path)
    server.reset_stats()
    third = ImageStage(
        server.url, out_dir=url, request=STEPS, output_format=output_format, shard_size=8
    )
    assert set(third.run(_table(30)).column("status").to_pylist()) == {"resumed"}
    assert server.stats.total_requests == 0


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_datasets_loads_the_stages_shards_as_they_are(
    server: LocalServer, tmp_path: pathlib.Path, output_format: str
) -> None:
    datasets = pytest.importorskip("datasets")
    stage = ImageStage(
        server.url, out_dir=str(tmp_path), request=STEPS, output_format=output_format, shard_size=4
    )
    out = stage.run(_table(10))
    loaded = datasets.load_dataset(str(tmp_path), split="train")
    assert len(loaded) == 10
    keys = loaded["__key__"] if output_format == "webdataset" else loaded["key"]
    assert sorted(keys) == sorted(out.column("key").to_pylist())


def test_a_shard_format_needs_an_out_dir_and_a_known_name(server: LocalServer) -> None:
    with pytest.raises(FriendliValidationError, match="pass out_dir"):
        ImageStage(server.url, output_format="parquet")
    with pytest.raises(FriendliValidationError, match="one of files, webdataset, parquet"):
        ImageStage(server.url, out_dir="memory://x", output_format="zip")
