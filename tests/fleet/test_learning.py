"""Limits learned from latency: near-ideal use of unequal endpoints with nothing configured.

Generated fleets (slots, service times, jitter, a slow endpoint, a dying and reviving
one) run in the in-process simulation of ``sim`` (virtual time: the numbers do not
depend on the machine's load) against the ideal scheduler for the same fleet: one queue,
one worker per slot, which knows the slots. A few run over loopback servers too, with
bounds wide enough for a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from friendli_image import AsyncFriendli, BatchProgress, Endpoint
from friendli_image._fleet import EndpointState
from friendli_image.server import LocalServer, ServerConfig

from .sim import SimEndpoint, fleet_run, ideal_run

# -- the rule, sample by sample ------------------------------------------------------------


def _state(cap: int = 64, start: int = 4) -> EndpointState:
    return EndpointState(Endpoint("http://127.0.0.1:1"), cap, start)


def test_no_queueing_doubles_the_limit_up_to_max_connections() -> None:
    """While latency at the limit stays at the no-load latency, the limit doubles, and
    ``max_connections`` bounds it."""
    state = _state(cap=12)
    limits = []
    for _ in range(6):
        top = int(state.limit)
        for _ in range(max(1, top // 2)):
            state.learn_from(top, 0.2)
        limits.append(int(state.limit))
    assert limits == [8, 12, 12, 12, 12, 12]


def test_queueing_sets_the_limit_to_the_slots_that_serve_the_latency() -> None:
    """Latency at level 4 four times the no-load latency: one slot (Little's law)."""
    state = _state(start=4)
    for level, latency in ((1, 0.2), (2, 0.4), (3, 0.6), (4, 0.8), (4, 0.8)):
        state.learn_from(level, latency)
    assert (state.limit, state.capacity) == (1, 1)
    # Then one slot more is probed every few rounds, and a probe that queues is dropped
    # and tried later than the last.
    raised_at = []
    for success in range(60):
        state.successes = success
        if state.learn_from(int(state.limit), 0.2 if state.limit == 1 else 0.4):
            raised_at.append(success)
    assert state.capacity == 1
    gaps = [b - a for a, b in itertools.pairwise(raised_at)]
    assert gaps == sorted(gaps)
    assert gaps[-1] > gaps[0]


def test_jitter_alone_does_not_lower_the_limit() -> None:
    """Latencies within +-10 % at every level: no level looks queued."""
    state = _state(cap=16)
    jitter = [0.9, 1.1, 1.0, 0.95, 1.05]
    for index in range(400):
        top = int(state.limit)
        state.learn_from(top, 0.2 * jitter[index % len(jitter)])
    assert state.limit == state.capacity == 16


# -- generated fleets, simulated -----------------------------------------------------------


@st.composite
def fleets(draw: st.DrawFn) -> list[SimEndpoint]:
    """2 to 5 endpoints of 1 to 8 slots, one service time with jitter, one of them maybe
    2 or 5 times slower."""
    slots = draw(st.lists(st.sampled_from((1, 2, 4, 8)), min_size=2, max_size=5))
    service = draw(st.sampled_from((0.05, 0.2, 1.0)))
    jitter = draw(st.sampled_from((0.0, 0.02, 0.05, 0.1)))
    slow = draw(st.sampled_from((1, 2, 5)))
    which = draw(st.integers(0, len(slots) - 1))
    return [
        SimEndpoint(s, service * (slow if i == which else 1), jitter) for i, s in enumerate(slots)
    ]


#: A fixed set of examples (the simulation runs in virtual time, so each gives the same
#: figures on any machine): CI checks the same fleets every run.
SIMULATED = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SIMULATED
@given(fleet=fleets(), seed=st.integers(0, 2**16))
def test_generated_fleets_run_near_the_ideal_with_nothing_configured(
    fleet: list[SimEndpoint], seed: int
) -> None:
    """C = 2x the slots: >= 0.95 of the ideal's throughput, median latency <= 1.3x the
    service time (requests wait in the client, not in a server's queue); C = the slots:
    >= 0.90. Over 100 rounds of the fleet and at least 60 service times of its slowest
    endpoint, learning included (the first rounds, until the limits are learned, run
    below the ideal)."""
    slots = sum(e.slots for e in fleet)
    rate = sum(e.slots / e.service for e in fleet)
    requests = max(100 * slots, int(60 * max(e.service for e in fleet) * rate))
    for concurrency, floor in ((2 * slots, 0.95), (slots, 0.90)):
        ours = fleet_run(fleet, concurrency, requests, seed=seed)
        ideal = ideal_run(fleet, concurrency, requests, seed=seed)
        share = ours.throughput / ideal.throughput
        numbers = f"C={concurrency}: {share:.3f} of the ideal, p50 x{ours.p50_stretch:.2f}"
        assert share >= floor, numbers
        assert ours.p50_stretch <= 1.3, numbers
        assert ours.failed_attempts == 0


@st.composite
def outages(draw: st.DrawFn) -> tuple[list[SimEndpoint], int]:
    """A fleet at 200 ms per image of which one endpoint dies for 0.3 to 6 s and returns."""
    slots = draw(st.lists(st.sampled_from((1, 2, 4, 8)), min_size=2, max_size=5))
    jitter = draw(st.sampled_from((0.0, 0.05, 0.1)))
    victim = draw(st.integers(0, len(slots) - 1))
    dies = draw(st.sampled_from((0.5, 2.0, 5.0)))
    down = draw(st.sampled_from((0.3, 1.0, 3.0, 6.0)))
    fleet = [
        SimEndpoint(s, 0.2, jitter, (dies, dies + down) if i == victim else None)
        for i, s in enumerate(slots)
    ]
    return fleet, victim


@SIMULATED
@given(outage=outages(), seed=st.integers(0, 2**16), mult=st.sampled_from((1, 2)))
# The 8 requests failed over from the dead endpoint may go only to the 2-slot one; when
# a freed slot went to whichever request asked first, new requests took every slot of
# it and 2 of the 10 workers waited for most of the run (0.82 of the ideal).
@example(
    outage=([SimEndpoint(8, 0.2, 0.0, (0.5, 0.8)), SimEndpoint(2, 0.2, 0.0, None)], 0),
    seed=0,
    mult=1,
)
def test_a_dead_endpoint_costs_no_call_and_works_again_within_a_second_of_returning(
    outage: tuple[list[SimEndpoint], int], seed: int, mult: int
) -> None:
    """Every call completes (what the dead endpoint dropped or refused goes elsewhere),
    and the revived endpoint completes a request within 1.5 s of coming back, with no
    active health probe."""
    fleet, victim = outage
    slots = sum(e.slots for e in fleet)
    down = fleet[victim].down
    assert down is not None
    requests = 80 * slots  # 16 s of the whole fleet at full speed: past the revival
    ours = fleet_run(fleet, mult * slots, requests, seed=seed)
    assert sum(len(done) for done in ours.completions) == requests
    after = [t for t in ours.completions[victim] if t >= down[1]]
    assert after, "the revived endpoint got no work"
    assert after[0] - down[1] <= 1.5
    ideal = ideal_run(fleet, mult * slots, requests, seed=seed)
    assert ours.throughput >= 0.85 * ideal.throughput


def test_hand_set_limits_bound_what_is_learned() -> None:
    """``max_connections`` per endpoint caps the learned limit; with it set to the slots
    the fleet is as good as the ideal from the start."""
    fleet = [SimEndpoint(s, 0.2, 0.05) for s in (1, 1, 2, 4)]
    endpoints = [
        Endpoint(f"http://sim{i}.invalid:{8000 + i}", max_connections=e.slots)
        for i, e in enumerate(fleet)
    ]
    ours = fleet_run(fleet, 16, 800, endpoints=endpoints)
    assert ours.max_busy == [1, 1, 2, 4]
    assert ours.throughput >= 0.97 * ideal_run(fleet, 16, 800).throughput
    assert ours.p50_stretch <= 1.1


# -- over loopback servers -------------------------------------------------------------------


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _server(slots: int, step_ms: float) -> ServerConfig:
    # A tiny static image: the server's time is the simulated GPU's, not PIL's.
    return ServerConfig(
        static_image=_png(), step_latency_ms=step_ms, max_concurrency=slots, record_requests=False
    )


@contextlib.contextmanager
def _served(slots: Sequence[int], step_ms: float) -> Iterator[list[str]]:
    """``friendli-image serve`` per slot count, each in a process of its own (as a fleet's
    servers are their own machines): a client busy on its loop does not delay their
    answers, so what it learns is theirs. Yields their URLs."""
    with contextlib.ExitStack() as stack:
        processes = [
            stack.enter_context(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "friendli_image",
                        "serve",
                        "--port",
                        "0",
                        "--step-latency-ms",
                        str(step_ms),
                        "--max-concurrency",
                        str(n),
                        "--image-size",
                        "8",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
            for n in slots
        ]
        for process in processes:
            stack.callback(process.terminate)  # SIGTERM stops `serve`; Popen's exit waits
        urls = []
        for process in processes:
            assert process.stdout is not None
            match = re.search(r"(http://\S+)", process.stdout.readline())
            assert match is not None, "the server printed no URL"
            urls.append(match.group(1))
        yield urls


# Slow: run once, alone, in CI (four server processes, 480 images).
@pytest.mark.slow
@pytest.mark.parametrize("slots", [(1, 1, 2, 4)])
async def test_loopback_fleet_keeps_each_server_just_full(slots: tuple[int, ...]) -> None:
    """Four servers of 1, 1, 2 and 4 slots at 100 ms per image, C = 16: the learned limits
    end at the slots (give or take a probe), and the median attempt waits in no server
    queue. Throughput is the benchmark's to measure; here only that most of the
    fleet's capacity is used, with room for a loaded machine."""
    with _served(slots, 25) as urls:
        async with AsyncFriendli(server_url=urls) as client:
            requests = [
                {"prompt": "a fox", "seed": i, "num_inference_steps": 4} for i in range(480)
            ]
            started = time.monotonic()
            result = await client.container.image.generate_batch(requests, concurrency=16).collect()
            elapsed = time.monotonic() - started
            learned = [e.capacity for e in client._fleet.endpoints]  # type: ignore[union-attr]
            p50 = statistics.median(
                x
                for e in client._fleet.endpoints
                for x in e.latencies  # type: ignore[union-attr]
            )
    assert not result.failed
    numbers = f"learned {learned}, p50 {p50:.3f} s, {len(requests) / elapsed:.1f} images/s"
    assert all(s <= c <= s + 1 for s, c in zip(slots, learned, strict=True)), numbers
    assert p50 <= 0.1 * 1.5, numbers
    assert len(requests) / elapsed >= 0.7 * sum(slots) / 0.1, numbers


async def test_loopback_revived_server_serves_within_a_second_and_a_half() -> None:
    """A server killed for 2 s: without the health probe, it serves again within 1.5 s
    of listening again."""
    servers = [LocalServer(_server(4, 25)) for _ in range(3)]
    try:
        for server in servers:
            await server.astart()
        victim = servers[2]
        async with AsyncFriendli(server_url=[s.url for s in servers]) as client:
            marks: dict[str, Any] = {}
            served = asyncio.Event()

            def progress(state: BatchProgress) -> None:
                if "back" in marks and state.endpoints[2].successes > marks["before"]:
                    marks.setdefault("served", time.monotonic())
                    served.set()

            async def chaos() -> None:
                await asyncio.sleep(0.5)
                await victim.restart(down_for_s=2.0)
                marks["before"] = client.endpoints[2].successes
                marks["back"] = time.monotonic()

            async def feed() -> Any:
                index = 0
                while not served.is_set():
                    yield {"prompt": "a fox", "seed": index, "num_inference_steps": 4}
                    index += 1

            task = asyncio.ensure_future(chaos())
            batch = client.container.image.generate_batch(
                feed(), concurrency=24, on_progress=progress
            )
            result = await asyncio.wait_for(batch.collect(), 30)
            await task
    finally:
        for server in servers:
            await server.aclose()
    assert not result.failed
    assert marks["served"] - marks["back"] <= 1.5
