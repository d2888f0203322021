"""Scenario 38 and 47: resuming into an output directory, its manifest and its lock.

The 2,000-item run through faults, a restart and a straggler is tests/test_batch.py's
(the one such run in the suite); dropped connections under the default policy are
tests/test_batch.py::test_dropped_connections_are_reported_maybe_processed.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from friendli_image import AsyncFriendli, FriendliUsageError
from friendli_image._store import MANIFEST_NAME
from friendli_image.server import LocalServer, ServerConfig

from .harness import TINY_PNG, Figures

MakeClient = Callable[..., AsyncFriendli]


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
