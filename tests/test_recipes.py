"""The recipes of examples/recipes/ work as the docs say: a FastAPI service under a real
ASGI server, a Flask view, and a user's own pytest suite on the bundled server fixture."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from friendli_image import SyncFriendli
from friendli_image.server import Action, LocalServer, ServerConfig

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
pytestmark = pytest.mark.skipif(not RECIPES.is_dir(), reason="examples/ is not beside the tests")

#: Requests the web-service test sends at once.
CONCURRENT = 50


@pytest.fixture
def bundled(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    """The bundled server, named by FRIENDLI_SERVER_URL as a deployment would name it.

    Each picture takes a few milliseconds of simulated GPU time, so requests overlap."""
    config = ServerConfig(image_size=64, step_latency_ms=1, max_concurrency=CONCURRENT)
    with LocalServer(config) as server:
        monkeypatch.setenv("FRIENDLI_SERVER_URL", server.url)
        monkeypatch.delenv("FRIENDLI_TOKEN", raising=False)
        yield server


def _load(name: str) -> ModuleType:
    """Import a recipe from its file, as ``uvicorn name:app`` or ``flask --app name`` would."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _expected(server: LocalServer, prompt: str, seed: int) -> bytes:
    with SyncFriendli(server_url=server.url) as client:
        return client.container.image.generate(prompt=prompt, seed=seed).data


class _Uvicorn:
    """A uvicorn server on a loopback port, in a thread, with the app's lifespan."""

    def __init__(self, app: Any) -> None:
        uvicorn = pytest.importorskip("uvicorn")
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def __enter__(self) -> _Uvicorn:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert self._thread.is_alive(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._socket.close()
        assert not self._thread.is_alive(), "uvicorn did not stop in 30 s"


def test_the_fastapi_service_serves_50_concurrent_requests(bundled: LocalServer) -> None:
    """Through uvicorn, 50 requests at once share the lifespan's client: every one gets
    its own picture, and the image server saw them in flight together."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    module = _load("fastapi_app")

    async def fetch_all(url: str) -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(
                *(
                    http.get("/images", params={"prompt": f"a fox {i}", "seed": i})
                    for i in range(CONCURRENT)
                )
            )

    with _Uvicorn(module.app) as service:
        responses = asyncio.run(fetch_all(service.url))
        bundled.script(None, [Action.status(500)])
        failed = httpx.get(f"{service.url}/images", params={"prompt": "x"}, timeout=60)
        refused = httpx.get(f"{service.url}/images", params={"prompt": "x", "seed": -1})
    sent = bundled.stats.requests_by_path["/v1/images/generations"]
    assert [r.status_code for r in responses] == [200] * CONCURRENT
    assert {r.headers["content-type"] for r in responses} == {"image/jpeg"}
    assert len({r.content for r in responses}) == CONCURRENT
    assert responses[7].content == _expected(bundled, "a fox 7", 7)
    assert bundled.stats.max_in_flight > 1  # one shared client, many requests at once
    assert failed.status_code == 502
    assert "500" in failed.json()["detail"]
    assert refused.status_code == 422  # the seed is out of range
    assert sent == CONCURRENT + 2  # one request each: nothing was retried


def test_the_flask_view_shares_one_sync_client(bundled: LocalServer) -> None:
    """The view answers with the picture, from several threads at once, and maps the
    SDK's errors to 422 and 502."""
    pytest.importorskip("flask")
    module = _load("flask_app")
    try:

        def fetch(i: int) -> Any:
            return module.app.test_client().get(
                "/images", query_string={"prompt": f"an owl {i}", "seed": i}
            )

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(fetch, range(16)))
        client = module.app.test_client()
        bundled.script(None, [Action.status(500)])
        failed = client.get("/images", query_string={"prompt": "x"})
        refused = client.get("/images", query_string={"prompt": "x", "seed": -1})
    finally:
        module.friendli.close()
    assert [r.status_code for r in responses] == [200] * 16
    assert {r.mimetype for r in responses} == {"image/jpeg"}
    assert responses[3].data == _expected(bundled, "an owl 3", 3)
    assert failed.status_code == 502
    assert refused.status_code == 422


@pytest.mark.long
@pytest.mark.subprocess
def test_the_users_own_pytest_suite_passes() -> None:
    """examples/recipes/my_project, a project of its own, passes its tests with the
    SDK's pytest fixtures (the bundled server and the zero-wait mode)."""
    pytest.importorskip("pytest_asyncio")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRIENDLI_")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=RECIPES / "my_project",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout, done.stdout
