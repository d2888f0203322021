"""Every request shape of the SDK, through Stoplight Prism validating the OpenAPI file.

Prism sits between the SDK and the bundled server (``prism proxy --errors``): a request
that breaks the spec is refused with a problem body before it reaches the server, and a
response that breaks it is replaced by a 500 problem. Each test also reads Prism's log
for violation lines, warnings included (an undeclared status code is only a warning).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pybase64
import pytest
import yaml
from PIL import Image

from friendli_image import (
    AsyncFriendli,
    ImageInput,
    ImageResult,
    RetryConfig,
    SyncFriendli,
)
from friendli_image.server import Action, LocalServer

from .conftest import GOLDEN_DIR, REMOTE_CAT, SPEC, PrismProxy

pytestmark = pytest.mark.contract

GOLDEN = {
    path.stem: json.loads(path.read_text(encoding="utf-8"))
    for path in sorted(GOLDEN_DIR.glob("*.json"))
}
GENERATE, EDIT = "/v1/images/generations", "/v1/images/edits"
MAX_SEED = 2**32 - 1
#: One attempt: a Prism refusal (500) must fail the call, not be retried away.
ONE_ATTEMPT = RetryConfig(max_attempts=1)


def _validation_error_schema() -> jsonschema.protocols.Validator:
    spec = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    schema = {"$ref": "#/components/schemas/HTTPValidationError", "components": spec["components"]}
    return jsonschema.Draft202012Validator(schema)


VALIDATION_ERROR = _validation_error_schema()


def _with_local_url(value: Any, url: str) -> Any:
    """The golden kwargs with their remote image URL pointed at the local image host."""
    return json.loads(json.dumps(value).replace(REMOTE_CAT, url))


def _expected_format(response_format: str | None) -> str:
    return "png" if response_format == "raw" else "jpeg"


@pytest.fixture
async def client(prism: PrismProxy) -> AsyncIterator[AsyncFriendli]:
    """The SDK pointed at Prism, with one attempt per call."""
    async with AsyncFriendli(
        token="golden-token", server_url=prism.url, retries=ONE_ATTEMPT
    ) as sdk:
        yield sdk


def _assert_clean(prism: PrismProxy, mark: int, requests: int) -> None:
    assert prism.violations_since(mark, requests=requests) == []


# -- the golden calls -------------------------------------------------------------------


@pytest.mark.parametrize("golden", GOLDEN.values(), ids=GOLDEN.keys())
async def test_golden_call_passes_prism(
    golden: dict[str, Any], client: AsyncFriendli, prism: PrismProxy, image_url: str
) -> None:
    """Each call the official SDK was recorded making gets a valid answer through Prism."""
    kwargs = _with_local_url(golden["call_kwargs"], image_url)
    mark = prism.mark()
    call = getattr(client.container.image, golden["operation"])
    result = await call(**kwargs)
    assert result.format == _expected_format(kwargs.get("response_format"))
    _assert_clean(prism, mark, 1)


# -- the SDK's other request shapes -----------------------------------------------------


@pytest.mark.parametrize("response_format", [None, "raw", "jpeg"])
async def test_generate_each_response_format(
    response_format: str | None, client: AsyncFriendli, prism: PrismProxy
) -> None:
    """generate with every response_format, and with the optional fields set or omitted."""
    mark = prism.mark()
    image = client.container.image
    results = [
        await image.generate(prompt="a fox", response_format=response_format),  # type: ignore[arg-type]
        await image.generate(
            prompt="a fox",
            model="(adapter-route)",
            num_inference_steps=50,
            guidance_scale=7.5,
            seed=0,
            response_format=response_format,  # type: ignore[arg-type]
        ),
        # None omits the field (the server applies the spec defaults).
        await image.generate(
            prompt="a fox",
            num_inference_steps=None,
            guidance_scale=None,
            seed=MAX_SEED,
            response_format=response_format,  # type: ignore[arg-type]
        ),
    ]
    assert {result.format for result in results} == {_expected_format(response_format)}
    _assert_clean(prism, mark, len(results))


@pytest.fixture
def edit_sources(png: bytes, image_url: str, tmp_path: Path) -> list[Any]:
    """The image as bytes, a path, a file, a PIL image, a data URI, base64, a URL, lists."""
    path = tmp_path / "input.png"
    path.write_bytes(png)
    data_uri = f"data:image/png;base64,{pybase64.b64encode(png).decode()}"
    with Image.open(io.BytesIO(png)) as opened:
        picture = opened.copy()
    return [
        png,
        bytearray(png),
        path,
        str(path),
        io.BytesIO(png),
        picture,
        data_uri,
        pybase64.b64encode(png).decode(),  # bare base64 text
        image_url,
        ImageInput(image=image_url),
        {"image": data_uri},
        [png, image_url],
        [ImageInput(image=data_uri)],
    ]


@pytest.mark.parametrize("response_format", [None, "raw", "jpeg"])
async def test_edit_each_image_form_and_response_format(
    response_format: str | None,
    client: AsyncFriendli,
    prism: PrismProxy,
    edit_sources: list[Any],
) -> None:
    """edit with every form of image input, and every response_format."""
    images = edit_sources
    mark = prism.mark()
    for source in images:
        result = await client.container.image.edit(
            image=source,
            prompt="make it snow",
            seed=7,
            response_format=response_format,  # type: ignore[arg-type]
        )
        assert result.format == _expected_format(response_format), source
    _assert_clean(prism, mark, len(images))


async def test_generate_with_controlnets(
    client: AsyncFriendli, prism: PrismProxy, png: bytes, image_url: str
) -> None:
    """control_images in every form, with and without weights (ints become floats)."""
    image = client.container.image
    mark = prism.mark()
    results = [
        await image.generate(prompt="a city", control_images=[png]),
        await image.generate(
            prompt="a city", control_images=[png, image_url], controlnet_weights=[0, 1]
        ),
        await image.generate(
            prompt="a city",
            control_images=[ImageInput(image=image_url), {"image": image_url}],
            controlnet_weights=(0.25, 0.75),
            response_format="raw",
        ),
    ]
    assert [result.format for result in results] == ["jpeg", "jpeg", "png"]
    _assert_clean(prism, mark, len(results))


async def test_batches(client: AsyncFriendli, prism: PrismProxy, png: bytes) -> None:
    """generate_batch (prompts and request mappings) and edit_batch, every item through Prism."""
    image = client.container.image
    mark = prism.mark()
    prompts = await image.generate_batch([f"a fox, variation {i}" for i in range(4)])
    mappings = await image.generate_batch(
        [
            {"prompt": "an owl", "seed": 1, "response_format": "raw"},
            {"prompt": "a heron", "num_inference_steps": 4, "guidance_scale": 1.5},
            {"prompt": "a crane", "control_images": [png], "controlnet_weights": [0.5]},
        ]
    )
    edits = await image.edit_batch(
        [{"image": png, "prompt": "snow"}, {"image": [png, png], "prompt": "rain", "seed": 3}]
    )
    for result in (prompts, mappings, edits):
        assert result.ok, [item.error for item in result.failed]
    assert mappings[0].result is not None
    assert mappings[0].result.format == "png"
    _assert_clean(prism, mark, len(prompts) + len(mappings) + len(edits))


def test_blocking_facade(prism: PrismProxy, png: bytes) -> None:
    """SyncFriendli: generate, edit and a batch through Prism."""
    mark = prism.mark()
    with SyncFriendli(token="golden-token", server_url=prism.url, retries=ONE_ATTEMPT) as sdk:
        generated = sdk.container.image.generate(prompt="a fox", seed=5, response_format="raw")
        edited = sdk.container.image.edit(image=png, prompt="make it snow")
        batch = sdk.container.image.generate_batch(["an owl", "a heron"]).collect()
    assert isinstance(generated, ImageResult)
    assert (generated.format, edited.format) == ("png", "jpeg")
    assert batch.ok
    _assert_clean(prism, mark, 2 + len(batch))


def test_cli(prism: PrismProxy, png: bytes, image_url: str, tmp_path: Path) -> None:
    """friendli-image generate and edit, every request option given, through Prism."""
    source = tmp_path / "in.png"
    source.write_bytes(png)
    common = ["--server-url", prism.url, "--retries", "1", "--seed", "9", "--steps", "3"]
    commands = [
        ["generate", "a fox", "-o", str(tmp_path / "g.png"), "--format", "raw", "--guidance", "2"],
        ["generate", "a fox", "-o", str(tmp_path / "c.jpg"), "--model", "(adapter-route)",
         "--control", str(source), "--control", image_url, "--control-weight", "0.5",
         "--control-weight", "1"],
        ["edit", str(source), image_url, "-p", "snow", "-o", str(tmp_path / "e.jpg")],
    ]  # fmt: skip
    mark = prism.mark()
    for command in commands:
        run = subprocess.run(
            [sys.executable, "-m", "friendli_image", *command, *common],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr
    assert {path.name for path in tmp_path.iterdir()} >= {"g.png", "c.jpg", "e.jpg"}
    _assert_clean(prism, mark, len(commands))


# -- what the server answers to invalid input -------------------------------------------


async def _post(
    proxy: PrismProxy, path: str, body: bytes | Mapping[str, Any]
) -> tuple[int, str, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url + path, data=data, headers={"Content-Type": "application/json"}
        ) as resp,
    ):
        return resp.status, resp.content_type, await resp.json(content_type=None)


#: Bodies the spec allows that go beyond a limit it states in prose (the descriptions of
#: num_inference_steps, controlnet_weights and ImageInput) or that the project documents
#: (the seed range; an edit needs an image): Prism forwards them and checks the 422.
BEYOND_STATED_LIMITS = [
    (GENERATE, {"prompt": "x", "num_inference_steps": 0}),
    (GENERATE, {"prompt": "x", "num_inference_steps": 51}),
    (GENERATE, {"prompt": "x", "seed": -1}),
    (GENERATE, {"prompt": "x", "seed": MAX_SEED + 1}),
    (GENERATE, {"prompt": "x", "controlnet_weights": [0.5]}),
    (
        GENERATE,
        {"prompt": "x", "control_images": [{"image": "data:,x"}], "controlnet_weights": [1.5]},
    ),
    (GENERATE, {"prompt": "x", "control_images": [{"image": "not an image"}]}),
    (EDIT, {"prompt": "x", "image": []}),
    (EDIT, {"prompt": "x", "image": {"image": ""}}),
    (EDIT, {"prompt": "x", "image": [{"image": "data:image/png;base64,AAAA"}]}),
]

#: Bodies that break the spec: the forwarding proxy lets them reach the server. (Text
#: that is not JSON cannot: Prism answers 400 itself, whatever --validate-request says.)
AGAINST_THE_SPEC: list[tuple[str, bytes | dict[str, Any]]] = [
    (GENERATE, {}),
    (GENERATE, {"prompt": 1, "num_inference_steps": "20", "seed": "1"}),
    (GENERATE, {"prompt": "x", "response_format": "png", "num_inference_steps": 2.5}),
    (GENERATE, {"prompt": "x", "control_images": [{"url": "u"}], "controlnet_weights": "1"}),
    (EDIT, {"prompt": "x"}),
    (EDIT, {"prompt": "x", "image": "a string"}),
    (EDIT, b"[1, 2]"),
]


@pytest.mark.parametrize(("path", "body"), BEYOND_STATED_LIMITS)
async def test_422_beyond_stated_limits_passes_prism(
    path: str, body: dict[str, Any], prism: PrismProxy
) -> None:
    """The server's 422 for a spec-valid body past a stated limit is a valid response."""
    mark = prism.mark()
    status, content_type, payload = await _post(prism, path, body)
    assert (status, content_type) == (422, "application/json"), payload
    VALIDATION_ERROR.validate(payload)
    assert payload["detail"], payload
    _assert_clean(prism, mark, 1)


@pytest.mark.parametrize(("path", "body"), AGAINST_THE_SPEC)
async def test_422_for_bodies_against_the_spec_passes_prism(
    path: str, body: bytes | dict[str, Any], prism_forwarding: PrismProxy
) -> None:
    """The server's 422 for a body the spec forbids passes Prism's response validation."""
    mark = prism_forwarding.mark()
    status, content_type, payload = await _post(prism_forwarding, path, body)
    assert (status, content_type) == (422, "application/json"), payload
    VALIDATION_ERROR.validate(payload)
    _assert_clean(prism_forwarding, mark, 1)


# -- the checks above can fail ----------------------------------------------------------


@pytest.mark.parametrize(("path", "body"), AGAINST_THE_SPEC[:2])
async def test_prism_refuses_a_request_against_the_spec(
    path: str, body: dict[str, Any], prism: PrismProxy
) -> None:
    """A body against the spec is refused by the validating proxy, and its log says so."""
    mark = prism.mark()
    status, content_type, payload = await _post(prism, path, body)
    assert (status, content_type) == (422, "application/problem+json"), payload
    assert payload["validation"]
    violations = prism.violations_since(mark, requests=1, at_least=1)
    assert violations
    prism.expected.extend(violations)


async def test_prism_reports_a_response_against_the_spec(
    prism: PrismProxy, upstream: LocalServer
) -> None:
    """A 200 without ``image`` and an undeclared status are caught: by status and in the log."""
    upstream.script(
        "contract-bad-answer", [Action.status(200, body={"img": "x"}), Action.status(503)]
    )
    headers = {"Content-Type": "application/json", "x-test-id": "contract-bad-answer"}
    mark = prism.mark()
    async with aiohttp.ClientSession() as session:
        async with session.post(prism.url + GENERATE, json={"prompt": "x"}, headers=headers) as bad:
            assert bad.status == 500
            assert "VIOLATIONS" in (await bad.json(content_type=None))["type"]
        async with session.post(prism.url + GENERATE, json={"prompt": "x"}, headers=headers) as odd:
            assert odd.status == 503
            assert "sl-violations" in odd.headers
    violations = prism.violations_since(mark, requests=2, at_least=2)
    prism.expected.extend(violations)
    assert any("VIOLATIONS" in line for line in violations), violations
    assert any("Unable to match the returned status code" in line for line in violations)
