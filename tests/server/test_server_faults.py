"""Every fault Action and the random FaultRates behave as named."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import pytest

from friendli_image.server import Action, FaultRates, LocalServer, ServerConfig

from .helpers import GENERATE, decode_response_image

BODY = {"prompt": "p"}


def _tid(name: str) -> dict[str, str]:
    return {"x-test-id": name}


async def test_status_action(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """Action.status answers the code, headers and body given, then normal service resumes."""
    server.script(
        "t",
        [
            Action.status(429, headers={"Retry-After": "2"}),
            Action.status(502, body="<html>bad gateway</html>", content_type="text/html"),
            Action.status(503, body={"error": "busy"}),
        ],
    )
    url = server.url + GENERATE
    async with session.post(url, json=BODY, headers=_tid("t")) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "2"
        assert "detail" in await resp.json()
    async with session.post(url, json=BODY, headers=_tid("t")) as resp:
        assert resp.status == 502
        assert resp.content_type == "text/html"
        assert await resp.text() == "<html>bad gateway</html>"
    async with session.post(url, json=BODY, headers=_tid("t")) as resp:
        assert resp.status == 503
        assert await resp.json() == {"error": "busy"}
    async with session.post(url, json=BODY, headers=_tid("t")) as resp:
        assert resp.status == 200
    assert server.stats.faults == {"status:429": 1, "status:502": 1, "status:503": 1}
    assert [r.action for r in server.records] == ["status:429", "status:502", "status:503", None]


async def test_scripts_are_per_test_id(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """A script only affects requests with its x-test-id; None scripts untagged requests."""
    server.script("a", [Action.status(500)])
    server.script(None, [Action.status(504)])
    url = server.url + GENERATE
    async with session.post(url, json=BODY, headers=_tid("b")) as resp:
        assert resp.status == 200
    async with session.post(url, json=BODY) as resp:
        assert resp.status == 504
    async with session.post(url, json=BODY, headers=_tid("a")) as resp:
        assert resp.status == 500
    assert server.pending_actions("a") == 0
    server.script("a", [Action.status(500)])
    server.clear_scripts()
    assert server.pending_actions("a") == 0


async def test_delay_action(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """Action.delay waits before answering normally, and trips a client read timeout."""
    server.script("t", [Action.delay(0.3), Action.delay(1.0)])
    url = server.url + GENERATE
    started = time.monotonic()
    async with session.post(url, json=BODY, headers=_tid("t")) as resp:
        assert resp.status == 200
    assert time.monotonic() - started >= 0.3
    timeout = aiohttp.ClientTimeout(total=0.2)
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(url, json=BODY, headers=_tid("t"), timeout=timeout) as resp:
            await resp.read()
    # The server notices the hang-up on its next read or write: poll, not a fixed sleep.
    for _ in range(500):
        if server.stats.disconnects:
            break
        await asyncio.sleep(0.01)
    assert server.records[-1].disconnected is True
    assert server.stats.disconnects == 1


async def test_status_with_delay(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """Action.status(..., delay=) sleeps before the status."""
    server.script("t", [Action.status(503, delay=0.2)])
    started = time.monotonic()
    async with session.post(server.url + GENERATE, json=BODY, headers=_tid("t")) as resp:
        assert resp.status == 503
    assert time.monotonic() - started >= 0.2


async def test_drop_before_read(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """Action.drop_before_read closes the connection without a reply."""
    server.script("t", [Action.drop_before_read()])
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with session.post(server.url + GENERATE, json=BODY, headers=_tid("t")) as resp:
            await resp.read()
    (record,) = server.records
    assert record.body is None
    assert record.status is None
    assert record.action == "drop_before_read"


async def test_drop_after_read(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """Action.drop_after_read reads the body, then closes without a reply."""
    server.script("t", [Action.drop_after_read()])
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with session.post(server.url + GENERATE, json=BODY, headers=_tid("t")) as resp:
            await resp.read()
    (record,) = server.records
    assert record.status is None
    assert server.stats.faults == {"drop_after_read": 1}


async def test_truncate(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """Action.truncate sends the full Content-Length but only half the body, then closes."""
    server.script("t", [Action.truncate()])
    async with session.post(server.url + GENERATE, json=BODY, headers=_tid("t")) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"]
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_malformed_json(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """Action.malformed_json answers 200 with a body that does not parse."""
    server.script("t", [Action.malformed_json()])
    async with session.post(server.url + GENERATE, json=BODY, headers=_tid("t")) as resp:
        assert resp.status == 200
        with pytest.raises(ValueError, match=r"."):
            await resp.json()


async def test_invalid_base64(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """Action.invalid_base64 answers 200 {"image": "@@@"}."""
    server.script("t", [Action.invalid_base64()])
    async with session.post(server.url + GENERATE, json=BODY, headers=_tid("t")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"image": "@@@"}


async def test_trickle(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """Action.trickle sends a valid JSON response in timed chunks."""
    server.script("t", [Action.trickle(chunk_size=64, interval_s=0.05, total_chunks=4)])
    started = time.monotonic()
    async with session.post(server.url + GENERATE, json=BODY, headers=_tid("t")) as resp:
        assert resp.status == 200
        sizes = [len(chunk) async for chunk in resp.content.iter_any()]
    assert time.monotonic() - started >= 0.2
    assert len(sizes) >= 3


async def test_trickle_body_is_valid_json(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """A trickled body, padded to size, still parses to a decodable image."""
    server.script("t", [Action.trickle(chunk_size=4096, interval_s=0.0, total_chunks=3)])
    async with session.post(server.url + GENERATE, json=BODY, headers=_tid("t")) as resp:
        decode_response_image(await resp.json())


async def test_ok_action(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """Action.ok serves normally and is not counted as a fault."""
    server.script("t", [Action.ok()])
    async with session.post(server.url + GENERATE, json=BODY, headers=_tid("t")) as resp:
        assert resp.status == 200
    assert server.stats.faults == {}


def test_action_arguments_are_checked() -> None:
    """Impossible actions are refused when built."""
    with pytest.raises(ValueError, match="status code"):
        Action.status(42)
    with pytest.raises(ValueError, match="delay_s"):
        Action.delay(-1)
    with pytest.raises(ValueError, match="chunk_size"):
        Action.trickle(chunk_size=0)
    with pytest.raises(ValueError, match="exceed"):
        FaultRates(p_503=0.6, p_429=0.6)


async def test_random_fault_rates(session: aiohttp.ClientSession) -> None:
    """FaultRates inject 503, 429 with Retry-After and drops at about the configured rates."""
    faults = FaultRates(p_503=0.2, p_429=0.2, retry_after_s=3, p_drop_after_read=0.1, seed=7)
    config = ServerConfig(image_size=8, faults=faults)
    statuses: dict[int | str, int] = {}
    async with LocalServer(config) as srv:
        for _ in range(200):
            try:
                async with session.post(srv.url + GENERATE, json=BODY) as resp:
                    await resp.read()
                    key: int | str = resp.status
                    if resp.status == 429:
                        assert resp.headers["Retry-After"] == "3"
            except aiohttp.ServerDisconnectedError:
                key = "drop"
            statuses[key] = statuses.get(key, 0) + 1
        stats = srv.stats
    assert 20 <= statuses[503] <= 60
    assert 20 <= statuses[429] <= 60
    assert 5 <= statuses["drop"] <= 40
    assert stats.faults == {
        "status:503": statuses[503],
        "status:429": statuses[429],
        "drop_after_read": statuses["drop"],
    }


async def test_random_delay(session: aiohttp.ClientSession, late: Callable[[float], float]) -> None:
    """FaultRates.delay_ms delays every request within the range."""
    config = ServerConfig(image_size=8, faults=FaultRates(delay_ms=(100, 150)))
    async with LocalServer(config) as srv:
        started = time.monotonic()
        async with session.post(srv.url + GENERATE, json=BODY) as resp:
            assert resp.status == 200
        assert 0.1 <= time.monotonic() - started <= late(0.15)


async def test_scripts_win_over_random_faults(session: aiohttp.ClientSession) -> None:
    """A scripted action is used instead of a random fault."""
    async with LocalServer(ServerConfig(faults=FaultRates(p_503=1.0))) as srv:
        srv.script("t", [Action.ok()])
        async with session.post(srv.url + GENERATE, json=BODY, headers=_tid("t")) as resp:
            assert resp.status == 200
        async with session.post(srv.url + GENERATE, json=BODY, headers=_tid("t")) as resp:
            assert resp.status == 503
