"""Memory and event-loop responsiveness under big bodies (target 5 of PERFORMANCE.md).

``python benchmarks/memory.py big CLIENT --url URL --size BYTES --c 8`` sends C requests at
once for a large image and reports the peak RSS above the pre-run baseline, against the
bytes in flight, and the worst lag of a 10 ms ticker on the event loop while they run.

``python benchmarks/memory.py disk --url URL --size BYTES --n 1000 --c 64 --out DIR``
writes N images to DIR at concurrency C and reports the peak RSS of the process.

``python benchmarks/memory.py cli --n 1000000 --c 64 --size 256 --out DIR [--url URL]``
runs ``friendli-image batch`` over a file of N distinct prompts into DIR (files, or
``--output-format``) against URL (default: ``benchmarks/server.py`` started for it) and
reports the command's peak RSS (its own rusage, from ``wait4``) and its RSS as it went,
so a summary that keeps every item shows as growth.

Each prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import subprocess
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


def rss_peak_mib() -> float:
    """This process's peak RSS in MiB."""
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
    peak = rss_peak_mib()
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
        "peak_mib": rss_peak_mib(),
    }


def _rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def cli(args: argparse.Namespace) -> dict[str, Any]:
    """``friendli-image batch`` over N prompts; its peak RSS and RSS samples as it ran."""
    out: Path = args.out
    prompts = out.with_name(out.name + "-prompts.txt")
    with prompts.open("w") as handle:
        handle.writelines(f"a lighthouse at dawn, take {i}\n" for i in range(args.n))
    url, server = args.url, None
    if url is None:
        command = [sys.executable, str(Path(__file__).with_name("server.py")), "--size"]
        server = subprocess.Popen(
            [*command, str(args.size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert server.stdout is not None
        url = f"http://127.0.0.1:{int(server.stdout.readline().split()[1])}"
    try:
        command = [
            sys.executable, "-m", "friendli_image", "batch", str(prompts), "--out-dir", str(out),
            "--server-url", url, "--concurrency", str(args.c), "--no-progress",
            "--output-format", args.output_format,
        ]  # fmt: skip
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        samples: list[tuple[float, float]] = []
        while True:
            # wait4: the command's own rusage (its peak RSS), not the children's maximum.
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            rss = _rss_mib(process.pid)
            if rss is not None:
                samples.append((time.perf_counter() - started, rss))
            time.sleep(1.0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
    finally:
        if server is not None:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(timeout=10)
        prompts.unlink()
    if process.returncode != 0:
        raise RuntimeError(f"friendli-image batch exited {process.returncode}")
    picks = [samples[int(len(samples) * q)] for q in (0.1, 0.5, 0.9)] if samples else []
    return {
        "scenario": "cli",
        "n": args.n,
        "c": args.c,
        "size": args.size,
        "output_format": args.output_format,
        "wall_s": round(wall, 1),
        "items_per_s": round(args.n / wall),
        "peak_mib": round(usage.ru_maxrss / 1024, 1),
        "rss_mib_at": {f"{t:.0f}s": round(rss, 1) for t, rss in picks},
    }


def main() -> None:
    """Parse the command line, run one scenario, print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=["big", "disk", "cli"])
    parser.add_argument(
        "client", nargs="?", default="friendli", choices=["friendli", "raw_aiohttp"]
    )
    parser.add_argument("--url", help="the server (cli: default, benchmarks/server.py)")
    parser.add_argument("--output-format", default="files", help="cli: the batch's format")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--c", type=int, required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.scenario != "cli" and args.url is None:
        parser.error(f"{args.scenario} needs --url")
    if args.scenario == "cli":
        if args.out is None:
            parser.error("cli needs --out")
        figures = cli(args)
    elif args.scenario == "big":
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
