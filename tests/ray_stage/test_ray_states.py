"""The Ray stage over one out_dir as a state machine: random inputs, edits, stops, reruns.

Hypothesis drives a `RuleBasedStateMachine` over an INPUT file, as ``batch --ray`` runs
it on the session's local cluster: Ray tasks read the file (`_dataset`: each request,
its index, its occurrence among identical requests) and `generate_images` writes the
images. Rules edit the input (insert, delete, reorder, change a parameter), run it to
the end (a rerun is the same rule), or stop it after some rows, which kills the actors
with their requests in flight. After every step:

- every image in out_dir has the bytes the bundled server returns for its request;
- the parquet manifest parses, and each of its ``ok``/``resumed`` rows names an image;
- nothing outside out_dir changed;
- (`RayShardStates`, WebDataset shards) every published shard reads to its end, and no
  item is in two shards;

and after a run to the end, each current item has exactly one image, named for its
occurrence and request, and the run sent exactly one request per item not stored
before it.

The budget is small, fixed and derandomized (``FRIENDLI_RAY_STATE_EXAMPLES`` raises it).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

pytest.importorskip("pyarrow", reason="the stage needs pyarrow: pip install 'friendli-image[ray]'")
pytest.importorskip("ray", reason="Ray is not installed: pip install 'friendli-image[ray]'")

import pyarrow.parquet as pq
from input_states import InputStates, digest, run_machine, shard_samples, small_server

from friendli_image._cli._batch import _Input
from friendli_image._cli._ray import _dataset
from friendli_image._store import row_image_name, row_key
from friendli_image.ray import generate_images
from friendli_image.server import LocalServer

EXAMPLES = int(os.environ.get("FRIENDLI_RAY_STATE_EXAMPLES", "8"))

# Ray Data warns about its own deprecated settings when it reads its context.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    yield from small_server(step_latency_ms=20)


class RayStates(InputStates):
    """The input run by the Ray stage as ``batch --ray`` runs it, into one out_dir."""

    ray: Any
    #: How often each kind of step ran (printed with the timing).
    steps: ClassVar[Counter[str]] = Counter()
    output_format: ClassVar[str] = "files"

    def _names(self) -> list[str]:
        """The current items' image names: occurrence and request digest."""
        seen: Counter[str] = Counter()
        names = []
        for request in self.items:
            key = digest(request)
            names.append(row_image_name(seen[key], key, None))
            seen[key] += 1
        return names

    # -- running -------------------------------------------------------------------------

    def _output(self) -> Any:
        self.source.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in self.items))
        rows, keys, _total = _dataset(self.ray, str(self.source), True, _Input, actors=1, n=1)
        return generate_images(
            rows,
            self.server.url,
            out_dir=str(self.out),
            id_column="_item",
            columns={key: key for key in keys},
            num_actors=1,  # a few lines are one block: one actor gets them all
            per_endpoint_limit=4,
            batch_size=4,
            output_format=self.output_format,
            shard_size=2,
        )

    @rule()
    def run_to_the_end(self) -> None:
        self.steps["run"] += 1
        stored_before = {p.name for p in self.out.glob("*.jpg")} if self.out.exists() else set()
        self.server.reset_stats()
        self._output().write_parquet(str(self.out / "manifest"), mode="overwrite")
        names = self._names()
        assert self.server.stats.total_requests == sum(n not in stored_before for n in names)
        rows = pq.read_table(self.out / "manifest").to_pylist()
        assert sorted(row["_line"] for row in rows) == list(range(len(self.items)))
        for row in rows:
            assert row["status"] in ("ok", "resumed"), row
            request = self.items[row["_line"]]
            assert row["uri"].rsplit("/", 1)[-1] == names[row["_line"]]
            assert (self.out / names[row["_line"]]).read_bytes() == self.server_bytes(request)

    @rule(data=st.data())
    def stop_mid_run(self, data: st.DataObject) -> None:
        """Stop after some rows: Ray kills the actors with their requests in flight."""
        self.steps["stop"] += 1
        stop_after = data.draw(st.integers(0, len(self.items)))
        rows = iter(self._output().iter_rows())  # a generator: closing it stops the job
        try:
            for seen, _row in enumerate(rows, start=1):
                if seen >= stop_after:
                    break
        finally:
            rows.close()  # type: ignore[attr-defined]

    # -- after every step ----------------------------------------------------------------

    @invariant()
    def the_manifest_parses(self) -> None:
        manifest = self.out / "manifest"
        if manifest.exists():
            for row in pq.read_table(manifest).to_pylist():
                if row["status"] in ("ok", "resumed"):
                    assert Path(row["uri"]).name in {p.name for p in self.out.iterdir()}

    @invariant()
    def every_image_is_the_servers_answer_to_its_request(self) -> None:
        if not self.out.exists():
            return
        by_prefix = {digest[:16]: request for digest, request in self.requests_by_digest.items()}
        for path in self.out.glob("*.jpg"):
            request = by_prefix[path.stem.rsplit("-", 1)[1]]
            assert path.read_bytes() == self.server_bytes(request), path.name


class RayShardStates(RayStates):
    """The same runs writing WebDataset shards of two: a stop loses at most the open
    shard, a published shard reads to its end, and an item is in one shard only."""

    output_format: ClassVar[str] = "webdataset"

    def _samples(self) -> dict[str, list[bytes]]:
        """Every sample of every published shard, by key (a shard that does not read
        to its end fails here)."""
        samples: dict[str, list[bytes]] = {}
        if self.out.exists():
            for path in sorted(self.out.glob("*.tar")):
                for key, image in shard_samples(path.name, path.read_bytes()):
                    samples.setdefault(key, []).append(image)
        return samples

    def _keys(self) -> list[str]:
        seen: Counter[str] = Counter()
        keys = []
        for request in self.items:
            key = digest(request)
            keys.append(row_key(seen[key], key))
            seen[key] += 1
        return keys

    @rule()
    def run_to_the_end(self) -> None:
        self.steps["run"] += 1
        stored_before = set(self._samples())
        self.server.reset_stats()
        self._output().write_parquet(str(self.out / "manifest"), mode="overwrite")
        keys = self._keys()
        assert self.server.stats.total_requests == sum(k not in stored_before for k in keys)
        samples = self._samples()
        rows = pq.read_table(self.out / "manifest").to_pylist()
        assert sorted(row["_line"] for row in rows) == list(range(len(self.items)))
        for row in rows:
            assert row["status"] in ("ok", "resumed"), row
            assert row["key"] == keys[row["_line"]]
            assert (self.out / row["uri"].rsplit("/", 1)[-1]).is_file()
            assert samples[row["key"]] == [self.server_bytes(self.items[row["_line"]])]

    @invariant()
    def every_image_is_the_servers_answer_to_its_request(self) -> None:
        by_prefix = {digest[:16]: request for digest, request in self.requests_by_digest.items()}
        for key, images in self._samples().items():
            assert len(images) == 1, f"{key} is in {len(images)} shards"
            assert images[0] == self.server_bytes(by_prefix[key.rsplit("-", 1)[1]]), key


@pytest.mark.scenario(57)
def test_ray_batches_stopped_edited_and_rerun(ray_local: Any, server: LocalServer) -> None:
    RayStates.server = server
    RayStates.ray = ray_local
    run_machine(RayStates, EXAMPLES, steps=6)


@pytest.mark.scenario(57)
def test_ray_shard_batches_stopped_edited_and_rerun(ray_local: Any, server: LocalServer) -> None:
    RayShardStates.server = server
    RayShardStates.ray = ray_local
    run_machine(RayShardStates, max(2, EXAMPLES // 2), steps=6)
