"""The benchmark server: answers every image POST with one pre-encoded JSON body.

Run as ``python benchmarks/server.py --size BYTES [--bundled]``. It prints ``PORT <n>``
once it listens on 127.0.0.1 and serves until stdin closes or it gets SIGTERM.

By default it is a minimal aiohttp.web app (read the request body, return the body built
at startup), the anchor of PERFORMANCE.md: the server must cost far less than any client,
or every client measures the server. ``--bundled`` serves the same body through
``friendli_image.server`` in static mode instead (it also validates each request, records
it and hashes the prompt, which costs the server CPU that the clients then wait for).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import struct
import sys
import threading

import pybase64
from aiohttp import web


def make_image(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that start like a baseline JPEG (SOI, APP0, SOF0 512x512), then noise.

    The header makes the SDK's format sniffing and dimension reading do their real work;
    the random rest makes the base64 incompressible and representative.
    """
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, 512, 512, 3) + bytes(9)
    head = b"\xff\xd8" + app0 + sof0
    rest = random.Random(seed).randbytes(max(0, size - len(head)))
    return (head + rest)[:size]


def body_for(size: int) -> bytes:
    """The JSON body the server returns for an image of ``size`` bytes."""
    return b'{"image":"' + pybase64.b64encode(make_image(size)) + b'"}'


def minimal_app(size: int, slots: int = 0, service_ms: float = 0.0) -> web.Application:
    """The anchor server: read the request, answer with the prebuilt body.

    With ``slots`` it serves at most that many requests at a time, each holding its slot
    for ``service_ms`` (the rest queue): a capacity of ``slots / service_ms`` per ms, as a
    model server with a fixed batch size and step time would have. The fleet benchmark
    gives four endpoints different slot counts.
    """
    body = body_for(size)

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    if slots > 0:
        gate = asyncio.Semaphore(slots)
        delay = service_ms / 1000
        served = handle

        async def handle(request: web.Request) -> web.Response:
            async with gate:
                await asyncio.sleep(delay)
                return await served(request)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/images/generations", handle)
    app.router.add_post("/v1/images/edits", handle)
    return app


def bundled_app(size: int) -> web.Application:
    """The bundled friendli_image server in static mode, tuned to never queue a request."""
    from friendli_image.server import ServerConfig, create_app

    return create_app(
        ServerConfig(
            static_image=make_image(size),
            max_concurrency=4096,
            record_requests=False,
            echo_prompt_hash=False,
        )
    )


async def serve(size: int, bundled: bool, slots: int = 0, service_ms: float = 0.0) -> None:
    """Listen on a free loopback port, announce it, serve until stdin closes or SIGTERM."""
    app = bundled_app(size) if bundled else minimal_app(size, slots, service_ms)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]
    print(f"PORT {port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def watch_stdin() -> None:
        # The parent holds our stdin open; when it exits (even killed), we stop too.
        sys.stdin.read()
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, required=True, help="decoded image size in bytes")
    parser.add_argument("--bundled", action="store_true", help="use friendli_image.server")
    parser.add_argument(
        "--slots", type=int, default=0, help="serve at most this many at once (0: no limit)"
    )
    parser.add_argument(
        "--service-ms", type=float, default=0.0, help="with --slots: how long each one takes"
    )
    args = parser.parse_args()
    if args.slots and args.bundled:
        parser.error("--slots applies to the minimal server only")
    asyncio.run(serve(args.size, args.bundled, args.slots, args.service_ms))


if __name__ == "__main__":
    main()
