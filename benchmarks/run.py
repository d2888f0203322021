"""Run the whole benchmark and write ``RESULTS.md``, ``results.json`` and ``results.png``.

    python benchmarks/run.py                 # the full matrix (about 12 minutes on 2 cores)
    python benchmarks/run.py --quick --out-dir /tmp/bench   # seconds: the smoke test's run
    python benchmarks/run.py --fleet-only    # only the 4-endpoint fleet (target 10)
    nox -s bench                             # the full matrix with the official SDK installed

The server runs in its own process (``server.py``), and every cell (client x image size
x concurrency x repetition) in a fresh process of its own (``client.py``). Repetitions are
interleaved (A B C … A B C …, the order rotated each round) so that drift on a shared
machine hits every client alike; the tables show medians, and every ratio compares two
medians from this one run. Clients whose package is missing are skipped and listed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KiB, MiB = 1024, 1024 * 1024

LABELS = {
    "expert": "expert aiohttp",
    "raw_aiohttp": "raw aiohttp",
    "friendli": "AsyncFriendli",
    "friendli_batch": "generate_batch",
    "friendli_sync": "SyncFriendli",
    "official_async": "official async",
    "official_sync": "official sync",
}
FLEET_LABELS = {
    "fleet": "AsyncFriendli(server_url=[4 URLs])",
    "fleet_round_robin": "4 x AsyncFriendli, round-robin by hand",
    "fleet_one": "AsyncFriendli(server_url=[1 URL])",
    "friendli": "AsyncFriendli(server_url=URL)",
}
#: Clients several times slower than the rest run a fraction of N (rates stay comparable).
N_FACTOR = {"official_async": 0.25, "official_sync": 0.25}
#: The sync clients are measured sequentially (C=1) only: the thread-pool cases measure
#: the thread pool more than the client.
SEQUENTIAL_ONLY = {"friendli_sync", "official_sync"}
#: 16 MiB x C=64 holds several GiB per client; only the fastest clients run it.
BIG_FANOUT = {"expert", "friendli", "friendli_batch"}
#: The fleet: per-endpoint slots (capacity 1:1:2:4 at one service time per request).
FLEET_SLOTS = (2, 2, 4, 8)


class Plan:
    """The matrix: per image size, the concurrencies and the N of one cell."""

    def __init__(self, quick: bool, scale: float) -> None:
        if quick:
            self.sizes: dict[int, tuple[list[int], int]] = {64 * KiB: ([1, 4], 24)}
            self.repeats = 1
            self.big = (2 * MiB, 2)
            self.disk = (64 * KiB, 40, 8)
            self.import_runs = 1
            # (image size, C, N, service ms per request, N of the one-endpoint check)
            self.fleet = (64 * KiB, 8, 40, 5.0, 24)
        else:
            self.sizes = {
                64 * KiB: ([1, 16, 64, 256], 3000),
                MiB: ([1, 16, 32, 64, 256], 300),
                # 16 MiB x C=256 would hold over 10 GiB per client: not run.
                16 * MiB: ([1, 16, 64], 64),
            }
            # Cells of one client spread by up to ±40 % on a shared machine: the median
            # of five interleaved repetitions is what the ratios are read from.
            self.repeats = 5
            self.big = (40 * MiB, 8)
            self.disk = (MiB, 1000, 64)
            self.import_runs = 9
            self.fleet = (64 * KiB, 32, 1600, 20.0, 3000)
        for size, (cs, n) in self.sizes.items():
            self.sizes[size] = (cs, max(1, round(n * scale)))

    @staticmethod
    def runs(name: str, size: int, c: int) -> bool:
        """Whether the matrix has a cell for this client at this size and C."""
        if name in SEQUENTIAL_ONLY and c > 1:
            return False
        return not (size >= 16 * MiB and c > 16 and name not in BIG_FANOUT)


def size_label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


@contextlib.contextmanager
def server(
    python: str, size: int, bundled: bool, slots: int = 0, service_ms: float = 0.0
) -> Iterator[str]:
    """Start ``server.py`` for ``size`` and yield its URL; stop it on exit."""
    command = [python, str(HERE / "server.py"), "--size", str(size)]
    if bundled:
        command.append("--bundled")
    if slots:
        command += ["--slots", str(slots), "--service-ms", str(service_ms)]
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the benchmark server did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def fleet_servers(
    python: str, size: int, service_ms: float, slots: tuple[int, ...] = FLEET_SLOTS
) -> Iterator[list[str]]:
    """Start one minimal server per entry of ``slots`` and yield their URLs.

    Each serves ``slots[i]`` requests at a time for ``service_ms`` each, so their
    capacities stand as the slot counts do (1:1:2:4 by default): the fleet a
    load-balancing client must route by measured capacity, not evenly.
    """
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(server(python, size, False, k, service_ms)) for k in slots]


def run_json(command: list[str], timeout: float) -> dict[str, Any] | None:
    """Run a measuring subprocess; its JSON line, or None when it exits 3 (client missing)."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    for name in ("FRIENDLI_TOKEN", "FRIENDLI_SERVER_URL", "FRIENDLI_LOG"):
        env.pop(name, None)
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False
    )
    if done.returncode == 3:
        return None
    if done.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run_cells(args: argparse.Namespace, plan: Plan) -> tuple[list[dict[str, Any]], list[str]]:
    """Every client x size x C x repetition, interleaved; the raw rows and skipped clients."""
    rows: list[dict[str, Any]] = []
    skipped: set[str] = set()
    clients = list(args.clients)
    for size, (concurrencies, n) in plan.sizes.items():
        with server(args.python, size, args.bundled_server) as url:
            for c in concurrencies:
                for repeat in range(plan.repeats):
                    shift = repeat % len(clients)
                    for name in clients[shift:] + clients[:shift]:
                        if name in skipped or not plan.runs(name, size, c):
                            continue
                        cell_n = max(c, round(n * N_FACTOR.get(name, 1.0)))
                        command = [args.python, str(HERE / "client.py"), name, "--url", url]
                        command += ["--n", str(cell_n), "--c", str(c), "--size", str(size)]
                        started = time.perf_counter()
                        row = run_json(command, timeout=args.cell_timeout)
                        if row is None:
                            skipped.add(name)
                            print(f"skip {name}: not available in {args.python}", flush=True)
                            continue
                        row["repeat"] = repeat
                        rows.append(row)
                        print(
                            f"{size_label(size):>7} C={c:<3} #{repeat} {name:<15} "
                            f"{row['rps']:8.1f} rps {row['cpu_us']:9.0f} µs/req "
                            f"({time.perf_counter() - started:.1f} s)",
                            flush=True,
                        )
    return rows, sorted(skipped)


def run_fleet(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Target 10: four endpoints of capacity 1:1:2:4, the fleet client against hand-split
    round-robin, and the fleet client with one endpoint against today's single URL.

    The fleet client runs only where ``AsyncFriendli`` accepts a list for ``server_url``
    (``client.py`` exits 3 otherwise); then it is reported as not available.
    """
    size, c, n, service_ms, n_one = plan.fleet
    rows: list[dict[str, Any]] = []
    available = True

    def cell(name: str, url: str, cell_n: int, cell_c: int, *, repeat: int, case: str) -> bool:
        command = [args.python, str(HERE / "client.py"), name.removesuffix("_one"), "--url", url]
        command += ["--n", str(cell_n), "--c", str(cell_c), "--size", str(size)]
        row = run_json(command, timeout=args.cell_timeout)
        if row is None:
            print(f"fleet: {name} not available (server_url takes one URL only)", flush=True)
            return False
        row.update(client=name, repeat=repeat, case=case)
        rows.append(row)
        print(
            f"fleet {case:<9} #{repeat} {name:<18} {row['rps']:8.1f} rps "
            f"{row['cpu_us']:7.0f} µs/req",
            flush=True,
        )
        return True

    with fleet_servers(args.python, size, service_ms) as urls:
        joined = ",".join(urls)
        for repeat in range(plan.repeats):
            names = ["fleet_round_robin", "fleet"] if available else ["fleet_round_robin"]
            for name in names if repeat % 2 == 0 else names[::-1]:
                if not cell(name, joined, n, c, repeat=repeat, case="1:1:2:4"):
                    available = False
    if available:
        with server(args.python, size, args.bundled_server) as url:
            for repeat in range(plan.repeats):
                names = ["friendli", "fleet_one"]
                for name in names if repeat % 2 == 0 else names[::-1]:
                    cell(name, url, n_one, 64, repeat=repeat, case="one URL")
    return {
        "available": available,
        "size": size,
        "c": c,
        "service_ms": service_ms,
        "slots": list(FLEET_SLOTS),
        "rows": rows,
    }


def fleet_medians(fleet: dict[str, Any]) -> dict[tuple[str, str], dict[str, float]]:
    """Median figures per (case, client) of the fleet benchmark."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in fleet.get("rows", []):
        grouped.setdefault((row["case"], row["client"]), []).append(row)
    keys = ("rps", "p50_ms", "p99_ms", "cpu_us", "rss_mib", "n")
    return {
        key: {k: statistics.median(r[k] for r in group) for k in keys}
        for key, group in grouped.items()
    }


def medians(rows: list[dict[str, Any]]) -> dict[tuple[int, int, str], dict[str, float]]:
    """Median of every figure per (size, C, client)."""
    grouped: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["size"], row["c"], row["client"]), []).append(row)
    keys = ("rps", "p50_ms", "p99_ms", "cpu_us", "rss_mib", "n")
    return {
        key: {k: statistics.median(r[k] for r in group) for k in keys} | {"runs": len(group)}
        for key, group in grouped.items()
    }


def run_memory(args: argparse.Namespace, plan: Plan) -> list[dict[str, Any]]:
    """Target 5: big bodies (AsyncFriendli and raw aiohttp) and a batch to disk."""
    found: list[dict[str, Any]] = []
    size, c = plan.big
    with server(args.python, size, args.bundled_server) as url:
        for client in ("friendli", "raw_aiohttp"):
            command = [args.python, str(HERE / "memory.py"), "big", client, "--url", url]
            command += ["--size", str(size), "--c", str(c)]
            row = run_json(command, timeout=args.cell_timeout)
            assert row is not None
            found.append(row)
            print(f"memory big {client}: {row}", flush=True)
    size, n, c = plan.disk
    with server(args.python, size, args.bundled_server) as url, tempfile.TemporaryDirectory() as d:
        command = [args.python, str(HERE / "memory.py"), "disk", "--url", url, "--out", d]
        command += ["--size", str(size), "--n", str(n), "--c", str(c)]
        row = run_json(command, timeout=args.cell_timeout)
        assert row is not None
        found.append(row)
        print(f"memory disk: {row}", flush=True)
    return found


def import_times(python: str, runs: int) -> dict[str, float]:
    """Target 6: median wall time of ``import X`` in fresh interpreters, interleaved.

    Both packages are imported from bytecode, as installed packages are: aiohttp's was
    written when pip installed it, while an editable install under
    ``PYTHONDONTWRITEBYTECODE`` would compile friendli_image from source on every run.
    """
    code = "import time; t = time.perf_counter(); import {}; print(time.perf_counter() - t)"
    samples: dict[str, list[float]] = {"aiohttp": [], "friendli_image": []}
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    for module in samples:  # untimed: writes the bytecode a wheel install would have
        subprocess.run([python, "-c", f"import {module}"], check=True, cwd=ROOT, env=env)
    for _ in range(runs):
        for module, found in samples.items():
            done = subprocess.run(
                [python, "-c", code.format(module)],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
                env=env,
            )
            found.append(float(done.stdout) * 1000)
    return {module: statistics.median(found) for module, found in samples.items()}


# -- the report -----------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(python: str) -> dict[str, str]:
    """What ran the benchmark: CPU, cores, Python and library versions, the commit."""
    probe = (
        "import importlib.metadata as m, json, platform\n"
        "def v(p):\n"
        "    try: return m.version(p)\n"
        "    except m.PackageNotFoundError: return 'not installed'\n"
        "print(json.dumps({'python': platform.python_version(), **{p: v(p) for p in "
        "('friendli-image', 'aiohttp', 'orjson', 'pybase64', 'tenacity', 'friendli', "
        "'httpx', 'pydantic')}}))"
    )
    versions = json.loads(
        subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout
    )
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "os": f"{platform.system()} {platform.release()}",
        "commit": commit or "unknown",
        **versions,
    }


def _fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def tables(med: dict[tuple[int, int, str], dict[str, float]], clients: list[str]) -> list[str]:
    """One markdown table per image size."""
    lines: list[str] = []
    for size in sorted({k[0] for k in med}):
        lines += [
            f"### {size_label(size)} images",
            "",
            "| client | C | N | rps | rps xexpert | rps xraw | p50 ms | p99 ms | CPU µs/req "
            "| CPU xexpert | CPU xraw | peak RSS MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in sorted({k[1] for k in med if k[0] == size}):
            raw = med.get((size, c, "raw_aiohttp"))
            expert = med.get((size, c, "expert"))
            for name in clients:
                cell = med.get((size, c, name))
                if cell is None:
                    continue
                label = LABELS[name]
                if name in ("friendli_sync", "official_sync"):
                    label += " (sequential)" if c == 1 else " (thread pool)"
                lines.append(
                    f"| {label} | {c} | {int(cell['n'])} | {_fmt(cell['rps'])} "
                    f"| {_ratio(cell['rps'], expert and expert['rps'])} "
                    f"| {_ratio(cell['rps'], raw and raw['rps'])} "
                    f"| {_fmt(cell['p50_ms'], 1)} | {_fmt(cell['p99_ms'], 1)} "
                    f"| {_fmt(cell['cpu_us'])} "
                    f"| {_ratio(cell['cpu_us'], expert and expert['cpu_us'])} "
                    f"| {_ratio(cell['cpu_us'], raw and raw['cpu_us'])} "
                    f"| {_fmt(cell['rss_mib'])} |"
                )
        lines.append("")
    return lines


#: The clients of the ratio table, each against the expert in the same cell.
VERSUS_EXPERT = ("friendli", "friendli_batch", "friendli_sync", "raw_aiohttp", "official_async")


def paired_ratios(
    rows: list[dict[str, Any]], cell: tuple[int, int], name: str, base: str, key: str
) -> list[float]:
    """``name``'s figure over ``base``'s in each repetition of one cell (same round)."""
    found = {
        (row["client"], row["repeat"]): row[key]
        for row in rows
        if (row["size"], row["c"]) == cell and row["client"] in (name, base)
    }
    return [
        found[(name, repeat)] / found[(base, repeat)]
        for (client, repeat) in sorted(found)
        if client == name and (base, repeat) in found and found[(base, repeat)]
    ]


def _spread(ratios: list[float]) -> str:
    if not ratios:
        return "-"
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def expert_ratios(
    med: dict[tuple[int, int, str], dict[str, float]], rows: list[dict[str, Any]]
) -> list[str]:
    """rps and CPU per request of each client as a multiple of the expert's, per cell.

    Each ratio pairs a client's repetition with the expert's of the same round (the
    clients of a round run one after another); the median of those ratios is shown, and
    their range.
    """
    present = [name for name in VERSUS_EXPERT if any(k[2] == name for k in med)]
    lines = [
        "Each cell: the client's throughput and CPU per request as a multiple of the expert "
        "hand-written client's in the same round, the median of the rounds (range over the "
        "rounds): rps above 1 and CPU below 1 beat it. The sync client runs sequentially, "
        "so it has C=1 cells only.",
        "",
        "| image | C | expert rps | expert CPU µs/req | measure | "
        + " | ".join(LABELS[name] for name in present)
        + " |",
        "|---|---:|---:|---:|---|" + "---:|" * len(present),
    ]
    for size, c in sorted({(k[0], k[1]) for k in med}):
        expert = med.get((size, c, "expert"))
        if expert is None:
            continue
        for key, what in (("rps", "rps / expert"), ("cpu_us", "CPU / expert")):
            cells = [
                _spread(paired_ratios(rows, (size, c), name, "expert", key)) for name in present
            ]
            lead = (
                f"| {size_label(size)} | {c} | {_fmt(expert['rps'])} | {_fmt(expert['cpu_us'])} "
                if key == "rps"
                else "| | | | "
            )
            lines.append(lead + f"| {what} | " + " | ".join(cells) + " |")
    return lines


def fleet_section(fleet: dict[str, Any]) -> list[str]:
    """The fleet benchmark's table (target 10)."""
    if not fleet:
        return []
    slots = fleet["slots"]
    lines = [
        "## Fleet (target 10)",
        "",
        f"{len(slots)} minimal servers of {size_label(fleet['size'])} images serving "
        f"{':'.join(str(k) for k in slots)} requests at a time for {fleet['service_ms']:g} ms "
        f"each (capacity {':'.join(str(k // slots[0]) for k in slots)}, "
        f"{sum(1000 * k / fleet['service_ms'] for k in slots):,.0f} rps in all), "
        f"C={fleet['c']} from one client process. The baseline splits requests by hand: "
        "request i goes to the AsyncFriendli of endpoint i mod 4, so the slow endpoints "
        "bound it.",
        "",
    ]
    if not fleet["available"]:
        lines += [
            "The fleet client: **not available** (`AsyncFriendli` takes one `server_url` "
            "string in this version); only the baseline was measured.",
            "",
        ]
    lines += [
        "| case | client | N | rps | p50 ms | p99 ms | CPU µs/req |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (case, name), cell in sorted(fleet_medians(fleet).items()):
        lines.append(
            f"| {case} | {FLEET_LABELS[name]} | {int(cell['n'])} | {_fmt(cell['rps'])} "
            f"| {_fmt(cell['p50_ms'], 1)} | {_fmt(cell['p99_ms'], 1)} | {_fmt(cell['cpu_us'])} |"
        )
    return [*lines, ""]


def targets(
    med: dict[tuple[int, int, str], dict[str, float]],
    memory: list[dict[str, Any]],
    imports: dict[str, float],
    fleet: dict[str, Any] | None = None,
    measured: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Each target of PERFORMANCE.md as a ratio from this run, and whether it is met.

    With the ``measured`` rows, a ratio of two clients in one cell also shows the range
    of its per-round ratios (see `paired_ratios`).
    """
    spreads: dict[str, list[float]] = {}

    def get(size: int, c: int, client: str, key: str) -> float | None:
        cell = med.get((size, c, client))
        return None if cell is None else cell[key]

    rows: list[tuple[str, str, float | None, float, str]] = []

    k64, m1 = 64 * KiB, MiB
    for number, what, size, c, a, b, key, goal, op in (
        (
            "1",
            "64 KiB C=64 rps, AsyncFriendli / raw",
            k64,
            64,
            "friendli",
            "raw_aiohttp",
            "rps",
            1.05,
            "≥",
        ),
        (
            "1",
            "64 KiB C=64 CPU/req, AsyncFriendli / raw",
            k64,
            64,
            "friendli",
            "raw_aiohttp",
            "cpu_us",
            0.85,
            "≤",
        ),
        (
            "1",
            "64 KiB C=64 rps, AsyncFriendli / official async",
            k64,
            64,
            "friendli",
            "official_async",
            "rps",
            8.0,
            "≥",
        ),
        (
            "2",
            "1 MiB C=32 CPU/req, AsyncFriendli / raw",
            m1,
            32,
            "friendli",
            "raw_aiohttp",
            "cpu_us",
            0.5,
            "≤",
        ),
        (
            "2",
            "1 MiB C=32 rps, AsyncFriendli / raw",
            m1,
            32,
            "friendli",
            "raw_aiohttp",
            "rps",
            1.3,
            "≥",
        ),
        (
            "3",
            "64 KiB C=1 rps, SyncFriendli / raw (sequential)",
            k64,
            1,
            "friendli_sync",
            "raw_aiohttp",
            "rps",
            0.8,
            "≥",
        ),
        (
            "3",
            "64 KiB C=1 rps, SyncFriendli / official sync",
            k64,
            1,
            "friendli_sync",
            "official_sync",
            "rps",
            2.0,
            "≥",
        ),
        (
            "4",
            "64 KiB C=64 rps, generate_batch / gather",
            k64,
            64,
            "friendli_batch",
            "friendli",
            "rps",
            0.95,
            "≥",
        ),
    ):
        top, bottom = get(size, c, a, key), get(size, c, b, key)
        rows.append((number, what, top / bottom if top and bottom else None, goal, op))
        spreads[what] = paired_ratios(measured or [], (size, c), a, b, key)
    for number, what, (size, c, a), (size_b, c_b, b), key, goal, op in (
        (
            "7",
            "64 KiB C=64 CPU/req, AsyncFriendli / expert",
            (k64, 64, "friendli"),
            (k64, 64, "expert"),
            "cpu_us",
            1.10,
            "≤",
        ),
        (
            "7",
            "64 KiB C=64 rps, AsyncFriendli / expert",
            (k64, 64, "friendli"),
            (k64, 64, "expert"),
            "rps",
            0.95,
            "≥",
        ),
        (
            "7",
            "64 KiB C=256 rps, AsyncFriendli / expert",
            (k64, 256, "friendli"),
            (k64, 256, "expert"),
            "rps",
            0.95,
            "≥",
        ),
        (
            "7",
            "1 MiB C=32 CPU/req, AsyncFriendli / expert",
            (m1, 32, "friendli"),
            (m1, 32, "expert"),
            "cpu_us",
            1.0,
            "≤",
        ),
        (
            "8",
            "16 MiB CPU/req, AsyncFriendli C=16 / C=1",
            (16 * MiB, 16, "friendli"),
            (16 * MiB, 1, "friendli"),
            "cpu_us",
            1.5,
            "≤",
        ),
        (
            "9",
            "64 KiB C=1 rps, SyncFriendli / raw aiohttp (sequential)",
            (k64, 1, "friendli_sync"),
            (k64, 1, "raw_aiohttp"),
            "rps",
            0.95,
            "≥",
        ),
        (
            "12",
            "64 KiB sequential rps, SyncFriendli / the naive async loop (raw aiohttp, C=1)",
            (k64, 1, "friendli_sync"),
            (k64, 1, "raw_aiohttp"),
            "rps",
            1.0,
            "≥",
        ),
    ):
        top, bottom = get(size, c, a, key), get(size_b, c_b, b, key)
        rows.append((number, what, top / bottom if top and bottom else None, goal, op))
        if (size, c) == (size_b, c_b):
            spreads[what] = paired_ratios(measured or [], (size, c), a, b, key)
    fleet_rows: list[tuple[str, str, float | None, float, str]] = []
    if fleet:
        fm = fleet_medians(fleet)

        def fget(case: str, client: str, key: str) -> float | None:
            cell = fm.get((case, client))
            return None if cell is None else cell[key]

        for what, (case, a, b), key, goal, op in (
            (
                "1:1:2:4 fleet rps, fleet / round-robin",
                ("1:1:2:4", "fleet", "fleet_round_robin"),
                "rps",
                1.3,
                "≥",
            ),
            (
                "one endpoint CPU/req, server_url=[URL] / server_url=URL",
                ("one URL", "fleet_one", "friendli"),
                "cpu_us",
                1.03,
                "≤",
            ),
        ):
            top, bottom = fget(case, a, key), fget(case, b, key)
            value = top / bottom if top and bottom else None
            fleet_rows.append(("10", what, value, goal, op))
    for row in memory:
        if row["scenario"] == "big" and row["client"] == "friendli":
            rows.append(
                (
                    "5",
                    f"{row['c']} x {size_label(row['size'])} bodies: (peak - baseline "
                    "RSS) / decoded bytes in flight",
                    row["peak_over_in_flight"],
                    4.0,
                    "≤",
                )
            )
            rows.append(
                (
                    "5",
                    "event-loop lag during those decodes, ms (absolute)",
                    row["max_lag_ms"],
                    50.0,
                    "≤",
                )
            )
        if row["scenario"] == "disk":
            rows.append(
                (
                    "5",
                    f"{row['n']:,} x {size_label(row['size'])} to disk at C={row['c']}:"
                    " peak RSS MiB (absolute)",
                    row["peak_mib"],
                    200.0,
                    "≤",
                )
            )
    if imports:
        budget = imports["aiohttp"] + 50
        rows.append(
            (
                "6",
                f"import friendli_image / (import aiohttp + 50 ms), "
                f"{imports['friendli_image']:.0f} / {budget:.0f} ms",
                imports["friendli_image"] / budget,
                1.0,
                "≤",
            )
        )
    rows += fleet_rows
    rows.sort(key=lambda row: int(row[0]))
    lines = [
        "| target | measure | this run (rounds) | goal | met |",
        "|---|---|---:|---:|---|",
    ]
    for number, what, value, goal, op in rows:
        if value is None:
            missing = (
                "not available"
                if number == "10" and fleet and not fleet["available"]
                else "not measured"
            )
            lines.append(f"| {number} | {what} | {missing} | {op} {goal:g} | - |")
            continue
        met = value >= goal if op == "≥" else value <= goal
        spread = spreads.get(what)
        shown = f"{value:.2f}" + (
            f" ({min(spread):.2f}-{max(spread):.2f})" if spread and len(spread) > 1 else ""
        )
        lines.append(
            f"| {number} | {what} | {shown} | {op} {goal:g} | {'yes' if met else '**no**'} |"
        )
    return lines


def plot(med: dict[tuple[int, int, str], dict[str, float]], clients: list[str], path: Path) -> bool:
    """rps and CPU µs/request against C, one line per client, one row per image size."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (nox -s bench installs it)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({k[0] for k in med})
    fig, axes = plt.subplots(len(sizes), 2, figsize=(11, 3.6 * len(sizes)), squeeze=False)
    for row, size in enumerate(sizes):
        for col, (key, title) in enumerate((("rps", "requests/s"), ("cpu_us", "CPU µs/request"))):
            ax = axes[row][col]
            for name in clients:
                points = sorted(
                    (k[1], v[key]) for k, v in med.items() if k[0] == size and k[2] == name
                )
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, marker="o", label=LABELS[name])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("concurrency C")
            ax.set_title(f"{size_label(size)}: {title}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def save(
    args: argparse.Namespace,
    *,
    plan: Plan,
    rows: list[dict[str, Any]],
    skipped: list[str],
    memory: list[dict[str, Any]],
    imports: dict[str, float],
    fleet: dict[str, Any],
    wall: float,
) -> dict[str, Any]:
    """Write everything measured to ``results.json`` (``--report-only`` renders it again)."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": machine(args.python),
        "command": args.command or shlex.join(["python", *sys.argv]),
        "wall": wall,
        "repeats": plan.repeats,
        "import_runs": plan.import_runs,
        "bundled_server": args.bundled_server,
        "clients": list(args.clients),
        "skipped": skipped,
        "rows": rows,
        "memory": memory,
        "imports": imports,
        "fleet": fleet,
    }
    (args.out_dir / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    return data


def report(data: dict[str, Any], out: Path, *, analysis: bool) -> None:
    """Write RESULTS.md and results.png from the measured data."""
    info, rows, memory, imports = data["machine"], data["rows"], data["memory"], data["imports"]
    clients, skipped, wall, command = (
        data["clients"],
        data["skipped"],
        data["wall"],
        data["command"],
    )
    med = medians(rows)
    plotted = plot(med, clients, out / "results.png")
    lines = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/run.py`; do not edit by hand (the analysis comes from "
        "`benchmarks/ANALYSIS.md`). Every ratio compares two medians from this one run.",
        "",
        f"- Command: `{command}` ({wall / 60:.0f} min)",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['os']}, shared with other "
        "work (absolute numbers drift; ratios are what to read)",
        f"- Versions: Python {info['python']}, friendli-image {info['friendli-image']} "
        f"({info['commit']}), aiohttp {info['aiohttp']}, orjson {info['orjson']}, pybase64 "
        f"{info['pybase64']}, tenacity {info['tenacity']}; official friendli "
        f"{info['friendli']} (httpx {info['httpx']}, pydantic {info['pydantic']})",
        "- Server: "
        + (
            "the bundled `friendli_image.server` in static mode"
            if data["bundled_server"]
            else 'a minimal aiohttp.web app returning a prebuilt `{"image": <base64>}` body'
        )
        + ", in its own process; each cell in a fresh client process; "
        f"{data['repeats']} interleaved repetitions, medians shown.",
        "- Clients: *expert aiohttp* is what an expert writes by hand (one `ClientSession`, "
        "`orjson.loads(await resp.read())`, `pybase64.b64decode`, no validation, no "
        "retries); *raw aiohttp* is what most users write (`await resp.json()`, "
        "`base64.b64decode`); the official SDK decodes with `base64.b64decode` too.",
        "- Each client is only its own per-request code (the expert's: post, "
        "`orjson.loads(await resp.read())`, `pybase64.b64decode`, no status check). CPU "
        "(the client process's user+sys, all threads) and rps come from a pass of N "
        "requests through C workers with nothing else in it: no per-request timing, no "
        "checks. p50/p99 come from a second pass of N/3 requests at the same C, which "
        "times each request and checks each image's size (the cell fails on a mismatch); "
        "the warm-up is checked too. Peak RSS is the client process's `VmHWM`. The "
        "official clients run N/4 requests per cell (they are the slowest; rates stay "
        "comparable).",
        "- Sync clients run sequentially (C=1 only). 16 MiB at C=64 runs only the expert, "
        "AsyncFriendli and generate_batch, and 16 MiB at C=256 is not run: it would hold "
        "over 10 GiB per client process.",
    ]
    if skipped:
        lines.append(
            "- Not measured (package or feature not available here): "
            + ", ".join(LABELS[s] for s in skipped)
        )
    lines.append("")
    if plotted:
        lines += ["![rps and CPU per request against concurrency](results.png)", ""]
    fleet = data.get("fleet") or {}
    lines += ["## Targets (PERFORMANCE.md)", "", *targets(med, memory, imports, fleet, rows), ""]
    if any(k[2] == "expert" for k in med):
        lines += ["## Against the expert hand-written client", "", *expert_ratios(med, rows), ""]
    lines += ["## Tables", "", *tables(med, clients)]
    lines += fleet_section(fleet)
    if memory:
        lines += [
            "## Memory and event-loop lag",
            "",
            "| scenario | client | figures |",
            "|---|---|---|",
        ]
        for row in memory:
            if row["scenario"] == "big":
                figures = (
                    f"{row['c']} concurrent x {size_label(row['size'])}: baseline "
                    f"{row['baseline_mib']:.0f} MiB, peak {row['peak_mib']:.0f} MiB, "
                    f"(peak - baseline) / in flight {row['peak_over_in_flight']:.2f}, "
                    f"worst 10 ms-ticker lag {row['max_lag_ms']:.1f} ms, {row['wall_s']:.1f} s"
                )
            else:
                figures = (
                    f"{row['n']:,} x {size_label(row['size'])} written to disk at C={row['c']}:"
                    f" peak RSS {row['peak_mib']:.0f} MiB, {row['wall_s']:.1f} s"
                )
            lines.append(f"| {row['scenario']} | {LABELS[row['client']]} | {figures} |")
        lines.append("")
    if imports:
        lines += [
            "## Import time",
            "",
            f"Median of {data['import_runs']} fresh interpreters each: `import aiohttp` "
            f"{imports['aiohttp']:.0f} ms, `import friendli_image` "
            f"{imports['friendli_image']:.0f} ms.",
            "",
        ]
    notes = HERE / "ANALYSIS.md"
    if analysis and notes.exists():
        lines += [notes.read_text().strip(), ""]
    (out / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {out / 'RESULTS.md'}, {out / 'results.png'}, {out / 'results.json'}")


def _cells(text: str) -> dict[int, list[int]]:
    """``SIZE:C,C;SIZE:C`` -> {size: [C, ...]}."""
    cells = {}
    for part in text.split(";"):
        size, _, cs = part.partition(":")
        cells[int(size)] = [int(c) for c in cs.split(",")]
    return cells


def main() -> None:
    """Parse the command line, run everything, write the report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run (the smoke test)")
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--python", default=sys.executable, help="interpreter of the processes")
    parser.add_argument("--clients", type=lambda s: s.split(","), default=list(LABELS))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every N")
    parser.add_argument(
        "--cells",
        type=_cells,
        help="only these sizes and C, e.g. '65536:1,64,256;1048576:32' (N as in the matrix)",
    )
    parser.add_argument("--repeats", type=int, help="override the number of repetitions")
    parser.add_argument("--bundled-server", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-import", action="store_true")
    parser.add_argument("--no-fleet", action="store_true", help="skip the fleet benchmark")
    parser.add_argument(
        "--fleet-only",
        action="store_true",
        help="run only the fleet benchmark (4 servers, capacity 1:1:2:4) and print its report",
    )
    parser.add_argument("--cell-timeout", type=float, default=600)
    parser.add_argument("--command", help="the command to show in RESULTS.md")
    parser.add_argument(
        "--report-only", action="store_true", help="re-render OUT_DIR/results.json, measure nothing"
    )
    args = parser.parse_args()
    if args.report_only:
        data = json.loads((args.out_dir / "results.json").read_text())
        report(data, args.out_dir, analysis=not args.quick)
        return
    unknown = set(args.clients) - set(LABELS)
    if unknown:
        parser.error(f"unknown clients {sorted(unknown)}; choose from {sorted(LABELS)}")
    plan = Plan(args.quick, args.scale)
    if args.cells:
        plan.sizes = {
            size: (cs, plan.sizes.get(size, ([], 300))[1]) for size, cs in args.cells.items()
        }
    if args.repeats:
        plan.repeats = args.repeats
    if args.fleet_only:
        fleet = run_fleet(args, plan)
        rows = targets({}, [], {}, fleet)
        print(
            "\n".join(
                [*fleet_section(fleet), *rows[:2], *(r for r in rows if r.startswith("| 10 "))]
            )
        )
        return
    started = time.perf_counter()
    rows, skipped = run_cells(args, plan)
    memory = [] if args.no_memory else run_memory(args, plan)
    imports = {} if args.no_import else import_times(args.python, plan.import_runs)
    fleet = {} if args.no_fleet else run_fleet(args, plan)
    data = save(
        args,
        plan=plan,
        rows=rows,
        skipped=skipped,
        memory=memory,
        imports=imports,
        fleet=fleet,
        wall=time.perf_counter() - started,
    )
    report(data, args.out_dir, analysis=not args.quick)


if __name__ == "__main__":
    main()
