"""The bundled server against hostile input: huge JSON, SSRF targets, the token's exposure;
and the health route, health toggle, in-flight counters and kill/revive used by fleet tests.

Measured figures are printed as ``FIGURE name=value`` lines (``pytest -s`` or ``-rP``).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from friendli_image.server import Action, LocalServer, ServerConfig
from friendli_image.server import _app as server_app

from .helpers import EDIT, GENERATE, figure, free_port, png_bytes, wait_for_announcement

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


def _post(port: int, body: bytes, path: str = GENERATE) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


# -- bounded JSON -------------------------------------------------------------------------


@pytest.mark.scenario(48)
@pytest.mark.subprocess
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_20m_integer_body_is_refused_without_a_memory_spike() -> None:
    """A 38 MiB body of 20 M integers gets 413 before parsing; the server's peak memory
    grows by about the body's size, not the ~500 MiB its parse would take."""
    port = free_port()
    code = (
        "from friendli_image.server import run_server, ServerConfig\n"
        f"run_server(ServerConfig(image_size=8), port={port})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    ) as proc:
        try:
            wait_for_announcement(proc)
            assert _post(port, b'{"prompt": "warm up"}')[0] == 200
            before = _memory_kib(proc.pid)
            body = b'{"prompt": "p", "seed": [' + b"1," * 20_000_000 + b"1]}"
            started = time.monotonic()
            status, payload = _post(port, body)
            elapsed = time.monotonic() - started
            after = _memory_kib(proc.pid)
            assert _post(port, b'{"prompt": "still fine"}')[0] == 200
        finally:
            proc.kill()
            proc.wait()
    assert status == 413
    assert "JSON list items" in payload["detail"]
    peak_growth_mib = (after["VmHWM"] - before["VmRSS"]) / 1024
    body_mib = len(body) / MiB
    assert peak_growth_mib < body_mib + 64
    figure("json20m.body_mib", round(body_mib, 1))
    figure("json20m.peak_rss_growth_mib", round(peak_growth_mib, 1))
    figure("json20m.rss_after_growth_mib", round((after["VmRSS"] - before["VmRSS"]) / 1024, 1))
    figure("json20m.answer_s", round(elapsed, 2))


async def test_item_limit_is_configurable_and_counts_only_structure(
    session: aiohttp.ClientSession,
) -> None:
    """Commas inside strings do not count; a body just over max_json_items gets 413."""
    async with LocalServer(ServerConfig(image_size=16, max_json_items=50)) as srv:
        prompt = {"prompt": "a, b, c, " * 100}
        async with session.post(srv.url + GENERATE, json=prompt) as resp:
            assert resp.status == 200
        weights = {"prompt": "p", "controlnet_weights": [0.5] * 60}
        async with session.post(srv.url + GENERATE, json=weights) as resp:
            assert resp.status == 413
            assert "at most 50" in (await resp.json())["detail"]
        assert srv.stats.responses_by_status == {200: 1, 413: 1}


# -- SSRF -------------------------------------------------------------------------------


@pytest.fixture
async def counted_host() -> AsyncIterator[tuple[TestServer, list[str]]]:
    """A loopback image host that records every path it is asked for."""
    seen: list[str] = []
    red = png_bytes((200, 30, 30))

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        if request.path == "/hop":
            raise web.HTTPFound(request.query["to"])
        return web.Response(body=red, content_type="image/png")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    async with TestServer(app, host="127.0.0.1") as host:
        yield host, seen


async def _edit_detail(session: aiohttp.ClientSession, url: str, image: str) -> tuple[int, str]:
    body = {"prompt": "p", "image": {"image": image}}
    async with session.post(url + EDIT, json=body) as resp:
        payload = await resp.json()
        if resp.status != 422:
            return resp.status, ""
        return resp.status, str(payload["detail"][0]["msg"])


@pytest.mark.scenario(48)
async def test_private_targets_are_refused_alike_open_or_closed(
    server: LocalServer,
    session: aiohttp.ClientSession,
    counted_host: tuple[TestServer, list[str]],
) -> None:
    """By default no loopback, private, link-local or unspecified target is fetched, by IP
    literal or by name; an open and a closed port get the same answer, without a connect."""
    host, seen = counted_host
    open_port, closed_port = host.port, free_port()
    targets = [
        f"http://127.0.0.1:{open_port}/red.png",
        f"http://127.0.0.1:{closed_port}/red.png",
        f"http://localhost:{open_port}/red.png",
        f"http://localhost:{closed_port}/red.png",
        f"http://[::1]:{open_port}/red.png",
        f"http://[::ffff:127.0.0.1]:{open_port}/red.png",
        f"http://0.0.0.0:{open_port}/red.png",
        "http://10.0.0.1/internal.png",
        "http://192.168.1.1/router.png",
        "http://100.64.0.1/cgnat.png",
        "http://169.254.169.254/latest/meta-data/iam",
        "http://[fe80::1]/link-local.png",
    ]
    answers = set()
    started = time.monotonic()
    for target in targets:
        status, message = await _edit_detail(session, server.url, target)
        assert status == 422, target
        answers.add(message)
    elapsed = time.monotonic() - started
    assert len(answers) == 1
    assert "allow_private_urls=True" in answers.pop()
    # 127.0.0.1 as one number: aiohttp refuses the non-canonical address itself.
    status, message = await _edit_detail(session, server.url, f"http://2130706433:{open_port}/")
    assert status == 422
    assert "could not fetch image from URL" in message
    assert seen == []
    # Trying 10.0.0.1 and friends would have waited for fetch_timeout_s (one is enough).
    assert elapsed < server.config.fetch_timeout_s


async def test_redirect_to_a_private_target_is_refused(
    server: LocalServer,
    session: aiohttp.ClientSession,
    counted_host: tuple[TestServer, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every redirect hop is checked: a public host that redirects inward gets the refusal."""
    host, seen = counted_host
    real_is_public = server_app._is_public
    # Stand-in for a public host: the image host's own address counts as public here.
    monkeypatch.setattr(
        server_app, "_is_public", lambda address: address == "127.0.0.1" or real_is_public(address)
    )
    inward = f"http://127.0.0.2:{host.port}/red.png"
    status, message = await _edit_detail(
        session, server.url, f"http://127.0.0.1:{host.port}/hop?to={inward}"
    )
    assert status == 422
    assert "allow_private_urls=True" in message
    assert seen == ["/hop"]
    status, _ = await _edit_detail(
        session, server.url, f"http://127.0.0.1:{host.port}/hop?to=/red.png"
    )
    assert status == 200
    assert seen == ["/hop", "/hop", "/red.png"]


async def test_allow_private_urls_fetches_loopback(
    session: aiohttp.ClientSession, counted_host: tuple[TestServer, list[str]]
) -> None:
    """With allow_private_urls=True loopback URLs, and redirects among them, are fetched."""
    host, seen = counted_host
    config = ServerConfig(image_size=16, allow_private_urls=True)
    async with LocalServer(config) as srv:
        hop = f"http://localhost:{host.port}/hop?to=http://127.0.0.1:{host.port}/red.png"
        status, _ = await _edit_detail(session, srv.url, hop)
        assert status == 200
    assert seen == ["/hop", "/red.png"]


# -- the token --------------------------------------------------------------------------


async def _generate_status(session: aiohttp.ClientSession, url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.post(url + GENERATE, json={"prompt": "p"}, headers=headers) as resp:
        return resp.status


async def test_token_from_file_and_environment(
    tmp_path: Path, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """token_file (whitespace stripped) and token_env supply the token the server requires."""
    path = tmp_path / "token"
    path.write_text("file-s3cret\n")
    monkeypatch.setenv("FRIENDLI_SERVER_TOKEN", "env-s3cret")
    for config, token in [
        (ServerConfig(image_size=16, token_file=path), "file-s3cret"),
        (ServerConfig(image_size=16, token_env="FRIENDLI_SERVER_TOKEN"), "env-s3cret"),
    ]:
        assert token not in repr(config)
        async with LocalServer(config) as srv:
            assert await _generate_status(session, srv.url, None) == 401
            assert await _generate_status(session, srv.url, "wrong") == 401
            assert await _generate_status(session, srv.url, token) == 200


async def test_token_source_errors_say_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing or empty file, an unset variable or two sources fail before serving."""
    monkeypatch.delenv("FRIENDLI_TEST_UNSET_TOKEN", raising=False)
    (tmp_path / "empty").write_text("  \n")
    cases = [
        (ServerConfig(token_file=tmp_path / "missing"), "cannot read"),
        (ServerConfig(token_file=tmp_path / "empty"), "is empty"),
        (ServerConfig(token_env="FRIENDLI_TEST_UNSET_TOKEN"), "unset or empty"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError, match=message):
            await LocalServer(config).astart()
    with pytest.raises(ValueError, match="at most one"):
        ServerConfig(token="a", token_env="B")


@pytest.mark.subprocess
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_token_file_keeps_the_token_out_of_the_process_list(tmp_path: Path) -> None:
    """run_server with token_file: the token is enforced and absent from the command line."""
    token = "proc-list-s3cret-7431"
    path = tmp_path / "token"
    path.write_text(token)
    port = free_port()
    code = (
        "import sys\n"
        "from friendli_image.server import run_server, ServerConfig\n"
        f"run_server(ServerConfig(image_size=8, token_file=sys.argv[1]), port={port})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    ) as proc:
        try:
            wait_for_announcement(proc)
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", GENERATE, body=b'{"prompt": "p"}')
            unauthorized = conn.getresponse().status
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request(
                "POST",
                GENERATE,
                body=b'{"prompt": "p"}',
                headers={"Authorization": f"Bearer {token}"},
            )
            authorized = conn.getresponse().status
            conn.close()
        finally:
            proc.kill()
            proc.wait()
    assert token.encode() not in cmdline
    assert (unauthorized, authorized) == (401, 200)


# -- health, in-flight counters, kill and revive ---------------------------------------


async def test_health_toggle(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """healthy=False makes /health answer 503 while image requests are still served."""
    server.healthy = False
    async with session.get(server.url + "/health") as resp:
        assert resp.status == 503
        assert await resp.json() == {"status": "unhealthy"}
    async with session.post(server.url + GENERATE, json={"prompt": "p"}) as resp:
        assert resp.status == 200
    server.healthy = True
    async with session.get(server.url + "/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_health_probes_are_not_in_flight(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """in_flight / max_in_flight count image requests only, so probes cannot break a limit."""
    server.script(None, [Action.delay(0.5)])

    async def slow() -> int:
        async with session.post(server.url + GENERATE, json={"prompt": "p"}) as resp:
            return resp.status

    task = asyncio.ensure_future(slow())
    for _ in range(200):
        if server.stats.in_flight:
            break
        await asyncio.sleep(0.01)
    for _ in range(3):
        async with session.get(server.url + "/health") as resp:
            assert resp.status == 200
    assert server.stats.in_flight == 1
    assert await task == 200
    stats = server.stats
    assert (stats.in_flight, stats.max_in_flight) == (0, 1)
    assert stats.requests_by_path == {GENERATE: 1, "/health": 3}


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def test_kill_drops_in_flight_and_revive_serves_on_the_same_port(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """kill() closes the port and every connection at once (in-flight requests get no
    answer); revive() listens again on the same port with the counters kept."""
    port = server.port
    answer_after = 5.0  # when the request would be answered were it not dropped
    server.script(None, [Action.delay(answer_after)])

    async def in_flight() -> BaseException | int:
        try:
            async with session.post(server.url + GENERATE, json={"prompt": "p"}) as resp:
                return resp.status
        except aiohttp.ClientError as exc:
            return exc

    task = asyncio.ensure_future(in_flight())
    for _ in range(200):
        if server.stats.in_flight:
            break
        await asyncio.sleep(0.01)
    started = time.monotonic()
    await server.kill()
    outcome = await asyncio.wait_for(task, answer_after)
    assert isinstance(outcome, aiohttp.ServerDisconnectedError)
    assert time.monotonic() - started < answer_after / 2
    assert not server.listening
    assert _refused(port)
    await server.revive()
    assert server.listening
    assert server.port == port
    async with session.post(server.url + GENERATE, json={"prompt": "p"}) as resp:
        assert resp.status == 200
    assert server.stats.requests_by_path == {GENERATE: 2}


def test_kill_and_revive_in_thread_mode() -> None:
    """The same in thread mode: the calls complete before they return."""
    with LocalServer(ServerConfig(image_size=8)) as srv:
        port = srv.port
        srv.kill()
        assert _refused(port)
        srv.kill()  # already down: no-op
        srv.revive()
        srv.revive()  # already up: no-op
        assert _post(port, b'{"prompt": "p"}')[0] == 200
