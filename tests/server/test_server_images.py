"""Deterministic pictures, formats, edits, control images and URL inputs."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pybase64
from aiohttp.test_utils import TestServer
from PIL import ImageChops, ImageStat

from friendli_image.server import LocalServer, ServerConfig

from .helpers import EDIT, GENERATE, data_uri, decode_response_image, png_bytes

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def _image(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bytes:
    async with session.post(url, json=body) as resp:
        payload = await resp.json()
        assert resp.status == 200, payload
    return pybase64.b64decode(payload["image"], validate=True)


def _difference(a: bytes, b: bytes) -> float:
    """Mean absolute pixel difference (0-255) between two encoded images."""
    from .helpers import decode_response_image as decode

    first = decode({"image": pybase64.b64encode(a).decode()}).convert("RGB")
    second = decode({"image": pybase64.b64encode(b).decode()}).convert("RGB")
    return sum(ImageStat.Stat(ImageChops.difference(first, second)).mean) / 3


async def test_same_request_same_bytes_across_servers(session: aiohttp.ClientSession) -> None:
    """The same request gives identical bytes from two separate server instances."""
    body = {"prompt": "a lighthouse at dawn", "seed": 42, "num_inference_steps": 12}
    results = []
    for _ in range(2):
        async with LocalServer(ServerConfig(image_size=96)) as srv:
            results.append(await _image(session, srv.url + GENERATE, body))
    assert results[0] == results[1]


async def test_prompt_and_seed_change_the_picture(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """A different prompt or seed gives a visibly different picture."""
    url = server.url + GENERATE
    base = await _image(session, url, {"prompt": "a lighthouse at dawn", "seed": 1})
    other_prompt = await _image(session, url, {"prompt": "snowy peaks at night", "seed": 1})
    other_seed = await _image(session, url, {"prompt": "a lighthouse at dawn", "seed": 2})
    assert _difference(base, other_prompt) > 10
    assert _difference(base, other_seed) > 5


async def test_jpeg_by_default_png_for_raw(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """Absent, null or "jpeg" response_format gives JPEG; "raw" gives PNG."""
    url = server.url + GENERATE
    assert (await _image(session, url, {"prompt": "p"})).startswith(JPEG_MAGIC)
    assert (await _image(session, url, {"prompt": "p", "response_format": None})).startswith(
        JPEG_MAGIC
    )
    assert (await _image(session, url, {"prompt": "p", "response_format": "jpeg"})).startswith(
        JPEG_MAGIC
    )
    assert (await _image(session, url, {"prompt": "p", "response_format": "raw"})).startswith(
        PNG_MAGIC
    )


async def test_edit_output_depends_on_input(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """Editing two different images with the same prompt gives different pictures."""
    url = server.url + EDIT
    red = await _image(
        session, url, {"prompt": "p", "image": {"image": data_uri(png_bytes((220, 0, 0)))}}
    )
    blue = await _image(
        session, url, {"prompt": "p", "image": [{"image": data_uri(png_bytes((0, 0, 220)))}]}
    )
    assert _difference(red, blue) > 20


async def test_edit_prompt_keywords(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """ "night" darkens the input; the same edit twice gives the same bytes."""
    image = {"image": data_uri(png_bytes((200, 200, 200)))}
    url = server.url + EDIT
    plain = await _image(session, url, {"prompt": "p", "image": image, "response_format": "raw"})
    night = await _image(
        session, url, {"prompt": "night", "image": image, "response_format": "raw"}
    )
    again = await _image(
        session, url, {"prompt": "night", "image": image, "response_format": "raw"}
    )
    assert night == again

    def brightness(data: bytes) -> float:
        picture = decode_response_image({"image": pybase64.b64encode(data).decode()})
        return float(ImageStat.Stat(picture.convert("L")).mean[0])

    assert brightness(night) < brightness(plain) - 30


async def test_bare_base64_image_input(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """An image given as bare base64 (no data: prefix) is accepted."""
    bare = pybase64.b64encode(png_bytes((5, 5, 5))).decode()
    await _image(session, server.url + EDIT, {"prompt": "p", "image": {"image": bare}})


async def test_control_weights_influence(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """Weight 0 leaves the picture as without control images; weights 0.5 and 1 change it."""
    url = server.url + GENERATE
    control = [{"image": data_uri(png_bytes((255, 255, 0), (64, 64)))}]
    body: dict[str, Any] = {"prompt": "hills", "seed": 3, "response_format": "raw"}
    plain = await _image(session, url, body)
    off = await _image(
        session, url, {**body, "control_images": control, "controlnet_weights": [0.0]}
    )
    half = await _image(
        session, url, {**body, "control_images": control, "controlnet_weights": [0.5]}
    )
    full = await _image(session, url, {**body, "control_images": control})
    assert off == plain
    assert _difference(plain, half) > 3
    assert _difference(half, full) > 3


async def test_url_inputs_are_fetched(
    fetching_server: LocalServer, session: aiohttp.ClientSession, image_host: TestServer
) -> None:
    """http URLs are fetched by the server; different images at the URLs give different edits."""
    url = fetching_server.url + EDIT
    red = await _image(
        session, url, {"prompt": "p", "image": {"image": str(image_host.make_url("/red.png"))}}
    )
    blue = await _image(
        session, url, {"prompt": "p", "image": {"image": str(image_host.make_url("/blue.png"))}}
    )
    assert _difference(red, blue) > 20


async def test_url_fetch_failures_are_422(
    fetching_server: LocalServer, session: aiohttp.ClientSession, image_host: TestServer
) -> None:
    """A URL answering 404, non-image bytes, or nothing at all gives 422 with a clear message."""
    server = fetching_server
    cases = {
        "/missing.png": "HTTP 404",
        "/text": "not a decodable image",
    }
    for path, message in cases.items():
        body = {"prompt": "p", "control_images": [{"image": str(image_host.make_url(path))}]}
        async with session.post(server.url + GENERATE, json=body) as resp:
            assert resp.status == 422
            detail = (await resp.json())["detail"]
            assert detail[0]["loc"] == ["body", "control_images", 0, "image"]
            assert message in detail[0]["msg"]
    refused = {"prompt": "p", "image": {"image": "http://127.0.0.1:1/x.png"}}
    async with session.post(server.url + EDIT, json=refused) as resp:
        assert resp.status == 422
        assert "could not fetch image from URL" in (await resp.json())["detail"][0]["msg"]


async def test_url_fetch_size_cap(session: aiohttp.ClientSession, image_host: TestServer) -> None:
    """A URL body over fetch_max_bytes gives 422 instead of being read whole."""
    config = ServerConfig(fetch_max_bytes=100_000, allow_private_urls=True)
    async with LocalServer(config) as srv:
        body = {"prompt": "p", "image": {"image": str(image_host.make_url("/big"))}}
        async with session.post(srv.url + EDIT, json=body) as resp:
            assert resp.status == 422
            assert "size limit" in (await resp.json())["detail"][0]["msg"]


async def test_static_image_mode(session: aiohttp.ClientSession) -> None:
    """With static_image every valid request returns those bytes, and bad ones still get 422."""
    static = png_bytes((9, 9, 9))
    async with LocalServer(ServerConfig(static_image=static)) as srv:
        assert await _image(session, srv.url + GENERATE, {"prompt": "a"}) == static
        assert (
            await _image(session, srv.url + EDIT, {"prompt": "b", "image": {"image": "x"}})
            == static
        )
        async with session.post(srv.url + GENERATE, json={"prompt": 1}) as resp:
            assert resp.status == 422


async def test_large_image_input(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """A multi-megabyte data: URI edit is decoded and answered with an image."""
    import io
    import os

    from PIL import Image

    noise = Image.frombytes("RGB", (700, 700), os.urandom(700 * 700 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    assert buffer.tell() > 1_000_000
    body = json.dumps({"prompt": "p", "image": {"image": data_uri(buffer.getvalue())}})
    # A stream, because aiohttp's client warns about large bytes bodies.
    data = io.BytesIO(body.encode())
    headers = {"Content-Type": "application/json"}
    async with session.post(server.url + EDIT, data=data, headers=headers) as resp:
        assert resp.status == 200
        assert decode_response_image(await resp.json()).format == "JPEG"


async def test_large_static_response(session: aiohttp.ClientSession) -> None:
    """A multi-megabyte static image is served whole."""
    import os

    static = os.urandom(3 * 1024 * 1024)
    async with LocalServer(ServerConfig(static_image=static)) as srv:
        assert await _image(session, srv.url + GENERATE, {"prompt": "p"}) == static
