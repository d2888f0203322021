"""SyncFriendli in-process: parity with AsyncFriendli, threads, guard rails, close semantics."""

from __future__ import annotations

import asyncio
import gc
import inspect
import pickle
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any

import pytest

from friendli_image import (
    AsyncFriendli,
    FriendliNotFoundError,
    FriendliUsageError,
    FriendliUsageWarning,
    FriendliValidationError,
    ImageResult,
    SyncFriendli,
)
from friendli_image._resources import Container as AsyncContainer
from friendli_image._resources import Image as AsyncImage
from friendli_image._sync import LOOP_THREAD_NAME
from friendli_image._sync import Container as SyncContainer
from friendli_image._sync import Image as SyncImage
from friendli_image.server import Action, LocalServer, ServerConfig

#: Hard limit for anything that could deadlock.
HANG_S = 5.0


def _loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == LOOP_THREAD_NAME]


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a daemon thread; fail (instead of hanging) if it has not ended in time."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s (deadlock?)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.fixture
def server() -> Iterator[LocalServer]:
    """The bundled server rendering small images, on its own thread."""
    with LocalServer(ServerConfig(image_size=32)) as srv:
        yield srv


@pytest.fixture
def client(server: LocalServer) -> Iterator[SyncFriendli]:
    """A SyncFriendli pointed at ``server``, closed after the test."""
    friendli = SyncFriendli(server_url=server.url, retries=0)
    yield friendli
    friendli.close()
    assert not _loop_threads()


def _public(cls: type) -> dict[str, Any]:
    return {name: value for name, value in vars(cls).items() if not name.startswith("_")}


def _signature(member: Any) -> tuple[str, inspect.Signature]:
    if isinstance(member, property):
        return "property", inspect.signature(member.fget)  # type: ignore[arg-type]
    if isinstance(member, cached_property):
        return "cached_property", inspect.signature(member.func)
    # The parameters must match; a blocking batch method returns SyncBatch, not Batch.
    return type(member).__name__, inspect.signature(member).replace(
        return_annotation=inspect.Signature.empty
    )


# -- parity ------------------------------------------------------------------------------


def test_constructor_signature_matches_async() -> None:
    """SyncFriendli takes exactly AsyncFriendli's arguments: names, kinds, defaults, types."""
    assert inspect.signature(SyncFriendli.__init__) == inspect.signature(AsyncFriendli.__init__)


@pytest.mark.parametrize(
    ("sync_cls", "async_cls"),
    [(SyncImage, AsyncImage), (SyncContainer, AsyncContainer)],
    ids=["image", "container"],
)
def test_namespace_methods_match_async(sync_cls: type, async_cls: type) -> None:
    """Every public method of a namespace has a blocking twin with the same signature."""
    sync_members, async_members = _public(sync_cls), _public(async_cls)
    assert sorted(sync_members) == sorted(async_members)
    for name, async_member in async_members.items():
        assert _signature(sync_members[name]) == _signature(async_member), name
        if inspect.iscoroutinefunction(async_member):
            assert not inspect.iscoroutinefunction(sync_members[name]), name
            assert sync_members[name].__doc__, f"{name} has no docstring"


def test_client_surface_matches_async() -> None:
    """The client has AsyncFriendli's public members and signatures, minus the async-only ones."""
    sync_members, async_members = _public(SyncFriendli), _public(AsyncFriendli)
    async_only = {"aclose", "copy"}  # the awaitable alias; a copy for another loop
    assert set(async_members) - set(sync_members) == async_only
    assert set(sync_members) <= set(async_members)
    for name, member in sync_members.items():
        assert _signature(member) == _signature(async_members[name]), name


# -- calls -------------------------------------------------------------------------------


def test_generate_and_edit_return_what_async_returns(
    server: LocalServer, client: SyncFriendli, tiny_png: bytes
) -> None:
    """generate and edit give the same images as the async client for the same arguments."""
    sync_generated = client.container.image.generate(prompt="a red barn", seed=3)
    sync_edited = client.container.image.edit(image=tiny_png, prompt="add snow", seed=4)

    async def run_async() -> tuple[ImageResult, ImageResult]:
        async with AsyncFriendli(server_url=server.url) as inner:
            return (
                await inner.container.image.generate(prompt="a red barn", seed=3),
                await inner.container.image.edit(image=tiny_png, prompt="add snow", seed=4),
            )

    async_generated, async_edited = asyncio.run(run_async())
    assert sync_generated == async_generated
    assert sync_edited == async_edited
    assert sync_generated != sync_edited
    assert len(str(sync_generated)) < 200


def test_errors_come_through_typed(server: LocalServer, client: SyncFriendli) -> None:
    """An API error raised on the loop thread reaches the caller as the same typed error."""
    server.script("nf", [Action.status(404)])
    with pytest.raises(FriendliNotFoundError) as info:
        client.container.image.generate(prompt="x", http_headers={"x-test-id": "nf"})
    assert info.value.status == 404


def test_bad_constructor_argument_raises_before_any_thread() -> None:
    """Invalid constructor arguments raise FriendliValidationError at once, starting nothing."""
    with pytest.raises(FriendliValidationError, match="max_connections"):
        SyncFriendli(max_connections=0)
    with pytest.raises(FriendliValidationError, match="server_url"):
        SyncFriendli(server_url="ftp://nope")
    assert not _loop_threads()


def test_construction_starts_no_thread(client: SyncFriendli) -> None:
    """Building a client starts nothing: the loop thread starts with the first call."""
    assert not _loop_threads()
    assert not client.closed


@pytest.mark.scenario(21)
def test_many_threads_share_one_client(server: LocalServer, client: SyncFriendli) -> None:
    """32 threads x 20 calls on one client: 640 correct, distinct results, one loop thread."""
    server.reset_stats()
    loop_thread_counts: list[int] = []

    def worker(worker_id: int) -> list[tuple[str, ImageResult]]:
        results = []
        for call in range(20):
            prompt = f"thread {worker_id} call {call}"
            results.append((prompt, client.container.image.generate(prompt=prompt, seed=call)))
            loop_thread_counts.append(len(_loop_threads()))
        return results

    with ThreadPoolExecutor(32) as pool:
        outcome = [item for batch in pool.map(worker, range(32)) for item in batch]

    assert len(outcome) == 640
    prompts_by_request_id = {
        record.headers["X-Request-ID"]: record.body["prompt"] for record in server.records
    }
    for prompt, result in outcome:
        assert prompts_by_request_id[result.request_id] == prompt
    assert len({result.data for _, result in outcome}) == 640
    assert server.stats.total_requests == 640
    assert set(loop_thread_counts) == {1}


# -- guard rails ---------------------------------------------------------------------------


@pytest.mark.scenario(19)
async def test_call_inside_running_loop_works_and_warns_once(
    server: LocalServer, client: SyncFriendli
) -> None:
    """A call inside a running event loop succeeds and warns once, pointing to AsyncFriendli."""
    with pytest.warns(FriendliUsageWarning, match="AsyncFriendli") as record:
        first = _call_here(client)
    assert len(record) == 1
    assert record[0].filename == __file__  # attributed to the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = _call_here(client)
    assert first.format == second.format == "jpeg"


def _call_here(client: SyncFriendli) -> ImageResult:
    return client.container.image.generate(prompt="in a loop")


@pytest.mark.scenario(20)
def test_call_from_the_loop_thread_raises_instead_of_deadlocking(
    server: LocalServer, client: SyncFriendli
) -> None:
    """A blocking call made on the client's own loop thread raises FriendliUsageError at once."""

    async def calls_back(_inner: AsyncFriendli) -> ImageResult:
        return client.container.image.generate(prompt="re-entrant")

    async def closes(_inner: AsyncFriendli) -> None:
        client.close()

    started = time.monotonic()
    with pytest.raises(FriendliUsageError, match="own event loop thread"):
        _within(HANG_S, lambda: client._run(calls_back))
    with pytest.raises(FriendliUsageError, match="own event loop thread"):
        _within(HANG_S, lambda: client._run(closes))
    assert time.monotonic() - started < HANG_S / 2  # a hang would take HANG_S or more
    assert server.stats.total_requests == 0
    assert client.container.image.generate(prompt="still usable").format == "jpeg"


# -- close ---------------------------------------------------------------------------------


def test_close_is_idempotent_and_stops_the_thread(server: LocalServer) -> None:
    """close() twice is a no-op the second time; the loop thread is gone after the first."""
    friendli = SyncFriendli(server_url=server.url)
    friendli.container.image.generate(prompt="once")
    assert len(_loop_threads()) == 1
    friendli.close()
    assert not _loop_threads()
    assert friendli.closed
    friendli.close()
    assert friendli.closed


def test_close_without_use_is_a_no_op() -> None:
    """Closing a client that never made a call starts and leaves nothing."""
    friendli = SyncFriendli()
    friendli.close()
    friendli.close()
    assert not _loop_threads()


def test_call_after_close_raises_and_sends_nothing(server: LocalServer) -> None:
    """A call after close raises FriendliUsageError and no request reaches the server."""
    with SyncFriendli(server_url=server.url) as friendli:
        friendli.container.image.generate(prompt="inside")
    server.reset_stats()
    with pytest.raises(FriendliUsageError, match="closed"):
        friendli.container.image.generate(prompt="after")
    with pytest.raises(FriendliUsageError, match="closed"), friendli:
        pass
    assert server.stats.total_requests == 0
    assert not _loop_threads()


def test_close_cancels_calls_in_flight_in_other_threads(server: LocalServer) -> None:
    """Closing while another thread waits on a call ends that call with FriendliUsageError."""
    server.script("slow", [Action.delay(30)])
    friendli = SyncFriendli(server_url=server.url, retries=0)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            friendli.container.image.generate, prompt="slow", http_headers={"x-test-id": "slow"}
        )
        deadline = time.monotonic() + HANG_S
        while server.stats.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        friendli.close()
        with pytest.raises(FriendliUsageError, match="closed while this call was in flight"):
            pending.result(timeout=HANG_S)
    assert time.monotonic() - started < HANG_S / 2  # a hang would take HANG_S or more
    assert server.stats.total_requests == 1


def test_unclosed_client_is_cleaned_up_when_collected(server: LocalServer) -> None:
    """A client dropped without close() stops its loop thread when it is garbage collected."""
    friendli = SyncFriendli(server_url=server.url)
    friendli.container.image.generate(prompt="then dropped")
    (thread,) = _loop_threads()
    del friendli
    gc.collect()
    thread.join(HANG_S)
    assert not thread.is_alive()


def test_repr_and_pickle_keep_the_token_secret(probe_token: str) -> None:
    """repr shows the URL but not the token, and the client refuses to be pickled."""
    friendli = SyncFriendli(token=probe_token, server_url="http://127.0.0.1:9")
    text = repr(friendli)
    assert probe_token not in text
    assert "token='***'" in text
    assert "http://127.0.0.1:9" in text
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(friendli)
    assert "token=None" in repr(SyncFriendli(token=""))
