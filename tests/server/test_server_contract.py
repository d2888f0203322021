"""The server's answers validate against the contract schemas, golden requests included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import yaml
from aiohttp.test_utils import TestServer

from friendli_image.server import LocalServer

from .helpers import EDIT, GENERATE, data_uri, decode_response_image, png_bytes

DATA = Path(__file__).resolve().parents[1] / "data"
SPEC: dict[str, Any] = yaml.safe_load((DATA / "openapi-container-image.yaml").read_text())
GOLDEN = {
    path.stem: json.loads(path.read_text()) for path in sorted((DATA / "golden").glob("*.json"))
}
REMOTE_CAT = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/diffusers/cat.png"


def validator(name: str) -> jsonschema.protocols.Validator:
    """A validator for one component schema of the contract, with its references resolvable."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": SPEC["components"]}
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


SUCCESS = {
    GENERATE: validator("ContainerImageGenerateSuccess"),
    EDIT: validator("ContainerImageEditSuccess"),
}
REQUEST = {
    GENERATE: validator("ContainerImageGenerationBody"),
    EDIT: validator("ContainerImageEditBody"),
}
VALIDATION_ERROR = validator("HTTPValidationError")


def test_contract_paths_are_served() -> None:
    """The contract's two operations are the two image routes the server serves."""
    assert set(SPEC["paths"]) == {GENERATE, EDIT}
    assert all(set(ops) == {"post", "servers"} for ops in SPEC["paths"].values())


@pytest.mark.parametrize("golden", GOLDEN.values(), ids=GOLDEN.keys())
async def test_golden_requests_get_contract_responses(
    golden: dict[str, Any],
    fetching_server: LocalServer,
    session: aiohttp.ClientSession,
    image_host: TestServer,
) -> None:
    """Each body the official SDK sent (remote URLs pointed at a local host) gets a valid 200."""
    server = fetching_server
    recorded = golden
    body_text = json.dumps(recorded["body"]).replace(
        REMOTE_CAT, str(image_host.make_url("/red.png"))
    )
    body = json.loads(body_text)
    path = recorded["path"]
    REQUEST[path].validate(body)
    headers = {"Content-Type": recorded["content_type"], "Authorization": recorded["authorization"]}
    async with session.post(server.url + path, data=body_text, headers=headers) as resp:
        payload = await resp.json()
        assert resp.status == 200, payload
    SUCCESS[path].validate(payload)
    picture = decode_response_image(payload)
    expected = "PNG" if body.get("response_format") == "raw" else "JPEG"
    assert picture.format == expected


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (GENERATE, {"prompt": "p", "num_inference_steps": 99}),
        (GENERATE, {"prompt": "p", "control_images": [{"image": "%%%"}]}),
        (EDIT, {"prompt": "p", "image": [{"image": data_uri(b"GIF89a-truncated")}]}),
        (EDIT, []),
    ],
)
async def test_422_matches_http_validation_error(
    path: str, body: Any, server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """422 bodies validate as the contract's HTTPValidationError."""
    async with session.post(server.url + path, json=body) as resp:
        assert resp.status == 422
        VALIDATION_ERROR.validate(await resp.json())


async def test_edit_success_matches_contract(
    server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """An edit with several images answers a contract-valid success."""
    images = [{"image": data_uri(png_bytes((1, 2, 3)))}, {"image": data_uri(png_bytes((9, 8, 7)))}]
    body = {"prompt": "warm sunset", "image": images, "seed": 5, "response_format": "raw"}
    REQUEST[EDIT].validate(body)
    async with session.post(server.url + EDIT, json=body) as resp:
        SUCCESS[EDIT].validate(await resp.json())


PNG_INPUT = json.dumps({"image": data_uri(png_bytes((40, 90, 160)))})
PNG_INPUT_MORE = json.dumps({"image": data_uri(png_bytes((40, 90, 160))), "detail": "high"})


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        # JSON Schema's integer is any number without a fractional part.
        (GENERATE, '{"prompt": "p", "num_inference_steps": 20.0, "seed": 7.0}'),
        (GENERATE, '{"prompt": "p", "num_inference_steps": 1e1, "seed": 0.0}'),
        (EDIT, '{"prompt": "p", "image": ' + PNG_INPUT + ', "num_inference_steps": 4.0}'),
        # Nulls where the schema allows them, integers where it takes numbers, no bounds on
        # guidance, an empty prompt, members the schema does not name.
        (
            GENERATE,
            '{"prompt": "", "model": null, "seed": null, "response_format": null,'
            ' "control_images": null, "controlnet_weights": null, "guidance_scale": -3}',
        ),
        (
            GENERATE,
            '{"prompt": "p", "control_images": ['
            + PNG_INPUT_MORE
            + '], "controlnet_weights": [1], "extra": {}}',
        ),
        (GENERATE, '{"prompt": "p", "control_images": [], "controlnet_weights": []}'),
    ],
)
async def test_spec_valid_edge_bodies_are_served(
    path: str, raw: str, server: LocalServer, session: aiohttp.ClientSession
) -> None:
    """Bodies at the edges of what the request schemas allow get a contract-valid 200."""
    REQUEST[path].validate(json.loads(raw))
    headers = {"Content-Type": "application/json"}
    async with session.post(server.url + path, data=raw, headers=headers) as resp:
        payload = await resp.json()
        assert resp.status == 200, payload
    SUCCESS[path].validate(payload)
