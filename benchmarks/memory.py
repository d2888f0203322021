"""Memory and event-loop responsiveness under big bodies (target 5 of PERFORMANCE.md).

``python benchmarks/memory.py big CLIENT --url URL --size BYTES --c 8`` sends C requests at
once for a large image and reports the peak RSS above the pre-run baseline, against the
bytes in flight, and the worst lag of a 10 ms ticker on the event loop while they run.

``python benchmarks/memory.py disk --url URL --size BYTES --n 1000 --c 64 --out DIR``
writes N images to DIR at concurrency C and reports the peak RSS of the process.
Both print one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

PATH = "/v1/images/generations"
PROMPT = "a lighthouse at dawn"
MiB = 1024 * 1024


def _rss_now_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / MiB


def _rss_peak_mib() -> float:
    # VmHWM, not ru_maxrss: Linux carries a parent's peak RSS across exec into ru_maxrss.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Ticker:
    """A task that wakes every 10 ms and keeps the worst lateness it saw."""

    def __init__(self, interval: float = 0.010) -> None:
        self.interval = interval
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            due = time.perf_counter() + self.interval
            await asyncio.sleep(self.interval)
            self.worst = max(self.worst, time.perf_counter() - due)

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def big(client: str, url: str, size: int, c: int) -> dict[str, Any]:
    """C concurrent requests for one large image each; peak RSS and loop lag."""
    import aiohttp

    from friendli_image import AsyncFriendli

    async with (
        aiohttp.ClientSession() as session,
        AsyncFriendli(server_url=url, token="", max_connections=c) as friendli,
    ):
        # Warm the loop, the pool and the executor with small work that allocates little.
        await asyncio.sleep(0)
        baseline = _rss_now_mib()
        started = time.perf_counter()
        with Ticker() as ticker:
            if client == "friendli":
                results = await asyncio.gather(
                    *(friendli.container.image.generate(prompt=PROMPT, seed=i) for i in range(c))
                )
                sizes = [len(r.data) for r in results]
                del results
            else:

                async def one(i: int) -> int:
                    async with session.post(url + PATH, json={"prompt": PROMPT, "seed": i}) as r:
                        payload = await r.json()
                    return len(base64.b64decode(payload["image"]))

                sizes = list(await asyncio.gather(*(one(i) for i in range(c))))
        wall = time.perf_counter() - started
    if any(s != size for s in sizes):
        raise RuntimeError(f"wrong image sizes: {sizes}")
    peak = _rss_peak_mib()
    in_flight = c * size / MiB
    return {
        "scenario": "big",
        "client": client,
        "c": c,
        "size": size,
        "wall_s": wall,
        "baseline_mib": baseline,
        "peak_mib": peak,
        "in_flight_mib": in_flight,
        "peak_over_in_flight": (peak - baseline) / in_flight,
        "max_lag_ms": ticker.worst * 1000,
    }


async def disk(url: str, size: int, n: int, c: int, out: Path) -> dict[str, Any]:
    """N images written to ``out`` at concurrency C; peak RSS of the whole process."""
    from friendli_image import AsyncFriendli

    async with AsyncFriendli(server_url=url, token="", max_connections=c) as client:
        image = client.container.image
        slots = asyncio.Semaphore(c)
        started = time.perf_counter()

        async def one(i: int) -> None:
            async with slots:
                result = await image.generate(prompt=PROMPT, seed=i)
            if len(result.data) != size:
                raise RuntimeError(f"image {i} has {len(result.data)} bytes")
            result.save(out / f"{i:06d}")

        # The pattern a user writes without generate_batch: results go to disk, not a list.
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - started
    return {
        "scenario": "disk",
        "client": "friendli",
        "n": n,
        "c": c,
        "size": size,
        "wall_s": wall,
        "peak_mib": _rss_peak_mib(),
    }


def main() -> None:
    """Parse the command line, run one scenario, print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=["big", "disk"])
    parser.add_argument(
        "client", nargs="?", default="friendli", choices=["friendli", "raw_aiohttp"]
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--c", type=int, required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.scenario == "big":
        figures = asyncio.run(big(args.client, args.url, args.size, args.c))
    else:
        if args.out is None:
            parser.error("disk needs --out")
        args.out.mkdir(parents=True, exist_ok=True)
        figures = asyncio.run(disk(args.url, args.size, args.n, args.c, args.out))
        written = sum(1 for _ in args.out.iterdir())
        if written != args.n:
            raise RuntimeError(f"{written} files written, expected {args.n}")
    json.dump(figures, sys.stdout)
    print()


if __name__ == "__main__":
    main()
