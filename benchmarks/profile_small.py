"""Where AsyncFriendli's CPU goes on small images, microsecond by microsecond.

    pip install py-spy        # or pyinstrument (a fallback: its per-call hook skews shares)
    python benchmarks/profile_small.py                # profile + A/B + micro-benchmarks
    python benchmarks/profile_small.py --only profile --n 20000 --c 64

Three views of the 64 KiB path against ``benchmarks/server.py`` (its own process):

1. **profile**: ``--n`` (20,000) requests of ``AsyncFriendli.generate`` at C=``--c`` in a
   worker process sampled by py-spy, then the same for the expert client (pyinstrument
   in process, AsyncFriendli only, if py-spy is missing); prints the inclusive time of
   the SDK's steps, self time by package and the top functions, as µs of CPU per
   request (each share of the samples times the worker's measured CPU per request),
   and the difference to the expert by package.
2. **ab**: in-process A/B runs without a profiler, interleaved rounds: the expert client,
   the expert plus one SDK ingredient at a time (the TraceConfig, the SDK's connector
   subclass that replaced it, a second semaphore, a ``ClientTimeout`` per request, the
   SDK's header set), and AsyncFriendli; client CPU µs per request (``getrusage``),
   medians over rounds.
3. **micro**: ``timeit`` of each pure-Python step the SDK adds (validation, attrs,
   cattrs, ``uuid4``, header merging, the timeout object, format sniffing and
   dimensions, the result object, the trace signals, the semaphore, the decode).

The SDK's internals are looked up by name in any ``friendli_image`` module, so the
script survives code moving between modules; a step that no longer exists is reported
as missing, not guessed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import importlib.util
import json
import os
import pkgutil
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pybase64

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from server import body_for, make_image  # noqa: E402  (the benchmark's own server module)

PATH = "/v1/images/generations"
PROMPT = "a lighthouse at dawn, volumetric light, 35mm"
SIZE = 64 * 1024


@contextmanager
def static_server(size: int) -> Iterator[str]:
    """``benchmarks/server.py`` in its own process; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "server.py"), "--size", str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
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
        proc.wait(timeout=10)


@functools.cache
def internal(name: str) -> Any:
    """The SDK object called ``name``, from whichever ``friendli_image`` module has it."""
    import friendli_image

    for info in pkgutil.walk_packages(friendli_image.__path__, "friendli_image."):
        parts = info.name.split(".")[1:]
        if parts[0] in {"_cli", "server"} or not all(part.startswith("_") for part in parts):
            continue
        module = importlib.import_module(info.name)
        if name in vars(module):
            return vars(module)[name]
    return None


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def fan_out(n: int, c: int, one: Callable[[int], Awaitable[bytes]]) -> None:
    """The measured pass of ``client.py``: N calls through C workers, images dropped."""
    numbers = iter(range(n))

    async def worker() -> None:
        for i in numbers:
            await one(i)

    await asyncio.gather(*(worker() for _ in range(c)))


async def warm_up(c: int, one: Callable[[int], Awaitable[bytes]]) -> None:
    """Open the connections; each image is checked here, outside the measured pass."""

    async def checked(i: int) -> bytes:
        image = await one(i)
        if len(image) != SIZE:
            raise RuntimeError(f"decoded {len(image)} bytes, expected {SIZE}")
        return image

    await fan_out(max(c, 64), c, checked)


# -- 1. the profile --------------------------------------------------------------------------

#: The steps whose inclusive time the profile reports: (what, frame, caller). A frame
#: matches by function name (``Class.method`` as py-spy prints it, or its last part),
#: or, written ``@text``, by a fragment of its file; the caller, when given, must be the
#: frame right above it.
STEPS = (
    ("Image.generate: the whole call", "Image.generate", None),
    ("AsyncFriendli.request: the call after validation", "AsyncFriendli.request", None),
    ("AsyncFriendli._attempt: one HTTP attempt", "AsyncFriendli._attempt", None),
    ("aiohttp ClientSession._request", "ClientSession._request", None),
    ("aiohttp's response parser (from the loop)", "ResponseHandler.data_received", None),
    ("validation + attrs request model (build_generate)", "build_generate", None),
    ("cattrs unstructure + orjson.dumps (dumps_request)", "dumps_request", None),
    ("the call's fixed parts: id, headers, body (Transport.prepare)", "Transport.prepare", None),
    ("trace signals: Signal.send", "Signal.send", None),
    ("trace signals: params objects", "@aiohttp.tracing", None),
    ("trace signals: all of tracing.py", "@aiohttp/tracing.py", None),
    ("the SDK's slot semaphore (asyncio/locks.py)", "@asyncio/locks.py", "AsyncFriendli._attempt"),
    ("ClientTimeout per attempt (_client_timeout)", "_client_timeout", None),
    ("reading the body (read_body)", "read_body", None),
    ("base64 decode (decode_image)", "decode_image", None),
    ("format sniffing (sniff_format)", "sniff_format", None),
    ("JPEG dimensions (image_dimensions)", "image_dimensions", None),
    ("the result object (ImageResult.__init__)", "@friendli_image._results.ImageResult", None),
)


def _matches(frame: tuple[str, str], target: str) -> bool:
    name, where = frame
    if target.startswith("@"):
        return target[1:] in where
    return name == target or name.endswith("." + target) or target.endswith("." + name)


def _in_step(frames: list[tuple[str, str]], target: str, caller: str | None) -> bool:
    for i, frame in enumerate(frames):
        if _matches(frame, target) and (
            caller is None or (i > 0 and _matches(frames[i - 1], caller))
        ):
            return True
    return False


#: Where a sample's innermost frame lives, by path fragment (first match wins).
AREAS = (
    ("friendli_image", "friendli_image"),
    ("aiohttp", "aiohttp"),
    ("multidict", "yarl / multidict / propcache"),
    ("yarl", "yarl / multidict / propcache"),
    ("propcache", "yarl / multidict / propcache"),
    ("attr", "attrs / cattrs"),
    ("cattrs", "attrs / cattrs"),
    ("asyncio", "asyncio (loop, tasks, selector)"),
    ("profile_small.py", "profile_small.py: harness (expert: + its orjson/pybase64 calls)"),
    ("uuid", "uuid"),
    ("<built-in>", "built-ins (socket, orjson, pybase64, ...)"),
)


def worker(url: str, n: int, c: int, client: str) -> None:
    """The profiled process: one A/B variant at N requests; prints its rps and CPU."""
    import friendli_image  # noqa: F401  (imported outside the loop, whose samples alone count)

    run = friendli_variant(url, c) if client == "friendli" else expert_variant(url, c)
    cpu_us, rps = asyncio.run(run(n))
    print("WORKER " + json.dumps({"rps": rps, "cpu_us": cpu_us}), flush=True)


def _report(
    stacks: list[tuple[list[tuple[str, str]], float]], n: int, title: str, cpu_us: float | None
) -> dict[str, float]:
    """Print inclusive step times, areas and top self times; return µs/request by area.

    With ``cpu_us`` (the process's measured CPU per request) each share of the samples
    is shown as that share of ``cpu_us``; else as sampled seconds / N.
    """
    total = sum(weight for _, weight in stacks)
    per = 1e6 / n if cpu_us is None else cpu_us / total
    inclusive: dict[str, float] = {}
    selfs: dict[tuple[str, str], float] = {}
    areas: dict[str, float] = {}
    for frames, weight in stacks:
        for what, target, caller in STEPS:
            if _in_step(frames, target, caller):
                inclusive[what] = inclusive.get(what, 0.0) + weight
        leaf = frames[-1]
        selfs[leaf] = selfs.get(leaf, 0.0) + weight
        area = next((label for key, label in AREAS if key in leaf[1]), "other")
        areas[area] = areas.get(area, 0.0) + weight
    print(f"\n== profile: {n:,} x 64 KiB, {title} ==")
    if cpu_us is None:
        print(f"sampled {total:.2f} s: {total * per:.0f} µs/request")
    else:
        print(f"{total:.2f} s sampled; shares scaled to the measured {cpu_us:.0f} µs CPU/request")
    print("\nSDK steps, inclusive (µs/request, share of samples):")
    for what, _, _ in STEPS:
        seconds = inclusive.get(what, 0.0)
        print(f"  {seconds * per:7.1f} µs {seconds / total:6.1%}  {what}")
    print("\nwhere the innermost frame is (self time by area):")
    for area, seconds in sorted(areas.items(), key=lambda kv: -kv[1]):
        print(f"  {seconds * per:7.1f} µs {seconds / total:6.1%}  {area}")
    print("\ntop 30 functions by self time:")
    for (name, where), seconds in sorted(selfs.items(), key=lambda kv: -kv[1])[:30]:
        print(f"  {seconds * per:7.1f} µs {seconds / total:6.1%}  {name} ({where})")
    return {area: seconds * per for area, seconds in areas.items()}


def _frame(text: str) -> tuple[str, str]:
    name, _, where = text.partition(" (")
    where = where.rstrip(")")
    path, _, line = where.rpartition(":")
    parts = Path(path).parts
    return name, "/".join(parts[-3:]) + f":{line}"


def profile_py_spy(
    py_spy: str, url: str, n: int, c: int, *, rate: int, client: str, keep: Path | None = None
) -> dict[str, float]:
    """Sample a worker process with py-spy (no per-call overhead, idle excluded)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(f"{keep}.{client}") if keep else Path(tmp) / "stacks.txt"
        command = [py_spy, "record", "-r", str(rate), "-f", "raw", "--full-filenames"]
        command += ["-o", str(out), "--", sys.executable, __file__, "--worker", url]
        command += ["--worker-client", client, "--n", str(n), "--c", str(c)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy failed: {done.stderr[-2000:]}")
        figures = next(
            json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("WORKER ")
        )
        print(f"\nworker: {figures['rps']:,.0f} rps, {figures['cpu_us']:.0f} µs CPU/request")
        stacks = []
        for line in out.read_text().splitlines():
            path, _, count = line.rpartition(" ")
            # Only the event loop's samples: imports and start-up are not the request path.
            if "run_until_complete" not in path:
                continue
            stacks.append(([_frame(f) for f in path.split(";")], int(count) / rate))
    return _report(stacks, n, f"{client}, C={c}, py-spy at {rate} Hz", figures["cpu_us"])


def profile_pyinstrument(url: str, n: int, c: int) -> None:
    """The fallback: pyinstrument in process (its hook on every call inflates call-heavy code)."""
    from pyinstrument import Profiler

    from friendli_image import AsyncFriendli

    async def main() -> Any:
        async with AsyncFriendli(server_url=url, token="", max_connections=c) as client:
            generate = client.container.image.generate

            async def one(i: int) -> bytes:
                return (await generate(prompt=PROMPT, seed=i)).data

            await warm_up(c, one)
            profiler = Profiler(interval=0.0005, async_mode="disabled")
            profiler.start()
            await fan_out(n, c, one)
            return profiler.stop()

    session = asyncio.run(main())
    stacks: list[tuple[list[tuple[str, str]], float]] = []

    def walk(frame: Any, path: list[tuple[str, str]]) -> None:
        if frame.is_synthetic:  # [self] / [await]: time of the parent itself
            if path:
                stacks.append((path, frame.time))
            return
        here = [*path, (frame.function or "?", f"{frame.file_path or '?'}:{frame.line_no}")]
        if frame.total_self_time and not frame.children:
            stacks.append((here, frame.total_self_time))
        for child in frame.children:
            walk(child, here)

    walk(session.root_frame(), [])
    _report(stacks, n, f"C={c}, pyinstrument (wall time, per-call hook overhead included)", None)


def profile(url: str, n: int, c: int, rate: int, keep: Path | None) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if Path(py_spy).exists():
        ours = profile_py_spy(py_spy, url, n, c, rate=rate, client="friendli", keep=keep)
        expert = profile_py_spy(py_spy, url, n, c, rate=rate, client="expert", keep=keep)
        print("\n== AsyncFriendli - expert, µs/request of self time by area ==")
        for area in sorted(set(ours) | set(expert), key=lambda a: -ours.get(a, 0.0)):
            mine, theirs = ours.get(area, 0.0), expert.get(area, 0.0)
            print(f"  {mine:7.1f} - {theirs:7.1f} = {mine - theirs:+7.1f} µs  {area}")
        print(
            f"  {sum(ours.values()):7.1f} - {sum(expert.values()):7.1f} = "
            f"{sum(ours.values()) - sum(expert.values()):+7.1f} µs  in all"
        )
    elif importlib.util.find_spec("pyinstrument") is not None:
        profile_pyinstrument(url, n, c)
    else:
        print("profile: neither py-spy nor pyinstrument is installed (pip install py-spy)")


# -- 2. in-process A/B -----------------------------------------------------------------------


def _sdk_like_trace_config() -> aiohttp.TraceConfig:
    made = internal("_make_trace_config")
    if made is not None:
        return made()  # type: ignore[no-any-return]
    trace = aiohttp.TraceConfig()  # the same two listeners, if the factory moved away

    async def listener(*_: object) -> None:
        return None

    trace.on_connection_create_end.append(listener)
    trace.on_connection_reuseconn.append(listener)
    trace.freeze()
    return trace


def _attempt_trace() -> Any:
    """What the SDK passes as ``trace_request_ctx`` (its listeners set flags on it)."""
    made = internal("AttemptTrace")
    return made() if made is not None else SimpleNamespace(connected=False, reused=False)


def expert_variant(
    url: str,
    c: int,
    *,
    trace: bool = False,
    semaphore: bool = False,
    timeout: bool = False,
    headers: bool = False,
    connector: bool = False,
) -> Callable[[int], Awaitable[tuple[float, float]]]:
    """The expert client of ``client.py``, plus the named SDK ingredients."""

    async def run(n: int) -> tuple[float, float]:
        target = url + PATH
        base = {"Content-Type": "application/json"}
        sdk_headers = {
            "User-Agent": "friendli-image",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        fixed_id = uuid.uuid4().hex
        # The SDK's connector subclass (what replaced the TraceConfig), if it still exists.
        connector_class = (internal("Connector") if connector else None) or aiohttp.TCPConnector
        session = aiohttp.ClientSession(
            connector=connector_class(limit=c),
            trace_configs=[_sdk_like_trace_config()] if trace else None,
        )
        extra = asyncio.Semaphore(c)
        async with session:

            async def one(i: int) -> bytes:
                kwargs: dict[str, Any] = {}
                if headers:
                    merged = {**sdk_headers, "X-Request-ID": fixed_id}
                    merged["X-Friendli-Attempt"] = str(0)
                    kwargs["headers"] = merged
                else:
                    kwargs["headers"] = base
                if timeout:
                    kwargs["timeout"] = aiohttp.ClientTimeout(
                        total=300.0, connect=None, sock_connect=10.0, sock_read=None
                    )
                if trace:
                    kwargs["trace_request_ctx"] = _attempt_trace()
                body = orjson.dumps({"prompt": PROMPT, "seed": i})
                if semaphore:
                    async with extra, session.post(target, data=body, **kwargs) as resp:
                        data = await resp.read()
                else:
                    async with session.post(target, data=body, **kwargs) as resp:
                        data = await resp.read()
                return pybase64.b64decode(orjson.loads(data)["image"])  # type: ignore[no-any-return]

            await warm_up(c, one)
            used, started = cpu(), time.perf_counter()
            await fan_out(n, c, one)
            return (cpu() - used) / n * 1e6, n / (time.perf_counter() - started)

    return run


def friendli_variant(url: str, c: int) -> Callable[[int], Awaitable[tuple[float, float]]]:
    async def run(n: int) -> tuple[float, float]:
        from friendli_image import AsyncFriendli

        async with AsyncFriendli(server_url=url, token="", max_connections=c) as client:
            generate = client.container.image.generate

            async def one(i: int) -> bytes:
                return (await generate(prompt=PROMPT, seed=i)).data

            await warm_up(c, one)
            used, started = cpu(), time.perf_counter()
            await fan_out(n, c, one)
            return (cpu() - used) / n * 1e6, n / (time.perf_counter() - started)

    return run


def ab(url: str, n: int, c: int, rounds: int) -> None:
    variants = {
        "expert": expert_variant(url, c),
        "expert + TraceConfig": expert_variant(url, c, trace=True),
        "expert + SDK Connector": expert_variant(url, c, connector=True),
        "expert + 2nd semaphore": expert_variant(url, c, semaphore=True),
        "expert + ClientTimeout/req": expert_variant(url, c, timeout=True),
        "expert + SDK headers": expert_variant(url, c, headers=True),
        "AsyncFriendli": friendli_variant(url, c),
    }
    found: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            found[name].append(asyncio.run(variants[name](n))[0])
    base = statistics.median(found["expert"])
    floor = min(found["expert"])
    print(f"\n== A/B in one process: {n:,} x 64 KiB, C={c}, {rounds} interleaved rounds ==")
    print(
        "client CPU µs/request: median (min-max), then the median's and the minimum's "
        "difference to the expert's (the minimum is the least disturbed round):"
    )
    for name, values in found.items():
        med, low = statistics.median(values), min(values)
        print(
            f"  {name:<27} {med:7.1f} ({low:.0f}-{max(values):.0f})  "
            f"median {med - base:+6.1f} µs ({med / base:4.2f}x)  min {low - floor:+6.1f} µs"
        )


# -- 3. micro-benchmarks ---------------------------------------------------------------------


def _us(statement: Callable[[], object], number: int = 20000) -> float:
    """Best of 5 repeats, µs per call."""
    return min(timeit.repeat(statement, number=number, repeat=5)) / number * 1e6


def _async_us(make: Callable[[], Awaitable[object]], number: int = 20000) -> float:
    async def loop() -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(number):
                await make()
            best = min(best, time.perf_counter() - started)
        return best / number * 1e6

    return asyncio.run(loop())


def micro(response_chunks: int) -> None:
    print("\n== micro-benchmarks (timeit, best of 5, µs per call) ==")
    rows: list[tuple[str, float | None]] = []

    def add(what: str, fn: Callable[[], float]) -> None:
        try:
            rows.append((what, fn()))
        except Exception as exc:  # a moved internal is reported, not fatal
            rows.append((f"{what} [{type(exc).__name__}: {exc}]", None))

    build_generate = internal("build_generate")
    dumps_request = internal("dumps_request")
    checks = [internal(f"check_{k}") for k in ("prompt", "model", "steps", "guidance", "seed")]
    check_format = internal("check_response_format")

    def validation() -> float:
        p, m, st, g, sd = checks

        def run() -> None:
            p(PROMPT)
            m(None)
            st(20)
            g(0.0)
            sd(7)
            check_format(None)

        return _us(run)

    add("validation: the six field checks of generate", validation)
    add(
        "validation + attrs: build_generate (GenerateRequest)",
        lambda: _us(lambda: build_generate(prompt=PROMPT, seed=7)),
    )
    request = build_generate(prompt=PROMPT, seed=7) if build_generate else None
    add("cattrs + orjson: dumps_request", lambda: _us(lambda: dumps_request(request)))
    add(
        "expert: orjson.dumps of the dict",
        lambda: _us(lambda: orjson.dumps({"prompt": PROMPT, "seed": 7})),
    )
    add("uuid.uuid4().hex (the request id before issue 26)", lambda: _us(lambda: uuid.uuid4().hex))
    add("os.urandom(16).hex() (the request id now)", lambda: _us(lambda: os.urandom(16).hex()))
    base = {
        "User-Agent": "friendli-image",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    opts: dict[str, str] = {}

    def merge() -> None:
        headers = {**base, **opts, "X-Request-ID": "0" * 32}
        headers["X-Friendli-Attempt"] = str(0)

    add("header dict merging (request + attempt)", lambda: _us(merge))
    from multidict import CIMultiDict

    four = {**base, "X-Request-ID": "0" * 32, "X-Friendli-Attempt": "0"}
    one_header = {"Content-Type": "application/json"}
    add(
        "aiohttp: CIMultiDict of the 5 SDK headers - of 1",
        lambda: _us(lambda: CIMultiDict(four)) - _us(lambda: CIMultiDict(one_header)),
    )
    add(
        "aiohttp.ClientTimeout(...)",
        lambda: _us(
            lambda: aiohttp.ClientTimeout(
                total=300.0, connect=None, sock_connect=10.0, sock_read=None
            )
        ),
    )
    client_timeout = internal("_client_timeout")
    timeout_cls = internal("Timeout")
    if client_timeout and timeout_cls:
        t = timeout_cls()
        add(
            "_client_timeout (the SDK's per attempt)",
            lambda: _us(lambda: client_timeout(t, None, 0.0)),
        )
    image = make_image(SIZE)
    sniff, dims = internal("sniff_format"), internal("image_dimensions")
    add(
        "format sniffing + JPEG dimensions",
        lambda: _us(lambda: dims(image, sniff(image))),
    )
    result_cls = internal("ImageResult")
    add(
        "ImageResult(...) (attrs frozen)",
        lambda: _us(
            lambda: result_cls(
                image=image,
                format="jpeg",
                width=512,
                height=512,
                request_id="0" * 32,
                attempts=1,
                elapsed=0.01,
            )
        ),
    )
    body = body_for(SIZE)
    decode = internal("decode_image")
    add("SDK decode: decode_image (64 KiB)", lambda: _us(lambda: decode(body, 200, "x"), 2000))
    add(
        "expert decode: orjson.loads + pybase64.b64decode",
        lambda: _us(lambda: pybase64.b64decode(orjson.loads(body)["image"]), 2000),
    )
    text = orjson.loads(body)["image"]
    add("  of which orjson.loads of the body", lambda: _us(lambda: orjson.loads(body), 2000))
    add(
        "  of which pybase64.b64decode of the str",
        lambda: _us(lambda: pybase64.b64decode(text), 2000),
    )
    add(
        "  (pybase64.b64decode of the same base64 as bytes)",
        lambda: _us(lambda: pybase64.b64decode(text.encode()), 2000),
    )
    sem = asyncio.Semaphore(64)

    async def acquire() -> None:
        async with sem:
            pass

    add("asyncio.Semaphore acquire+release (free)", lambda: _async_us(acquire))

    from aiohttp.tracing import Trace
    from yarl import URL

    trace_config = _sdk_like_trace_config()
    target = URL("http://127.0.0.1:1/v1/images/generations")
    headers = CIMultiDict(four)

    async def traced() -> None:
        # The signals aiohttp sends for one reused-connection request with a small body
        # and a 64 KiB image (see the counts printed below).
        ctx = trace_config.trace_config_ctx(trace_request_ctx=_attempt_trace())
        trace = Trace(None, trace_config, ctx)  # type: ignore[arg-type]
        await trace.send_request_start("POST", target, headers)
        await trace.send_connection_reuseconn()
        await trace.send_request_headers("POST", target, headers)
        await trace.send_request_chunk_sent("POST", target, b"{}")
        for _ in range(response_chunks):
            await trace.send_response_chunk_received("POST", target, b"")
        await trace.send_request_end("POST", target, headers, None)  # type: ignore[arg-type]

    add(
        f"trace signals of one request ({5 + response_chunks} sends + Trace)",
        lambda: _async_us(traced, 5000),
    )
    for what, value in rows:
        print(f"  {'missing' if value is None else f'{value:7.2f}'} µs  {what}")


def count_signals(url: str) -> int:
    """Print how many trace signals aiohttp sends per request; the response chunk count."""
    counts: dict[str, int] = {}
    trace = aiohttp.TraceConfig()
    for name in dir(trace):
        if name.startswith("on_"):

            def listener(*_: object, _name: str = name) -> Awaitable[None]:
                counts[_name] = counts.get(_name, 0) + 1
                return asyncio.sleep(0)

            getattr(trace, name).append(listener)
    trace.freeze()
    n = 200

    async def run() -> None:
        async with aiohttp.ClientSession(trace_configs=[trace]) as session:
            for i in range(n):
                body = orjson.dumps({"prompt": PROMPT, "seed": i})
                async with session.post(url + PATH, data=body) as resp:
                    await resp.read()

    asyncio.run(run())
    print("\n== trace signals per request (aiohttp sends all once any TraceConfig is set) ==")
    for name, count in sorted(counts.items()):
        print(f"  {count / n:5.2f}  {name}")
    return round(counts.get("on_response_chunk_received", 0) / n)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20000, help="requests of the profiled run")
    parser.add_argument("--c", type=int, default=64)
    parser.add_argument("--ab-n", type=int, default=4000, help="requests per A/B round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--only", choices=("profile", "ab", "micro"))
    parser.add_argument(
        "--stacks", type=Path, help="keep py-spy's collapsed stacks here (for flamegraph.pl)"
    )
    parser.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--worker-client", default="friendli", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.n, args.c, args.worker_client)
        return
    with static_server(SIZE) as url:
        if args.only in (None, "profile"):
            profile(url, args.n, args.c, args.rate, args.stacks)
        if args.only in (None, "ab"):
            ab(url, args.ab_n, args.c, args.rounds)
        if args.only in (None, "micro"):
            micro(count_signals(url))


if __name__ == "__main__":
    main()
