"""Fleet benchmark: the issue-25 table (ideal, ours, ours hand-set, round-robin) and the
single-URL cost.

Run as ``python benchmarks/fleet.py`` (both parts) or with ``--part table`` / ``--part cpu``.

- **table**: 4 bundled servers on loopback, each in its own process, with 1, 1, 2 and 4
  GPU slots at 200 ms per image (``max_concurrency`` and ``step_latency_ms``), in three
  scenarios: *steady*; *slow*, the 4-slot server 5x slower (1 s per image); *kill*, the
  4-slot server killed 3 s into the run and back 3 s later. Each scheduler runs the same
  requests at C = the fleet's slots (8) and C = 2x (16), one run each:

  - *ideal*: one queue, one worker per slot, which knows the slots (one single-URL client
    per server; a slot's worker takes the next request when it is free);
  - *ours*: ``AsyncFriendli(server_url=[4 URLs])`` and ``generate_batch``, nothing set;
  - *ours, hand-set*: the same with ``Endpoint(url, weight=slots, max_connections=slots)``;
  - *round-robin*: one client per server, requests dealt round-robin, C/4 each.

  Reported per row: images/s, its ratio to the ideal's in the same scenario and C, and
  the p50 *server latency* (send to answer: time in a server's queue and slot, not the
  time a request waits in the client for a free slot). In *kill*, also how long after
  the server came back it completed its first request, and how many calls failed.
  One JSON object on stdout, each row and a Markdown table on stderr.
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
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

PROMPT = "a lighthouse at dawn"
_HERE = os.path.dirname(os.path.abspath(__file__))
SLOTS = (1, 1, 2, 4)
SERVICE_S = 0.2
STEPS = 4
Kill = tuple[float, float] | None
#: name -> each server's seconds per image, and (seconds in, seconds down) of the last one.
SCENARIOS: dict[str, tuple[tuple[float, ...], Kill]] = {
    "steady": ((SERVICE_S,) * 4, None),
    "slow": ((SERVICE_S, SERVICE_S, SERVICE_S, 5 * SERVICE_S), None),
    "kill": ((SERVICE_S,) * 4, (3.0, 3.0)),
}


def _tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _serve(port_queue: Any, control: Any, slots: int, step_ms: float) -> None:
    from friendli_image.server import LocalServer, ServerConfig

    async def serve() -> None:
        config = ServerConfig(
            static_image=_tiny_png(),
            max_concurrency=slots,
            step_latency_ms=step_ms,
            record_requests=False,
        )
        loop = asyncio.get_running_loop()
        async with LocalServer(config) as server:
            port_queue.put(server.url)
            while True:  # commands: ("restart", seconds down), or None to stop
                command = await loop.run_in_executor(None, control.recv)
                if command is None:
                    return
                await server.restart(down_for_s=command[1])
                control.send("back")

    asyncio.run(serve())


class _Servers:
    """Server processes, one per (slots, step_ms), each with a control pipe."""

    def __init__(self, specs: Sequence[tuple[int, float]]) -> None:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        self.processes: list[Any] = []
        self.controls: list[Any] = []
        self.urls: list[str] = []
        for slots, step_ms in specs:
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_serve, args=(queue, theirs, slots, step_ms), daemon=True
            )
            process.start()
            self.processes.append(process)
            self.controls.append(ours)
            self.urls.append(queue.get(timeout=30))

    def restart(self, index: int, down_for_s: float) -> None:
        """Kill server ``index`` now and bring it back after ``down_for_s`` (blocking)."""
        self.controls[index].send(("restart", down_for_s))
        self.controls[index].recv()

    def stop(self) -> None:
        for control in self.controls:
            control.send(None)
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)


def _request(i: int) -> dict[str, Any]:
    return {"prompt": PROMPT, "seed": i, "num_inference_steps": STEPS}


class _Run:
    """What a scheduler did in one run."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.failed = 0
        self.done = 0
        self.elapsed = 0.0
        self.marks: dict[str, float] = {}
        self.revived_after: float | None = None  # back -> first completion there

    def served_by_last(self) -> None:
        """Server 3 completed a request: note when, the first time after it came back."""
        if "back" in self.marks and self.revived_after is None:
            self.revived_after = time.monotonic() - self.marks["back"]


async def _kill_later(servers: _Servers, kill: Kill, run: _Run) -> None:
    if kill is None:
        return
    await asyncio.sleep(kill[0])
    await asyncio.get_running_loop().run_in_executor(None, servers.restart, 3, kill[1])
    run.marks["back"] = time.monotonic()


async def _ideal(servers: _Servers, n: int, c: int, kill: Kill) -> _Run:
    """One queue, one worker per slot; a worker of a dead server puts its request back."""
    from friendli_image import AsyncFriendli, RetryConfig

    run = _Run()
    once = RetryConfig(max_attempts=1)
    clients = [AsyncFriendli(server_url=url, retries=once) for url in servers.urls]
    queue: asyncio.Queue[tuple[int, asyncio.Future[None]]] = asyncio.Queue()
    try:
        for client in clients:  # connections up before the clock starts
            await client.container.image.generate(**_request(n + 1))

        async def slot(index: int) -> None:
            image = clients[index].container.image
            while True:
                item, done = await queue.get()
                started = time.monotonic()
                try:
                    await image.generate(**_request(item))
                except Exception:
                    queue.put_nowait((item, done))
                    await asyncio.sleep(0.05)
                    continue
                run.latencies.append(time.monotonic() - started)
                if index == len(clients) - 1:
                    run.served_by_last()
                done.set_result(None)

        items = iter(range(n))

        async def client_worker() -> None:
            for item in items:
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                queue.put_nowait((item, done))
                await done

        workers = [
            asyncio.ensure_future(slot(index))
            for index, slots in enumerate(SLOTS)
            for _ in range(slots)
        ]
        chaos = asyncio.ensure_future(_kill_later(servers, kill, run))
        started = time.monotonic()
        await asyncio.gather(*(client_worker() for _ in range(c)))
        run.elapsed = time.monotonic() - started
        run.done = n
        await chaos
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    finally:
        for client in clients:
            await client.close()
    return run


async def _ours(servers: _Servers, n: int, c: int, kill: Kill, *, hand_set: bool) -> _Run:
    from friendli_image import AsyncFriendli, BatchProgress, Endpoint

    run = _Run()
    urls: list[str | Endpoint] = list(servers.urls)
    if hand_set:
        urls = [
            Endpoint(url, weight=slots, max_connections=slots)
            for url, slots in zip(servers.urls, SLOTS, strict=True)
        ]
    async with AsyncFriendli(server_url=urls) as client:
        await client.container.image.generate(**_request(n + 1))
        chaos = asyncio.ensure_future(_kill_later(servers, kill, run))
        started = time.monotonic()

        def progress(state: BatchProgress) -> None:
            if "back" in run.marks:
                served = state.endpoints[-1].successes
                if served > run.marks.setdefault("served_at_back", served):
                    run.served_by_last()

        result = await client.container.image.generate_batch(
            [_request(i) for i in range(n)], concurrency=c, on_progress=progress
        ).collect()
        run.elapsed = time.monotonic() - started
        await chaos
        run.failed = len(result.failed)
        run.done = len(result.succeeded)
        fleet = client._fleet  # the attempts' own latencies: send to answer
        assert fleet is not None
        run.latencies = [x for endpoint in fleet.endpoints for x in endpoint.latencies]
    return run


async def _round_robin(servers: _Servers, n: int, c: int, kill: Kill) -> _Run:
    from friendli_image import AsyncFriendli

    run = _Run()
    clients = [AsyncFriendli(server_url=url) for url in servers.urls]
    try:
        for client in clients:
            await client.container.image.generate(**_request(n + 1))
        shares = [list(range(i, n, len(clients))) for i in range(len(clients))]

        async def worker(index: int, items: list[int]) -> None:
            image = clients[index].container.image
            while items:
                item = items.pop()
                started = time.monotonic()
                try:
                    await image.generate(**_request(item))
                except Exception:
                    run.failed += 1
                    continue
                run.latencies.append(time.monotonic() - started)
                if index == len(clients) - 1:
                    run.served_by_last()

        per_client = max(1, c // len(clients))
        chaos = asyncio.ensure_future(_kill_later(servers, kill, run))
        started = time.monotonic()
        await asyncio.gather(
            *(worker(i, share) for i, share in enumerate(shares) for _ in range(per_client))
        )
        run.elapsed = time.monotonic() - started
        run.done = n - run.failed
        await chaos
    finally:
        for client in clients:
            await client.close()
    return run


async def _ours_default(servers: _Servers, n: int, c: int, kill: Kill) -> _Run:
    return await _ours(servers, n, c, kill, hand_set=False)


async def _ours_hand_set(servers: _Servers, n: int, c: int, kill: Kill) -> _Run:
    return await _ours(servers, n, c, kill, hand_set=True)


SCHEDULERS: dict[str, Callable[[_Servers, int, int, Kill], Coroutine[Any, Any, _Run]]] = {
    "ideal": _ideal,
    "ours, nothing configured": _ours_default,
    "ours, hand-set to the slots": _ours_hand_set,
    "round-robin": _round_robin,
}


def table_part(n: int, concurrencies: Sequence[int], scenarios: Sequence[str]) -> dict[str, Any]:
    """The issue-25 table: each scheduler, scenario and C once, ratios to the ideal."""
    rows: list[dict[str, Any]] = []
    for scenario in scenarios:
        services, kill = SCENARIOS[scenario]
        servers = _Servers(
            [(slots, s * 1000 / STEPS) for slots, s in zip(SLOTS, services, strict=True)]
        )
        try:
            for c in concurrencies:
                ideal = 0.0
                for name, scheduler in SCHEDULERS.items():
                    run = asyncio.run(scheduler(servers, n, c, kill))
                    rps = run.done / run.elapsed
                    ideal = ideal or rps
                    row: dict[str, Any] = {
                        "scenario": scenario,
                        "scheduler": name,
                        "c": c,
                        "images_per_s": round(rps, 1),
                        "share_of_ideal": round(rps / ideal, 3),
                        "p50_latency_ms": round(statistics.median(run.latencies) * 1000),
                        "failed": run.failed,
                    }
                    if kill is not None:
                        after = run.revived_after
                        row["revived_serves_after_s"] = None if after is None else round(after, 2)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            servers.stop()
    return {
        "part": "table",
        "slots": ":".join(map(str, SLOTS)),
        "service_ms": SERVICE_S * 1000,
        "n": n,
        "rows": rows,
    }


def markdown(table: dict[str, Any]) -> str:
    """The table as the fleet guide (docs/guides/fleet.md) shows it."""
    lines = [
        "| scenario | scheduler | C | share of the ideal | p50 server latency | failed "
        "| revived server's first image |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in table["rows"]:
        revived = row.get("revived_serves_after_s", "")
        revived = "never" if revived is None else (f"{revived} s" if revived != "" else "")
        lines.append(
            f"| {row['scenario']} | {row['scheduler']} | {row['c']} | "
            f"{row['share_of_ideal']:.2f} | {row['p50_latency_ms']} ms | {row['failed']} "
            f"| {revived} |"
        )
    return "\n".join(lines)


def _load_baseline(checkout: str) -> Any:
    """Import ``checkout``'s package as ``friendli_image_baseline``, beside this one.

    The copy's imports of the package are renamed with it, so it loads on its own and both
    clients can alternate in one process, under the same load.
    """
    target = tempfile.mkdtemp(prefix="fleet-bench-")
    copy = os.path.join(target, "friendli_image_baseline")
    shutil.copytree(
        os.path.join(checkout, "friendli_image"),
        copy,
        ignore=shutil.ignore_patterns("_cli", "server", "__pycache__"),
    )
    # Subpackages (the transport) import the package's modules by absolute name: point
    # those at the copy too, or the baseline would run half on this checkout's code.
    for folder, _dirs, files in os.walk(copy):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as source:
                    text = source.read()
                text = text.replace("from friendli_image.", "from friendli_image_baseline.")
                with open(path, "w", encoding="utf-8") as source:
                    source.write(text)
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
    servers = _Servers([(4, 0.0)])
    urls = servers.urls

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
        servers.stop()
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
    parser.add_argument("--part", choices=("table", "cpu", "all"), default="all")
    parser.add_argument("--n", type=int, default=400, help="requests per table run")
    parser.add_argument("--c", type=int, nargs="+", default=[8, 16], help="table concurrencies")
    parser.add_argument("--scenarios", nargs="+", choices=tuple(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--cpu-n", type=int, default=5000, help="single-URL requests per run")
    parser.add_argument(
        "--baseline", default=None, metavar="DIR", help="cpu part: a checkout to compare with"
    )
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(_HERE))
    if args.part in ("cpu", "all"):
        print(json.dumps(cpu_part(args.cpu_n, args.baseline)), flush=True)
    if args.part in ("table", "all"):
        table = table_part(args.n, args.c, args.scenarios)
        print(json.dumps(table), flush=True)
        print(markdown(table), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
