"""Scenarios 38 and 47: a batch through faults and a restart loses nothing; resuming into
an output directory, its manifest and its lock.

The 2,000-item run (faults, a restart, a straggler; ``retry_ambiguous``) is the one such
run in the suite; a 500-item run shows what the default policy does with requests the
server read and dropped. Both record the figures of docs/reliability.md's batch section.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from friendli_image import (
    AsyncFriendli,
    BatchItem,
    FriendliConnectionError,
    FriendliUsageError,
    RetryConfig,
)
from friendli_image._store import MANIFEST_NAME
from friendli_image.server import Action, FaultRates, LocalServer, ServerConfig

from .harness import TINY_PNG, Figures

MakeClient = Callable[..., AsyncFriendli]


def _account(items: Sequence[BatchItem], server: LocalServer) -> Counter[str]:
    """Check each item against what the server saw and count what happened to it.

    Every item has its own request id, every request under that id carried the item's
    prompt (nothing lost to another item, nothing misordered), and a failure is only a
    POST the server read and dropped, flagged maybe_processed.
    """
    by_id: dict[str, list[Any]] = defaultdict(list)
    for record in server.records:
        by_id[record.headers.get("X-Request-ID", "")].append(record)
    counts: Counter[str] = Counter()
    for item in items:
        if item.status == "ok":
            counts["ok"] += 1
            counts["maybe_duplicated"] += item.maybe_duplicated
        else:
            assert isinstance(item.error, FriendliConnectionError), item
            assert item.maybe_processed, item
            counts["flagged"] += 1
        assert item.request_id is not None
        records = by_id[item.request_id]
        assert records, item
        prompts = {r.body.get("prompt") for r in records if isinstance(r.body, dict)}
        assert prompts <= {item.request["prompt"]}, (item, prompts)
        if item.status == "ok":  # the answer it holds is the one to its own prompt
            answered = [r for r in records if r.status == 200 and isinstance(r.body, dict)]
            assert [r.body["prompt"] for r in answered] == [item.request["prompt"]], item
        resent = sum(r.action == "drop_after_read" for r in records[:-1])
        counts["resent_after_read"] += resent
        if resent:
            counts["resent_items"] += 1
            counts["resent_items_flagged"] += item.maybe_duplicated or item.maybe_processed
    assert len({item.request_id for item in items}) == len(items)  # none delivered twice
    return counts


def _summary(items: int, elapsed: float, counts: Counter[str], server: LocalServer) -> str:
    stats = server.stats
    return (
        f"{items} items in {elapsed:.1f} s: {counts['ok']} results, {counts['flagged']} "
        f"typed errors flagged maybe_processed, lost 0, duplicated 0, misordered 0; "
        f"{counts['resent_after_read']} resends of a POST the server had read "
        f"({counts['maybe_duplicated']} results flagged maybe_duplicated); server max in "
        f"flight {stats.max_in_flight}; {stats.total_requests} requests "
        f"({stats.total_requests / items:.3f} per item)"
    )


def _record_outcomes(figures: Figures, counts: Counter[str], server: LocalServer) -> None:
    faults = server.stats.faults
    figures.add("inject.status", sum(n for kind, n in faults.items() if kind.startswith("status")))
    figures.add("inject.reset", faults.get("drop_after_read", 0))
    figures.add("recover.expected", counts["ok"])
    figures.add("recover.ok", counts["ok"])
    figures.add("fail.expected", counts["flagged"])
    figures.add("fail.typed", counts["flagged"])
    figures.add("ambiguous.flagged", counts["flagged"])


@pytest.mark.slow
@pytest.mark.scenario(38)
async def test_two_thousand_items_survive_faults_a_restart_and_a_straggler(
    figures: Figures,
) -> None:
    """The one 2,000-item fault run: concurrency 64 with 5 % 503, 2 % 429 + Retry-After,
    1 % connections dropped after the server read the request, 0-200 ms delays, one
    restart and one straggler. With retry_ambiguous every item succeeds with its own
    image, none lost or duplicated, in-flight never above 64, and all 1,999 others finish
    while the straggler is still in flight. Waits are real: the restart's downtime is."""
    faults = FaultRates(
        p_503=0.05, p_429=0.02, retry_after_s=1, p_drop_after_read=0.01, delay_ms=(0, 200), seed=7
    )
    config = ServerConfig(static_image=TINY_PNG, max_concurrency=64, faults=faults)
    total, straggler = 2000, 1500  # sent after the restart, which would cut its delay short
    requests: list[dict[str, Any]] = [{"prompt": f"item {i}", "seed": i} for i in range(total)]
    requests[straggler]["http_headers"] = {"x-test-id": "straggler"}
    items: list[BatchItem] = []
    restart: asyncio.Task[None] | None = None
    # Several faults can meet one item (503, 429, a drop, the restart): more than 5 attempts.
    resend = RetryConfig(max_attempts=8, retry_ambiguous=True, budget_floor=200, budget_cap=200)
    async with LocalServer(config) as server:
        server.script("straggler", [Action.delay(600)])  # ends only when the batch is closed
        started = time.monotonic()
        async with AsyncFriendli(server_url=server.url, retries=resend) as friendli:
            batch = friendli.container.image.generate_batch(requests, concurrency=64)
            async with batch:
                async for item in batch:
                    items.append(item)
                    if len(items) == 500:
                        restart = asyncio.ensure_future(server.restart(down_for_s=0.3))  # type: ignore[arg-type]
                    if len(items) == total - 1:
                        straggling = server.stats.in_flight
                        break  # closing the batch cancels the straggler
        elapsed = time.monotonic() - started
        assert restart is not None
        await restart
        counts = _account(items, server)
        summary = _summary(total, elapsed, counts, server)
        stats = server.stats
    assert sorted(item.index for item in items) == [i for i in range(total) if i != straggler]
    assert counts["ok"] == total - 1
    assert straggling == 1  # the straggler, still on the server: it held up nobody
    assert any(r.headers.get("x-test-id") == "straggler" for r in server.records)
    assert stats.max_in_flight <= 64
    assert stats.faults.get("drop_after_read", 0) > 0  # resent, and none lost
    _record_outcomes(figures, counts, server)
    figures.add("inject.timeout")  # the straggler
    figures.set(
        "batch.optin",
        f"{summary}; C=64, 5 % 503, 2 % 429 with Retry-After, 1 % dropped after the read, "
        "one restart, one straggler left in flight when the other 1,999 were done",
    )
    figures.set("amplification.batch", f"{stats.total_requests / total:.3f}")
    figures.add("ambiguous.resent.optin", counts["resent_after_read"])


@pytest.mark.scenario(38)
async def test_dropped_connections_are_reported_maybe_processed(figures: Figures) -> None:
    """With 2 % of requests dropped after the server read them and the default policy, no
    item is lost and every dropped request is flagged on its item: failed as
    maybe_processed, or (when the client resent it as a stale keep-alive connection) ok
    but maybe_duplicated."""
    total = 500
    config = ServerConfig(
        static_image=TINY_PNG,
        max_concurrency=64,
        faults=FaultRates(p_drop_after_read=0.02, seed=11),
    )
    async with LocalServer(config) as server:
        started = time.monotonic()
        async with AsyncFriendli(server_url=server.url) as friendli:
            result = await friendli.container.image.generate_batch(
                [f"p{i}" for i in range(total)], concurrency=32
            )
        elapsed = time.monotonic() - started
        counts = _account(result.items, server)
        summary = _summary(total, elapsed, counts, server)
    assert len(result) == total
    assert result.aborted is None
    assert counts["ok"] + counts["flagged"] == total
    flagged = {item.request_id for item in result if item.maybe_processed or item.maybe_duplicated}
    dropped = {
        record.headers["X-Request-ID"]
        for record in server.records
        if record.action == "drop_after_read"
    }
    assert dropped
    assert dropped <= flagged
    # Resent only through the one reconnect of a reused connection, and the item says so.
    assert counts["resent_items_flagged"] == counts["resent_items"]
    _record_outcomes(figures, counts, server)
    figures.set("batch", f"{summary}; C=32, 2 % dropped after the read")
    figures.add("ambiguous.resent.default", counts["resent_after_read"])


def _resumed(result: Any) -> int:
    return sum(item.status == "resumed" for item in result)


def _manifest_indexes(out_dir: Path) -> Counter[int]:
    lines = (out_dir / MANIFEST_NAME).read_bytes().splitlines()
    return Counter(orjson.loads(line)["index"] for line in lines)


@pytest.mark.scenario(47)
@pytest.mark.scenario(38)
async def test_resume_after_deleted_and_corrupted_images_keeps_one_line_per_index(
    make_client: MakeClient, tmp_path: Path, figures: Figures
) -> None:
    """Resume after an image was deleted and another corrupted: both are redone, the rest
    skipped, and manifest.jsonl ends with exactly one line per index (the latest)."""
    prompts = [f"p{i}" for i in range(40)]
    async with LocalServer(ServerConfig(static_image=TINY_PNG)) as srv:
        client = make_client(srv.url)
        first = await client.container.image.generate_batch(prompts, out_dir=tmp_path)
        assert len(first.succeeded) == 40
        paths = {item.index: item.path for item in first.items}
        paths[3].unlink()  # type: ignore[union-attr]
        paths[7].write_bytes(b"not the image")  # type: ignore[union-attr]
        before = srv.stats.total_requests
        second = await client.container.image.generate_batch(prompts, out_dir=tmp_path)
        redone = srv.stats.total_requests - before
    assert redone == 2
    assert _resumed(second) == 38
    counts = _manifest_indexes(tmp_path)
    assert sorted(counts) == list(range(40))
    duplicated = sum(n - 1 for n in counts.values())
    figures.set(
        "manifest.resume",
        f"40 items, one image deleted and one corrupted, resumed: 2 redone, 38 skipped, "
        f"{duplicated} duplicate manifest lines (target 0)",
    )
    assert duplicated == 0
    assert paths[3].read_bytes() == TINY_PNG  # type: ignore[union-attr]
    assert paths[7].read_bytes() == TINY_PNG  # type: ignore[union-attr]


@pytest.mark.scenario(38)
async def test_a_manifest_with_duplicates_is_compacted_on_resume(
    make_client: MakeClient, tmp_path: Path
) -> None:
    """A manifest left with duplicate lines (an older release, a crash) is compacted when a
    resume opens it: the latest line of each index wins, a torn last line is dropped."""
    async with LocalServer(ServerConfig(static_image=TINY_PNG)) as srv:
        client = make_client(srv.url)
        await client.container.image.generate_batch(["a", "b", "c"], out_dir=tmp_path)
        manifest = tmp_path / MANIFEST_NAME
        lines = manifest.read_bytes().splitlines(keepends=True)
        stale = orjson.loads(lines[0])
        stale["attempts"] = 99
        manifest.write_bytes(orjson.dumps(stale) + b"\n" + b"".join(lines) + b'{"index": 1, "st')
        result = await client.container.image.generate_batch(["a", "b", "c"], out_dir=tmp_path)
        assert _resumed(result) == 3
        assert srv.stats.total_requests == 3
    counts = _manifest_indexes(tmp_path)
    assert counts == Counter({0: 1, 1: 1, 2: 1})
    assert all(orjson.loads(line)["attempts"] == 1 for line in manifest.read_bytes().splitlines())


@pytest.mark.scenario(47)
@pytest.mark.scenario(38)
async def test_a_second_batch_on_the_same_out_dir_fails_at_once(
    make_client: MakeClient, tmp_path: Path, figures: Figures
) -> None:
    """While a batch runs into out_dir, another one on the same directory (same process
    here; the lock is an fcntl lock, so other processes meet it too) raises
    FriendliUsageError at once and sends nothing; the first finishes alone."""
    config = ServerConfig(static_image=TINY_PNG, step_latency_ms=2)
    prompts = [f"p{i}" for i in range(200)]
    async with LocalServer(config) as srv:
        client = make_client(srv.url)
        first = asyncio.ensure_future(
            client.container.image.generate_batch(prompts, out_dir=tmp_path, concurrency=8)
        )
        for _ in range(1000):  # until the first batch holds the directory
            if (tmp_path / MANIFEST_NAME).exists():
                break
            await asyncio.sleep(0.005)
        started = time.monotonic()
        with pytest.raises(FriendliUsageError, match="in use by another batch"):
            await client.container.image.generate_batch(prompts, out_dir=tmp_path)
        refused_in = time.monotonic() - started
        # At once: refused while the first batch (25 rounds of 40 ms) still runs, not
        # after waiting for its lock.
        assert not first.done()
        result = await first
        requests = srv.stats.total_requests
        # Once the first has finished, the directory is free again (and all is resumed).
        again = await client.container.image.generate_batch(prompts, out_dir=tmp_path)
    assert len(result.succeeded) == 200
    assert _resumed(again) == 200
    assert requests == 200
    assert sum(_manifest_indexes(tmp_path).values()) == 200
    figures.set(
        "manifest.lock",
        f"a second batch on a busy out_dir: FriendliUsageError in {refused_in * 1000:.0f} ms, "
        f"{requests} requests for 200 prompts (before: two processes sent 1,991 and 2,001 "
        "for 1,000)",
    )


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from friendli_image._store import BatchStore

store = BatchStore(Path(sys.argv[1]), resume=True)
store.open()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""
#: How long the other process holds out_dir: what a CLI waiting for the lock would take.
HOLD_S = 30.0


@pytest.mark.scenario(38)
def test_another_process_holding_out_dir_makes_the_cli_batch_exit_2(tmp_path: Path) -> None:
    """A batch process holds out_dir: `friendli-image batch` on it exits 2 at once, saying
    which process holds it; nothing is sent (the server URL points nowhere)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path), str(HOLD_S)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        prompts = tmp_path.parent / "prompts.txt"
        prompts.write_text("a\nb\n")
        started = time.monotonic()
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "friendli_image",
                "batch",
                str(prompts),
                "--out-dir",
                str(tmp_path),
                "--server-url",
                "http://127.0.0.1:9",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        elapsed = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert completed.returncode == 2, completed.stderr
    assert f"in use by another batch (process {holder.pid})" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1
    assert elapsed < HOLD_S / 2
