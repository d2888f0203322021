"""Validation errors answer 422 like the real FastAPI container, never 500."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from friendli_image.server import LocalServer, ServerConfig

from .helpers import EDIT, GENERATE, data_uri, png_bytes

PNG = data_uri(png_bytes((10, 20, 30)))

GENERATE_CASES: list[tuple[dict[str, Any], list[str | int]]] = [
    ({}, ["body", "prompt"]),
    ({"prompt": 3}, ["body", "prompt"]),
    ({"prompt": None}, ["body", "prompt"]),
    ({"prompt": "p", "num_inference_steps": 0}, ["body", "num_inference_steps"]),
    ({"prompt": "p", "num_inference_steps": 51}, ["body", "num_inference_steps"]),
    ({"prompt": "p", "num_inference_steps": 2.5}, ["body", "num_inference_steps"]),
    ({"prompt": "p", "num_inference_steps": True}, ["body", "num_inference_steps"]),
    ({"prompt": "p", "num_inference_steps": "20"}, ["body", "num_inference_steps"]),
    ({"prompt": "p", "guidance_scale": "3"}, ["body", "guidance_scale"]),
    ({"prompt": "p", "guidance_scale": None}, ["body", "guidance_scale"]),
    ({"prompt": "p", "seed": -1}, ["body", "seed"]),
    ({"prompt": "p", "seed": 2**32}, ["body", "seed"]),
    ({"prompt": "p", "seed": 2**64}, ["body", "seed"]),
    ({"prompt": "p", "seed": 3.5}, ["body", "seed"]),
    ({"prompt": "p", "response_format": "png"}, ["body", "response_format"]),
    ({"prompt": "p", "model": 5}, ["body", "model"]),
    ({"prompt": "p", "control_images": "x"}, ["body", "control_images"]),
    ({"prompt": "p", "control_images": ["x"]}, ["body", "control_images", 0]),
    ({"prompt": "p", "control_images": [{}]}, ["body", "control_images", 0, "image"]),
    ({"prompt": "p", "control_images": [{"image": 1}]}, ["body", "control_images", 0, "image"]),
    (
        {"prompt": "p", "control_images": [{"image": "@/path/to/file.png"}]},
        ["body", "control_images", 0, "image"],
    ),
    (
        {"prompt": "p", "control_images": [{"image": data_uri(b"not an image")}]},
        ["body", "control_images", 0, "image"],
    ),
    (
        {"prompt": "p", "control_images": [{"image": "file:///etc/passwd"}]},
        ["body", "control_images", 0, "image"],
    ),
    (
        {"prompt": "p", "control_images": [{"image": PNG}], "controlnet_weights": [1.5]},
        ["body", "controlnet_weights", 0],
    ),
    (
        {"prompt": "p", "control_images": [{"image": PNG}], "controlnet_weights": ["1"]},
        ["body", "controlnet_weights", 0],
    ),
    (
        {"prompt": "p", "control_images": [{"image": PNG}], "controlnet_weights": [0.5, 0.5]},
        ["body", "controlnet_weights"],
    ),
    ({"prompt": "p", "controlnet_weights": [0.5]}, ["body", "controlnet_weights"]),
    ({"prompt": "p", "controlnet_weights": 0.5}, ["body", "controlnet_weights"]),
]

EDIT_CASES: list[tuple[dict[str, Any], list[str | int]]] = [
    ({"prompt": "p"}, ["body", "image"]),
    ({"prompt": "p", "image": []}, ["body", "image"]),
    ({"prompt": "p", "image": "x"}, ["body", "image"]),
    ({"prompt": "p", "image": {"image": "!!!notbase64"}}, ["body", "image", "image"]),
    (
        {"prompt": "p", "image": [{"image": PNG}, {"image": "aGVsbG8="}]},
        ["body", "image", 1, "image"],
    ),
    ({"image": {"image": PNG}}, ["body", "prompt"]),
]


async def _post(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.post(url, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize(("body", "loc"), GENERATE_CASES)
async def test_generate_422_names_the_field(
    server: LocalServer, session: aiohttp.ClientSession, body: dict[str, Any], loc: list[Any]
) -> None:
    """Each invalid generation body gets 422 whose detail locates the offending field."""
    status, payload = await _post(session, server.url + GENERATE, json=body)
    assert status == 422
    assert loc in [error["loc"] for error in payload["detail"]]
    assert all({"loc", "msg", "type"} <= error.keys() for error in payload["detail"])


@pytest.mark.parametrize(("body", "loc"), EDIT_CASES)
async def test_edit_422_names_the_field(
    server: LocalServer, session: aiohttp.ClientSession, body: dict[str, Any], loc: list[Any]
) -> None:
    """Each invalid edit body gets 422 whose detail locates the offending field."""
    status, payload = await _post(session, server.url + EDIT, json=body)
    assert status == 422
    assert loc in [error["loc"] for error in payload["detail"]]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "p", "num_inference_steps": 20.0}',
        b'{"prompt": "p", "num_inference_steps": 1e1, "seed": 42.0}',
        b'{"prompt": "p", "seed": 0.0}',
    ],
)
async def test_integral_floats_are_integers(
    server: LocalServer, session: aiohttp.ClientSession, raw: bytes
) -> None:
    """``20.0`` is an integer to the contract (JSON Schema) and to the real container (pydantic)."""
    status, payload = await _post(session, server.url + GENERATE, data=raw)
    assert status == 200, payload


async def test_fractional_integer_is_int_from_float(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """A fraction where an integer belongs gets pydantic's int_from_float error."""
    body = {"prompt": "p", "num_inference_steps": 2.5, "seed": 1.5}
    status, payload = await _post(session, server.url + GENERATE, json=body)
    assert status == 422
    assert {(tuple(error["loc"]), error["type"]) for error in payload["detail"]} == {
        (("body", "num_inference_steps"), "int_from_float"),
        (("body", "seed"), "int_from_float"),
    }


async def test_every_problem_is_reported(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """A body with several bad fields lists each of them."""
    body = {"num_inference_steps": 0, "seed": -5, "response_format": "gif"}
    status, payload = await _post(session, server.url + GENERATE, json=body)
    assert status == 422
    locs = {tuple(error["loc"]) for error in payload["detail"]}
    assert locs == {
        ("body", "prompt"),
        ("body", "num_inference_steps"),
        ("body", "seed"),
        ("body", "response_format"),
    }


@pytest.mark.parametrize(
    "raw", [b"{not json", b"NaN", b'{"prompt": "p", "seed": NaN}', b"\xff\xfe", b"[" * 5000]
)
async def test_non_json_body(
    server: LocalServer, session: aiohttp.ClientSession, raw: bytes
) -> None:
    """A body that is not JSON gets 422 json_invalid."""
    headers = {"Content-Type": "application/json"}
    status, payload = await _post(session, server.url + GENERATE, data=raw, headers=headers)
    assert status == 422
    assert payload["detail"][0]["type"] == "json_invalid"


@pytest.mark.parametrize("raw", [b"[]", b'"prompt"', b"null", b"12"])
async def test_top_level_not_object(
    server: LocalServer, session: aiohttp.ClientSession, raw: bytes
) -> None:
    """A JSON body that is not an object gets 422 located at the body."""
    status, payload = await _post(session, server.url + EDIT, data=raw)
    assert status == 422
    assert payload["detail"][0]["loc"] == ["body"]


async def test_empty_body(server: LocalServer, session: aiohttp.ClientSession) -> None:
    """An empty body gets 422 missing."""
    status, payload = await _post(session, server.url + GENERATE, data=b"")
    assert status == 422
    assert payload["detail"] == [{"loc": ["body"], "msg": "Field required", "type": "missing"}]


async def test_lone_surrogate_prompt_is_served(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """A prompt with an escaped lone surrogate is valid JSON and gets an image, not a 500."""
    raw = b'{"prompt": "\\ud800 moon"}'
    status, payload = await _post(session, server.url + GENERATE, data=raw)
    assert status == 200
    assert payload["image"]


async def test_body_too_large_is_413(session: aiohttp.ClientSession) -> None:
    """A body over client_max_size gets 413 JSON, whether or not it announces its length."""
    async with LocalServer(ServerConfig(client_max_size=1000)) as srv:
        body = {"prompt": "x" * 2000}
        status, payload = await _post(session, srv.url + GENERATE, json=body)
        assert status == 413
        assert "detail" in payload

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"prompt": "'
            yield b"x" * 2000
            yield b'"}'

        status, payload = await _post(session, srv.url + GENERATE, data=chunks())
        assert status == 413
        assert srv.stats.responses_by_status == {413: 2}


async def test_oversized_image_input_is_422(session: aiohttp.ClientSession) -> None:
    """An image input over fetch_max_bytes gets 422 naming the field."""
    async with LocalServer(ServerConfig(fetch_max_bytes=100)) as srv:
        body = {"prompt": "p", "image": {"image": data_uri(png_bytes((1, 1, 1), (64, 64)))}}
        status, payload = await _post(session, srv.url + EDIT, json=body)
    assert status == 422
    assert payload["detail"][0]["loc"] == ["body", "image", "image"]
    assert "size limit" in payload["detail"][0]["msg"]
