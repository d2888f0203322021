"""Tests of thumbnails.py against the bundled server: no GPU, no network, no waiting."""

from __future__ import annotations

from pathlib import Path

import pytest
from thumbnails import draw_all

from friendli_image import AsyncFriendli, RetryConfig
from friendli_image.server import Action, LocalServer
from friendli_image.testing import RecordedWaits


@pytest.mark.asyncio
async def test_every_prompt_gets_a_picture(friendli_server_url: str, tmp_path: Path) -> None:
    async with AsyncFriendli(server_url=friendli_server_url) as client:
        paths = await draw_all(client, ["a fox", "an owl"], tmp_path)
    assert len(paths) == 2
    assert all(path.stat().st_size > 0 for path in paths)


@pytest.mark.asyncio
async def test_a_busy_server_is_waited_for_not_slept_on(
    friendli_server: LocalServer, friendli_no_wait: RecordedWaits, tmp_path: Path
) -> None:
    friendli_server.script(None, [Action.status(503, {"Retry-After": "20"}), Action.ok()])
    async with AsyncFriendli(
        server_url=friendli_server.url, retries=RetryConfig(jitter=0)
    ) as client:
        paths = await draw_all(client, ["a fox"], tmp_path)
    assert len(paths) == 1
    assert friendli_no_wait.delays == [20.0]  # the server's Retry-After, not slept


@pytest.mark.asyncio
async def test_a_refused_prompt_is_left_out(friendli_server: LocalServer, tmp_path: Path) -> None:
    friendli_server.script(None, [Action.status(422, body={"detail": "bad prompt"})])
    async with AsyncFriendli(server_url=friendli_server.url) as client:
        paths = await draw_all(client, ["a fox"], tmp_path)
    assert paths == []
