"""Batches into one out_dir as a state machine: random inputs, edits, kills and reruns.

Hypothesis drives a `RuleBasedStateMachine` over an input of requests. Rules edit the
input (insert, delete, reorder, change a parameter), run the batch to the end, cancel
it in process after some items, or SIGKILL a ``friendli-image batch`` subprocess. After
every step:

- every image in out_dir has the bytes the bundled server returns for its request
  (renders are deterministic per request, so the oracle is a direct call);
- the manifest (and ``unmatched.jsonl``) parse, every line a valid record;
- nothing outside out_dir changed;

and after a run to the end, each current item has exactly one ``ok`` manifest line whose
image is right, and the run sent exactly one request per item not stored before it.

The budget is fixed and derandomized for CI (``FRIENDLI_STATE_EXAMPLES`` raises it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar

import orjson
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule
from input_states import InputStates, digest, run_machine, small_server

from friendli_image import AsyncFriendli
from friendli_image._store import MANIFEST_NAME, UNMATCHED_NAME, valid_name
from friendli_image.server import LocalServer

EXAMPLES = int(os.environ.get("FRIENDLI_STATE_EXAMPLES", "100"))


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    yield from small_server(step_latency_ms=15)


class BatchStates(InputStates):
    """The input run by ``generate_batch`` and the ``batch`` command into one out_dir."""

    #: How often each kind of step ran (printed with the timing).
    steps: ClassVar[Counter[str]] = Counter()

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
        return {
            line["file"].rsplit(".", 1)[0]
            for line in lines
            if line["status"] == "ok" and (self.out / line["file"]).exists()
        }

    # -- running ----------------------------------------------------------------------------------

    async def _batch(self, stop_after: int | None) -> Any:
        async with AsyncFriendli(server_url=self.server.url) as client:
            batch = client.container.image.generate_batch(
                list(self.items), out_dir=self.out, concurrency=3
            )
            if stop_after is None:
                return await batch
            seen = 0
            async with batch:
                async for _item in batch:
                    seen += 1
                    if seen >= stop_after:
                        break  # leaving `async with` cancels the requests in flight
            return None

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
        for line in lines:
            request = self.items[line["index"]]
            assert line["status"] == "ok"
            assert line["id"] == digest(request)
            assert (self.out / line["file"]).read_bytes() == self.server_bytes(request)
        assert len({line["file"] for line in lines}) == len(lines)

    @rule(data=st.data())
    def cancel_in_process(self, data: st.DataObject) -> None:
        self.steps["cancel"] += 1
        asyncio.run(self._batch(data.draw(st.integers(0, len(self.items)))))

    @rule(wait=st.sampled_from([0.0, 0.05, 0.2]))
    def sigkill_a_subprocess(self, wait: float) -> None:
        self.source.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in self.items))
        command = [
            sys.executable, "-m", "friendli_image", "batch", str(self.source),
            "--out-dir", str(self.out), "--server-url", self.server.url,
            "--concurrency", "2", "--no-progress",
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
        path = self.out / name
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines()]

    @invariant()
    def manifests_parse(self) -> None:
        for name in (MANIFEST_NAME, UNMATCHED_NAME):
            for line in self._lines(name):
                assert isinstance(line["index"], int)
                assert line["index"] >= 0
                if line["status"] == "ok":
                    assert valid_name(line["file"]) == line["file"]

    @invariant()
    def every_image_is_the_servers_answer_to_its_request(self) -> None:
        if not self.out.exists():
            return
        by_prefix = {digest[:20]: request for digest, request in self.requests_by_digest.items()}
        for path in self.out.glob("*.jpg"):
            request = by_prefix[path.name[:20]]
            assert path.read_bytes() == self.server_bytes(request), path.name


def test_batches_killed_edited_and_rerun(server: LocalServer) -> None:
    BatchStates.server = server
    run_machine(BatchStates, EXAMPLES, steps=10)
