"""An in-process simulation of a fleet, in virtual time: the real `Fleet` against
simulated GPU containers, and the ideal scheduler against the same containers.

A simulated container has slots and a service time per image (with jitter); it starts
what it has slots for and queues the rest, first in first out, like a GPU container. It
can die (queued and running requests are dropped, new connections refused) and come
back. The event loop's clock jumps to the next timer instead of sleeping, so a run of
minutes of fleet time takes a fraction of a second, and its numbers do not depend on
how busy the machine is.

The ideal scheduler is the one the issue measures against: one queue, one worker per
slot, which knows the slots (and, here, when an endpoint is down).
"""

from __future__ import annotations

import asyncio
import random
import selectors
import statistics
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import attrs
from yarl import URL

from friendli_image import Endpoint, FleetConfig
from friendli_image._exceptions import FriendliConnectionError
from friendli_image._fleet import Fleet

T = TypeVar("T")


# -- virtual time ----------------------------------------------------------------------


class _Jumping(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Polls without blocking; when nothing is ready, moves the loop's clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualLoop | None = None

    def select(self, timeout: float | None = None) -> list[Any]:
        events: list[Any] = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise RuntimeError("the simulation waits on nothing: a deadlock")
        assert self.loop is not None
        self.loop.now += timeout
        return events


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to its next timer: waiting costs no wall time."""

    def __init__(self) -> None:
        selector = _Jumping()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0

    def time(self) -> float:
        return self.now


def run_virtual(main: Callable[[VirtualLoop], Coroutine[Any, Any, T]]) -> T:
    """Run ``main(loop)`` to the end on a fresh virtual-time loop."""
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(main(loop))
    finally:
        loop.close()


# -- simulated containers ---------------------------------------------------------------


@attrs.frozen
class SimEndpoint:
    """A simulated container: ``slots`` images at once, ``service`` seconds each (times
    a uniform jitter of +-``jitter``), down from ``down[0]`` to ``down[1]`` seconds."""

    slots: int
    service: float
    jitter: float = 0.0
    down: tuple[float, float] | None = None


class Refused(Exception):
    """The container is down: the connection is refused (nothing was sent)."""


class Dropped(Exception):
    """The container died with the request queued or running."""


class SimServer:
    """One container in virtual time: FIFO queue, ``slots`` at work, death and revival."""

    def __init__(self, spec: SimEndpoint, loop: asyncio.AbstractEventLoop, seed: int) -> None:
        self.spec = spec
        self.loop = loop
        self.rng = random.Random(seed)
        self.dead = False
        self.busy: dict[asyncio.Future[None], asyncio.TimerHandle] = {}
        self.queue: deque[asyncio.Future[None]] = deque()
        self.max_busy = 0
        if spec.down is not None:
            loop.call_at(spec.down[0], self.die)
            loop.call_at(spec.down[1], self.revive)

    def duration(self) -> float:
        jitter = self.spec.jitter
        return self.spec.service * self.rng.uniform(1 - jitter, 1 + jitter)

    async def serve(self) -> None:
        if self.dead:
            raise Refused
        done: asyncio.Future[None] = self.loop.create_future()
        if len(self.busy) < self.spec.slots:
            self._start(done)
        else:
            self.queue.append(done)
        await done

    def _start(self, done: asyncio.Future[None]) -> None:
        self.busy[done] = self.loop.call_later(self.duration(), self._finish, done)
        self.max_busy = max(self.max_busy, len(self.busy))

    def _finish(self, done: asyncio.Future[None]) -> None:
        del self.busy[done]
        done.set_result(None)
        if self.queue:
            self._start(self.queue.popleft())

    def die(self) -> None:
        self.dead = True
        for done, timer in self.busy.items():
            timer.cancel()
            done.set_exception(Dropped())
        for done in self.queue:
            done.set_exception(Dropped())
        self.busy.clear()
        self.queue.clear()

    def revive(self) -> None:
        self.dead = False


# -- runs ---------------------------------------------------------------------------------


@attrs.frozen
class Run:
    """What one run did: throughput, latencies and each endpoint's completions."""

    throughput: float
    #: Each successful attempt's latency divided by its endpoint's service time.
    stretch: Sequence[float]
    #: Virtual times of each endpoint's completions.
    completions: Sequence[Sequence[float]]
    #: Attempts that reached a container and were dropped or refused.
    failed_attempts: int
    #: Requests each endpoint had at once, at most.
    max_busy: Sequence[int]

    @property
    def p50_stretch(self) -> float:
        return statistics.median(self.stretch)


def _url(index: int) -> str:
    return f"http://sim{index}.invalid:{8000 + index}"


def fleet_run(
    specs: Sequence[SimEndpoint],
    concurrency: int,
    requests: int,
    *,
    seed: int = 0,
    config: FleetConfig | None = None,
    endpoints: Sequence[Endpoint] | None = None,
) -> Run:
    """``requests`` calls, ``concurrency`` at a time, through a real `Fleet` (nothing
    configured unless ``config``/``endpoints`` say otherwise), as the client drives it:
    acquire, send, report; a refused or dropped attempt goes elsewhere."""

    async def main(loop: VirtualLoop) -> Run:
        servers = [SimServer(spec, loop, seed * 100 + i) for i, spec in enumerate(specs)]
        by_url = {_url(i): server for i, server in enumerate(servers)}

        async def connects(url: URL, _timeout: float) -> bool | None:
            return not by_url[str(url)].dead

        fleet = Fleet(
            endpoints or [Endpoint(_url(i)) for i in range(len(specs))],
            64,
            config or FleetConfig(),
            random.Random(seed),
            clock=loop.time,
            connects=connects,
        )
        index = {e.url: i for i, e in enumerate(fleet.endpoints)}
        stretch: list[float] = []
        completions: list[list[float]] = [[] for _ in specs]
        failed = 0
        remaining = requests

        async def call() -> None:
            nonlocal failed
            tried: list[Any] = []
            moving = False
            while True:
                endpoint = await fleet.acquire(tried, strict=moving)
                epoch, level, began = endpoint.epoch, endpoint.in_flight, loop.time()
                server = servers[index[endpoint.url]]
                try:
                    await server.serve()
                except Refused:
                    failed += 1
                    fleet.failed(endpoint, epoch, FriendliConnectionError("refused"))
                except Dropped:
                    failed += 1
                    reset = FriendliConnectionError("reset", maybe_processed=True)
                    fleet.failed(endpoint, epoch, reset)
                    await fleet.is_dead(endpoint, 1.0)
                else:
                    latency = loop.time() - began
                    fleet.succeeded(endpoint, latency, level)
                    stretch.append(latency / server.spec.service)
                    completions[index[endpoint.url]].append(loop.time())
                    return
                tried.append(endpoint)
                moving = fleet.has_other(tried)
                if not moving:
                    del tried[:-1]

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await call()

        started = loop.time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = loop.time() - started
        await fleet.stop_health()
        return Run(
            throughput=requests / elapsed,
            stretch=stretch,
            completions=completions,
            failed_attempts=failed,
            max_busy=[server.max_busy for server in servers],
        )

    return run_virtual(main)


def ideal_run(specs: Sequence[SimEndpoint], concurrency: int, requests: int, seed: int = 0) -> Run:
    """The same calls through the ideal scheduler: one queue, one worker per slot, each
    worker taking the next request as soon as it is free (and its endpoint up)."""

    async def main(loop: VirtualLoop) -> Run:
        servers = [
            SimServer(attrs.evolve(spec, down=None), loop, seed * 100 + i)
            for i, spec in enumerate(specs)
        ]
        queue: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()
        stretch: list[float] = []
        completions: list[list[float]] = [[] for _ in specs]
        remaining = requests

        async def slot(i: int) -> None:
            server, down = servers[i], specs[i].down
            while True:
                done = await queue.get()
                duration = server.duration()
                if down is not None and loop.time() < down[1] and loop.time() + duration > down[0]:
                    # It knows the outage: work that would not finish before it waits.
                    await asyncio.sleep(max(0.0, down[1] - loop.time()))
                await asyncio.sleep(duration)
                stretch.append(duration / server.spec.service)
                completions[i].append(loop.time())
                done.set_result(None)

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                done: asyncio.Future[None] = loop.create_future()
                queue.put_nowait(done)
                await done

        workers = [
            asyncio.ensure_future(slot(i))
            for i, spec in enumerate(specs)
            for _ in range(spec.slots)
        ]
        started = loop.time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = loop.time() - started
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        return Run(
            throughput=requests / elapsed,
            stretch=stretch,
            completions=completions,
            failed_attempts=0,
            max_busy=[spec.slots for spec in specs],
        )

    return run_virtual(main)
