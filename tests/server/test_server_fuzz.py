"""Property-based fuzzing: no body, however odd, makes the server answer 500."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from friendli_image.server import LocalServer, ServerConfig

from .helpers import EDIT, GENERATE, data_uri, png_bytes

PNG = data_uri(png_bytes((40, 80, 120), (8, 8)))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
image_strings = st.sampled_from(
    [
        PNG,
        "",
        "abc",
        "aGVsbG8=",
        "data:,",
        "data:image/png;base64,!!",
        "ftp://x/y",
        "http://127.0.0.1:1/x",
    ]
) | st.text(max_size=30)
image_inputs = st.fixed_dictionaries({"image": image_strings}) | json_values
shaped_bodies = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.text(max_size=40) | json_values,
        "model": st.none() | st.text(max_size=10) | json_values,
        "num_inference_steps": st.integers(-3, 60) | json_values,
        "guidance_scale": st.floats() | json_values,
        "seed": st.integers(-10, 2**33) | json_values,
        "response_format": st.sampled_from(["raw", "jpeg", None, "png"]) | json_values,
        "control_images": st.lists(image_inputs, max_size=3) | json_values,
        "controlnet_weights": st.lists(st.floats(-0.5, 1.5), max_size=3) | json_values,
        "image": image_inputs | st.lists(image_inputs, max_size=3),
    },
)
bodies = (
    shaped_bodies.map(lambda body: json.dumps(body).encode())
    | json_values.map(lambda value: json.dumps(value).encode())
    | st.binary(max_size=64)
)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[LocalServer]:
    """One small-image server for every example."""
    with LocalServer(ServerConfig(image_size=16, fetch_timeout_s=2)) as srv:
        yield srv


def _post(server: LocalServer, path: str, body: bytes) -> tuple[int, str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, resp.getheader("Content-Type", ""), json.loads(raw)
    finally:
        conn.close()


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=st.sampled_from([GENERATE, EDIT]), body=bodies)
def test_no_body_gets_a_500(fuzz_server: LocalServer, path: str, body: bytes) -> None:
    """Random and schema-shaped bodies get 200 or 422 JSON answers, never a 500 or a traceback."""
    status, content_type, payload = _post(fuzz_server, path, body)
    assert status in (200, 422), (status, payload)
    assert content_type.startswith("application/json")
    if status == 200:
        assert isinstance(payload["image"], str)
    else:
        assert all({"loc", "msg", "type"} <= error.keys() for error in payload["detail"])
        assert "Traceback" not in json.dumps(payload)
