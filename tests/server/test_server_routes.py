"""Routes, headers and authentication of the bundled server."""

from __future__ import annotations

import hashlib

import aiohttp

from friendli_image.server import LocalServer, ServerConfig

from .helpers import EDIT, GENERATE, data_uri, decode_response_image, png_bytes


async def test_health(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """GET /health answers 200 {"status": "ok"}."""
    async with session.get(server.url + "/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_generate_returns_base64_image(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """A generation answers 200 with a JSON body whose image decodes to the configured size."""
    async with session.post(server.url + GENERATE, json={"prompt": "a lighthouse"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        picture = decode_response_image(await resp.json())
    assert picture.size == (64, 64)


async def test_edit_returns_base64_image(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """An edit of a data: URI image answers 200 with a decodable image."""
    body = {"prompt": "make it snow", "image": {"image": data_uri(png_bytes((0, 128, 0)))}}
    async with session.post(server.url + EDIT, json=body) as resp:
        assert resp.status == 200
        assert decode_response_image(await resp.json()).size == (64, 64)


async def test_request_id_is_echoed(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """The client's X-Request-ID comes back as x-request-id."""
    headers = {"X-Request-ID": "req-123"}
    async with session.post(server.url + GENERATE, json={"prompt": "p"}, headers=headers) as resp:
        assert resp.headers["x-request-id"] == "req-123"


async def test_request_id_is_generated(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """Without X-Request-ID the server makes up a distinct id per request."""
    ids = set()
    for _ in range(2):
        async with session.get(server.url + "/health") as resp:
            ids.add(resp.headers["x-request-id"])
    assert len(ids) == 2
    assert all(ids)


async def test_prompt_hash_header(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """x-prompt-sha256 is the sha256 hex of the prompt, so results can be matched to inputs."""
    async with session.post(server.url + GENERATE, json={"prompt": "héllo"}) as resp:
        assert resp.headers["x-prompt-sha256"] == hashlib.sha256("héllo".encode()).hexdigest()


async def test_prompt_hash_can_be_disabled(session: aiohttp.ClientSession) -> None:
    """echo_prompt_hash=False sends no x-prompt-sha256."""
    config = ServerConfig(image_size=16, echo_prompt_hash=False)
    async with (
        LocalServer(config) as srv,
        session.post(srv.url + GENERATE, json={"prompt": "p"}) as resp,
    ):
        assert resp.status == 200
        assert "x-prompt-sha256" not in resp.headers


async def test_unknown_route_is_json_404(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """An unknown path answers a JSON 404, and a GET on an image route a JSON 405."""
    async with session.get(server.url + "/v1/nope") as resp:
        assert resp.status == 404
        assert await resp.json() == {"detail": "Not Found"}
    async with session.get(server.url + GENERATE) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert "detail" in await resp.json()


async def test_token_required_when_configured(session: aiohttp.ClientSession) -> None:
    """With a token, a missing or wrong bearer gets 401 JSON; the right one gets 200."""
    async with LocalServer(ServerConfig(token="sekret", image_size=16)) as srv:
        url = srv.url + GENERATE
        async with session.post(url, json={"prompt": "p"}) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            detail = (await resp.json())["detail"]
            assert isinstance(detail, str)
            assert "sekret" not in detail
        wrong = {"Authorization": "Bearer nope"}
        async with session.post(url, json={"prompt": "p"}, headers=wrong) as resp:
            assert resp.status == 401
        right = {"Authorization": "Bearer sekret"}
        async with session.post(url, json={"prompt": "p"}, headers=right) as resp:
            assert resp.status == 200
        async with session.get(srv.url + "/health") as resp:
            assert resp.status == 200


def test_token_not_in_config_repr() -> None:
    """The token does not appear in the config's repr."""
    assert "sekret" not in repr(ServerConfig(token="sekret"))


async def test_stats_count_requests(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """Stats count requests per path and status, and reset_stats zeroes them."""
    async with session.post(server.url + GENERATE, json={"prompt": "p"}) as resp:
        await resp.read()
    async with session.post(server.url + GENERATE, json={"prompt": 1}) as resp:
        await resp.read()
    async with session.get(server.url + "/health") as resp:
        await resp.read()
    stats = server.stats
    assert stats.total_requests == 3
    assert stats.requests_by_path == {GENERATE: 2, "/health": 1}
    assert stats.responses_by_status == {200: 2, 422: 1}
    assert stats.in_flight == 0
    assert stats.max_in_flight == 1
    server.reset_stats()
    assert server.stats.total_requests == 0
    assert server.records == []


async def test_records_redact_images(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """Records keep headers and the JSON body, with image strings replaced by their length."""
    image = data_uri(png_bytes((1, 2, 3)))
    body = {"prompt": "p", "control_images": [{"image": image}], "controlnet_weights": [0.5]}
    async with session.post(server.url + GENERATE, json=body, headers={"x-test-id": "rec"}) as resp:
        assert resp.status == 200
    (record,) = server.records
    assert record.path == GENERATE
    assert record.method == "POST"
    assert record.headers["x-test-id"] == "rec"
    assert record.body == {
        "prompt": "p",
        "control_images": [{"image": f"<{len(image)} chars>"}],
        "controlnet_weights": [0.5],
    }
    assert record.status == 200
    assert record.disconnected is False


async def test_records_can_be_disabled_and_are_bounded(session: aiohttp.ClientSession) -> None:
    """record_requests=False keeps no records; max_records bounds the list; probes leave none."""
    async with LocalServer(ServerConfig(record_requests=False)) as srv:
        async with session.post(srv.url + GENERATE, json={"prompt": "p"}) as resp:
            await resp.read()
        assert srv.records == []
        assert srv.stats.total_requests == 1
    async with LocalServer(ServerConfig(max_records=2)) as srv:
        for prompt in ("a", "b", "c"):
            async with session.post(srv.url + GENERATE, json={"prompt": prompt}) as resp:
                await resp.read()
        async with session.get(srv.url + "/health") as resp:
            await resp.read()
        assert [record.body["prompt"] for record in srv.records] == ["b", "c"]


async def test_records_are_bounded_in_bytes(session: aiohttp.ClientSession) -> None:
    """Headers and bodies count against max_record_bytes; the oldest records go first."""
    bound = 64 * 1024
    async with LocalServer(ServerConfig(max_record_bytes=bound)) as srv:
        for index in range(40):
            headers = {"x-test-id": f"big-{index}", "x-pad": "p" * 4000}
            body = {"prompt": "q" * 2000}
            async with session.post(srv.url + GENERATE, json=body, headers=headers) as resp:
                assert resp.status == 200
        records = srv.records
        kept = sum(len(k) + len(v) for r in records for k, v in r.headers.items())
        assert 0 < kept <= bound
        assert 8 <= len(records) < 40
        # The newest are the ones kept, with their bodies.
        assert records[-1].headers["x-test-id"] == "big-39"
        assert records[-1].body == {"prompt": "q" * 2000}
        # A request larger than the whole bound is served but not kept.
        huge = {"x-test-id": "huge", **{f"x-pad-{i}": "h" * 8000 for i in range(10)}}
        async with session.post(srv.url + GENERATE, json={"prompt": "p"}, headers=huge) as resp:
            assert resp.status == 200
        assert all(r.headers["x-test-id"] != "huge" for r in srv.records)


async def test_refused_requests_leave_no_record(session: aiohttp.ClientSession) -> None:
    """A request refused at the token check is counted, answered 401 and not recorded; an
    accepted one keeps its Authorization as a Credential, which no repr shows."""
    async with LocalServer(ServerConfig(token="sk-server-secret")) as srv:
        for token in (None, "wrong"):
            headers = {"x-pad": "x" * 8000}
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            async with session.post(
                srv.url + GENERATE, json={"prompt": "p"}, headers=headers
            ) as resp:
                assert resp.status == 401
        assert srv.records == []
        assert srv.stats.responses_by_status == {401: 2}
        good = {"Authorization": "Bearer sk-server-secret"}
        async with session.post(srv.url + GENERATE, json={"prompt": "p"}, headers=good) as resp:
            assert resp.status == 200
        (record,) = srv.records
        assert "Authorization" not in record.headers
        assert record.credentials["Authorization"].reveal() == "Bearer sk-server-secret"
        assert "sk-server-secret" not in repr(srv.records) + str(srv.records)
        assert "sk-server-secret" not in repr(srv.config)


async def test_long_request_ids_are_not_echoed(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """An X-Request-ID over 200 characters is replaced, not sent back."""
    headers = {"X-Request-ID": "r" * 5000}
    async with session.post(server.url + GENERATE, json={"prompt": "p"}, headers=headers) as resp:
        echoed = resp.headers["x-request-id"]
    assert 0 < len(echoed) <= 200
    assert echoed != headers["X-Request-ID"]
