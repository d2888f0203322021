"""Fixtures for the contract suite: the bundled server, an image host, Stoplight Prism.

The suite checks our SDK and our server against the OpenAPI file we did not write
(tests/data/openapi-container-image.yaml). Prism runs as a validating proxy between the
SDK and the bundled server; schemathesis runs against the server. Prism is a Node
program: `nox -s contract` installs it and points ``FRIENDLI_PRISM`` at it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from friendli_image.server import LocalServer, ServerConfig

DATA = Path(__file__).resolve().parents[1] / "data"
SPEC = DATA / "openapi-container-image.yaml"
GOLDEN_DIR = DATA / "golden"
PRISM_ENV = "FRIENDLI_PRISM"
#: The image URL of the golden calls; the tests serve a local image in its place.
REMOTE_CAT = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/diffusers/cat.png"

# What Prism prints for a request or response that breaks the spec: an error it
# answered instead of the upstream ("✖ error ... Request terminated with error"), or a
# violation it only warns about ("[VALIDATOR] ⚠ warning Violation: ...").
_VIOLATION = re.compile(r"Violation|✖|⚠")


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prism_executable() -> str:
    """The Prism CLI: ``$FRIENDLI_PRISM`` (set by ``nox -s contract``) or ``prism`` on PATH."""
    configured = os.environ.get(PRISM_ENV)
    if configured:
        if not os.access(configured, os.X_OK):
            pytest.fail(f"{PRISM_ENV}={configured} is not an executable Prism CLI")
        return configured
    found = shutil.which("prism")
    if found is None:
        pytest.skip(
            "Stoplight Prism is not installed: run `nox -s contract` (it installs Prism with "
            f"npm), or set {PRISM_ENV} to the prism executable"
        )
    return found


class PrismProxy:
    """One ``prism proxy --errors`` process and its log."""

    def __init__(self, url: str, log: Path, process: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.log = log
        self.process = process
        self.expected: list[str] = []
        """Violation lines a test caused on purpose (`unexpected_violations` skips them)."""

    def text(self) -> str:
        """Everything Prism has printed so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")

    def mark(self) -> int:
        """A position in the log; `lines_since` returns what was printed after it."""
        return len(self.text())

    def lines_since(self, mark: int, *, requests: int, timeout: float = 10.0) -> list[str]:
        """The log lines after ``mark``, once Prism has finished ``requests`` requests.

        Prism prints a request's lines after it has answered, so a caller that has its
        answer waits here until the lines of each of its requests are in the log: a
        forwarded request ends with "Received forward response" (a violation follows it on
        the same tick), a refused one with "Request terminated".
        """
        deadline = time.monotonic() + timeout
        while True:
            lines = self.text()[mark:].splitlines()
            done = sum(
                "Received forward response" in line or "Request terminated" in line
                for line in lines
            )
            if done >= requests or time.monotonic() > deadline:
                # One more beat for a violation line printed just after the response.
                time.sleep(0.05)
                return self.text()[mark:].splitlines()
            time.sleep(0.02)

    def violations_since(self, mark: int, *, requests: int, at_least: int = 0) -> list[str]:
        """Prism's violation and error lines after ``mark`` (see `lines_since`).

        With ``at_least``, wait (a few seconds at most) until that many are in the log.
        """
        deadline = time.monotonic() + 10.0
        while True:
            lines = self.lines_since(mark, requests=requests)
            found = [line for line in lines if _VIOLATION.search(line)]
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def unexpected_violations(self) -> list[str]:
        """Every violation line in the whole log that no test caused on purpose.

        The per-test checks read the log as soon as the test's requests are logged; this
        one, at the end of the session, also sees a line Prism printed later than that.
        """
        expected = set(self.expected)
        return [
            line
            for line in self.text().splitlines()
            if _VIOLATION.search(line) and line not in expected
        ]


def _start_prism(upstream: str, log: Path, *extra: str) -> PrismProxy:
    port = free_port()
    command = [prism_executable(), "proxy", str(SPEC), upstream, "--errors", "--port", str(port)]
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [*command, *extra], stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return PrismProxy(f"http://127.0.0.1:{port}", log, process)


def _wait_listening(proxy: PrismProxy, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while "Prism is listening" not in proxy.text():
        if proxy.process.poll() is not None or time.monotonic() > deadline:
            proxy.process.kill()
            pytest.fail(f"Prism did not start:\n{proxy.text()[-3000:]}")
        time.sleep(0.1)


def _stop(proxy: PrismProxy) -> None:
    proxy.process.terminate()
    try:
        proxy.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proxy.process.kill()
        proxy.process.wait()


class _ImageHandler(BaseHTTPRequestHandler):
    png: bytes = b""

    def do_GET(self) -> None:
        if self.path != "/cat.png":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def png() -> bytes:
    """A small PNG with two colours."""
    import io

    from PIL import Image

    picture = Image.new("RGB", (24, 16), (200, 30, 30))
    picture.paste(Image.new("RGB", (8, 8), (30, 30, 200)), (4, 4))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def image_url(png: bytes) -> Iterator[str]:
    """A loopback URL serving ``png`` (the golden calls' remote URL is replaced by it)."""
    handler = type("Handler", (_ImageHandler,), {"png": png})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="session")
def upstream() -> Iterator[LocalServer]:
    """The bundled server on its own thread, fetching image URLs on loopback."""
    with LocalServer(ServerConfig(image_size=32, allow_private_urls=True)) as server:
        yield server


@pytest.fixture(scope="session")
def prism_pair(
    upstream: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PrismProxy, PrismProxy]]:
    """Two proxies in front of ``upstream``: one validating requests, one forwarding all.

    Both validate every response. The second (``--validate-request false``) lets bodies
    that break the spec reach the server, so that its 422 answers get validated too.
    Both start at once: each takes a few seconds.
    """
    logs = tmp_path_factory.mktemp("prism")
    validating = _start_prism(upstream.url, logs / "validating.log")
    forwarding = _start_prism(upstream.url, logs / "forwarding.log", "--validate-request", "false")
    try:
        _wait_listening(validating)
        _wait_listening(forwarding)
        yield validating, forwarding
        time.sleep(0.5)  # for lines of the last requests still being written
        for proxy in (validating, forwarding):
            assert proxy.unexpected_violations() == [], proxy.log
    finally:
        _stop(validating)
        _stop(forwarding)


@pytest.fixture(scope="session")
def prism(prism_pair: tuple[PrismProxy, PrismProxy]) -> PrismProxy:
    """Prism validating requests and responses between the SDK and the bundled server."""
    return prism_pair[0]


@pytest.fixture(scope="session")
def prism_forwarding(prism_pair: tuple[PrismProxy, PrismProxy]) -> PrismProxy:
    """Prism validating only responses (requests that break the spec reach the server)."""
    return prism_pair[1]
