"""Behaviour the single retry loop and the option objects guarantee across entry points."""

from __future__ import annotations

import asyncio
import inspect
import pathlib
import warnings
from collections.abc import AsyncIterator

import pytest

from friendli_image import (
    AsyncFriendli,
    BatchOptions,
    FriendliRateLimitError,
    FriendliValidationError,
    RetryConfig,
    SyncFriendli,
)
from friendli_image.server import Action, LocalServer, ServerConfig
from friendli_image.testing import RecordedWaits, no_wait

#: Waits are recorded, not slept, so they can be long next to a requests real time on
#: a loaded machine, which the clock that max_elapsed and Timeout.total read still counts.
POLICY = RetryConfig(max_attempts=5, max_elapsed=5.0, jitter=0.0, initial_delay=0.05)
RATE_LIMITED = [Action.status(429, headers={"retry-after-ms": "3000"})] * 10


@pytest.fixture
async def server() -> AsyncIterator[LocalServer]:
    async with LocalServer(ServerConfig()) as local:
        yield local


async def test_a_batch_item_retries_exactly_like_a_single_call(server: LocalServer) -> None:
    """One 429 script (Retry-After 3 s, max_elapsed 5 s): same attempts, same waits."""
    server.script("single", RATE_LIMITED)
    server.script("batch", RATE_LIMITED)
    async with AsyncFriendli(server_url=server.url, retries=POLICY) as client:
        image = client.container.image
        with no_wait() as single, pytest.raises(FriendliRateLimitError) as caught:
            await image.generate(prompt="p", http_headers={"x-test-id": "single"})
        with no_wait() as batch:
            result = await image.generate_batch(
                [{"prompt": "p", "http_headers": {"x-test-id": "batch"}}]
            )
    (item,) = result.items
    assert isinstance(item.error, FriendliRateLimitError)
    assert caught.value.attempts == item.attempts == item.error.attempts == 2
    # 3 s, then a second 3 s would end at 6 s, past max_elapsed.
    assert single.delays == batch.delays == [3.0]


async def test_a_batch_honours_timeout_total_across_429_retries(
    server: LocalServer, friendli_no_wait: RecordedWaits
) -> None:
    """Timeout.total bounds a batch item's 429 retries as it bounds a single call's."""
    from friendli_image import Timeout

    server.script("t", RATE_LIMITED)
    async with AsyncFriendli(
        server_url=server.url,
        retries=RetryConfig(max_attempts=10, max_elapsed=None, jitter=0.0),
        timeout=Timeout(total=7.0),
    ) as client:
        result = await client.container.image.generate_batch(
            [{"prompt": "p", "http_headers": {"x-test-id": "t"}}]
        )
    assert result.items[0].attempts == 3  # sent at 0, 3, 6; 9 is past the total
    assert friendli_no_wait.delays == [3.0, 3.0]


async def test_the_batch_gate_still_shrinks_on_429(
    server: LocalServer, friendli_no_wait: RecordedWaits
) -> None:
    """429s seen by the one retry loop reach the batch's in-flight limit."""
    limits: list[int] = []
    for index in range(8):
        server.script(f"g{index}", [Action.status(429, headers={"Retry-After": "0.05"})])
    async with AsyncFriendli(server_url=server.url, retries=POLICY) as client:
        result = await client.container.image.generate_batch(
            [{"prompt": "p", "http_headers": {"x-test-id": f"g{i}"}} for i in range(8)],
            concurrency=8,
            on_progress=lambda progress: limits.append(progress.limit),
        )
    assert result.ok
    assert all(item.attempts == 2 for item in result)
    assert min(limits) < 8


def test_sync_batch_options_are_checked_when_the_batch_is_made() -> None:
    """SyncFriendli's generate_batch(concurrency=0) raises at once, as the async one does."""
    with (
        SyncFriendli(server_url="http://127.0.0.1:9") as friendli,
        pytest.raises(FriendliValidationError) as caught,
    ):
        friendli.container.image.generate_batch(["x"], concurrency=0)
    assert caught.value.field == "concurrency"
    client = AsyncFriendli(server_url="http://127.0.0.1:9")
    with pytest.raises(FriendliValidationError):
        client.container.image.generate_batch(["x"], concurrency=0)


@pytest.mark.parametrize("factory", [AsyncFriendli, SyncFriendli])
def test_verify_false_warns_once_at_the_callers_line(factory: type) -> None:
    """verify=False warns exactly once, and the warning points at the line that built it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = factory(verify=False)  # the line the warning must name
    line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
    assert len(caught) == 1
    assert pathlib.Path(caught[0].filename).resolve() == pathlib.Path(__file__).resolve()
    assert caught[0].lineno == line
    if isinstance(client, SyncFriendli):
        client.close()


def test_batch_options_are_one_value_object() -> None:
    """The batch methods take BatchOptions' fields; help() shows them with their defaults."""
    options = inspect.signature(BatchOptions).parameters
    for method in (AsyncFriendli().container.image.generate_batch,):
        shown = inspect.signature(method).parameters
        assert next(iter(shown)) == "requests"
        assert set(shown) - {"requests"} == set(options)
        assert shown["concurrency"].default == 16
        assert "concurrency" in (method.__doc__ or "")
    with pytest.raises(FriendliValidationError):
        BatchOptions(rps=-1)


async def test_the_success_path_builds_no_retry_controller(server: LocalServer) -> None:
    """A call that succeeds at once never imports or builds tenacity's controller."""
    import sys

    sys.modules.pop("tenacity", None)
    async with AsyncFriendli(server_url=server.url) as client:
        await asyncio.gather(*(client.container.image.generate(prompt="p") for _ in range(3)))
    assert "tenacity" not in sys.modules


async def test_large_body_buffers_are_reused_only_while_bodies_are_in_flight() -> None:
    """A buffer goes back to the pool while another large body is read, and none is kept idle."""
    from friendli_image._transport import BodyBuffers

    buffers = BodyBuffers()
    first = await buffers.take(1000)
    second = await buffers.take(1000)
    buffers.give(first)  # `second` is still in flight: keep `first` for the next body
    third = await buffers.take(800)
    assert third is first
    buffers.give(second)
    buffers.give(third)  # nothing in flight: nothing held
    fourth = await buffers.take(1000)
    assert fourth is not first
    assert fourth is not second
    assert len(fourth) == 1000
    buffers.give(fourth)


@pytest.mark.subprocess
def test_importing_the_package_leaves_the_heavy_dependencies_for_first_use() -> None:
    """``import friendli_image`` loads neither anyio's portal, cattrs nor html; each loads
    when first needed (a SyncFriendli's loop thread, the first request body, a table)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "before = set(sys.modules)\n"  # whatever the interpreter's start-up loaded
        "import friendli_image\n"
        "print(sorted(m for m in ('anyio', 'anyio.from_thread', 'cattrs', 'html')"
        " if m in set(sys.modules) - before))\n"
        "from friendli_image import GenerateRequest\n"
        "from friendli_image._serde import dumps_request\n"
        "dumps_request(GenerateRequest(prompt='p'))\n"
        "print('cattrs' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split("\n")[:2] == ["[]", "True"], done.stdout + done.stderr


def test_batch_item_ids_are_stable_across_versions() -> None:
    """The id is sha256(path + newline + canonical JSON): resume matches it against
    manifests written by earlier runs, so its value must never change."""
    from friendli_image import EditRequest, GenerateRequest
    from friendli_image._batch import BatchOperation
    from friendli_image._resources import EDITS_PATH, GENERATIONS_PATH

    generate = BatchOperation(GENERATIONS_PATH, GenerateRequest)
    edit = BatchOperation(EDITS_PATH, EditRequest)
    assert generate.request_id(GenerateRequest(prompt="x", seed=1)) == (
        "67908cf8db6471654ee6be2257fceb1dea0c91b24cba9a736d1425caa586f109"
    )
    assert edit.request_id(EditRequest(image="https://example.com/a.png", prompt="hat")) == (
        "859c085c89b55da5f3e76b5aecb3fe19757b6ec8afef1651a65283c25a49d6c2"
    )
