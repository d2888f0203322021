"""Fixtures of the Ray stage tests: bundled servers on loopback, a local Ray cluster.

The whole directory needs pyarrow and fsspec (``friendli-image[ray]``); the tests that
run Ray Data also need ``ray``. Where they are missing, the tests skip with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip(
    "pyarrow", reason="the Ray stage needs pyarrow: pip install 'friendli-image[ray]'"
)
pytest.importorskip(
    "fsspec", reason="the Ray stage needs fsspec: pip install 'friendli-image[ray]'"
)

from friendli_image.server import LocalServer, ServerConfig

#: Small pictures and a short simulated GPU time: many rows in little CPU.
SMALL = ServerConfig(image_size=64, step_latency_ms=2.0, max_concurrency=8)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    """One bundled server in thread mode."""
    with LocalServer(SMALL) as srv:
        yield srv


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """A local Ray cluster for the session (about 3 s to start, 0.7 GB)."""
    ray = pytest.importorskip(
        "ray", reason="Ray is not installed: pip install 'friendli-image[ray]'"
    )
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=8,
        object_store_memory=512 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def prompts_seen(*servers: LocalServer) -> dict[str, int]:
    """How many image requests each prompt got, over the servers' own records."""
    counts: dict[str, int] = {}
    for srv in servers:
        for record in srv.records:
            if isinstance(record.body, dict) and "prompt" in record.body:
                prompt = record.body["prompt"]
                counts[prompt] = counts.get(prompt, 0) + 1
    return counts
