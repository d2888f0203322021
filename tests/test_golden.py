"""Wire compatibility: our client puts on the wire what the official SDK does (golden files)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from friendli_image import AsyncFriendli

GOLDEN = sorted((pathlib.Path(__file__).parent / "data" / "golden").glob("*.json"))
CASES = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in GOLDEN}
SPEC_DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 0.0}


def normalized(body: dict[str, Any]) -> dict[str, Any]:
    """The contract's comparison rule: drop null keys, then fill the spec defaults."""
    kept = {key: value for key, value in body.items() if value is not None}
    return {**SPEC_DEFAULTS, **kept}


def test_golden_files_are_present() -> None:
    """The golden files are bundled with the tests (the suite must not need ../shared)."""
    assert len(GOLDEN) >= 6
    assert {path.stem for path in GOLDEN} >= {"generate-minimal", "edit-seed-example"}


@pytest.mark.parametrize("golden", CASES.values(), ids=CASES.keys())
async def test_golden_request(
    golden: dict[str, Any], capture_server: Any, tiny_jpeg: bytes
) -> None:
    """The golden call sends the same path, Authorization, Content-Type and (normalized) body."""
    kwargs = golden["call_kwargs"]
    if kwargs.get("response_format") == "jpeg":
        capture_server.image = tiny_jpeg
    async with AsyncFriendli(token="golden-token", server_url=capture_server.url) as client:
        call = getattr(client.container.image, golden["operation"])
        result = await call(**kwargs)
    assert result.data == capture_server.image
    (sent,) = capture_server.requests
    assert sent.method == "POST"
    assert sent.path == golden["path"]
    assert sent.headers["Authorization"] == golden["authorization"]
    assert sent.headers["Content-Type"] == golden["content_type"]
    assert normalized(sent.json) == normalized(golden["body"])


def test_normalization_rule_is_not_vacuous() -> None:
    """The comparison rule still tells different bodies apart (guards the golden test)."""
    assert normalized({"prompt": "a", "seed": None}) == normalized(
        {"prompt": "a", "num_inference_steps": 20}
    )
    assert normalized({"prompt": "a"}) != normalized({"prompt": "a", "num_inference_steps": 10})
    assert normalized({"image": {"image": "u"}}) != normalized({"image": [{"image": "u"}]})
