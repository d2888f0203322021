"""Scenario 38: a 500-item fan-out of single calls through faults and a restart loses nothing.

The batch API (``generate_batch``) is its engineer's to test, including "a 401 on the
first item stops new dispatches"; here the same load runs as a plain
``asyncio.gather`` over ``AsyncFriendli.generate`` behind a semaphore, which is what the
retry policy, the budget and the connection handling must survive on their own.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from friendli_image import AsyncFriendli, FriendliConnectionError, FriendliUsageError, RetryConfig
from friendli_image._store import MANIFEST_NAME
from friendli_image.server import Action, FaultRates, LocalServer, ServerConfig

from .harness import TINY_PNG, Figures

MakeClient = Callable[..., AsyncFriendli]
#: The 2,000-item acceptance run is tests/test_batch.py's (through generate_batch); these
#: runs of single calls under the same faults need fewer items to show the same.
ITEMS = 500
CONCURRENCY = 64
STRAGGLER_S = 8.0  # long enough that the other 499 items finish first on a loaded machine
#: Starts after the restart (items start in order), so the restart cannot cut it short.
STRAGGLER = 375


async def _run_batch(
    srv: LocalServer, client: AsyncFriendli, tid: str
) -> tuple[list[Any], list[float], float]:
    """Run ITEMS prompts at CONCURRENCY; restart the server halfway; one item straggles."""
    srv.script(f"{tid}-straggler", [Action.delay(STRAGGLER_S)])
    slots = asyncio.Semaphore(CONCURRENCY)
    finished: list[float] = [0.0] * ITEMS
    done = 0
    halfway = asyncio.Event()
    started = time.monotonic()

    async def item(index: int) -> Any:
        nonlocal done
        headers = {"x-test-id": f"{tid}-straggler"} if index == STRAGGLER else None
        async with slots:
            try:
                return await client.container.image.generate(
                    prompt=f"item {index}", http_headers=headers
                )
            finally:
                finished[index] = time.monotonic() - started
                done += 1
                if done == ITEMS // 2:
                    halfway.set()

    async def restart_halfway() -> None:
        await halfway.wait()
        await srv.restart()

    restarter = asyncio.ensure_future(restart_halfway())
    outcomes = await asyncio.gather(*(item(i) for i in range(ITEMS)), return_exceptions=True)
    await restarter
    return outcomes, finished, time.monotonic() - started


def _check(srv: LocalServer, outcomes: list[Any], figures: Figures) -> dict[str, int]:
    by_id: dict[str, list[Any]] = defaultdict(list)
    for record in srv.records:
        by_id[record.headers.get("X-Request-ID", "")].append(record)
    counts: Counter[str] = Counter()
    seen_ids: set[str] = set()
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            # The only acceptable failure: a POST the server read and dropped.
            assert isinstance(outcome, FriendliConnectionError), repr(outcome)
            assert outcome.maybe_processed
            counts["flagged"] += 1
            request_id = outcome.request_id
        else:
            counts["ok"] += 1
            counts["maybe_duplicated"] += outcome.maybe_duplicated
            request_id = outcome.request_id
        assert request_id is not None
        assert request_id not in seen_ids  # no result delivered twice
        seen_ids.add(request_id)
        records = by_id[request_id]
        assert records, index
        prompts = {r.body.get("prompt") for r in records if isinstance(r.body, dict)}
        assert prompts <= {f"item {index}"}, (index, prompts)  # in order, never mixed up
        after_read = [r for r in records[:-1] if r.action == "drop_after_read"]
        counts["resent_after_read"] += len(after_read)
    figures.add("inject.status", sum(v for k, v in srv.stats.faults.items() if "status" in k))
    figures.add("inject.reset", srv.stats.faults.get("drop_after_read", 0) + 1)
    figures.add("inject.timeout")  # the straggler
    return dict(counts)


@pytest.mark.slow
@pytest.mark.scenario(38)
@pytest.mark.parametrize("resend", [False, True], ids=["default", "retry_ambiguous"])
async def test_two_thousand_items_through_faults_and_a_restart(
    make_client: MakeClient, tid: str, figures: Figures, resend: bool
) -> None:
    """500 items, C=64, 5 % 503, 2 % 429, 1 % drops, a restart, a straggler: nothing lost."""
    faults = FaultRates(
        p_503=0.05, p_429=0.02, retry_after_s=0.5, p_drop_after_read=0.01, delay_ms=(0, 200)
    )
    config = ServerConfig(static_image=TINY_PNG, faults=faults, max_concurrency=CONCURRENCY)
    # Several independent faults (503, 429, drops, the restart) can meet one request:
    # more attempts than the default keep the run deterministic on a loaded machine.
    policy = RetryConfig(
        max_attempts=8, initial_delay=0.1, max_delay=1.0, jitter=0.1, retry_ambiguous=resend
    )
    async with LocalServer(config) as srv:
        client = make_client(srv.url, retries=policy, max_connections=CONCURRENCY)
        outcomes, finished, elapsed = await _run_batch(srv, client, tid)
        counts = _check(srv, outcomes, figures)
        stats = srv.stats
    assert len(outcomes) == ITEMS
    assert stats.max_in_flight <= CONCURRENCY
    others = [t for i, t in enumerate(finished) if i != STRAGGLER]
    assert finished[STRAGGLER] >= STRAGGLER_S
    assert max(others) < finished[STRAGGLER]  # the straggler held up nobody
    ratio = stats.total_requests / ITEMS
    summary = (
        f"{ITEMS} items in {elapsed:.1f} s: {counts['ok']} results, "
        f"{counts.get('flagged', 0)} typed errors flagged maybe_processed, lost 0, "
        f"duplicated 0, misordered 0; {counts.get('resent_after_read', 0)} resends of a "
        f"POST the server had read ({counts.get('maybe_duplicated', 0)} results flagged "
        f"maybe_duplicated); server max in flight {stats.max_in_flight} (C={CONCURRENCY}); "
        f"{stats.total_requests} requests ({ratio:.3f} per item)"
    )
    figures.add("recover.expected", ITEMS - counts.get("flagged", 0))
    figures.add("recover.ok", counts["ok"])
    figures.add("fail.expected", counts.get("flagged", 0))
    figures.add("fail.typed", counts.get("flagged", 0))
    figures.add("ambiguous.flagged", counts.get("flagged", 0))
    if resend:
        figures.set("batch.optin", summary)
        figures.add("ambiguous.resent.optin", counts.get("resent_after_read", 0))
        assert counts.get("flagged", 0) == 0
    else:
        figures.set("batch", summary)
        figures.set("amplification.batch", f"{ratio:.3f}")
        figures.add("ambiguous.resent.default", counts.get("resent_after_read", 0))
        # Resent only through the one reconnect of a reused connection, always flagged.
        assert counts.get("resent_after_read", 0) <= counts.get("maybe_duplicated", 0)


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
    assert refused_in < 1.0


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from friendli_image._store import BatchStore

store = BatchStore(Path(sys.argv[1]), resume=True)
store.open()
print("locked", flush=True)
time.sleep(30)
"""


@pytest.mark.scenario(38)
def test_another_process_holding_out_dir_makes_the_cli_batch_exit_2(tmp_path: Path) -> None:
    """A batch process holds out_dir: `friendli-image batch` on it exits 2 at once, saying
    which process holds it; nothing is sent (the server URL points nowhere)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
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
    assert elapsed < 10
