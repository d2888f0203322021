"""generate_batch / edit_batch: ordering, laziness, limits, AIMD, aborts, sink and resume."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from friendli_image import (
    AsyncFriendli,
    BatchItem,
    BatchProgress,
    BatchResult,
    FriendliAuthenticationError,
    FriendliBatchAborted,
    FriendliConnectionError,
    FriendliServerError,
    FriendliValidationError,
    RetryConfig,
)
from friendli_image._batch import Gate
from friendli_image._store import MANIFEST_NAME
from friendli_image.server import Action, FaultRates, LocalServer, ServerConfig

MakeServer = Callable[..., Awaitable[LocalServer]]
#: A request the server answers this late is one a test expects to be cancelled.
SLOW_S = 30.0


@pytest.fixture
async def make_server(tiny_jpeg: bytes) -> AsyncIterator[MakeServer]:
    """Factory for bundled servers on this loop, in fast mode (a static JPEG) by default."""
    servers: list[LocalServer] = []

    async def start(**settings: Any) -> LocalServer:
        settings.setdefault("static_image", tiny_jpeg)
        settings.setdefault("max_concurrency", 64)
        server = await LocalServer(ServerConfig(**settings)).astart()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.aclose()


@pytest.fixture
async def server(make_server: MakeServer) -> LocalServer:
    """A fast-mode bundled server."""
    return await make_server()


@pytest.fixture
async def client(server: LocalServer) -> AsyncIterator[AsyncFriendli]:
    """A client of ``server`` with millisecond retries."""
    fast = RetryConfig(max_attempts=3, initial_delay=0.001, max_delay=0.002, jitter=0.0)
    async with AsyncFriendli(server_url=server.url, retries=fast) as friendli:
        yield friendli


def _prompts_by_request_id(server: LocalServer) -> dict[str, list[str]]:
    """Prompts of the requests the server answered 200, by X-Request-ID."""
    answered: dict[str, list[str]] = {}
    for record in server.records:
        if record.status == 200 and isinstance(record.body, dict):
            request_id = record.headers.get("X-Request-ID", "")
            answered.setdefault(request_id, []).append(record.body["prompt"])
    return answered


def _batch_tasks() -> list[asyncio.Task[Any]]:
    """The batch's per-item tasks still alive on this loop (the server's are not counted)."""
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "Batch._process"
    ]


def _assert_each_matches_its_input(items: list[BatchItem], server: LocalServer) -> None:
    answered = _prompts_by_request_id(server)
    for item in items:
        assert item.request_id is not None
        assert item.request["prompt"] in answered[item.request_id], item


# -- results ----------------------------------------------------------------------------


async def test_collect_returns_every_item_in_input_order(
    client: AsyncFriendli, server: LocalServer
) -> None:
    """Awaiting a batch returns one ok item per request, in input order, each its own."""
    requests = [{"prompt": f"a lighthouse #{i}", "seed": i} for i in range(40)]
    result = await client.container.image.generate_batch(requests, concurrency=8)
    assert result.ok
    assert [item.index for item in result] == list(range(40))
    assert all(item.result is not None and item.result.format == "jpeg" for item in result)
    assert [item.request for item in result] == requests
    _assert_each_matches_its_input(result.items, server)


async def test_async_for_yields_as_items_finish(client: AsyncFriendli, server: LocalServer) -> None:
    """Iterating yields an item as soon as it finishes: a slow first item comes last."""
    # 2 s: ten fast items took over 0.5 s on a loaded 2-core machine.
    server.script("slow", [Action.delay(2.0)])
    requests: list[Any] = [{"prompt": "slow", "http_headers": {"x-test-id": "slow"}}]
    requests += [f"fast {i}" for i in range(10)]
    order = [item.index async for item in client.container.image.generate_batch(requests)]
    assert order[-1] == 0
    assert sorted(order) == list(range(11))


async def test_ordered_iteration_follows_input_order(
    make_server: MakeServer,
) -> None:
    """With ordered=True items come in input order despite random server delays."""
    server = await make_server(faults=FaultRates(delay_ms=(0, 30), seed=3))
    async with AsyncFriendli(server_url=server.url) as friendli:
        batch = friendli.container.image.generate_batch(
            (f"p{i}" for i in range(60)), concurrency=8, ordered=True, reorder_window=16
        )
        order = [item.index async for item in batch]
    assert order == list(range(60))


async def test_prompts_and_models_and_async_iterables_are_accepted(
    client: AsyncFriendli,
) -> None:
    """Requests may be prompt strings, mappings or models, from an async iterable."""
    from friendli_image._requests import GenerateRequest

    async def source() -> AsyncIterator[Any]:
        yield "plain prompt"
        yield {"prompt": "mapping", "num_inference_steps": 5}
        yield GenerateRequest(prompt="model", seed=1)

    result = await client.container.image.generate_batch(source())
    assert result.ok
    assert [item.request["prompt"] for item in result] == ["plain prompt", "mapping", "model"]


async def test_equal_requests_have_equal_ids(client: AsyncFriendli) -> None:
    """The item id is a content hash: equal requests share it, different ones do not."""
    result = await client.container.image.generate_batch(
        [{"prompt": "x", "seed": 1}, {"seed": 1, "prompt": "x"}, {"prompt": "x", "seed": 2}]
    )
    ids = [item.id for item in result]
    assert ids[0] == ids[1] != ids[2]
    assert len(ids[0]) == 64


async def test_edit_batch_sends_edits(
    client: AsyncFriendli, server: LocalServer, tiny_png: bytes
) -> None:
    """edit_batch posts each request to the edits route."""
    result = await client.container.image.edit_batch(
        [{"image": tiny_png, "prompt": f"add a hat #{i}"} for i in range(3)]
    )
    assert result.ok
    assert server.stats.requests_by_path == {"/v1/images/edits": 3}


# -- laziness and limits ----------------------------------------------------------------


async def test_input_is_read_lazily(make_server: MakeServer) -> None:
    """A generator is consumed at most `concurrency` items ahead of what was yielded."""
    server = await make_server(faults=FaultRates(delay_ms=(5, 15), seed=1))
    consumed = 0

    def requests() -> Iterator[str]:
        nonlocal consumed
        for i in range(1_000_000):
            consumed += 1
            yield f"prompt {i}"

    leads = []
    async with AsyncFriendli(server_url=server.url) as friendli:
        batch = friendli.container.image.generate_batch(requests(), concurrency=4)
        seen = 0
        async with batch:
            async for _item in batch:
                seen += 1
                leads.append(consumed - seen)
                if seen == 50:
                    break
    assert consumed <= 50 + 4 + 1
    assert max(leads) <= 4 + 1


async def test_in_flight_never_exceeds_concurrency(make_server: MakeServer) -> None:
    """The server never sees more than `concurrency` requests at once, and does see that many."""
    server = await make_server(faults=FaultRates(delay_ms=(20, 40), seed=2))
    async with AsyncFriendli(server_url=server.url) as friendli:
        result = await friendli.container.image.generate_batch(
            [f"p{i}" for i in range(80)], concurrency=8
        )
    assert result.ok
    assert 6 <= server.stats.max_in_flight <= 8


async def test_rps_ceiling_spaces_requests(client: AsyncFriendli, server: LocalServer) -> None:
    """With rps=50, 20 requests take at least about 0.38 s."""
    started = time.monotonic()
    result = await client.container.image.generate_batch(
        [f"p{i}" for i in range(20)], concurrency=8, rps=50
    )
    assert result.ok
    assert time.monotonic() - started >= 0.3
    arrivals = sorted(record.received_at for record in server.records)
    assert arrivals[-1] - arrivals[0] >= 0.3


def test_gate_cuts_once_per_round_and_grows_back() -> None:
    """AIMD: the first 429 of a round cuts the limit by 30 %, later ones of that round do
    not; each success adds 1/limit, up to the ceiling."""

    async def scenario() -> list[int]:
        gate = Gate(16, None)
        limits = []
        epochs = [await gate.acquire() for _ in range(16)]
        gate.release(epochs[0], "rate_limited")
        limits.append(gate.limit)
        gate.release(epochs[1], "rate_limited")  # same round: no second cut
        limits.append(gate.limit)
        for epoch in epochs[2:]:
            gate.release(epoch, "other")
        for _ in range(200):
            gate.release(await gate.acquire(), "ok")
        limits.append(gate.limit)
        return limits

    assert asyncio.run(scenario()) == [11, 11, 16]


async def test_rate_limits_lower_the_in_flight_limit_then_it_recovers(
    make_server: MakeServer,
) -> None:
    """429s cut the limit (the server then sees fewer requests at once), the items are
    retried after Retry-After and succeed, and the limit climbs back."""
    server = await make_server(faults=FaultRates(delay_ms=(10, 20), seed=5))
    rate_limited = Action.status(429, headers={"Retry-After": "0.01"})
    server.script("t", ([rate_limited] + [Action.ok()] * 12) * 4)
    limits: list[int] = []
    async with AsyncFriendli(server_url=server.url) as friendli:
        batch = friendli.container.image.generate_batch(
            [f"p{i}" for i in range(150)],
            concurrency=8,
            http_headers={"x-test-id": "t"},
        )
        items = []
        async for item in batch:
            items.append(item)
            limits.append(batch.progress().limit)
    assert all(item.ok for item in items)
    assert min(limits) < 8
    assert limits[-1] == 8
    assert sum(item.attempts for item in items) == 150 + 4
    assert server.stats.responses_by_status[429] == 4


async def test_rate_limit_without_retry_is_reported(
    client: AsyncFriendli, server: LocalServer
) -> None:
    """With retries disabled a 429 is the item's error, not a retry."""
    server.script(None, [Action.status(429, headers={"Retry-After": "0"})])
    result = await client.container.image.generate_batch(["a"], retries=0)
    assert result[0].status == "failed"
    assert result[0].error is not None
    assert "429" in str(result[0].error)


# -- errors -----------------------------------------------------------------------------


async def test_item_errors_are_captured_and_the_batch_goes_on(
    client: AsyncFriendli, server: LocalServer
) -> None:
    """A bad argument, a 500 and a dropped connection fail their items only."""
    server.script("boom", [Action.status(500)])
    server.script("drop", [Action.drop_after_read()])
    requests = [
        # First, so that it goes out on a new connection: a drop on a reused one is
        # taken for the keep-alive race and resent once.
        {"prompt": "drop", "http_headers": {"x-test-id": "drop"}},
        {"prompt": "bad steps", "num_inference_steps": 0},
        {"prompt": "boom", "http_headers": {"x-test-id": "boom"}},
        {"prompt": "fine"},
        {"prompt": "unknown", "colour": "red"},
        {"prompt": "odd type", "control_images": ["https://x/a.png"], "controlnet_weights": 5},
        {"prompt": "fine too"},
    ]
    result = await client.container.image.generate_batch(requests, concurrency=2)
    statuses = [item.status for item in result]
    assert statuses == ["failed", "failed", "failed", "ok", "failed", "failed", "ok"]
    assert result.aborted is None
    assert isinstance(result[0].error, FriendliConnectionError)
    assert result[0].maybe_processed
    assert isinstance(result[1].error, FriendliValidationError)
    assert result[1].error.field == "num_inference_steps"
    assert result[1].attempts == 0
    assert isinstance(result[2].error, FriendliServerError)
    assert isinstance(result[4].error, FriendliValidationError)
    assert result[4].error.field == "colour"
    assert isinstance(result[5].error, FriendliValidationError)
    assert len(result.failed) == 5
    assert isinstance(
        (await client.container.image.generate_batch([42]))[0].error, FriendliValidationError
    )


async def test_unauthorized_stops_the_batch_within_a_round_trip(
    make_server: MakeServer,
) -> None:
    """A 401 stops new dispatches: the server sees one round of requests, the rest are
    reported skipped with FriendliBatchAborted."""
    server = await make_server(token="right", faults=FaultRates(delay_ms=(10, 20)))
    async with AsyncFriendli(server_url=server.url, token="wrong") as friendli:
        result = await friendli.container.image.generate_batch(
            [f"p{i}" for i in range(100)], concurrency=4
        )
    assert len(result) == 100
    failed, skipped = result.failed, result.skipped
    assert 1 <= len(failed) <= 4
    assert all(isinstance(item.error, FriendliAuthenticationError) for item in failed)
    assert len(skipped) == 100 - len(failed)
    assert all(isinstance(item.error, FriendliBatchAborted) for item in skipped)
    assert isinstance(result.aborted, FriendliBatchAborted)
    assert isinstance(result.aborted.cause, FriendliAuthenticationError)
    assert "401" in str(skipped[-1].error)
    assert server.stats.total_requests <= 4


async def test_unreachable_server_stops_the_batch(unused_tcp_port: int) -> None:
    """Connection refused after the retries aborts the batch instead of failing each item
    through its own retries."""
    fast = RetryConfig(max_attempts=2, initial_delay=0.001, max_delay=0.002, jitter=0.0)
    async with AsyncFriendli(server_url=f"http://127.0.0.1:{unused_tcp_port}") as friendli:
        result = await friendli.container.image.generate_batch(
            [f"p{i}" for i in range(50)], concurrency=2, retries=fast
        )
    assert len(result.failed) <= 2
    assert len(result.skipped) >= 48
    assert result.aborted is not None
    assert isinstance(result.aborted.cause, FriendliConnectionError)


async def test_stop_on_fatal_false_attempts_every_item(make_server: MakeServer) -> None:
    """With stop_on_fatal=False every item is attempted and fails on its own."""
    server = await make_server(token="right")
    async with AsyncFriendli(server_url=server.url, token="wrong") as friendli:
        result = await friendli.container.image.generate_batch(
            [f"p{i}" for i in range(10)], stop_on_fatal=False
        )
    assert [item.status for item in result] == ["failed"] * 10
    assert server.stats.total_requests == 10


async def test_bad_batch_arguments_raise_before_anything_is_sent(
    client: AsyncFriendli,
) -> None:
    """Invalid batch arguments raise FriendliValidationError at once."""
    image = client.container.image
    with pytest.raises(FriendliValidationError, match="concurrency"):
        image.generate_batch(["a"], concurrency=0)
    with pytest.raises(FriendliValidationError, match="rps"):
        image.generate_batch(["a"], rps=float("nan"))
    with pytest.raises(FriendliValidationError, match="requests"):
        image.generate_batch("a single prompt")  # type: ignore[arg-type]
    with pytest.raises(FriendliValidationError, match="retries"):
        image.generate_batch(["a"], retries=-1)


async def test_a_batch_runs_once(client: AsyncFriendli) -> None:
    """Iterating a batch a second time raises FriendliUsageError."""
    from friendli_image import FriendliUsageError

    batch = client.container.image.generate_batch(["a"])
    await batch
    with pytest.raises(FriendliUsageError, match="runs once"):
        await batch


async def test_leaving_early_cancels_the_requests_in_flight(
    client: AsyncFriendli, server: LocalServer
) -> None:
    """Breaking out inside `async with batch` cancels the slow requests still in flight."""
    server.script("slow", [Action.delay(SLOW_S)] * 4)
    requests: list[Any] = ["fast"]
    requests += [{"prompt": "slow", "http_headers": {"x-test-id": "slow"}}] * 4
    started = time.monotonic()
    batch = client.container.image.generate_batch(requests, concurrency=5)
    async with batch:
        async for item in batch:
            assert item.index == 0
            break
    assert time.monotonic() - started < SLOW_S / 2  # not waited for
    assert batch.progress().in_flight == 0
    assert _batch_tasks() == []


async def test_cancelling_collect_cancels_everything(
    client: AsyncFriendli, server: LocalServer
) -> None:
    """Cancelling the task awaiting a batch raises CancelledError and leaves no task."""
    server.script("slow", [Action.delay(30)] * 3)
    batch = client.container.image.generate_batch(
        [{"prompt": "slow", "http_headers": {"x-test-id": "slow"}}] * 3
    )
    task = asyncio.ensure_future(batch.collect())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _batch_tasks() == []


async def test_progress_reports_counts_rate_and_eta(client: AsyncFriendli) -> None:
    """on_progress gets snapshots; the last one accounts for every item."""
    snapshots: list[BatchProgress] = []
    await client.container.image.generate_batch(
        [f"p{i}" for i in range(30)] + [{"prompt": "bad", "num_inference_steps": 0}],
        on_progress=snapshots.append,
    )
    last = snapshots[-1]
    assert (last.total, last.done, last.succeeded, last.failed) == (31, 31, 30, 1)
    assert last.in_flight == 0
    assert last.rate > 0
    assert last.eta == 0.0


# -- sink, manifest and resume ------------------------------------------------------------


def _manifest(directory: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (directory / MANIFEST_NAME).read_bytes().splitlines()]


async def test_out_dir_writes_files_and_a_manifest(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path, tiny_jpeg: bytes
) -> None:
    """Each image is written to out_dir, items hold the path (no bytes), and the manifest
    has one line per item with its file, sha256, seed, attempts and error."""
    requests: list[Any] = [{"prompt": f"p{i}", "seed": i} for i in range(12)]
    requests.append({"prompt": "bad", "num_inference_steps": 0})
    result = await client.container.image.generate_batch(requests, out_dir=tmp_path)
    digest = hashlib.sha256(tiny_jpeg).hexdigest()
    for item in result.items[:12]:
        assert item.result is None
        assert item.path is not None
        assert item.path.read_bytes() == tiny_jpeg
        assert item.sha256 == digest
    lines = sorted(_manifest(tmp_path), key=lambda line: line["index"])
    assert len(lines) == 13
    first = lines[0]
    assert first["status"] == "ok"
    assert (first["prompt"], first["seed"], first["format"]) == ("p0", 0, "jpeg")
    assert first["sha256"] == digest
    assert first["file"] == result[0].path.name  # type: ignore[union-attr]
    assert first["attempts"] == 1
    assert first["error"] is None
    assert lines[12]["status"] == "failed"
    assert "num_inference_steps" in lines[12]["error"]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]


async def test_rerun_resumes_without_any_request(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path
) -> None:
    """A second run over the same input and directory sends nothing."""
    requests = [f"p{i}" for i in range(20)]
    await client.container.image.generate_batch(requests, out_dir=tmp_path)
    sent = server.stats.total_requests
    again = await client.container.image.generate_batch(requests, out_dir=tmp_path)
    assert server.stats.total_requests == sent
    assert [item.status for item in again] == ["resumed"] * 20
    assert all(item.ok and item.path is not None and item.path.exists() for item in again)
    assert len(_manifest(tmp_path)) == 20


async def test_resume_redoes_missing_corrupt_and_changed_items(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path
) -> None:
    """Resume redoes an item whose file is gone, whose bytes changed, or whose request
    changed at the same index; the rest is skipped."""
    requests = [f"p{i}" for i in range(10)]
    first = await client.container.image.generate_batch(requests, out_dir=tmp_path)
    first[2].path.unlink()  # type: ignore[union-attr]
    first[5].path.write_bytes(b"tampered")  # type: ignore[union-attr]
    requests[7] = "a different prompt"
    server.reset_stats()
    again = await client.container.image.generate_batch(requests, out_dir=tmp_path)
    assert server.stats.total_requests == 3
    redone = [item.index for item in again if item.status == "ok"]
    assert redone == [2, 5, 7]
    assert again.ok


async def test_resume_tolerates_a_partial_last_line(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path
) -> None:
    """A crash mid-append (a last line without newline) is cut off, and the run goes on."""
    requests = [f"p{i}" for i in range(6)]
    await client.container.image.generate_batch(requests[:3], out_dir=tmp_path)
    with (tmp_path / MANIFEST_NAME).open("ab") as manifest:
        manifest.write(b'{"index": 3, "id": "abc", "sta')
    again = await client.container.image.generate_batch(requests, out_dir=tmp_path)
    assert [item.status for item in again] == ["resumed"] * 3 + ["ok"] * 3
    lines = _manifest(tmp_path)
    assert sorted(line["index"] for line in lines) == list(range(6))


async def test_resume_false_starts_over(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path
) -> None:
    """resume=False sends every request again and rewrites the manifest."""
    requests = [f"p{i}" for i in range(5)]
    await client.container.image.generate_batch(requests, out_dir=tmp_path)
    again = await client.container.image.generate_batch(requests, out_dir=tmp_path, resume=False)
    assert [item.status for item in again] == ["ok"] * 5
    assert server.stats.total_requests == 10
    assert len(_manifest(tmp_path)) == 5


async def test_unwritable_out_dir_is_a_usage_error(client: AsyncFriendli, tmp_path: Path) -> None:
    """An out_dir that is a file raises FriendliUsageError saying so."""
    from friendli_image import FriendliUsageError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(FriendliUsageError, match="out_dir"):
        await client.container.image.generate_batch(["a"], out_dir=blocker)


# -- memory ---------------------------------------------------------------------------
# The 2,000-item run through faults, a restart and a straggler, and dropped connections
# under the default policy, are tests/reliability/test_batch.py's (they record the
# figures of docs/reliability.md).


_MEMORY_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from friendli_image import AsyncFriendli

    async def main():
        async with AsyncFriendli(server_url=sys.argv[1]) as friendli:
            result = await friendli.container.image.generate_batch(
                (f"p{i}" for i in range(1000)), out_dir=sys.argv[2], total=1000
            )
        assert all(item.ok and item.result is None for item in result), result.failed[:3]

    asyncio.run(main())
    # VmHWM, not ru_maxrss: Linux carries the parent's peak RSS across exec into
    # ru_maxrss, so a child of a big test process would report the parent's peak.
    with open("/proc/self/status") as status:
        print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
    """
)


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_thousand_megabyte_images_to_disk_stay_under_200_mib(tmp_path: Path) -> None:
    """1,000 x 1 MiB images written to out_dir peak under 200 MiB RSS in the client process."""
    image = b"\xff\xd8\xff\xe0" + random.randbytes(1024 * 1024 - 4)
    out = tmp_path / "out"
    with LocalServer(ServerConfig(static_image=image, max_concurrency=64)) as server:
        child = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, server.url, str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "PYTHONDEVMODE": "0"},
        )
    assert child.returncode == 0, child.stderr
    peak_mib = int(child.stdout.split()[-1]) / 1024
    print(f"peak RSS for 1,000 x 1 MiB to disk: {peak_mib:.0f} MiB")
    assert peak_mib < 200
    files = [path for path in out.iterdir() if path.suffix == ".jpg"]
    assert len(files) == 1000
    assert all(path.stat().st_size == len(image) for path in files)


# -- the blocking twin --------------------------------------------------------------------


@pytest.fixture
def thread_server(tiny_jpeg: bytes) -> Iterator[LocalServer]:
    """A fast-mode bundled server on its own thread, for blocking clients."""
    config = ServerConfig(
        static_image=tiny_jpeg, max_concurrency=64, faults=FaultRates(delay_ms=(0, 10), seed=4)
    )
    with LocalServer(config) as local:
        yield local


def _counting_portal_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from friendli_image import SyncFriendli

    calls: list[int] = []
    original = SyncFriendli._run

    def counted(self: SyncFriendli, call: Any) -> Any:
        calls.append(1)
        return original(self, call)

    monkeypatch.setattr(SyncFriendli, "_run", counted)
    return calls


def test_sync_collect_crosses_the_thread_boundary_once(
    thread_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SyncFriendli's generate_batch(...).collect() runs the whole batch in one portal call."""
    from friendli_image import SyncFriendli

    with SyncFriendli(server_url=thread_server.url) as friendli:
        calls = _counting_portal_calls(monkeypatch)
        result = friendli.container.image.generate_batch(
            [f"p{i}" for i in range(200)], concurrency=32
        ).collect()
    assert len(calls) == 1
    assert result.ok
    assert [item.index for item in result] == list(range(200))
    _assert_each_matches_its_input(result.items, thread_server)


def test_sync_iteration_yields_every_item_in_chunks(
    thread_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Iterating the blocking batch yields every item with one portal call in all."""
    from friendli_image import SyncFriendli

    with SyncFriendli(server_url=thread_server.url) as friendli:
        calls = _counting_portal_calls(monkeypatch)
        batch = friendli.container.image.generate_batch(
            ({"prompt": f"p{i}"} for i in range(300)), concurrency=32, ordered=True
        )
        indexes = [item.index for item in batch]
    assert indexes == list(range(300))
    assert len(calls) == 1


def test_sync_early_exit_cancels_the_batch(thread_server: LocalServer) -> None:
    """Leaving a blocking batch's loop cancels the slow requests in flight at once."""
    from friendli_image import SyncFriendli

    thread_server.script("slow", [Action.delay(SLOW_S)] * 4)
    requests: list[Any] = ["fast"]
    requests += [{"prompt": "slow", "http_headers": {"x-test-id": "slow"}}] * 4
    started = time.monotonic()
    with SyncFriendli(server_url=thread_server.url) as friendli:
        for item in friendli.container.image.generate_batch(requests, concurrency=5):
            assert item.index == 0
            break
        assert time.monotonic() - started < SLOW_S / 2  # not waited for
        # The client still works after the cancelled batch.
        assert friendli.container.image.generate_batch(["again"]).collect().ok
    assert thread_server.stats.in_flight == 0


def test_sync_batch_errors_reach_the_caller(thread_server: LocalServer, tmp_path: Path) -> None:
    """Invalid batch arguments and unusable out_dirs raise in the calling thread; item
    failures stay on the items."""
    from friendli_image import FriendliUsageError, SyncFriendli

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with SyncFriendli(server_url=thread_server.url) as friendli:
        image = friendli.container.image
        with pytest.raises(FriendliValidationError, match="concurrency"):
            image.generate_batch(["a"], concurrency=0).collect()
        with pytest.raises(FriendliUsageError, match="out_dir"):
            list(image.generate_batch(["a"], out_dir=blocker))
        result = image.generate_batch([{"prompt": "", "num_inference_steps": 0}]).collect()
        batch = image.generate_batch(["a"])
        batch.collect()
        with pytest.raises(FriendliUsageError, match="runs once"):
            batch.collect()
    assert result[0].status == "failed"


async def test_an_unexpected_exception_in_an_item_is_raised_by_the_iterator() -> None:
    """A defect (not an API failure) ends the batch with that exception, and the other
    items in flight are cancelled rather than left running."""
    from friendli_image._batch import Batch, BatchOperation
    from friendli_image._batch_models import BatchOptions
    from friendli_image._request_path import RequestPath
    from friendli_image._requests import GenerateRequest
    from friendli_image._resources import GENERATIONS_PATH

    client = AsyncFriendli(server_url="http://127.0.0.1:9", token="")
    cancelled = []

    async def send(path: str, model: Any, options: Any, gate: Any) -> Any:
        if model.seed == 1:
            raise RuntimeError("a bug")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(model.seed)
            raise

    batch = Batch(
        RequestPath(send=send, resolve=client._resolve),
        BatchOperation(GENERATIONS_PATH, GenerateRequest, accepts_prompt=True),
        [{"prompt": "p", "seed": seed} for seed in range(4)],
        BatchOptions(concurrency=4),
    )
    with pytest.raises(RuntimeError, match="a bug"):
        await asyncio.wait_for(batch.collect(), 10)
    assert sorted(cancelled) == [0, 2, 3]


def test_a_batch_result_prints_as_a_one_line_summary() -> None:
    """``print(result)`` of 2,000 items is a short line of counts, not every item."""
    statuses = ["ok"] * 1990 + ["resumed"] * 5 + ["failed"] * 3 + ["skipped"] * 2
    items = [BatchItem(index=i, id=str(i), request={}, status=s) for i, s in enumerate(statuses)]
    result = BatchResult(items=items, elapsed=12.345, unmatched=4)
    assert repr(result) == (
        "BatchResult(2,000 items: 1,990 ok, 5 resumed, 3 failed, 2 skipped, "
        "elapsed=12.35s, unmatched=4)"
    )
    assert repr(BatchResult(items=[], elapsed=0.0)) == "BatchResult(0 items, elapsed=0.00s)"
