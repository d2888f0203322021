"""Check that the official ``friendli`` SDK (0.16.3) works against the bundled server.

Run it with a Python that has ``friendli==0.16.3`` installed (plus this project's runtime
dependencies); it exits 0 and prints ``official SDK check: ok`` on success. Not collected by
pytest on its own: ``tests/server/test_official_sdk.py`` runs it when ``friendli`` is importable.

The official SDK ignores the client-level ``server_url`` for container operations (each
operation has its own default server), so the URL is passed on every call.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from friendli import SyncFriendli
from friendli.core import models
from PIL import Image

from friendli_image.server import LocalServer, ServerConfig

_PIXEL_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
    "DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def _decode(image: object) -> Image.Image:
    raw = image if isinstance(image, (bytes, bytearray)) else str(image).encode()
    picture = Image.open(io.BytesIO(base64.b64decode(raw, validate=True)))
    picture.load()
    return picture


def main() -> int:
    """Generate, edit and provoke a 422 through the official SDK; fail loudly on surprises."""
    with (
        LocalServer(ServerConfig(token="x", image_size=128)) as server,
        SyncFriendli(token="x", server_url=server.url) as friendli,
    ):
        url = server.url
        generated = friendli.container.image.generate(
            prompt="a lighthouse at dawn", seed=42, server_url=url
        )
        picture = _decode(generated.image)
        assert picture.format == "JPEG", picture.format
        assert picture.size == (128, 128), picture.size

        raw = friendli.container.image.generate(
            prompt="a city skyline",
            response_format="raw",
            control_images=[{"image": _PIXEL_PNG}],
            controlnet_weights=[0.5],
            server_url=url,
        )
        assert _decode(raw.image).format == "PNG"

        edited = friendli.container.image.edit(
            image={"image": _PIXEL_PNG}, prompt="make it snow", seed=0, server_url=url
        )
        assert _decode(edited.image).format == "JPEG"

        error: models.SDKError | None = None
        try:
            friendli.container.image.generate(
                prompt="too many steps", num_inference_steps=51, server_url=url
            )
        except models.SDKError as exc:
            error = exc
        assert error is not None, "a 422 did not surface as the official SDK's error"
        assert error.status_code == 422, error.status_code
        assert "num_inference_steps" in error.body, error.body

        paths = [record.path for record in server.records]
        assert paths == ["/v1/images/generations"] * 2 + ["/v1/images/edits"] + [
            "/v1/images/generations"
        ], paths
    print("official SDK check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
