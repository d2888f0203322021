"""What the batch state machines share: an input of requests, its edits, the oracle.

`InputStates` holds one root folder (``out/``, ``outside.txt``, ``input.jsonl``), the
current items, and the bundled server's answer for every request seen (renders are
deterministic per request, so the oracle is a direct call). Its rules edit the input:
insert, delete, reorder, change a parameter. The machines over ``generate_batch``
(tests/test_store_states.py) and over the Ray stage (tests/ray_stage/test_ray_states.py)
add how they run and what they check.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from friendli_image import AsyncFriendli
from friendli_image._requests import GenerateRequest
from friendli_image._resources import GENERATIONS_PATH
from friendli_image._store import Location, request_digest
from friendli_image.server import LocalServer, ServerConfig

PROMPTS = st.sampled_from(["a fox", "an owl", "a heron", "a lake", "a pier", "dunes"])
REQUESTS = st.fixed_dictionaries(
    {"prompt": PROMPTS, "seed": st.integers(0, 3), "num_inference_steps": st.integers(1, 2)}
)


def small_server(step_latency_ms: float) -> Iterator[LocalServer]:
    """Small deterministic renders, slow enough per step that a kill lands mid-run."""
    config = ServerConfig(image_size=16, step_latency_ms=step_latency_ms, max_concurrency=8)
    with LocalServer(config) as local:
        yield local


class Killed(BaseException):
    """The process dying: nothing after it is written."""


@contextlib.contextmanager
def dies_at_put(puts: int) -> Iterator[None]:
    """Within: the run dies (`Killed`) at its ``puts + 1``-th write to a location, and
    every write after that dies too, as a killed process writes nothing more."""
    write = Location.write
    done = 0

    def dies(location: Location, name: str, data: bytes) -> None:
        nonlocal done
        if done >= puts:
            raise Killed
        done += 1
        write(location, name, data)

    with mock.patch.object(Location, "write", dies):
        yield


def shard_samples(name: str, data: bytes) -> list[tuple[str, bytes]]:
    """(key, image) of every sample of a tar or Parquet shard; a shard that does not
    read to its end fails here."""
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(io.BytesIO(data)).to_pylist()
        return [(row["key"], row["image"]["bytes"]) for row in rows]
    samples = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            if extension == "jpg":
                handle = tar.extractfile(member)
                assert handle is not None
                samples.append((key, handle.read()))
    return samples


def digest(request: dict[str, Any]) -> str:
    """The request's identity, as the store computes it."""
    return request_digest(GENERATIONS_PATH, GenerateRequest(**request))


class InputStates(RuleBasedStateMachine):
    """One out_dir, one input, and the server's answer for every request seen."""

    server: LocalServer
    #: How often each kind of step ran (printed with the timing; set per subclass).
    steps: ClassVar[Counter[str]]

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="friendli-states-"))
        self.out = self.root / "out"
        self.outside = self.root / "outside.txt"
        self.outside.write_text("precious\n")
        self.source = self.root / "input.jsonl"
        self.items: list[dict[str, Any]] = []
        self.requests_by_digest: dict[str, dict[str, Any]] = {}
        self.expected: dict[str, bytes] = {}

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def server_bytes(self, request: dict[str, Any]) -> bytes:
        """What the server returns for the request (asked once)."""
        key = digest(request)
        if key not in self.expected:

            async def direct() -> bytes:
                async with AsyncFriendli(server_url=self.server.url) as client:
                    return (await client.container.image.generate(**request)).data

            self.expected[key] = asyncio.run(direct())
        return self.expected[key]

    # -- editing the input ------------------------------------------------------------

    @initialize(items=st.lists(REQUESTS, min_size=1, max_size=8))
    def start(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        for request in items:
            self.requests_by_digest[digest(request)] = request

    @rule(data=st.data(), request=REQUESTS)
    def insert(self, data: st.DataObject, request: dict[str, Any]) -> None:
        at = data.draw(st.integers(0, len(self.items)))
        self.items.insert(at, request)
        self.requests_by_digest[digest(request)] = request

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        if len(self.items) > 1:
            del self.items[data.draw(st.integers(0, len(self.items) - 1))]

    @rule(data=st.data())
    def reorder(self, data: st.DataObject) -> None:
        self.items = data.draw(st.permutations(self.items))

    @rule(data=st.data(), steps=st.integers(1, 3))
    def change_steps(self, data: st.DataObject, steps: int) -> None:
        at = data.draw(st.integers(0, len(self.items) - 1))
        self.items[at] = {**self.items[at], "num_inference_steps": steps}
        self.requests_by_digest[digest(self.items[at])] = self.items[at]

    @invariant()
    def nothing_outside_changed(self) -> None:
        assert self.outside.read_text() == "precious\n"
        assert {p.name for p in self.root.iterdir()} <= {"out", "outside.txt", "input.jsonl"}


def run_machine(machine: type[InputStates], examples: int, steps: int) -> None:
    """Run the machine with a fixed, derandomized budget and print how long it took."""
    started = time.monotonic()
    run = machine.TestCase
    run.settings = settings(
        max_examples=examples,
        stateful_step_count=steps,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    run("runTest").runTest()
    elapsed = time.monotonic() - started
    print(f"{machine.__name__}: {examples} examples in {elapsed:.1f} s, {dict(machine.steps)}")
