"""Pytest fixtures for testing code that talks to Friendli Container.

Enable them in a ``conftest.py`` with::

    pytest_plugins = ["friendli_image.server.pytest_plugin"]

Override ``friendli_server_config`` to change the server's settings (token, faults, ...).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._config import ServerConfig
from ._local import LocalServer


@pytest.fixture
def friendli_server_config() -> ServerConfig:
    """The `ServerConfig` the ``friendli_server`` fixture starts with; override to customise."""
    return ServerConfig()


@pytest.fixture
def friendli_server(friendli_server_config: ServerConfig) -> Iterator[LocalServer]:
    """A started `LocalServer` on a free loopback port, closed after the test."""
    with LocalServer(friendli_server_config) as server:
        yield server


@pytest.fixture
def friendli_server_url(friendli_server: LocalServer) -> str:
    """The base URL of the ``friendli_server`` fixture, e.g. ``http://127.0.0.1:54321``."""
    return friendli_server.url
