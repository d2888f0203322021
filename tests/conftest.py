"""Shared fixtures: test images, loopback servers that record requests, and HTTP mocking.

- ``make_image`` / ``tiny_png`` / ``tiny_jpeg``: real encoded images made with Pillow.
- ``capture_server`` / ``make_capture_server``: an aiohttp app on 127.0.0.1 that records
  every request (path, headers, raw and JSON body) and answers 200 ``{"image": ...}`` with
  a configurable image, or with responses queued by ``respond(...)``.
- ``raw_http_server``: a socket server that answers every request with exactly the status,
  headers and body given (no header is added but Content-Length), for bodies and headers
  aiohttp's server would normalise.
- ``mock_http``: ``aioresponses`` patched to build responses on aiohttp 3.14+.
- ``fast_retry``: a retry policy with millisecond backoff, to keep retry tests fast.
- ``dev_mode_stderr``: a child's stderr without asyncio debug mode's slow-callback reports.
- ``late``: the latest a timer may be seen to fire on a loaded machine, for checks where
  time is the behaviour (a timeout fires, an idle connection closes).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import re
import signal
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aioresponses import aioresponses
from multidict import CIMultiDict, CIMultiDictProxy

from friendli_image import RetryConfig

#: The zero-wait testing mode's fixture (``friendli_no_wait``), as users enable it.
pytest_plugins = ["friendli_image.testing"]

_ENV_VARS = ("FRIENDLI_TOKEN", "FRIENDLI_SERVER_URL", "FRIENDLI_LOG")
_CONTRACT = Path(__file__).parent / "contract"


def pytest_configure(config: pytest.Config) -> None:
    """Children get Ctrl-C as a user's would, even when pytest runs in the background.

    A shell starts a background job (`cmd &`, nohup) with SIGINT ignored; its children
    inherit that, Python then installs no KeyboardInterrupt handler, and the tests that
    interrupt a child (a batch, a blocking call) would see it run on.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/contract runs only when named (`nox -s contract`): it needs Node and Prism."""
    if collection_path != _CONTRACT:
        return None
    named = (Path(arg.split("::")[0]).resolve() for arg in config.args)
    return not any(path == _CONTRACT or _CONTRACT in path.parents for path in named)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked ``long`` first: pytest-xdist hands tests out in collection order,
    and a long one handed out last keeps its worker running after the others are done
    (the state machines' module sorts near the end: a two-minute tail on two cores)."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's FRIENDLI_* variables; a test sets what it needs."""
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)


# Under -X dev, asyncio logs every loop step over 0.1 s. On a loaded machine a step of
# ordinary work can take that long; the line reports a stall, not a fault of the code.
_SLOW_CALLBACK_REPORT = re.compile(r"^Executing <.*> took \d+\.\d+ seconds\n", re.MULTILINE)


@pytest.fixture
def dev_mode_stderr() -> Callable[[str], str]:
    """``dev_mode_stderr(text)``: a ``-X dev`` child's stderr minus slow-callback reports."""

    def strip(text: str) -> str:
        return _SLOW_CALLBACK_REPORT.sub("", text)

    return strip


# -- images -----------------------------------------------------------------------------


def _encode(fmt: str, size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt.upper())
    return buffer.getvalue()


@pytest.fixture
def make_image() -> Callable[..., bytes]:
    """Factory: ``make_image("png", (w, h), color=(r, g, b))`` → bytes in any Pillow format."""

    def make(
        fmt: str = "png",
        size: tuple[int, int] = (3, 2),
        color: tuple[int, int, int] = (200, 30, 30),
    ) -> bytes:
        return _encode(fmt, size, color)

    return make


@pytest.fixture
def tiny_png() -> bytes:
    """A 3x2 red PNG."""
    return _encode("png", (3, 2), (200, 30, 30))


@pytest.fixture
def tiny_jpeg() -> bytes:
    """A 4x3 blue JPEG."""
    return _encode("jpeg", (4, 3), (30, 30, 200))


@pytest.fixture
def probe_token() -> str:
    """A recognisable fake token, to search for in reprs, messages and pickles."""
    return f"sk-probe-{uuid.uuid4().hex}"


@pytest.fixture
def fast_retry() -> RetryConfig:
    """Three attempts with millisecond backoff and no jitter."""
    return RetryConfig(max_attempts=3, initial_delay=0.001, max_delay=0.002, jitter=0.0)


def _late(seconds: float) -> float:
    return seconds * 1.5 + 1.0


@pytest.fixture
def late() -> Callable[[float], float]:
    """``late(seconds)``: the latest a timer of ``seconds`` may be seen to fire, half as
    long again plus a second. Two busy loops on two cores stay well inside it; a timer
    that does not fire, or fires at another setting's time, does not."""
    return _late


# -- the capture server -----------------------------------------------------------------


class CapturedRequest:
    """One request as the capture server received it."""

    def __init__(self, method: str, path: str, headers: CIMultiDictProxy[str], body: bytes):
        self.method = method
        self.path = path
        self.headers: CIMultiDict[str] = CIMultiDict(headers)
        self.body = body

    @property
    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"<CapturedRequest {self.method} {self.path} {len(self.body)} B>"


class CaptureServer:
    """A loopback server that records requests and answers with an image or a queued response."""

    def __init__(self, image: bytes) -> None:
        self.image = image
        """The image every unscripted request gets back (as ``{"image": <base64>}``)."""
        self.requests: list[CapturedRequest] = []
        self.url = ""
        self._queue: deque[web.Response] = deque()

    def respond(
        self,
        status: int = 200,
        body: bytes | str | Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Queue one response for the next request (first in, first out)."""
        if isinstance(body, Mapping):
            body = orjson.dumps(dict(body))
        elif isinstance(body, str):
            body = body.encode()
        self._queue.append(
            web.Response(
                status=status,
                body=body if body is not None else b"",
                headers=dict(headers or {}),
                content_type=content_type,
            )
        )

    def image_body(self, image: bytes | None = None) -> bytes:
        """The JSON success body carrying ``image`` (default: this server's image)."""
        encoded = base64.b64encode(self.image if image is None else image)
        return b'{"image":"' + encoded + b'"}'

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(CapturedRequest(request.method, request.path, request.headers, body))
        if self._queue:
            return self._queue.popleft()
        return web.Response(body=self.image_body(), content_type="application/json")


@pytest.fixture
async def make_capture_server(
    tiny_png: bytes,
) -> AsyncIterator[Callable[..., Awaitable[CaptureServer]]]:
    """Factory: ``await make_capture_server(image=...)`` starts another capture server."""
    runners: list[web.AppRunner] = []

    async def start(image: bytes | None = None) -> CaptureServer:
        server = CaptureServer(tiny_png if image is None else image)
        app = web.Application(client_max_size=128 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", server._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def capture_server(
    make_capture_server: Callable[..., Awaitable[CaptureServer]],
) -> CaptureServer:
    """A capture server answering 200 with ``tiny_png`` (set ``.image`` to change it)."""
    return await make_capture_server()


# -- a raw HTTP server --------------------------------------------------------------------


@pytest.fixture
async def raw_http_server() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Factory: ``url = await raw_http_server(body, status=200, headers={...})``.

    Every request gets exactly that response (Content-Length is the only header added) and
    the connection is closed; the base URL is returned.
    """
    servers: list[asyncio.Server] = []

    async def start(
        body: bytes, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> str:
        lines = [f"HTTP/1.1 {status} Whatever"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        lines += [f"Content-Length: {len(body)}", "Connection: close"]
        response = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            writer.write(response)
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


# -- aioresponses on aiohttp 3.14+ ------------------------------------------------------


_NEEDS_STREAM_WRITER = "stream_writer" in inspect.signature(aiohttp.ClientResponse).parameters


class _CompatResponse(aiohttp.ClientResponse):
    # aioresponses 0.7.9 builds ClientResponse without the `stream_writer` argument that
    # aiohttp 3.14 made required (pnuckowski/aioresponses#289); the request is already
    # "sent", so aiohttp only reads its output size.
    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        if _NEEDS_STREAM_WRITER:
            kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


class _Mock(aioresponses):  # type: ignore[misc]
    def add(self, url: Any, method: str = "GET", *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("response_class", _CompatResponse)
        super().add(url, method, *args, **kwargs)


@pytest.fixture
def mock_http() -> Iterator[aioresponses]:
    """An active ``aioresponses`` mock (``mock_http.post(url, status=..., body=...)``)."""
    with _Mock() as mock:
        yield mock


@pytest.fixture
async def capture_client(capture_server: CaptureServer) -> AsyncIterator[Any]:
    """An ``AsyncFriendli`` (token ``test-token``, no retries) pointed at ``capture_server``."""
    from friendli_image import AsyncFriendli

    async with AsyncFriendli(
        token="test-token", server_url=capture_server.url, retries=RetryConfig.disabled()
    ) as client:
        yield client
