"""Client CPU, memory and resume time of each batch output format.

    python benchmarks/dataset_formats.py [--n 10000] [--size 256] [--formats ...] [--http]
                                         [--location memory]

Each format runs in fresh processes (so peak RSS is each one's own):

- **write**: ``generate_batch`` of N distinct tiny images through the batch engine and
  the output store; client CPU (user + sys, every thread) per item, wall time, peak RSS
  (``VmHWM``). ``none`` keeps no out_dir (items carry the bytes and are dropped as they
  come).
- **resume**: the same N requests and ``--new`` more after them, into the finished
  location: everything resumes and only the new ones are sent. Its figures are the time
  from the call to the first new request (what a user waits before new work starts),
  the whole rerun's wall time, and the process's peak RSS.

By default the request path is a stub (the package's private `RequestPath`) that answers
every call with one prebuilt result after one loop iteration, so the CPU is the engine's
and the store's alone, not HTTP's. With ``--http`` the write runs use a real
`AsyncFriendli` against ``benchmarks/server.py`` (the static server, its own process),
the measure of PERFORMANCE.md target 13 (files at most 1.5x the CPU per item of no
out_dir); resume is measured on the stub either way (it sends nothing but the new items).

``--location memory`` writes to fsspec's ``memory://`` instead of a local directory: the
object-store path (one PUT per image or shard, the manifest written at the end). A
memory file system lives in its process only, so there the resume process first writes
the N items itself (unmeasured, but in its peak RSS).

``--repeats R`` runs the formats R times, the order reversed every other round, and
prints each round's CPU per item of each format against ``none`` with the median and
range of those ratios (PERFORMANCE.md target 13 is read from them).

Every location is kept until the last run ends, then removed. On ext4 without a journal
(this project's benchmark machine) the inode allocator steps, one by one, over every inode
of the group freed in the last 5 s, or in the last 5 minutes once the inode table block
holding it is dirty, which creating files next to it makes it: a ``files`` run writing
10,000 images after the previous run's were deleted paid 340-450 µs of system time per
image, against 70-120 µs with nothing deleted nearby. Deleting between runs would charge
each run for the one before.

Prints one JSON line per run and a table at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

from memory import rss_peak_mib  # the benchmarks' own module (this script's folder)

from friendli_image import AsyncFriendli, ImageResult

FORMATS = ("none", "files", "webdataset", "parquet")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sys() -> float:
    """The process's system time: the kernel's share, e.g. creating each image file."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


class _Stub:
    """A client whose request path answers at once, noting when it was first called."""

    def __init__(self, size: int) -> None:
        from friendli_image._request_path import RequestPath
        from friendli_image._resources import Image

        result = ImageResult(data=b"\xff\xd8\xff\xe0" + bytes(size - 4))
        self.first_send: float | None = None
        self._client = AsyncFriendli(server_url="http://127.0.0.1:9", token="")

        async def send(path: str, model: object, options: object, gate: Any) -> ImageResult:
            if self.first_send is None:
                self.first_send = time.perf_counter()
            ticket = await gate.acquire()
            await asyncio.sleep(0)
            gate.release(ticket, "ok")
            return result

        path = RequestPath(send=send, resolve=self._client._resolve)
        self.container = SimpleNamespace(image=Image(path))


async def _run(
    client: Any, n: int, start: int, out: Path | str | None, output_format: str
) -> dict[str, int]:
    specs = ({"prompt": "a lighthouse at dawn", "seed": i} for i in range(start, n))
    options: dict[str, Any] = {"concurrency": 64, "total": n - start}
    if out is not None:
        options.update(out_dir=out, output_format=output_format)
    counts = {"ok": 0, "resumed": 0, "failed": 0, "skipped": 0}
    async for item in client.container.image.generate_batch(specs, **options):
        counts[item.status] += 1
    return counts


def _child(args: argparse.Namespace) -> None:
    output_format, out = args.format, Path(args.out)
    target: Path | str | None = None if output_format == "none" else out
    if target is not None and args.location == "memory":
        target = f"memory://friendli-bench/{output_format}"
    figures: dict[str, Any] = {
        "run": args.child,
        "format": output_format,
        "n": args.n,
        "location": args.location,
    }
    if args.child == "write":
        if args.url:
            counts, cpu0, sys0, wall0 = asyncio.run(
                _timed_http(args.url, args.n, target, output_format)
            )
        else:
            stub = _Stub(args.size)
            cpu0, sys0, wall0 = _cpu(), _sys(), time.perf_counter()
            counts = asyncio.run(_run(stub, args.n, 0, target, output_format))
        cpu, wall = _cpu() - cpu0, time.perf_counter() - wall0
        figures.update(
            http=bool(args.url),
            ok=counts["ok"],
            cpu_us_per_item=round(cpu / args.n * 1e6, 1),
            sys_us_per_item=round((_sys() - sys0) / args.n * 1e6, 1),
            wall_s=round(wall, 2),
        )
    else:
        stub = _Stub(args.size)
        total = args.n + args.new
        if isinstance(target, str):  # memory://: the write's process is gone with it
            asyncio.run(_run(stub, args.n, 0, target, output_format))
            stub.first_send = None
        cpu0, wall0 = _cpu(), time.perf_counter()
        counts = asyncio.run(_run(stub, total, 0, target, output_format))
        wall = time.perf_counter() - wall0
        first = None if stub.first_send is None else stub.first_send - wall0
        figures.update(
            new=args.new,
            resumed=counts["resumed"],
            sent=counts["ok"],
            first_new_request_s=None if first is None else round(first, 2),
            wall_s=round(wall, 2),
            cpu_us_per_item=round((_cpu() - cpu0) / total * 1e6, 1),
        )
    figures["peak_rss_mib"] = round(rss_peak_mib())
    print(json.dumps(figures), flush=True)


async def _timed_http(
    url: str, n: int, out: Path | str | None, output_format: str
) -> tuple[dict[str, int], float, float, float]:
    """The write through HTTP: counts, and the CPU, system time and wall clock after the
    warm-up."""
    async with AsyncFriendli(server_url=url, token="", max_connections=64) as client:
        await _run(client, 256, 0, None, "files")  # warm up: open the pool
        cpu0, sys0, wall0 = _cpu(), _sys(), time.perf_counter()
        return await _run(client, n, 0, out, output_format), cpu0, sys0, wall0


def _spawn(
    kind: str, output_format: str, out: Path, args: argparse.Namespace, url: str | None
) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--child", kind, "--format", output_format, "--out", str(out),
        "--n", str(args.n), "--size", str(args.size), "--new", str(args.new),
        "--location", args.location,
    ]  # fmt: skip
    if url:
        command += ["--url", url]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    line = done.stdout.strip().splitlines()[-1]
    print(line, flush=True)
    figures: dict[str, Any] = json.loads(line)
    return figures


def _table(rows: list[dict[str, Any]], n: int) -> str:
    lines = [
        f"| format (N = {n:,}) | write CPU us/item | write peak RSS MiB | resume: first new "
        "request s | resume wall s | resume peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        resume = row.get("resume") or {}
        lines.append(
            f"| {row['format']} | {row['write']['cpu_us_per_item']:,.1f} | "
            f"{row['write']['peak_rss_mib']:,} | {resume.get('first_new_request_s', '-')} | "
            f"{resume.get('wall_s', '-')} | {resume.get('peak_rss_mib', '-')} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run each format's write and resume in processes of their own; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="items (default 10000)")
    parser.add_argument("--size", type=int, default=256, help="image bytes (default 256)")
    parser.add_argument("--new", type=int, default=100, help="new items on resume (100)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--http", action="store_true", help="write through benchmarks/server.py")
    parser.add_argument("--no-resume", action="store_true", help="measure the writes only")
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds of every format, interleaved (default 1)"
    )
    parser.add_argument("--dir", help="where the locations go (default: a temporary folder)")
    parser.add_argument(
        "--location",
        choices=["local", "memory"],
        default="local",
        help="a local directory (default), or fsspec's memory:// (the object-store path)",
    )
    parser.add_argument("--child", choices=("write", "resume"), help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    server = None
    url = None
    if args.http:
        command = [sys.executable, str(Path(__file__).with_name("server.py")), "--size"]
        server = subprocess.Popen(
            [*command, str(args.size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert server.stdout is not None
        url = f"http://127.0.0.1:{int(server.stdout.readline().split()[1])}"
    rows = []
    ratios: dict[str, list[float]] = {}
    locations: list[Path] = []
    try:
        for round_number in range(args.repeats):
            order = args.formats if round_number % 2 == 0 else args.formats[::-1]
            cpu: dict[str, float] = {}
            for output_format in order:
                base = Path(tempfile.mkdtemp(prefix=f"friendli-{output_format}-", dir=args.dir))
                locations.append(base)
                row: dict[str, Any] = {"format": output_format, "round": round_number}
                row["write"] = _spawn("write", output_format, base / "out", args, url)
                cpu[output_format] = row["write"]["cpu_us_per_item"]
                if output_format != "none" and not args.no_resume:
                    row["resume"] = _spawn("resume", output_format, base / "out", args, None)
                rows.append(row)
            if "none" in cpu:
                for output_format, figure in cpu.items():
                    if output_format != "none":
                        ratios.setdefault(output_format, []).append(figure / cpu["none"])
                print(
                    f"round {round_number}: CPU per item / none: "
                    + ", ".join(f"{f} {r[-1]:.3f}" for f, r in ratios.items()),
                    flush=True,
                )
    finally:
        for base in locations:
            shutil.rmtree(base, ignore_errors=True)
        if server is not None:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(timeout=10)
    print(_table(rows, args.n))
    for output_format, values in ratios.items():
        values.sort()
        print(
            f"{output_format} / none, CPU per item: median {statistics.median(values):.3f} "
            f"(range {values[0]:.3f}-{values[-1]:.3f}, {len(values)} rounds)"
        )
    if os.environ.get("FRIENDLI_BENCH_JSON"):
        Path(os.environ["FRIENDLI_BENCH_JSON"]).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
