"""AsyncFriendli behaviour a user notices: settings precedence, headers, lifecycle, loops."""

from __future__ import annotations

import asyncio
import gc
import pickle
import threading
import warnings
from typing import Any

import aiohttp
import pytest

from friendli_image import (
    AsyncFriendli,
    FriendliServerError,
    FriendliUsageError,
    FriendliValidationError,
    RetryConfig,
)
from friendli_image.server import LocalServer, ServerConfig

# -- token ------------------------------------------------------------------------------


async def _authorization(server: Any, **kwargs: Any) -> str | None:
    """Make one call with a client built from ``kwargs``; return the Authorization sent."""
    async with AsyncFriendli(server_url=server.url, **kwargs) as client:
        await client.container.image.generate(prompt="p")
    return server.requests[-1].headers.get("Authorization")


async def test_explicit_token_beats_the_environment(
    capture_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """token= wins over FRIENDLI_TOKEN."""
    monkeypatch.setenv("FRIENDLI_TOKEN", "env-token")
    assert await _authorization(capture_server, token="explicit") == "Bearer explicit"


async def test_token_defaults_to_the_environment(
    capture_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without token=, FRIENDLI_TOKEN is sent as a bearer token."""
    monkeypatch.setenv("FRIENDLI_TOKEN", "env-token")
    assert await _authorization(capture_server) == "Bearer env-token"


async def test_no_token_sends_no_authorization_header(capture_server: Any) -> None:
    """No token and no FRIENDLI_TOKEN: no Authorization header at all (not 'Bearer ')."""
    assert await _authorization(capture_server, token=None) is None


async def test_empty_token_sends_no_authorization_header(
    capture_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """token="" (the seed's os.getenv default) sends no Authorization header, even with env set."""
    monkeypatch.setenv("FRIENDLI_TOKEN", "env-token")
    assert await _authorization(capture_server, token="") is None


async def test_empty_env_token_sends_no_authorization_header(
    capture_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FRIENDLI_TOKEN set to an empty string counts as no token."""
    monkeypatch.setenv("FRIENDLI_TOKEN", "")
    assert await _authorization(capture_server) is None


# -- server URL -------------------------------------------------------------------------


async def test_per_call_server_url_beats_the_client(make_capture_server: Any) -> None:
    """server_url= on a call sends that call there, not to the client's server."""
    client_server, call_server = await make_capture_server(), await make_capture_server()
    async with AsyncFriendli(server_url=client_server.url) as client:
        await client.container.image.generate(prompt="p", server_url=call_server.url)
        await client.container.image.edit(image=b"GIF89a" + bytes(20), prompt="p")
    assert [r.path for r in call_server.requests] == ["/v1/images/generations"]
    assert [r.path for r in client_server.requests] == ["/v1/images/edits"]


async def test_client_server_url_beats_the_environment(
    make_capture_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's server_url wins over FRIENDLI_SERVER_URL (the official SDK ignores it)."""
    client_server, env_server = await make_capture_server(), await make_capture_server()
    monkeypatch.setenv("FRIENDLI_SERVER_URL", env_server.url)
    async with AsyncFriendli(server_url=client_server.url) as client:
        await client.container.image.generate(prompt="p")
    assert len(client_server.requests) == 1
    assert env_server.requests == []


async def test_environment_server_url_is_used(
    capture_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without server_url=, FRIENDLI_SERVER_URL is used (a trailing slash is fine)."""
    monkeypatch.setenv("FRIENDLI_SERVER_URL", capture_server.url + "/")
    async with AsyncFriendli() as client:
        await client.container.image.generate(prompt="p")
    assert [r.path for r in capture_server.requests] == ["/v1/images/generations"]


async def test_default_server_url_is_localhost_8000(mock_http: Any) -> None:
    """With nothing configured, calls go to http://localhost:8000."""
    mock_http.post("http://localhost:8000/v1/images/generations", body=b'{"image":"iVBORw0KGgo="}')
    async with AsyncFriendli() as client:
        assert client.server_url == "http://localhost:8000"
        result = await client.container.image.generate(prompt="p")
    assert result.format == "png"
    assert [str(url) for _method, url in mock_http.requests] == [
        "http://localhost:8000/v1/images/generations"
    ]


async def test_invalid_per_call_server_url_sends_nothing(
    capture_client: Any, capture_server: Any
) -> None:
    """A bad per-call server_url is refused before anything is sent."""
    with pytest.raises(FriendliValidationError):
        await capture_client.container.image.generate(prompt="p", server_url="file:///tmp")
    assert capture_server.requests == []


# -- headers ----------------------------------------------------------------------------


async def test_http_headers_are_merged(capture_server: Any) -> None:
    """Client and call headers are both sent; the call's win; they do not leak to later calls."""
    async with AsyncFriendli(
        server_url=capture_server.url, http_headers={"X-Team": "a", "X-Both": "client"}
    ) as client:
        await client.container.image.generate(
            prompt="p", http_headers={"X-Call": "b", "X-Both": "call"}
        )
        await client.container.image.generate(prompt="p")
    first, second = capture_server.requests
    assert (first.headers["X-Team"], first.headers["X-Call"], first.headers["X-Both"]) == (
        "a",
        "b",
        "call",
    )
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["User-Agent"].startswith("friendli-image/")
    assert second.headers["X-Both"] == "client"
    assert "X-Call" not in second.headers


async def test_request_id_is_stable_across_attempts(
    capture_server: Any, fast_retry: RetryConfig
) -> None:
    """One call keeps its X-Request-ID on every attempt; X-Friendli-Attempt counts 0, 1, 2."""
    capture_server.respond(503, {"detail": "busy"})
    capture_server.respond(503, {"detail": "busy"})
    async with AsyncFriendli(server_url=capture_server.url, retries=fast_retry) as client:
        result = await client.container.image.generate(prompt="p")
        await client.container.image.generate(prompt="p")
    attempts = capture_server.requests[:3]
    ids = {request.headers["X-Request-ID"] for request in attempts}
    assert ids == {result.request_id}
    assert [r.headers["X-Friendli-Attempt"] for r in attempts] == ["0", "1", "2"]
    assert result.attempts == 3
    later = capture_server.requests[3]
    assert later.headers["X-Request-ID"] != result.request_id
    assert later.headers["X-Friendli-Attempt"] == "0"


async def test_retries_int_sets_the_number_of_retries(capture_server: Any) -> None:
    """retries=1 means two attempts in all."""
    for _ in range(3):
        capture_server.respond(503, {"detail": "busy"})
    async with AsyncFriendli(
        server_url=capture_server.url,
        retries=RetryConfig(initial_delay=0.001, max_delay=0.001, jitter=0.0),
    ) as client:
        with pytest.raises(FriendliServerError) as caught:
            await client.container.image.generate(prompt="p", retries=1)
    assert caught.value.attempts == 2
    assert len(capture_server.requests) == 2


# -- lifecycle --------------------------------------------------------------------------


def test_construction_needs_no_loop_and_does_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client can be built outside any event loop: no session, connector or loop is made."""

    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("no session or connector may be created in __init__")

    monkeypatch.setattr(aiohttp, "ClientSession", forbidden)
    monkeypatch.setattr(aiohttp, "TCPConnector", forbidden)
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    client = AsyncFriendli(token="t", server_url="http://127.0.0.1:9")
    assert client.container.image is client.container.image
    assert not client.closed


async def test_use_after_close_is_a_usage_error(capture_server: Any) -> None:
    """A closed client raises FriendliUsageError and sends nothing; closing twice is fine."""
    client = AsyncFriendli(server_url=capture_server.url)
    await client.container.image.generate(prompt="p")
    await client.close()
    await client.close()
    assert client.closed
    with pytest.raises(FriendliUsageError, match="closed"):
        await client.container.image.generate(prompt="p")
    assert len(capture_server.requests) == 1


async def test_close_without_use_is_fine() -> None:
    """Closing a client that never made a call does nothing and raises nothing."""
    client = AsyncFriendli()
    await client.close()
    assert client.closed


def test_one_client_across_two_asyncio_runs(tiny_png: bytes) -> None:
    """A client used in two successive asyncio.run() calls works and leaves nothing open."""
    sessions: list[aiohttp.ClientSession] = []
    with LocalServer(ServerConfig(static_image=tiny_png)) as server:
        client = AsyncFriendli(server_url=server.url)

        async def use() -> bytes:
            result = await client.container.image.generate(prompt="p")
            assert client._session is not None
            sessions.append(client._session)
            return result.data

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert asyncio.run(use()) == tiny_png
            assert asyncio.run(use()) == tiny_png
            gc.collect()
    assert [session.closed for session in sessions] == [True, True]
    assert sessions[0] is not sessions[1]
    assert [str(w.message) for w in caught] == []


async def test_dropped_client_closes_its_session(capture_server: Any) -> None:
    """A client dropped without close() while the loop runs closes its pool, without warnings."""
    client = AsyncFriendli(server_url=capture_server.url)
    await client.container.image.generate(prompt="p")
    session = client._session
    assert session is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del client
        gc.collect()
        for _ in range(20):
            if session.closed:
                break
            await asyncio.sleep(0.01)
        gc.collect()
    assert session.closed
    assert [str(w.message) for w in caught] == []


async def test_use_from_another_loop_is_a_usage_error(
    capture_client: Any, capture_server: Any
) -> None:
    """A client whose session lives on a running loop refuses calls from another loop."""
    await capture_client.container.image.generate(prompt="p")
    outcome: list[BaseException] = []

    def other_thread() -> None:
        try:
            asyncio.run(capture_client.container.image.generate(prompt="p"))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    await asyncio.get_running_loop().run_in_executor(None, thread.join)
    assert len(outcome) == 1
    assert isinstance(outcome[0], FriendliUsageError)
    assert "another event loop" in str(outcome[0])
    assert len(capture_server.requests) == 1


# -- repr and pickling ------------------------------------------------------------------


def test_repr_hides_the_token(probe_token: str) -> None:
    """repr(client) shows the server and that a token is set, never the token."""
    client = AsyncFriendli(token=probe_token, server_url="https://api.example.com")
    text = repr(client)
    assert probe_token not in text
    assert probe_token not in str(client)
    assert "'***'" in text
    assert "https://api.example.com" in text
    assert "token=None" in repr(AsyncFriendli(token=None))


def test_pickling_the_client_is_refused(probe_token: str) -> None:
    """Pickling a client raises TypeError saying why, without the token."""
    client = AsyncFriendli(token=probe_token)
    with pytest.raises(TypeError, match="cannot be pickled") as caught:
        pickle.dumps(client)
    assert probe_token not in str(caught.value)
    assert probe_token not in repr(caught.value.args)


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\r\nX-Injected: 1", "\x00"])
def test_token_with_a_line_break_is_refused(probe_token: str, suffix: str) -> None:
    """A token with a line break (e.g. read from a file) is a validation error, not aiohttp's."""
    with pytest.raises(FriendliValidationError) as caught:
        AsyncFriendli(token=probe_token + suffix)
    assert caught.value.field == "token"
    assert "strip" in str(caught.value)
    assert probe_token not in str(caught.value)
    assert probe_token not in repr(caught.value.args)


def test_env_token_with_a_trailing_newline_is_refused(
    probe_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FRIENDLI_TOKEN ending in a newline is refused the same way, without showing it."""
    monkeypatch.setenv("FRIENDLI_TOKEN", probe_token + "\n")
    with pytest.raises(FriendliValidationError) as caught:
        AsyncFriendli()
    assert probe_token not in str(caught.value)


async def test_header_with_a_line_break_is_refused(
    capture_client: Any, capture_server: Any, probe_token: str
) -> None:
    """An http_headers value with a line break raises FriendliValidationError; nothing is sent."""
    with pytest.raises(FriendliValidationError) as caught:
        AsyncFriendli(http_headers={"X-Key": probe_token + "\n"})
    assert caught.value.field == "http_headers"
    assert probe_token not in str(caught.value)
    with pytest.raises(FriendliValidationError):
        await capture_client.container.image.generate(
            prompt="p", http_headers={"X-Bad\r\nName": "v"}
        )
    assert capture_server.requests == []
