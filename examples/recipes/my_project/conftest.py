"""Enable the SDK's fixtures: friendli_server, friendli_server_url, friendli_no_wait."""

import pytest

from friendli_image.server import ServerConfig

pytest_plugins = ["friendli_image.server.pytest_plugin", "friendli_image.testing"]


@pytest.fixture
def friendli_server_config() -> ServerConfig:
    """The bundled server of these tests: small pictures, answered at once."""
    return ServerConfig(image_size=64, step_latency_ms=0)
