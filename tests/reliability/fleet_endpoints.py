"""Loopback endpoints for the fleet's tests, and the oracle that reads their log.

Each endpoint is a small aiohttp app with one behaviour at a time (healthy, slow,
flapping, garbage, 429 forever, black hole, dying mid-body, or down: not listening).
They serve from an event loop and thread of their own, so a client busy on its loop does
not delay their answers. Every request is logged as it arrives, with its
``X-Request-ID``, then marked with what the endpoint did: the oracle's view of the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, Literal

import attrs
from aiohttp import web

from friendli_image import AsyncFriendli, FriendliAPIError, FriendliTimeoutError, ImageResult

from .harness import GENERATE, image_body

__all__ = [
    "AMBIGUOUS",
    "HEALTH",
    "PROCESSED",
    "Behaviour",
    "Endpoints",
    "Event",
    "Kind",
    "check_outcomes",
    "run_calls",
    "running",
]

Kind = Literal[
    "healthy", "slow", "flapping", "garbage", "rate_limited", "black_hole", "dying", "down"
]
#: What a server has done with a request once it answered or read it: later sends of the
#: same request id are resends, and must be flagged unless the first was refused.
PROCESSED = frozenset({"image", "garbage", "black_hole", "dying", "abandoned"})
#: The server read the request and gave no usable answer: a resend may duplicate work.
#: ``abandoned``: the client went away (its attempt timed out) before the server answered.
AMBIGUOUS = frozenset({"black_hole", "dying", "abandoned"})
#: The health route every endpoint serves while it listens (200, whatever else it does).
HEALTH = "/health"
GARBAGE_BODIES = (
    (b"<html><body>502 upstream</body></html>", "text/html"),
    (b'{"image": null}', "application/json"),
    (b'{"image": "@@@ not base64"}', "application/json"),
    (b'{"data": [{"b64_json": "aGk="}]}', "application/json"),
)


@attrs.frozen
class Behaviour:
    """How one endpoint answers."""

    kind: Kind
    latency: float = 0.0
    period: int = 2
    """Flapping: this many 503 answers, then this many images, and so on."""


@attrs.define
class Event:
    """One request as an endpoint saw it: logged on arrival, then marked with what the
    endpoint did (``abandoned`` until it answers)."""

    where: int
    rid: str
    what: str = "abandoned"


@attrs.define
class Endpoints:
    """The running endpoints and the log of what each did with each request id, in the
    order the requests arrived. ``behaviours`` may change while they run (`change`)."""

    behaviours: list[Behaviour]
    loop: asyncio.AbstractEventLoop
    urls: list[str] = attrs.field(factory=list)
    log: list[Event] = attrs.field(factory=list)
    runners: list[web.AppRunner | None] = attrs.field(factory=list)
    #: Each endpoint's listener and the protocol of every connection it accepted.
    listeners: list[asyncio.Server | None] = attrs.field(factory=list)
    accepted: list[list[asyncio.BaseProtocol]] = attrs.field(factory=list)

    def calls_to(self, index: int) -> int:
        return sum(1 for event in self.log if event.where == index)

    async def change(self, index: int, behaviour: Behaviour) -> None:
        """Give endpoint ``index`` a new behaviour from now on; ``down`` closes its
        listener and every connection to it, and leaving ``down`` listens again on the
        same port."""
        await self._on_their_loop(self._change(index, behaviour))

    async def _change(self, index: int, behaviour: Behaviour) -> None:
        runner = self.runners[index]
        if behaviour.kind == "down" and runner is not None:
            self.runners[index] = None
            await self._close(index, runner)
        elif behaviour.kind != "down" and runner is None:
            await self._listen(index, int(self.urls[index].rsplit(":", 1)[1]))
        self.behaviours[index] = behaviour

    async def _listen(self, index: int, port: int) -> int:
        runner = web.AppRunner(
            _app(index, self), handler_cancellation=True, access_log=None, shutdown_timeout=0.05
        )
        await runner.setup()
        self.runners[index] = runner
        server, accepted = runner.server, self.accepted[index]
        assert server is not None

        def connection() -> asyncio.BaseProtocol:
            protocol = server()
            accepted.append(protocol)
            return protocol

        listener = await self.loop.create_server(connection, "127.0.0.1", port)
        self.listeners[index] = listener
        bound: int = listener.sockets[0].getsockname()[1]
        return bound

    async def _start(self) -> None:
        for index, behaviour in enumerate(self.behaviours):
            self.runners.append(None)
            self.listeners.append(None)
            self.accepted.append([])
            self.urls.append("")
            if behaviour.kind != "down":
                port = await self._listen(index, 0)
            else:
                with socket.socket() as probe:  # a port nothing listens on, for now
                    probe.bind(("127.0.0.1", 0))
                    port = probe.getsockname()[1]
            self.urls[index] = f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        for index, runner in enumerate(self.runners):
            if runner is not None:
                await self._close(index, runner)
        # A connection the kernel handed over just before its listener closed may still
        # be on its way to its protocol (an accept task of this loop): let those finish,
        # then close whatever they opened.
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=1.0)
        for accepted in self.accepted:
            _close_all(accepted)

    async def _close(self, index: int, runner: web.AppRunner) -> None:
        """Stop listening, then close every connection: the server's shutdown closes
        those it knows, and every protocol the listener made is closed after it (one
        accepted just before the listener closed may not be registered yet; a loaded
        machine widens that window)."""
        listener, self.listeners[index] = self.listeners[index], None
        if listener is not None:
            # A Server.close() between an accept and its transport's setup leaves that
            # connection half-built, its socket open until collected (CPython
            # gh-109564). So stop accepting first, let the accepts under way set up
            # their transports (one loop turn), then close.
            for sock in listener.sockets:
                self.loop.remove_reader(sock.fileno())
            await asyncio.sleep(0)
            listener.close()
        await asyncio.sleep(0.01)
        await runner.cleanup()
        _close_all(self.accepted[index])

    async def connect_then_change(self, index: int, behaviour: Behaviour, turns: int) -> None:
        """Open a raw connection to endpoint ``index``, let ``turns`` turns of their loop
        pass, then `change` it: a connection arriving as an endpoint goes down, at each
        step of its accept."""

        async def step() -> None:
            with socket.socket() as raw:
                raw.setblocking(False)
                raw.connect_ex(("127.0.0.1", int(self.urls[index].rsplit(":", 1)[1])))
                for _ in range(turns):
                    await asyncio.sleep(0)
                await self._change(index, behaviour)

        await self._on_their_loop(step())

    async def _on_their_loop(self, step: Coroutine[Any, Any, None]) -> None:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(step, self.loop))


def _close_all(accepted: list[asyncio.BaseProtocol]) -> None:
    """Close the transport of every accepted connection still open. Those without one yet
    (accepted, not connected) are kept for the final stop, which waits for them."""
    waiting = []
    for protocol in accepted:
        transport = getattr(protocol, "transport", None)
        if transport is None:
            waiting.append(protocol)
        elif not transport.is_closing():
            transport.close()
    accepted[:] = waiting


def _app(index: int, endpoints: Endpoints) -> web.Application:
    seen = 0
    image = image_body()

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal seen
        seen += 1
        behaviour = endpoints.behaviours[index]
        event = Event(index, request.headers.get("X-Request-ID", ""))
        endpoints.log.append(event)
        await request.read()
        if behaviour.latency:
            await asyncio.sleep(behaviour.latency)
        kind: str = behaviour.kind
        if kind == "flapping":
            kind = "healthy" if (seen - 1) // behaviour.period % 2 else "busy"
        if kind in ("healthy", "slow"):
            event.what = "image"
            return web.Response(body=image, content_type="application/json")
        if kind == "busy":
            event.what = "503"
            return web.json_response({"detail": "busy"}, status=503)
        if kind == "rate_limited":
            event.what = "429"
            return web.json_response(
                {"detail": "slow down"}, status=429, headers={"retry-after-ms": "50"}
            )
        if kind == "garbage":
            event.what = "garbage"
            body, content_type = GARBAGE_BODIES[seen % len(GARBAGE_BODIES)]
            return web.Response(body=body, content_type=content_type.split(";")[0])
        event.what = kind
        transport = request.transport
        if kind == "black_hole":
            await asyncio.Event().wait()  # until the client gives up and the task is cancelled
        assert transport is not None
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(image)}\r\n\r\n"
        ).encode()
        transport.write(head + image[: len(image) // 2])
        transport.close()
        return web.Response()  # aiohttp finds the transport closing and sends nothing

    async def health(_request: web.Request) -> web.Response:
        # As a container's process check answers: up while it listens, whatever its
        # image route does.
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post(GENERATE, handle)
    app.router.add_get(HEALTH, health)
    return app


@contextlib.asynccontextmanager
async def running(behaviours: Sequence[Behaviour]) -> AsyncIterator[Endpoints]:
    """The endpoints, serving from a thread of their own for the block."""
    loop = asyncio.new_event_loop()
    endpoints = Endpoints(list(behaviours), loop)
    thread = threading.Thread(target=loop.run_forever, name="endpoints", daemon=True)
    thread.start()
    try:
        await endpoints._on_their_loop(endpoints._start())
        yield endpoints
    finally:
        try:
            await endpoints._on_their_loop(endpoints._stop())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join)
            loop.close()


async def run_calls(
    client: AsyncFriendli, gaps: Sequence[float], concurrency: int
) -> list[ImageResult | FriendliAPIError]:
    slots = asyncio.Semaphore(concurrency)

    async def one(index: int) -> ImageResult | FriendliAPIError:
        async with slots:
            try:
                return await client.container.image.generate(prompt=f"call {index}", seed=index)
            except FriendliAPIError as error:
                return error

    tasks = []
    for index, gap in enumerate(gaps):
        if gap:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(index)))
    return list(await asyncio.gather(*tasks))


def _request_id(outcome: ImageResult | FriendliAPIError) -> str:
    rid = outcome.request_id
    assert rid
    return rid


def check_outcomes(
    endpoints: Endpoints,
    outcomes: Sequence[ImageResult | FriendliAPIError],
    *,
    retry_ambiguous: bool = False,
    served: bool = True,
) -> int:
    """The oracle: failures only where the policy forbids a resend; resends flagged.

    ``served``: a healthy endpoint was in rotation throughout, so a call fails only
    where the policy forbids a resend (else any typed failure may end a call, and only
    the resends are judged). Returns how many calls timed out at an endpoint that
    answers (late answers).
    """
    healthy = {
        url
        for url, behaviour in zip(endpoints.urls, endpoints.behaviours, strict=True)
        if behaviour.kind in ("healthy", "slow")
    }
    trails: dict[str, list[Event]] = {}
    for event in endpoints.log:
        trails.setdefault(event.rid, []).append(event)
    late = 0
    for outcome in outcomes:
        trail = trails.get(_request_id(outcome), [])
        whats = [event.what for event in trail]
        if isinstance(outcome, FriendliTimeoutError):
            # No answer within the attempt's 0.3 s: a black hole's, or any endpoint's on
            # a machine loaded enough to delay it (CI). Either way the server may have
            # read the request, so the policy does not resend it.
            assert outcome.maybe_processed, (outcome, trail)
            if trail:
                assert endpoints.urls[trail[-1].where] == outcome.endpoint, (outcome, trail)
            late += whats[-1:] != ["black_hole"]
        elif isinstance(outcome, FriendliAPIError) and served:
            # A healthy endpoint could have served it unless the policy forbids the
            # resend: the request was read by a server that then gave no answer.
            assert outcome.maybe_processed, (outcome, trail)
            assert outcome.endpoint not in healthy, (outcome, trail)
            assert whats, (outcome, trail)
            assert whats[-1] in AMBIGUOUS, (outcome, trail)
        elif isinstance(outcome, ImageResult):
            assert whats[-1] == "image", trail
        # Nothing unsafe resent: after an ambiguous event nothing follows (unless the
        # policy resends those), and a request that ran before its last attempt is flagged.
        if not retry_ambiguous:
            for earlier in whats[:-1]:
                assert earlier not in AMBIGUOUS, trail
        ran_before = any(what in PROCESSED for what in whats[:-1])
        if ran_before and isinstance(outcome, ImageResult):
            assert outcome.maybe_duplicated, trail
    return late
