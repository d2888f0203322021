"""Client CPU, memory and resume time of each batch output format, with the server stubbed.

    python benchmarks/dataset_formats.py [--n 100000] [--size 256] [--formats ...]
                                         [--location memory]

Each format runs in a fresh process (so peak RSS is its own): ``generate_batch`` of N
distinct tiny images through the batch engine and the output store, on a stub request
path (the package's private `RequestPath`) that answers every call with one prebuilt
result after one loop iteration, so the CPU is the engine's and the store's alone, not
HTTP's. ``none`` keeps no out_dir (items carry the bytes and are dropped as they come).
Then the same batch again into the finished location: everything resumes, nothing is
sent; its wall time is the resume time. Prints one JSON line per format.
``--location memory`` writes to fsspec's ``memory://`` instead of a local directory: the
object-store path (one PUT per image or shard, the manifest written at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from friendli_image import AsyncFriendli, ImageResult


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stub(size: int) -> Any:
    from friendli_image._request_path import RequestPath
    from friendli_image._resources import Image

    result = ImageResult(data=b"\xff\xd8\xff\xe0" + bytes(size - 4))
    client = AsyncFriendli(server_url="http://127.0.0.1:9", token="")

    async def send(path: str, model: object, options: object, gate: Any) -> ImageResult:
        ticket = await gate.acquire()
        await asyncio.sleep(0)
        gate.release(ticket, "ok")
        return result

    image = Image(RequestPath(send=send, resolve=client._resolve))  # type: ignore[arg-type]
    return SimpleNamespace(container=SimpleNamespace(image=image))


async def _run(stub: Any, n: int, out: Path | str | None, output_format: str) -> dict[str, int]:
    specs = ({"prompt": "a lighthouse at dawn", "seed": i} for i in range(n))
    options: dict[str, Any] = {"concurrency": 64, "total": n}
    if out is not None:
        options.update(out_dir=out, output_format=output_format)
    counts = {"ok": 0, "resumed": 0, "failed": 0, "skipped": 0}
    async for item in stub.container.image.generate_batch(specs, **options):
        counts[item.status] += 1
    return counts


def _child(output_format: str, n: int, size: int, out: Path, location: str) -> None:
    stub = _stub(size)
    target: Path | str | None = None if output_format == "none" else out
    if target is not None and location == "memory":
        target = f"memory://friendli-bench/{output_format}"
    cpu0, wall0 = _cpu(), time.perf_counter()
    counts = asyncio.run(_run(stub, n, target, output_format))
    cpu, wall = _cpu() - cpu0, time.perf_counter() - wall0
    figures: dict[str, Any] = {
        "format": output_format,
        "n": n,
        "ok": counts["ok"],
        "cpu_us_per_item": round(cpu / n * 1e6, 1),
        "wall_s": round(wall, 2),
    }
    if target is not None:
        cpu0, wall0 = _cpu(), time.perf_counter()
        again = asyncio.run(_run(stub, n, target, output_format))
        figures["resumed"] = again["resumed"]
        figures["resume_wall_s"] = round(time.perf_counter() - wall0, 2)
        figures["resume_cpu_us_per_item"] = round((_cpu() - cpu0) / n * 1e6, 1)
        if isinstance(target, Path):
            figures["files_in_out_dir"] = sum(1 for _ in target.iterdir())
        else:
            import fsspec  # only the memory location needs it

            figures["files_in_out_dir"] = len(fsspec.filesystem("memory").ls(target))
        figures["location"] = location
    figures["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(figures), flush=True)


def main() -> None:
    """Run each format in its own process and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="items (default 100000)")
    parser.add_argument("--size", type=int, default=256, help="image bytes (default 256)")
    parser.add_argument(
        "--formats",
        nargs="+",
        default=["none", "files", "webdataset", "parquet"],
        choices=["none", "files", "webdataset", "parquet"],
    )
    parser.add_argument(
        "--location",
        choices=["local", "memory"],
        default="local",
        help="a local directory (default), or fsspec's memory:// (the object-store path)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.n, args.size, Path(args.out), args.location)
        return
    for output_format in args.formats:
        out = Path(tempfile.mkdtemp(prefix=f"friendli-{output_format}-"))
        try:
            subprocess.run(
                [sys.executable, __file__, "--child", output_format, "--out", str(out / "out"),
                 "--n", str(args.n), "--size", str(args.size), "--location", args.location],
                check=True,
            )  # fmt: skip
        finally:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
