"""LocalServer in both modes, restarts, GPU slots, disconnects, run_server and the pytest plugin."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from friendli_image.server import Action, LocalServer, ServerConfig

from .helpers import GENERATE

REPO = Path(__file__).resolve().parents[2]


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 5 s")


@pytest.mark.parametrize("slots", [1, 2])
async def test_gpu_slots_queue_or_run_in_parallel(
    session: aiohttp.ClientSession, slots: int
) -> None:
    """Two concurrent requests of one compute each: one GPU slot runs them one after the
    other (two computes at the least), two slots side by side (under two computes)."""
    compute = 0.5  # 10 steps of 50 ms: against a loaded machine's overhead, half a compute
    config = ServerConfig(image_size=8, max_concurrency=slots, step_latency_ms=50)
    async with LocalServer(config) as srv:
        body = {"prompt": "p", "num_inference_steps": 10}

        async def one() -> None:
            async with session.post(srv.url + GENERATE, json=body) as resp:
                assert resp.status == 200

        started = time.monotonic()
        await asyncio.gather(one(), one())
        elapsed = time.monotonic() - started
        assert srv.stats.max_in_flight == 2
    if slots == 1:
        assert elapsed >= 2 * compute
    else:
        assert compute <= elapsed < 2 * compute


async def test_client_disconnect_is_recorded(session: aiohttp.ClientSession) -> None:
    """A client that goes away mid-generation is recorded as disconnected and frees its slot."""
    config = ServerConfig(image_size=8, max_concurrency=1, step_latency_ms=100)
    async with LocalServer(config) as srv:
        task = asyncio.ensure_future(
            session.post(srv.url + GENERATE, json={"prompt": "p", "num_inference_steps": 50})
        )
        await _until(lambda: srv.stats.in_flight > 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until(lambda: srv.stats.in_flight == 0)
        assert srv.records[0].disconnected is True
        assert srv.stats.disconnects == 1
        async with session.post(
            srv.url + GENERATE, json={"prompt": "p", "num_inference_steps": 1}
        ) as resp:
            assert resp.status == 200


async def test_a_client_gone_mid_body_is_a_disconnect_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that sends part of its body and resets the connection (a stopped batch
    does this) is recorded as disconnected; the server logs no error and serves on."""
    async with LocalServer(ServerConfig(image_size=8)) as srv:
        host, port = srv.url.removeprefix("http://").split(":")

        def cut_short() -> None:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(
                    f"POST {GENERATE} HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                    'application/json\r\nContent-Length: 1000\r\n\r\n{"prompt"'.encode()
                )
                time.sleep(0.2)  # the server is reading the body
                # RST instead of FIN: SO_LINGER with a zero timeout.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)

        with caplog.at_level("DEBUG", logger="friendli_image.server"):
            await asyncio.to_thread(cut_short)
            await _until(lambda: bool(srv.records) and srv.stats.in_flight == 0)
        assert srv.records[0].disconnected is True
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                srv.url + GENERATE, json={"prompt": "p", "num_inference_steps": 1}
            ) as resp,
        ):
            assert resp.status == 200


async def test_restart_keeps_port_and_refuses_meanwhile(session: aiohttp.ClientSession) -> None:
    """restart() drops connections, refuses new ones while down, then serves on the same port."""
    async with LocalServer(ServerConfig(image_size=8)) as srv:
        port = srv.port
        async with session.get(srv.url + "/health") as resp:
            assert resp.status == 200
        restart = asyncio.ensure_future(srv.restart(down_for_s=0.3))
        await asyncio.sleep(0.15)
        assert await asyncio.to_thread(_refused, port)
        await restart
        assert srv.port == port
        async with session.get(srv.url + "/health") as resp:
            assert resp.status == 200
        assert srv.stats.requests_by_path == {"/health": 2}


async def test_restart_closes_in_flight_requests(session: aiohttp.ClientSession) -> None:
    """A request in flight during a restart sees its connection closed."""
    async with LocalServer(ServerConfig(image_size=8)) as srv:
        srv.script(None, [Action.delay(5)])
        request = asyncio.ensure_future(session.post(srv.url + GENERATE, json={"prompt": "p"}))
        await _until(lambda: srv.stats.in_flight > 0)
        await srv.restart()
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await request
        assert srv.records[0].disconnected is True


async def test_async_server_close_is_idempotent() -> None:
    """aclose() twice is harmless and frees the port; close() in async mode says what to use."""
    srv = LocalServer()
    await srv.astart()
    port = srv.port
    with pytest.raises(RuntimeError, match="aclose"):
        srv.close()
    await srv.aclose()
    await srv.aclose()
    assert await asyncio.to_thread(_refused, port)


def test_sync_local_server() -> None:
    """`with LocalServer()` serves from a thread, takes scripts from others, restarts and joins."""
    before = threading.active_count()
    with LocalServer(ServerConfig(image_size=8)) as srv:
        assert srv.url == f"http://127.0.0.1:{srv.port}"
        with urllib.request.urlopen(srv.url + "/health", timeout=5) as resp:  # noqa: S310
            assert resp.status == 200

        def script_from_thread() -> None:
            srv.script("t", [Action.status(503)])

        worker = threading.Thread(target=script_from_thread)
        worker.start()
        worker.join()
        request = urllib.request.Request(  # noqa: S310
            srv.url + GENERATE,
            data=b'{"prompt": "p"}',
            headers={"x-test-id": "t", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=5)  # noqa: S310
        assert info.value.code == 503
        info.value.close()
        port = srv.port
        srv.restart(down_for_s=0.05)
        assert srv.port == port
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
            assert resp.status == 200
        assert srv.stats.faults == {"status:503": 1}
    assert threading.active_count() == before
    assert _refused(port)
    srv.close()


def test_not_started_server() -> None:
    """A server that is not started has no port and cannot restart."""
    srv = LocalServer()
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.url
    with pytest.raises(RuntimeError, match="not started"):
        srv.restart()
    assert "not started" in repr(srv)


def test_port_in_use_fails_cleanly() -> None:
    """Starting on a port that is taken raises OSError and leaves no thread behind."""
    before = threading.active_count()
    with LocalServer() as first, pytest.raises(OSError, match="in use"):
        LocalServer(port=first.port).start()
    assert threading.active_count() == before


@pytest.mark.subprocess
def test_run_server_announces_and_stops_on_ctrl_c() -> None:
    """run_server prints its URL when ready, serves, and exits 0 without a traceback on SIGINT."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = (
        "from friendli_image.server import run_server, ServerConfig\n"
        f"run_server(ServerConfig(image_size=8), port={port})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert (
                line.strip() == f"Serving Friendli Container image API on http://127.0.0.1:{port}"
            )
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                assert resp.status == 200
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0
    assert "Traceback" not in err
    assert err == ""


@pytest.mark.subprocess
def test_pytest_plugin_fixtures(tmp_path: Path) -> None:
    """The plugin's fixtures give a running server and its URL in a user's test suite."""
    (tmp_path / "conftest.py").write_text(
        'pytest_plugins = ["friendli_image.server.pytest_plugin"]\n'
    )
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            import json
            import urllib.request

            import pytest

            from friendli_image.server import ServerConfig


            def test_url(friendli_server, friendli_server_url):
                assert friendli_server_url == friendli_server.url
                with urllib.request.urlopen(friendli_server_url + "/health") as resp:
                    assert json.load(resp) == {"status": "ok"}
                assert friendli_server.stats.total_requests == 1


            class TestCustomConfig:
                @pytest.fixture
                def friendli_server_config(self):
                    return ServerConfig(token="t")

                def test_token(self, friendli_server):
                    assert friendli_server.config.token.reveal() == "t"
            """
        )
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:asyncio",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


async def test_thread_mode_server_closes_inside_a_running_loop() -> None:
    """`with LocalServer()` works in async code: it starts, answers and closes cleanly."""
    import aiohttp

    with LocalServer() as server:
        async with aiohttp.ClientSession() as session, session.get(f"{server.url}/health") as resp:
            assert resp.status == 200
    assert not any(t.name == "friendli-image-local-server" for t in threading.enumerate())
