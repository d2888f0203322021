"""Fixtures of the reliability suite (RELIABILITY.md) and the hooks that write its report.

Each test gets: the bundled server on its loop (scripted per test through ``x-test-id``),
raw ``asyncio.start_server`` listeners for faults below HTTP, a client factory that closes
what it made and probes it for the token, and a secret probe over every log record.
When ``FRIENDLI_RELIABILITY_REPORT`` names a file (``nox -s reliability`` sets it), the
figures the tests recorded and each scenario's outcome are written there at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from friendli_image import AsyncFriendli, Timeout
from friendli_image.server import LocalServer, ServerConfig

from .harness import (
    FAST,
    FIGURES,
    REPORT_ENV,
    TINY_PNG,
    TOKEN,
    Figures,
    RawHandler,
    RawServer,
    SecretProbe,
    _RecordAll,
    carry_hand_kept,
    render_report,
)


@pytest.fixture(scope="session")
def figures() -> Figures:
    """The session-wide figure collector."""
    return FIGURES


class _ScenarioRecorder:
    """Counts the outcome of every test marked scenario(n), in this directory or not.

    Registered as a plugin, not as this conftest's own hooks, which pytest would call
    only for tests under tests/reliability: scenarios 19-24 live in tests/test_sync*.py.
    """

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # scenario(n) markers become plain keywords so the log report (which has no
        # markers) can tell which scenario a test belongs to.
        for item in items:
            for marker in item.iter_markers("scenario"):
                for number in marker.args:
                    item.keywords[f"scenario_{number}"] = True

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        keywords = report.keywords
        numbers = [int(k[len("scenario_") :]) for k in keywords if k.startswith("scenario_")]
        if not numbers:
            return
        if report.when == "call" or (report.when == "setup" and not report.passed):
            outcome = report.outcome
            if outcome == "skipped" and hasattr(report, "wasxfail"):
                outcome = "xfailed"
            for number in numbers:
                FIGURES.scenarios.setdefault(number, []).append(outcome)
        elif report.when == "teardown" and report.failed:
            for number in numbers:
                FIGURES.scenarios.setdefault(number, []).append("failed")


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("friendli-scenarios"):
        config.pluginmanager.register(_ScenarioRecorder(), "friendli-scenarios")


def _server_figures() -> None:
    """The bundled server's figures, measured by tests/server (see its helpers.figure)."""
    source = os.environ.get("FRIENDLI_SERVER_FIGURES")
    if not source or not Path(source).exists():
        return
    values: dict[str, Any] = {}
    for line in Path(source).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        values[record["name"]] = record["value"]
    if "slowloris.connections" in values:
        FIGURES.set(
            "server.slowloris",
            f"{values['slowloris.connections']} connections trickling a request head all "
            f"closed after at most {values['slowloris.closed_after_max_s']} s (header "
            f"timeout {values.get('slowloris.header_timeout_s', '?')} s); a real request "
            f"meanwhile answered in "
            f"{values['slowloris.real_request_s']} s"
            + (
                f"; at a 256-fd limit with stderr a full pipe, "
                f"{values['flood.connections_opened']} connections opened and real requests "
                f"answered in at most {values['flood.real_request_max_s']} s"
                if "flood.connections_opened" in values
                else ""
            ),
        )
    if "json20m.body_mib" in values:
        FIGURES.set(
            "server.memory",
            f"a {values['json20m.body_mib']} MiB body of 20 M integers refused with 413 in "
            f"{values['json20m.answer_s']} s; peak RSS growth "
            f"{values['json20m.peak_rss_growth_mib']} MiB (its full parse took +534 MiB)",
        )


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get(REPORT_ENV)
    _server_figures()
    if target and FIGURES.scenarios:
        report = Path(target)
        kept = report.read_text(encoding="utf-8") if report.exists() else ""
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(carry_hand_kept(kept, render_report(FIGURES)), encoding="utf-8")


@pytest.fixture(autouse=True)
def secrets(figures: Figures) -> Iterator[SecretProbe]:
    """Every test: all log records (DEBUG and up, any logger) are checked for the token."""
    probe = SecretProbe(figures)
    handler = _RecordAll()
    root = logging.getLogger()
    ours = logging.getLogger("friendli_image")
    old_root, old_ours = root.level, ours.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    ours.setLevel(logging.DEBUG)
    try:
        yield probe
    finally:
        root.removeHandler(handler)
        root.setLevel(old_root)
        ours.setLevel(old_ours)
    probe.check_records(handler.records)


# -- servers ---------------------------------------------------------------------------


@pytest.fixture
def tid(request: pytest.FixtureRequest) -> str:
    """A per-test script key for the bundled server's ``x-test-id``."""
    return f"{request.node.nodeid}-{time.monotonic_ns()}"


@pytest.fixture
async def server() -> AsyncIterator[LocalServer]:
    """The bundled server on the test's loop, answering a tiny static PNG."""
    async with LocalServer(ServerConfig(static_image=TINY_PNG, max_concurrency=64)) as srv:
        yield srv


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[RawHandler], Awaitable[RawServer]]]:
    """A factory of raw listeners; each handler gets (reader, writer) per connection."""
    made: list[RawServer] = []
    tasks: set[asyncio.Task[None]] = set()

    async def start(handler: RawHandler) -> RawServer:
        holder: list[RawServer] = []

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            holder[0].connections += 1
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)  # type: ignore[arg-type]
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                tasks.discard(task)  # type: ignore[arg-type]
                writer.transport.abort()

        srv = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        raw = RawServer(srv, port)
        holder.append(raw)
        made.append(raw)
        return raw

    yield start
    for raw in made:
        raw.server.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for raw in made:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(raw.server.wait_closed(), 2)


@pytest.fixture
async def make_client(
    tid: str, secrets: SecretProbe
) -> AsyncIterator[Callable[..., AsyncFriendli]]:
    """A client factory: probe token, fast retries, this test's x-test-id; closed after."""
    made: list[AsyncFriendli] = []

    def build(url: str, **kwargs: Any) -> AsyncFriendli:
        kwargs.setdefault("token", TOKEN)
        kwargs.setdefault("retries", FAST)
        kwargs.setdefault("timeout", Timeout(connect=2.0, attempt=10.0))
        headers = {"x-test-id": tid, **kwargs.pop("http_headers", {})}
        client = AsyncFriendli(server_url=url, http_headers=headers, **kwargs)
        made.append(client)
        return client

    yield build
    for client in made:
        secrets.check(client)
        await client.close()
