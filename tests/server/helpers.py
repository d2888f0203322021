"""Helpers shared by the bundled server's tests."""

from __future__ import annotations

import io
import json
import os
import select
import socket
import subprocess

import pybase64
from PIL import Image

GENERATE = "/v1/images/generations"
EDIT = "/v1/images/edits"
#: When set, measured figures are also appended to this file (JSON lines), which the
#: reliability report (`nox -s reliability`) reads.
FIGURES_ENV = "FRIENDLI_SERVER_FIGURES"


def figure(name: str, value: float | int) -> None:
    """Print a measured figure, and record it for docs/reliability.md when asked."""
    print(f"FIGURE {name}={value}")
    target = os.environ.get(FIGURES_ENV)
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"name": name, "value": value}) + "\n")


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> bytes:
    """A small PNG of one colour with a contrasting square, so edges exist."""
    picture = Image.new("RGB", size, color)
    inverse = tuple(255 - c for c in color)
    picture.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), inverse), (4, 4))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """Wrap bytes in a base64 ``data:`` URI."""
    return f"data:{mime};base64,{pybase64.b64encode(data).decode()}"


def decode_response_image(payload: dict[str, str]) -> Image.Image:
    """Decode the ``image`` of a 200 response body."""
    picture = Image.open(io.BytesIO(pybase64.b64decode(payload["image"], validate=True)))
    picture.load()
    return picture


def wait_for_announcement(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Wait for run_server's "Serving ..." line; fail (not hang) if it never comes."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the server did not start"
    assert b"Serving" in proc.stdout.readline()


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
