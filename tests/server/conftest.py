"""Fixtures for the bundled server's tests: a server on the test's loop and a raw client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from friendli_image.server import LocalServer, ServerConfig

from .helpers import png_bytes


@pytest.fixture
async def server() -> AsyncIterator[LocalServer]:
    """A small-image server on the test's event loop."""
    async with LocalServer(ServerConfig(image_size=64)) as srv:
        yield srv


@pytest.fixture
async def fetching_server() -> AsyncIterator[LocalServer]:
    """Like ``server``, but fetching image URLs on loopback (where ``image_host`` listens)."""
    async with LocalServer(ServerConfig(image_size=64, allow_private_urls=True)) as srv:
        yield srv


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A raw aiohttp client session."""
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def image_host() -> AsyncIterator[TestServer]:
    """A plain HTTP server hosting images for URL inputs: /red.png, /blue.png, /big, /404, /text."""
    app = web.Application()
    red, blue = png_bytes((200, 30, 30)), png_bytes((30, 30, 200))

    async def red_png(_: web.Request) -> web.Response:
        return web.Response(body=red, content_type="image/png")

    async def blue_png(_: web.Request) -> web.Response:
        return web.Response(body=blue, content_type="image/png")

    async def big(_: web.Request) -> web.Response:
        return web.Response(body=b"\x89PNG" + b"\0" * 300_000, content_type="image/png")

    async def text(_: web.Request) -> web.Response:
        return web.Response(text="not an image")

    app.router.add_get("/red.png", red_png)
    app.router.add_get("/blue.png", blue_png)
    app.router.add_get("/big", big)
    app.router.add_get("/text", text)
    async with TestServer(app) as host:
        yield host
