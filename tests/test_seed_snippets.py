"""The two code snippets of the seed document run unchanged except for the import line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from friendli_image import AsyncFriendli
from friendli_image.server import LocalServer, ServerConfig

CAT = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/diffusers/cat.png"

# The seed's snippets, verbatim but for the import line (`from friendli import SyncFriendli`).
SEED_DIR = Path(__file__).parent / "data" / "seed"
GENERATE_SNIPPET = (SEED_DIR / "generate.py.txt").read_text()
EDIT_SNIPPET = (SEED_DIR / "edit.py.txt").read_text()

GENERATE_BODY = {
    "prompt": "An orange Lamborghini driving down a hill road at night with a beautiful ocean "
    "view in the background.",
    "model": "(adapter-route)",
    "num_inference_steps": 10,
    "guidance_scale": 3.5,
    "control_images": [{"image": CAT}],
}
EDIT_BODY = {
    "image": [{"image": CAT}],
    "prompt": "Add a red sports car in the foreground.",
    "model": "(adapter-route)",
    "num_inference_steps": 20,
    "guidance_scale": 0.0,
}


async def test_generate_snippet_through_async_friendli(
    capture_server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The generate snippet's calls, through AsyncFriendli: no token → no header, decoded image."""
    monkeypatch.setenv("FRIENDLI_SERVER_URL", capture_server.url)
    async with AsyncFriendli(
        token=os.getenv("FRIENDLI_TOKEN", ""),
    ) as friendli:
        res = await friendli.container.image.generate(
            prompt="An orange Lamborghini driving down a hill road at night with a beautiful "
            "ocean view in the background.",
            model="(adapter-route)",
            num_inference_steps=10,
            guidance_scale=3.5,
            control_images=[
                {
                    "image": CAT,
                },
            ],
        )
        # Handle response
        print(res)
    (sent,) = capture_server.requests
    assert "Authorization" not in sent.headers
    assert sent.path == "/v1/images/generations"
    assert sent.json == GENERATE_BODY
    assert res.data == capture_server.image
    assert res.format == "png"
    printed = capsys.readouterr().out
    assert printed.startswith("ImageResult(format='png'")
    assert printed.count("\n") == 1


async def test_edit_snippet_through_async_friendli(
    capture_server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The edit snippet's calls, through AsyncFriendli: the image list stays a list on the wire."""
    monkeypatch.setenv("FRIENDLI_SERVER_URL", capture_server.url)
    async with AsyncFriendli(
        token=os.getenv("FRIENDLI_TOKEN", ""),
    ) as friendli:
        res = await friendli.container.image.edit(
            image=[
                {
                    "image": CAT,
                },
            ],
            prompt="Add a red sports car in the foreground.",
            model="(adapter-route)",
            num_inference_steps=20,
            guidance_scale=0,
        )
        # Handle response
        print(res)
    (sent,) = capture_server.requests
    assert "Authorization" not in sent.headers
    assert sent.path == "/v1/images/edits"
    assert sent.json == EDIT_BODY
    assert res.data == capture_server.image
    assert "ImageResult(" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case",
    [
        pytest.param((GENERATE_SNIPPET, "/v1/images/generations", GENERATE_BODY), id="generate"),
        pytest.param((EDIT_SNIPPET, "/v1/images/edits", EDIT_BODY), id="edit"),
    ],
)
def test_seed_snippet_verbatim_with_sync_friendli(
    case: tuple[str, str, dict[str, Any]],
    tiny_png: bytes,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The seed snippet itself runs against the bundled server, sending no Authorization header."""
    snippet, path, body = case
    with LocalServer(ServerConfig(static_image=tiny_png)) as server:
        monkeypatch.setenv("FRIENDLI_SERVER_URL", server.url)
        namespace: dict[str, Any] = {}
        exec(compile(snippet, "<seed snippet>", "exec"), namespace)  # noqa: S102  (our own text)
        (record,) = server.records
    res = namespace["res"]
    assert res.data == tiny_png
    assert record.path == path
    assert record.status == 200
    assert "authorization" not in {name.lower() for name in record.headers}
    # The server records image strings by length only; compare the rest exactly.
    images = "control_images" if "control_images" in body else "image"
    assert {k: v for k, v in record.body.items() if k != images} == {
        k: v for k, v in body.items() if k != images
    }
    assert len(record.body[images]) == 1
    assert capsys.readouterr().out.startswith("ImageResult(format='png'")
