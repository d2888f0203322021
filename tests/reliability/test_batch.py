"""Scenario 38: a 500-item fan-out of single calls through faults and a restart loses nothing.

The batch API (``generate_batch``) is its engineer's to test, including "a 401 on the
first item stops new dispatches"; here the same load runs as a plain
``asyncio.gather`` over ``AsyncFriendli.generate`` behind a semaphore, which is what the
retry policy, the budget and the connection handling must survive on their own.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pytest

from friendli_image import AsyncFriendli, FriendliConnectionError, RetryConfig
from friendli_image.server import Action, FaultRates, LocalServer, ServerConfig

from .harness import TINY_PNG, Figures

MakeClient = Callable[..., AsyncFriendli]
#: The 2,000-item acceptance run is tests/test_batch.py's (through generate_batch); these
#: runs of single calls under the same faults need fewer items to show the same.
ITEMS = 500
CONCURRENCY = 64
STRAGGLER_S = 8.0  # long enough that the other 499 items finish first on a loaded machine
#: Starts after the restart (items start in order), so the restart cannot cut it short.
STRAGGLER = 375


async def _run_batch(
    srv: LocalServer, client: AsyncFriendli, tid: str
) -> tuple[list[Any], list[float], float]:
    """Run ITEMS prompts at CONCURRENCY; restart the server halfway; one item straggles."""
    srv.script(f"{tid}-straggler", [Action.delay(STRAGGLER_S)])
    slots = asyncio.Semaphore(CONCURRENCY)
    finished: list[float] = [0.0] * ITEMS
    done = 0
    halfway = asyncio.Event()
    started = time.monotonic()

    async def item(index: int) -> Any:
        nonlocal done
        headers = {"x-test-id": f"{tid}-straggler"} if index == STRAGGLER else None
        async with slots:
            try:
                return await client.container.image.generate(
                    prompt=f"item {index}", http_headers=headers
                )
            finally:
                finished[index] = time.monotonic() - started
                done += 1
                if done == ITEMS // 2:
                    halfway.set()

    async def restart_halfway() -> None:
        await halfway.wait()
        await srv.restart()

    restarter = asyncio.ensure_future(restart_halfway())
    outcomes = await asyncio.gather(*(item(i) for i in range(ITEMS)), return_exceptions=True)
    await restarter
    return outcomes, finished, time.monotonic() - started


def _check(srv: LocalServer, outcomes: list[Any], figures: Figures) -> dict[str, int]:
    by_id: dict[str, list[Any]] = defaultdict(list)
    for record in srv.records:
        by_id[record.headers.get("X-Request-ID", "")].append(record)
    counts: Counter[str] = Counter()
    seen_ids: set[str] = set()
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            # The only acceptable failure: a POST the server read and dropped.
            assert isinstance(outcome, FriendliConnectionError), repr(outcome)
            assert outcome.maybe_processed
            counts["flagged"] += 1
            request_id = outcome.request_id
        else:
            counts["ok"] += 1
            counts["maybe_duplicated"] += outcome.maybe_duplicated
            request_id = outcome.request_id
        assert request_id is not None
        assert request_id not in seen_ids  # no result delivered twice
        seen_ids.add(request_id)
        records = by_id[request_id]
        assert records, index
        prompts = {r.body.get("prompt") for r in records if isinstance(r.body, dict)}
        assert prompts <= {f"item {index}"}, (index, prompts)  # in order, never mixed up
        after_read = [r for r in records[:-1] if r.action == "drop_after_read"]
        counts["resent_after_read"] += len(after_read)
    figures.add("inject.status", sum(v for k, v in srv.stats.faults.items() if "status" in k))
    figures.add("inject.reset", srv.stats.faults.get("drop_after_read", 0) + 1)
    figures.add("inject.timeout")  # the straggler
    return dict(counts)


@pytest.mark.slow
@pytest.mark.scenario(38)
@pytest.mark.parametrize("resend", [False, True], ids=["default", "retry_ambiguous"])
async def test_two_thousand_items_through_faults_and_a_restart(
    make_client: MakeClient, tid: str, figures: Figures, resend: bool
) -> None:
    """500 items, C=64, 5 % 503, 2 % 429, 1 % drops, a restart, a straggler: nothing lost."""
    faults = FaultRates(
        p_503=0.05, p_429=0.02, retry_after_s=0.5, p_drop_after_read=0.01, delay_ms=(0, 200)
    )
    config = ServerConfig(static_image=TINY_PNG, faults=faults, max_concurrency=CONCURRENCY)
    # Several independent faults (503, 429, drops, the restart) can meet one request:
    # more attempts than the default keep the run deterministic on a loaded machine.
    policy = RetryConfig(
        max_attempts=8, initial_delay=0.1, max_delay=1.0, jitter=0.1, retry_ambiguous=resend
    )
    async with LocalServer(config) as srv:
        client = make_client(srv.url, retries=policy, max_connections=CONCURRENCY)
        outcomes, finished, elapsed = await _run_batch(srv, client, tid)
        counts = _check(srv, outcomes, figures)
        stats = srv.stats
    assert len(outcomes) == ITEMS
    assert stats.max_in_flight <= CONCURRENCY
    others = [t for i, t in enumerate(finished) if i != STRAGGLER]
    assert finished[STRAGGLER] >= STRAGGLER_S
    assert max(others) < finished[STRAGGLER]  # the straggler held up nobody
    ratio = stats.total_requests / ITEMS
    summary = (
        f"{ITEMS} items in {elapsed:.1f} s: {counts['ok']} results, "
        f"{counts.get('flagged', 0)} typed errors flagged maybe_processed, lost 0, "
        f"duplicated 0, misordered 0; {counts.get('resent_after_read', 0)} resends of a "
        f"POST the server had read ({counts.get('maybe_duplicated', 0)} results flagged "
        f"maybe_duplicated); server max in flight {stats.max_in_flight} (C={CONCURRENCY}); "
        f"{stats.total_requests} requests ({ratio:.3f} per item)"
    )
    figures.add("recover.expected", ITEMS - counts.get("flagged", 0))
    figures.add("recover.ok", counts["ok"])
    figures.add("fail.expected", counts.get("flagged", 0))
    figures.add("fail.typed", counts.get("flagged", 0))
    figures.add("ambiguous.flagged", counts.get("flagged", 0))
    if resend:
        figures.set("batch.optin", summary)
        figures.add("ambiguous.resent.optin", counts.get("resent_after_read", 0))
        assert counts.get("flagged", 0) == 0
    else:
        figures.set("batch", summary)
        figures.set("amplification.batch", f"{ratio:.3f}")
        figures.add("ambiguous.resent.default", counts.get("resent_after_read", 0))
        # Resent only through the one reconnect of a reused connection, always flagged.
        assert counts.get("resent_after_read", 0) <= counts.get("maybe_duplicated", 0)
