"""The per-call cost of the blocking facade: sequential SyncFriendli vs sequential AsyncFriendli.

    python benchmarks/sync_overhead.py [--n 2000] [--rounds 5]

Both clients make the same ``generate`` call, one at a time, against the bundled server in
static mode (it answers every request with one tiny pre-encoded JPEG, without rendering),
running in a separate process so that it does not share this process's GIL. Rounds are
interleaved (async, sync, async, sync, ...) so drift on a shared machine hits both alike;
the figures are medians over rounds. The difference is what crossing the thread boundary
costs per call: submitting the coroutine to the facade's loop thread and waking the caller.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

from friendli_image import AsyncFriendli, SyncFriendli

SERVER = """
import io, sys
from PIL import Image
from friendli_image.server import LocalServer, ServerConfig
buffer = io.BytesIO()
Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="JPEG")
config = ServerConfig(static_image=buffer.getvalue(), record_requests=False, echo_prompt_hash=False)
with LocalServer(config) as srv:
    print(srv.url, flush=True)
    sys.stdin.read()
"""


async def _async_round(url: str, n: int) -> float:
    async with AsyncFriendli(server_url=url, retries=0) as client:
        await client.container.image.generate(prompt="warm up")
        started = time.perf_counter()
        for _ in range(n):
            await client.container.image.generate(prompt="a lighthouse at dawn")
        return (time.perf_counter() - started) / n


def _sync_round(url: str, n: int) -> float:
    with SyncFriendli(server_url=url, retries=0) as client:
        client.container.image.generate(prompt="warm up")
        started = time.perf_counter()
        for _ in range(n):
            client.container.image.generate(prompt="a lighthouse at dawn")
        return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="calls per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per client (default 5)")
    args = parser.parse_args()

    server = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        if not url.startswith("http"):
            raise SystemExit("the benchmark server did not start")
        async_times, sync_times = [], []
        for _ in range(args.rounds):
            async_times.append(asyncio.run(_async_round(url, args.n)))
            sync_times.append(_sync_round(url, args.n))
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)

    async_us = statistics.median(async_times) * 1e6
    sync_us = statistics.median(sync_times) * 1e6
    print(f"sequential calls: {args.n} x {args.rounds} rounds, medians, server in its own process")
    print(f"AsyncFriendli  {async_us:8.1f} µs/call")
    print(f"SyncFriendli   {sync_us:8.1f} µs/call")
    print(f"facade overhead {sync_us - async_us:7.1f} µs/call (ratio {sync_us / async_us:.2f}x)")


if __name__ == "__main__":
    main()
