"""What telemetry costs a call: client CPU per request with each telemetry setup, side by side.

    python benchmarks/telemetry_overhead.py [--n 2000] [--c 16] [--size 65536] [--rounds 5]
                                            [--base main]

One run measures, against ``benchmarks/server.py``'s static server in its own process:

- ``base``: the package as it is at ``--base`` (a git ref, exported with ``git archive``):
  the client before telemetry existed (skipped without ``--base``);
- ``off``: this package with OpenTelemetry not importable (the ``otel`` extra not installed);
- ``api``: OpenTelemetry's API importable but no provider set (installed, not configured);
- ``hooks``: no OpenTelemetry, one no-op `Hooks` callback on every response;
- ``sdk``: the OpenTelemetry SDK's providers set, spans to an in-memory exporter (simple,
  synchronous processor) and metrics to an in-memory reader.

Each cell is a fresh worker process that makes ``--n`` calls (``--c`` at a time, after a
warm-up) on one `AsyncFriendli` and reports its own CPU (user + sys, ``getrusage``) per
call. Rounds run the setups in turn (each round in another order), so drift on a shared
machine hits them alike; the summary is each setup's median, and its ratio to ``off``
and to ``base``.

Whole calls cost a few hundred µs and vary by more than the few µs at stake on a busy
machine, so the run also times what the retry loop adds when nothing listens, alone:
the call to ``Instrumentation.start`` that returns None, without OpenTelemetry (``off``)
and with the API but no provider (``api``), in ns per call (best of 7 timeit repeats).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

SETUPS = ("base", "off", "api", "hooks", "sdk")
ROOT = Path(__file__).resolve().parent.parent


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(setup: str, url: str, n: int, c: int, warmup: int) -> None:
    if setup in {"off", "hooks", "base"}:
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
    from friendli_image import AsyncFriendli

    options: dict[str, object] = {}
    if setup == "hooks":
        from friendli_image import Hooks

        options["hooks"] = Hooks(on_response=lambda _event: None)
    if setup == "sdk":
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))

    async def run() -> float:
        async with AsyncFriendli(server_url=url, max_connections=c, **options) as client:
            generate = client.container.image.generate
            slots = asyncio.Semaphore(c)

            async def one(i: int) -> None:
                async with slots:
                    await generate(prompt="a lighthouse at dawn", seed=i)

            await asyncio.gather(*(one(i) for i in range(warmup)))
            before = _cpu()
            await asyncio.gather(*(one(i) for i in range(n)))
            return (_cpu() - before) / n

    print(f"{asyncio.run(run()) * 1e6:.2f}")


def _micro(setup: str) -> None:
    """ns per ``Instrumentation.start`` that finds nobody listening."""
    if setup == "off":
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
    import logging
    import timeit

    from friendli_image import GenerateRequest
    from friendli_image._telemetry import Instrumentation

    watch = Instrumentation(None, None, logging.getLogger("bench"))
    request = GenerateRequest(prompt="p")
    if watch.start(request, "id") is not None:
        raise RuntimeError("something listens")
    number = 200_000
    best = min(timeit.repeat(lambda: watch.start(request, "id"), number=number, repeat=7))
    print(f"{best / number * 1e9:.0f}")


def _export(ref: str, into: Path) -> Path:
    """The package at git ``ref``, unpacked under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "friendli_image"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    """Parse the command line, start the server, run the rounds, print the summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--c", type=int, default=16)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--base", help="a git ref to measure as 'base' (e.g. main)")
    parser.add_argument("--worker", choices=SETUPS, help=argparse.SUPPRESS)
    parser.add_argument("--micro", choices=("off", "api"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.micro:
        _micro(args.micro)
        return
    if args.worker:
        _worker(args.worker, args.url, args.n, args.c, args.warmup)
        return
    setups = [setup for setup in SETUPS if setup != "base" or args.base]
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("server.py")), "--size", str(args.size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    results: dict[str, list[float]] = {setup: [] for setup in setups}
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{int(server.stdout.readline().split()[1])}"
        with tempfile.TemporaryDirectory() as scratch:
            base_path = _export(args.base, Path(scratch)) if args.base else None
            for round_number in range(args.rounds):
                shift = round_number % len(setups)
                for setup in setups[shift:] + setups[:shift]:
                    env = dict(os.environ)
                    if setup == "base" and base_path is not None:
                        env["PYTHONPATH"] = str(base_path)
                        env["PYTHONDONTWRITEBYTECODE"] = "1"
                    done = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--worker",
                            setup,
                            "--url",
                            url,
                            "--n",
                            str(args.n),
                            "--c",
                            str(args.c),
                            "--warmup",
                            str(args.warmup),
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                        env=env,
                        cwd=scratch if setup == "base" else None,
                    )
                    results[setup].append(float(done.stdout))
                print(
                    f"round {round_number + 1}: "
                    + "  ".join(f"{setup} {results[setup][-1]:.1f}" for setup in setups),
                    flush=True,
                )
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=10)
    medians = {setup: statistics.median(values) for setup, values in results.items()}
    print(f"\nclient CPU per call, median of {args.rounds} (n={args.n}, c={args.c}):")
    for setup in setups:
        line = (
            f"  {setup:6} {medians[setup]:8.1f} µs   vs off {medians[setup] / medians['off']:.3f}"
        )
        if "base" in medians:
            line += f"   vs base {medians[setup] / medians['base']:.3f}"
        print(line)
    print("\nwhat the retry loop adds per call when nothing listens (Instrumentation.start):")
    for setup in ("off", "api"):
        done = subprocess.run(
            [sys.executable, __file__, "--micro", setup], capture_output=True, text=True, check=True
        )
        nanos = float(done.stdout)
        share = nanos / 1000 / medians["off"] * 100
        print(f"  {setup:6} {nanos:8.0f} ns   = {share:.2f} % of off's CPU per call")


if __name__ == "__main__":
    main()
