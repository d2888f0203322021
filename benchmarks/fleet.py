"""Fleet benchmark: one client over 4 endpoints against one client per endpoint by hand.

Run as ``python benchmarks/fleet.py`` (both parts) or with ``--part fleet`` / ``--part cpu``.

- **fleet**: 4 bundled servers on loopback, each in its own process, with capacities
  1:1:2:4 (GPU slots; the same step latency). The same N requests at concurrency C go
  once through one ``AsyncFriendli(server_url=[...])`` and ``generate_batch``, and once
  through one client per endpoint with the requests split round-robin by hand (what a
  user of a single-URL SDK writes). Reported: throughput of each and their ratio (the
  goal is >= 1.3x: round-robin waits on the slowest endpoint, the fleet routes by load).
- **cpu**: a single URL, N tiny images sequentially against one server in another
  process; the client process's ``time.process_time()`` per request. With
  ``--baseline DIR`` (another checkout, e.g. ``git worktree add /tmp/base main``) both
  clients run in this process, alternating in chunks against the same server, and the
  ratio is reported (goal: within 3 %).

Prints one JSON object per part.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

PROMPT = "a lighthouse at dawn"
_HERE = os.path.dirname(os.path.abspath(__file__))
CAPACITIES = (1, 1, 2, 4)


def _tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _serve(port_queue: Any, slots: int, step_ms: float) -> None:
    from friendli_image.server import LocalServer, ServerConfig

    async def main() -> None:
        config = ServerConfig(
            static_image=_tiny_png(),
            max_concurrency=slots,
            step_latency_ms=step_ms,
            record_requests=False,
        )
        async with LocalServer(config) as server:
            port_queue.put(server.url)
            await asyncio.Event().wait()

    asyncio.run(main())


def _start_servers(specs: list[tuple[int, float]]) -> tuple[list[str], list[Any]]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = []
    urls = []
    for slots, step_ms in specs:
        process = context.Process(target=_serve, args=(queue, slots, step_ms), daemon=True)
        process.start()
        processes.append(process)
        urls.append(queue.get(timeout=30))
    return urls, processes


def _stop(processes: list[Any]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(5)


async def _fleet_rps(urls: list[str], n: int, c: int, steps: int) -> float:
    from friendli_image import AsyncFriendli

    async with AsyncFriendli(server_url=urls, max_connections=c) as client:
        requests = [{"prompt": PROMPT, "seed": i, "num_inference_steps": steps} for i in range(n)]
        await client.container.image.generate_batch(requests[: c * 2], concurrency=c).collect()
        started = time.perf_counter()
        result = await client.container.image.generate_batch(requests, concurrency=c).collect()
        elapsed = time.perf_counter() - started
        if result.failed:
            raise RuntimeError(f"{len(result.failed)} fleet requests failed")
    return n / elapsed


async def _round_robin_rps(urls: list[str], n: int, c: int, steps: int) -> float:
    from friendli_image import AsyncFriendli

    clients = [AsyncFriendli(server_url=url, max_connections=c) for url in urls]
    try:

        async def run(count: int) -> None:
            shares: list[list[dict[str, Any]]] = [[] for _ in clients]
            for i in range(count):
                shares[i % len(clients)].append(
                    {"prompt": PROMPT, "seed": i, "num_inference_steps": steps}
                )
            per_client = max(1, c // len(clients))
            results = await asyncio.gather(
                *(
                    client.container.image.generate_batch(share, concurrency=per_client).collect()
                    for client, share in zip(clients, shares, strict=True)
                )
            )
            if any(result.failed for result in results):
                raise RuntimeError("round-robin requests failed")

        await run(c * 2)
        started = time.perf_counter()
        await run(n)
        return n / (time.perf_counter() - started)
    finally:
        for client in clients:
            await client.close()


def fleet_part(n: int, c: int, repeats: int) -> dict[str, Any]:
    """Fleet vs hand-split round-robin over 4 endpoints with 1:1:2:4 capacity."""
    step_ms, steps = 10.0, 10  # 100 ms of "GPU" per image and slot
    urls, processes = _start_servers([(slots * 4, step_ms) for slots in CAPACITIES])
    try:
        fleet, rr = [], []
        for _ in range(repeats):
            rr.append(asyncio.run(_round_robin_rps(urls, n, c, steps)))
            fleet.append(asyncio.run(_fleet_rps(urls, n, c, steps)))
    finally:
        _stop(processes)
    ratio = statistics.median(fleet) / statistics.median(rr)
    return {
        "part": "fleet",
        "endpoints": len(urls),
        "capacity": "1:1:2:4 (" + ":".join(str(s * 4) for s in CAPACITIES) + " slots x 100 ms)",
        "n": n,
        "c": c,
        "fleet_rps": round(statistics.median(fleet), 1),
        "round_robin_rps": round(statistics.median(rr), 1),
        "ratio": round(ratio, 2),
        "goal": ">= 1.3",
        "met": ratio >= 1.3,
    }


def _load_baseline(checkout: str) -> Any:
    """Import ``checkout``'s package as ``friendli_image_baseline``, beside this one.

    Its modules import each other relatively, so a renamed copy loads on its own and both
    clients can alternate in one process, under the same load.
    """
    target = tempfile.mkdtemp(prefix="fleet-bench-")
    shutil.copytree(
        os.path.join(checkout, "friendli_image"),
        os.path.join(target, "friendli_image_baseline"),
        ignore=shutil.ignore_patterns("_cli", "server", "__pycache__"),
    )
    sys.path.insert(0, target)
    return importlib.import_module("friendli_image_baseline")


async def _cpu_chunks(clients: dict[str, Any], n: int, chunk: int) -> dict[str, list[float]]:
    """CPU seconds per request of each client, over alternating chunks of requests."""
    samples: dict[str, list[float]] = {name: [] for name in clients}
    names = list(clients)
    for name in names:  # warm-up: connections, caches
        for i in range(200):
            await clients[name].container.image.generate(prompt=PROMPT, seed=i)
    for index in range(n // chunk):
        for name in names if index % 2 == 0 else reversed(names):
            image = clients[name].container.image
            started = time.process_time()
            for i in range(chunk):
                await image.generate(prompt=PROMPT, seed=i)
            samples[name].append((time.process_time() - started) / chunk)
    return samples


def cpu_part(n: int, baseline: str | None) -> dict[str, Any]:
    """Single-URL client CPU per request; with ``baseline``, against that checkout's.

    One server process serves both; the clients alternate in chunks of 250 requests in
    one process, so machine load drifts over both alike.
    """
    import friendli_image

    modules = {"this": friendli_image}
    if baseline:
        modules["baseline"] = _load_baseline(baseline)
    urls, processes = _start_servers([(4, 0.0)])

    async def run() -> dict[str, list[float]]:
        clients = {name: m.AsyncFriendli(server_url=urls[0]) for name, m in modules.items()}
        try:
            return await _cpu_chunks(clients, n, 250)
        finally:
            for client in clients.values():
                await client.close()

    try:
        samples = asyncio.run(run())
    finally:
        _stop(processes)
    report: dict[str, Any] = {"part": "cpu", "requests_per_client": n}
    for name, values in samples.items():
        report[f"{name}_us_per_request"] = round(statistics.median(values) * 1e6, 1)
    if baseline:
        # Paired: each chunk against the other client's chunk next to it in time.
        ratios = [a / b for a, b in zip(samples["this"], samples["baseline"], strict=True)]
        ratio = statistics.median(ratios)
        report["ratio"] = round(ratio, 3)
        report["goal"] = "within 3 %"
        report["met"] = abs(ratio - 1) <= 0.03
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("fleet", "cpu", "all"), default="all")
    parser.add_argument("--n", type=int, default=1000, help="fleet requests per run")
    parser.add_argument("--c", type=int, default=64, help="fleet concurrency")
    parser.add_argument("--repeats", type=int, default=3, help="fleet runs per client")
    parser.add_argument("--cpu-n", type=int, default=5000, help="single-URL requests per run")
    parser.add_argument(
        "--baseline", default=None, metavar="DIR", help="cpu part: a checkout to compare with"
    )
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(_HERE))
    if args.part in ("cpu", "all"):
        print(json.dumps(cpu_part(args.cpu_n, args.baseline)), flush=True)
    if args.part in ("fleet", "all"):
        print(json.dumps(fleet_part(args.n, args.c, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
