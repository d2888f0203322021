"""Batches into one out_dir as a state machine: random inputs, edits, kills and reruns.

Hypothesis drives a `RuleBasedStateMachine` over an input of requests. Rules edit the
input (insert, delete, reorder, change a parameter), run the batch to the end, stop
it in process after some items (a ``break``, a cancelled task, or an anyio cancel scope,
which cancels the batch's cleanup too), or SIGKILL a ``friendli-image batch``
subprocess. After
every step:

- every image in out_dir has the bytes the bundled server returns for its request
  (renders are deterministic per request, so the oracle is a direct call);
- the manifest (and ``unmatched.jsonl``) parse, every line a valid record;
- nothing outside out_dir changed;

and after a run to the end, each current item has exactly one ``ok`` manifest line whose
image is right, and the run sent exactly one request per item not stored before it.

The same machine runs over ``webdataset`` and ``parquet`` locations with shards of three
items (`ShardStates`, `ParquetStates`, a smaller budget): there, after every step, every
published shard reads to its end and holds the server's answers, and no item is in two
shards; after a run to the end, each current item is in exactly one published shard.
`MemoryStates` runs it over an fsspec ``memory://`` location, where a kill is the run
dying at one of its PUTs (in process: a subprocess would have its own memory).

The budget is fixed and derandomized for CI (``FRIENDLI_STATE_EXAMPLES`` raises it).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar

import anyio
import fsspec
import orjson
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule
from input_states import (
    InputStates,
    Killed,
    dies_at_put,
    digest,
    run_machine,
    shard_samples,
    small_server,
)

from friendli_image import AsyncFriendli, _batch
from friendli_image._store import (
    MANIFEST_NAME,
    UNMATCHED_NAME,
    item_key,
    valid_stored_name,
)
from friendli_image.server import LocalServer

EXAMPLES = int(os.environ.get("FRIENDLI_STATE_EXAMPLES", "100"))
SHARD_EXAMPLES = max(1, EXAMPLES // 4)


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    yield from small_server(step_latency_ms=15)


class BatchStates(InputStates):
    """The input run by ``generate_batch`` and the ``batch`` command into one out_dir."""

    #: How often each kind of step ran (printed with the timing).
    steps: ClassVar[Counter[str]] = Counter()
    output_format: ClassVar[str] = "files"
    shard_size: ClassVar[int] = 1000

    @property
    def location(self) -> str:
        """Where the batches write (a local path here)."""
        return str(self.out)

    def _files(self) -> dict[str, int]:
        """Name -> size of every file in the location."""
        fs, root = fsspec.core.url_to_fs(self.location)
        if not fs.exists(root):
            return {}
        listed = fs.ls(root, detail=True, refresh=True)
        return {
            info["name"].rsplit("/", 1)[-1]: info["size"]
            for info in listed
            if info["type"] == "file"
        }

    def _read(self, name: str) -> bytes:
        fs, root = fsspec.core.url_to_fs(self.location)
        data: bytes = fs.cat_file(f"{root}/{name}")
        return data

    def _identities(self) -> list[str]:
        """The current items as their image names' stems: digest prefix and occurrence."""
        seen: Counter[str] = Counter()
        stems = []
        for key in map(digest, self.items):
            stems.append(f"{key[:20]}-{seen[key]}")
            seen[key] += 1
        return stems

    def _stored(self) -> set[str]:
        """The stems of the images recorded (manifest or unmatched.jsonl) and present.

        An image a kill left without its manifest line is not known to the store: it is
        made again (atomic writes make that safe), so it does not count as stored.
        """
        lines = [*self._lines(UNMATCHED_NAME), *self._lines(MANIFEST_NAME)]
        files = self._files()
        if self.output_format != "files":
            # A shard's lines precede it: they count once it is there, whole.
            return {
                item_key(line["id"], line["occurrence"])
                for line in lines
                if line["status"] == "ok" and files.get(line["file"]) == line["shard_bytes"]
            }
        return {
            line["file"].rsplit(".", 1)[0]
            for line in lines
            if line["status"] == "ok" and line["file"] in files
        }

    def _shard_images(self) -> dict[str, list[bytes]]:
        """Every image in the published shards, by key (a tar that does not read to its
        end fails here)."""
        images: dict[str, list[bytes]] = {}
        for name in sorted(self._files()):
            if name.startswith("train-"):
                for key, image in shard_samples(name, self._read(name)):
                    images.setdefault(key, []).append(image)
        return images

    # -- running ----------------------------------------------------------------------------------

    async def _batch(self, stop_after: int | None, stop: str = "break") -> Any:
        async with AsyncFriendli(server_url=self.server.url) as client:
            batch = client.container.image.generate_batch(
                list(self.items),
                out_dir=self.location,
                concurrency=3,
                output_format=self.output_format,
                shard_size=self.shard_size,
            )
            if stop_after is None:
                return await batch
            with anyio.CancelScope() as scope:
                await self._stopped(batch, stop_after, stop, scope)
            return None

    @staticmethod
    async def _stopped(batch: Any, stop_after: int, stop: str, scope: anyio.CancelScope) -> None:
        """Iterate the batch until ``stop_after`` items, then stop it: leave the loop
        (``break``: leaving `async with` cancels the requests in flight), cancel the task
        iterating it once (``cancel``), or cancel every await from then on, the batch's
        cleanup included (``scope``, as anyio does)."""
        seen = 0
        if stop == "cancel":

            async def iterate() -> None:
                nonlocal seen
                async with batch:
                    async for _item in batch:
                        seen += 1
                        if seen >= stop_after:
                            task.cancel()
                            await asyncio.sleep(0)

            task = asyncio.ensure_future(iterate())
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
        async with batch:
            async for _item in batch:
                seen += 1
                if seen >= stop_after:
                    if stop == "scope":
                        scope.cancel()
                    break

    @rule()
    def run_to_the_end(self) -> None:
        self.steps["run"] += 1
        stored_before = self._stored()
        self.server.reset_stats()
        result = asyncio.run(self._batch(None))
        sent = self.server.stats.total_requests
        assert sent == sum(1 for stem in self._identities() if stem not in stored_before)
        assert result.ok
        lines = self._lines(MANIFEST_NAME)
        assert sorted(line["index"] for line in lines) == list(range(len(self.items)))
        shards = self._shard_images() if self.output_format != "files" else {}
        for line in lines:
            request = self.items[line["index"]]
            assert line["status"] == "ok"
            assert line["id"] == digest(request)
            if self.output_format == "files":
                assert self._read(line["file"]) == self.server_bytes(request)
            else:  # each current item in exactly one published shard
                key = item_key(line["id"], line["occurrence"])
                assert shards[key] == [self.server_bytes(request)], key
        keys = {(line["id"], line["occurrence"]) for line in lines}
        assert len(keys) == len(lines)
        # What the user iterated: one item per input position, the request as given,
        # resumed exactly when its image was stored before (whatever order the claims
        # took: a rerun sends its new requests first), and its image the server's.
        assert sorted(item.index for item in result.items) == list(range(len(self.items)))
        stems = self._identities()
        for item in result.items:
            request = self.items[item.index]
            assert item.request == request
            assert (item.id, item.key) == (digest(request), stems[item.index])
            assert item.status == ("resumed" if item.key in stored_before else "ok")
            if self.output_format == "files":
                assert self._read(item.uri.rsplit("/", 1)[-1]) == self.server_bytes(request)

    @rule(data=st.data(), stop=st.sampled_from(["break", "cancel", "scope"]))
    def cancel_in_process(self, data: st.DataObject, stop: str) -> None:
        self.steps[f"stop ({stop})"] += 1
        asyncio.run(self._batch(data.draw(st.integers(0, len(self.items))), stop))

    @rule(wait=st.sampled_from([0.0, 0.05, 0.2]))
    def sigkill_a_subprocess(self, wait: float) -> None:
        self.source.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in self.items))
        command = [
            sys.executable, "-m", "friendli_image", "batch", str(self.source),
            "--out-dir", str(self.out), "--server-url", self.server.url,
            "--concurrency", "2", "--no-progress", "--output-format", self.output_format,
            "--shard-size", str(self.shard_size),
        ]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        manifest = self.out / MANIFEST_NAME
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            if manifest.exists() and manifest.stat().st_size > 0:
                time.sleep(wait)
                break
            time.sleep(0.01)
        self.steps["sigkill" if process.poll() is None else "finished before the kill"] += 1
        process.send_signal(signal.SIGKILL)
        process.wait(30)

    # -- after every step -----------------------------------------------------------------

    def _lines(self, name: str) -> list[dict[str, Any]]:
        if name not in self._files():
            return []
        return [orjson.loads(line) for line in self._read(name).splitlines()]

    @invariant()
    def manifests_parse(self) -> None:
        for name in (MANIFEST_NAME, UNMATCHED_NAME):
            for line in self._lines(name):
                assert isinstance(line["index"], int)
                assert line["index"] >= 0
                if line["status"] == "ok":
                    assert valid_stored_name(line["file"]) == line["file"]

    @invariant()
    def every_image_is_the_servers_answer_to_its_request(self) -> None:
        by_prefix = {digest[:20]: request for digest, request in self.requests_by_digest.items()}
        for name in self._files():
            if name.endswith(".jpg"):
                assert self._read(name) == self.server_bytes(by_prefix[name[:20]]), name
        for key, images in self._shard_images().items():
            assert len(images) == 1, f"{key} is in {len(images)} shards"
            assert images[0] == self.server_bytes(by_prefix[key[:20]]), key


class ShardStates(BatchStates):
    """The same machine over a ``webdataset`` location with shards of three items."""

    steps: ClassVar[Counter[str]] = Counter()
    output_format = "webdataset"
    shard_size = 3

    @rule(data=st.data())
    def lose_a_shard(self, data: st.DataObject) -> None:
        """The state a kill between a shard's manifest lines and its publication leaves
        (lines naming an absent shard), made directly: that window is too short for a
        SIGKILL to hit often."""
        shards = sorted(name for name in self._files() if name.startswith("train-"))
        if shards:
            self.steps["lose a shard"] += 1
            fs, root = fsspec.core.url_to_fs(self.location)
            fs.rm_file(f"{root}/{data.draw(st.sampled_from(shards))}")


class ParquetStates(ShardStates):
    """The same machine over a ``parquet`` location with shards of three items."""

    steps: ClassVar[Counter[str]] = Counter()
    output_format = "parquet"


class MemoryStates(ShardStates):
    """The shard machine over a ``memory://`` location (an object store's semantics: one
    PUT per shard, the manifest written when the run ends)."""

    steps: ClassVar[Counter[str]] = Counter()
    output_format = "parquet"

    @property
    def location(self) -> str:
        return f"memory://friendli-states/{self.root.name}"

    def _stored(self) -> set[str]:
        """The items in published shards: a killed run wrote no manifest, and the rerun
        finds its shards' items from the shards themselves."""
        return set(self._shard_images())

    def teardown(self) -> None:
        fs = fsspec.filesystem("memory")
        if fs.exists(self.location):
            fs.rm(self.location, recursive=True)
        super().teardown()

    @rule(puts=st.integers(0, 4))
    def sigkill_a_subprocess(self, puts: int) -> None:
        """Here: the run dies at its ``puts + 1``-th PUT (nothing is written after)."""
        with dies_at_put(puts), contextlib.suppress(Killed):
            asyncio.run(self._batch(None))
            self.steps["finished before the kill"] += 1
            return
        self.steps["killed at a PUT"] += 1


def _small_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims in groups of two, and a resume's deferred claims on disk past 200 bytes: the
    machine's short inputs then cross group boundaries and the spill to disk, where
    a stop or a kill may fall between two groups."""
    monkeypatch.setattr(_batch, "_CLAIM_GROUP", 2)
    monkeypatch.setattr(_batch, "_DEFERRED_IN_MEMORY", 200)


@pytest.mark.long
@pytest.mark.scenario(50)
def test_batches_killed_edited_and_rerun(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _small_groups(monkeypatch)
    BatchStates.server = server
    run_machine(BatchStates, EXAMPLES, steps=10)


_NEEDS_PYARROW = pytest.mark.skipif(
    importlib.util.find_spec("pyarrow") is None,
    reason="parquet shards need pyarrow: pip install 'friendli-image[datasets]'",
)


@pytest.mark.long
@pytest.mark.parametrize(
    "machine",
    [
        ShardStates,
        pytest.param(ParquetStates, marks=_NEEDS_PYARROW),
        pytest.param(MemoryStates, marks=_NEEDS_PYARROW),
    ],
)
@pytest.mark.scenario(50)
def test_shard_batches_killed_edited_and_rerun(
    server: LocalServer, machine: type[BatchStates], monkeypatch: pytest.MonkeyPatch
) -> None:
    _small_groups(monkeypatch)
    machine.server = server
    run_machine(machine, SHARD_EXAMPLES, steps=10)
