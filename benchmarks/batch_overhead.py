"""The per-item cost of a batch: ``generate_batch`` against ``asyncio.gather`` of single calls.

    python benchmarks/batch_overhead.py [--n 3000] [--c 64] [--size 65536] [--rounds 6]

Both run in this one process on one `AsyncFriendli` (pool size C), against
``benchmarks/server.py``'s static server in its own process. Rounds alternate (gather,
batch, batch, gather, ...) so drift on a shared machine hits both alike; each round
reports throughput and this process's CPU (user + sys, ``getrusage``) per item. The
summary is the median of the per-pair ratios (batch / gather) and their spread. With
``--profile FILE`` the batch rounds alone are run under cProfile instead; ``--only batch``
(or ``gather``) runs one of them alone, to be sampled by py-spy. ``--stub`` measures the
engines alone, without a server: both run on a stub request path (the package's private
`RequestPath`) that answers every call with one prebuilt result after one loop iteration,
so CPU per item is the fan-out machinery only (gather's semaphore and tasks against the
batch's dispatch, request ids, gate and items).

``--files DIR`` compares ``generate_batch`` without ``out_dir`` against the same batch
writing each round to a fresh ``output_format="files"`` location under DIR (PERFORMANCE.md
target 13), in this one process: rounds alternate as above, and each round also prints
the system time per item (mostly the kernel creating image files). The locations are
removed only when every round is done: on ext4 without a journal, images deleted in the
last 5 minutes slow every file created next to them (see ``dataset_formats.py``). On
tmpfs it is the other way round: each file costs the kernel twice as much once a few
hundred thousand others are kept, so there each round's location is removed after the
round (outside its measured CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from friendli_image import AsyncFriendli

PROMPT = "a lighthouse at dawn, volumetric light, 35mm"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sys() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


async def _gather(client: AsyncFriendli, n: int, c: int, size: int) -> None:
    generate = client.container.image.generate
    slots = asyncio.Semaphore(c)

    async def one(i: int) -> None:
        async with slots:
            result = await generate(prompt=PROMPT, seed=i)
        if len(result.data) != size:
            raise RuntimeError("wrong image size")

    await asyncio.gather(*(one(i) for i in range(n)))


async def _batch(client: AsyncFriendli, n: int, c: int, size: int) -> None:
    specs = [{"prompt": PROMPT, "seed": i} for i in range(n)]
    async for item in client.container.image.generate_batch(specs, concurrency=c):
        if item.result is None or len(item.result.data) != size:
            raise RuntimeError(f"batch item failed: {item!r}")


async def _files(client: AsyncFriendli, n: int, c: int, out: Path, start: int) -> None:
    specs = [{"prompt": PROMPT, "seed": start + i} for i in range(n)]
    batch = client.container.image.generate_batch(specs, concurrency=c, out_dir=out)
    async for item in batch:
        if item.status != "ok":
            raise RuntimeError(f"batch item failed: {item!r}")


def _file_system(path: Path) -> str:
    """The type of the file system ``path`` is on (Linux's mount table), "" if unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    best, kind = "", ""
    for line in mounts:
        _device, point, fs_type, *_rest = line.split()
        if str(path).startswith(point.rstrip("/") + "/") and len(point) > len(best):
            best, kind = point, fs_type
    return kind


async def _files_main(client: AsyncFriendli, args: argparse.Namespace) -> None:
    """Rounds of batch without out_dir against batch to a fresh files location."""
    root = Path(tempfile.mkdtemp(prefix="friendli-files-", dir=args.files))
    tmpfs = _file_system(root) == "tmpfs"
    try:
        pairs: list[tuple[float, float]] = []
        for r in range(args.rounds):
            figures: dict[str, tuple[float, float]] = {}
            for kind in ("batch", "files") if r % 2 == 0 else ("files", "batch"):
                cpu0, sys0 = _cpu(), _sys()
                if kind == "files":
                    await _files(client, args.n, args.c, root / str(r), r * args.n)
                else:
                    await _batch(client, args.n, args.c, args.size)
                figures[kind] = ((_cpu() - cpu0) / args.n * 1e6, (_sys() - sys0) / args.n * 1e6)
                if kind == "files" and tmpfs:
                    shutil.rmtree(root / str(r))
            b, f = figures["batch"], figures["files"]
            pairs.append((b[0], f[0]))
            print(
                f"round {r}: batch {b[0]:6.0f} us/item (sys {b[1]:4.0f}) | files {f[0]:6.0f} "
                f"us/item (sys {f[1]:4.0f}) | cpu {f[0] / b[0]:.3f}x",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratios = sorted(f / b for b, f in pairs)
    print(
        f"files/no out_dir: CPU per item median {statistics.median(ratios):.3f}x "
        f"(range {ratios[0]:.3f}-{ratios[-1]:.3f}); no out_dir "
        f"{statistics.median(b for b, _ in pairs):.0f} us/item, files "
        f"{statistics.median(f for _, f in pairs):.0f} us/item"
    )


async def _round(
    kind: str, client: AsyncFriendli, n: int, c: int, size: int
) -> tuple[float, float]:
    run = _batch if kind == "batch" else _gather
    cpu0, wall0 = _cpu(), time.perf_counter()
    await run(client, n, c, size)
    wall, cpu = time.perf_counter() - wall0, _cpu() - cpu0
    return n / wall, cpu / n * 1e6


async def _main(url: str, args: argparse.Namespace) -> None:
    async with AsyncFriendli(server_url=url, token="", max_connections=args.c) as client:
        await _gather(client, args.c * 4, args.c, args.size)  # warm up: open the pool
        if args.files:
            await _files_main(client, args)
            return
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.rounds):
                await _batch(client, args.n, args.c, args.size)
            profiler.disable()
            profiler.dump_stats(args.profile)
            return
        if args.only:
            for r in range(args.rounds):
                rps, cpu = await _round(args.only, client, args.n, args.c, args.size)
                print(f"round {r}: {args.only} {rps:7.0f} rps {cpu:6.0f} us/item", flush=True)
            return
        pairs: list[tuple[tuple[float, float], tuple[float, float]]] = []
        for r in range(args.rounds):
            order = ("gather", "batch") if r % 2 == 0 else ("batch", "gather")
            figures = {
                kind: await _round(kind, client, args.n, args.c, args.size) for kind in order
            }
            pairs.append((figures["gather"], figures["batch"]))
            g, b = figures["gather"], figures["batch"]
            print(
                f"round {r}: gather {g[0]:7.0f} rps {g[1]:6.0f} us/item | "
                f"batch {b[0]:7.0f} rps {b[1]:6.0f} us/item | "
                f"rps {b[0] / g[0]:.3f}x cpu {b[1] / g[1]:.3f}x",
                flush=True,
            )
        rps = sorted(b[0] / g[0] for g, b in pairs)
        cpu = sorted(b[1] / g[1] for g, b in pairs)
        print(
            f"batch/gather: throughput median {statistics.median(rps):.3f}x "
            f"(range {rps[0]:.3f}-{rps[-1]:.3f}); CPU per item median "
            f"{statistics.median(cpu):.3f}x (range {cpu[0]:.3f}-{cpu[-1]:.3f}); "
            f"gather {statistics.median(g[1] for g, _ in pairs):.0f} us/item, "
            f"batch {statistics.median(b[1] for _, b in pairs):.0f} us/item"
        )


async def _stub_main(args: argparse.Namespace) -> None:
    from friendli_image import ImageResult
    from friendli_image._request_path import RequestPath
    from friendli_image._resources import Image

    result = ImageResult(data=b"\xff\xd8\xff\xe0" + bytes(args.size))
    client = AsyncFriendli(server_url="http://127.0.0.1:9", token="")

    async def send(path: str, model: object, options: object, gate: Any) -> ImageResult:
        ticket = None if gate is None else await gate.acquire()
        await asyncio.sleep(0)
        if gate is not None:
            gate.release(ticket, "ok")
        return result

    image = Image(RequestPath(send=send, resolve=client._resolve))  # type: ignore[arg-type]
    stub = SimpleNamespace(container=SimpleNamespace(image=image))
    size = len(result.data)
    ratios = []
    costs: dict[str, list[float]] = {"gather": [], "batch": []}
    for r in range(args.rounds):
        figures = {}
        for kind in ("gather", "batch") if r % 2 == 0 else ("batch", "gather"):
            run = _batch if kind == "batch" else _gather
            cpu0 = _cpu()
            await run(stub, args.n, args.c, size)  # type: ignore[arg-type]
            figures[kind] = (_cpu() - cpu0) / args.n * 1e6
            costs[kind].append(figures[kind])
        ratios.append(figures["batch"] / figures["gather"])
        print(
            f"round {r}: gather {figures['gather']:5.1f} us/item, batch "
            f"{figures['batch']:5.1f} us/item ({ratios[-1]:.3f}x)",
            flush=True,
        )
    ratios.sort()
    print(
        f"stub: gather {statistics.median(costs['gather']):.1f} us/item, batch "
        f"{statistics.median(costs['batch']):.1f} us/item; batch/gather CPU per item "
        f"median {statistics.median(ratios):.3f}x (range {ratios[0]:.3f}-{ratios[-1]:.3f})"
    )


def main() -> None:
    """Start the server, run the interleaved rounds, print each and the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="items per round (default 3000)")
    parser.add_argument("--c", type=int, default=64, help="concurrency (default 64)")
    parser.add_argument("--size", type=int, default=65536, help="image bytes (default 64 KiB)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per client (default 6)")
    parser.add_argument("--bundled", action="store_true", help="serve with friendli_image.server")
    parser.add_argument("--profile", help="cProfile the batch rounds into this file instead")
    parser.add_argument(
        "--only", choices=("batch", "gather"), help="run one of them alone (e.g. under py-spy)"
    )
    parser.add_argument("--stub", action="store_true", help="the engines alone, no server")
    parser.add_argument(
        "--files", metavar="DIR", help="batch without out_dir against batch to files under DIR"
    )
    args = parser.parse_args()
    if args.stub:
        asyncio.run(_stub_main(args))
        return
    command = [sys.executable, str(Path(__file__).with_name("server.py")), "--size", str(args.size)]
    if args.bundled:
        command.append("--bundled")
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        asyncio.run(_main(f"http://127.0.0.1:{port}", args))
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
