"""Fixtures of the Ray stage tests: bundled servers on loopback, a local Ray cluster.

Each module skips with the reason when what it needs is missing: pyarrow and fsspec
(``friendli-image[ray]``) for the stage, ``ray`` for Ray Data, s3fs and moto for S3.
This file imports none of them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from friendli_image.server import LocalServer, ServerConfig

# Ray starts its workers at nice 15 (a head node's own daemons at 0). On a machine that
# also runs other work (CI runs the test sessions beside this one) the actors under test
# then get a sliver of the CPU and the clusters' tests crawl; the clusters these tests
# start (in this process and in the scripts they run) schedule their workers as equals.
os.environ.setdefault("RAY_worker_niceness", "0")

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


@pytest.fixture
def joined_env(ray_local: Any) -> dict[str, str]:
    """The environment of a ``batch --ray`` command that joins the session's cluster
    (``$RAY_ADDRESS``) instead of starting a local one of its own: a cluster start is
    about 10 s of CPU on a 2-core machine, and only the command's own local cluster
    test needs one."""
    address = ray_local.get_runtime_context().gcs_address
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore",
            "RAY_ADDRESS": address}  # fmt: skip


def prompts_seen(*servers: LocalServer) -> dict[str, int]:
    """How many image requests each prompt got, over the servers' own records."""
    counts: dict[str, int] = {}
    for srv in servers:
        for record in srv.records:
            if isinstance(record.body, dict) and "prompt" in record.body:
                prompt = record.body["prompt"]
                counts[prompt] = counts.get(prompt, 0) + 1
    return counts


# -- an S3-compatible object store (moto in server mode) ---------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A local S3 (moto's server mode) on a loopback port outside Ray's 10002-19999."""
    pytest.importorskip("s3fs", reason="s3fs is not installed: pip install s3fs")
    pytest.importorskip(
        "moto.server", reason="moto's server mode is not installed: pip install 'moto[server]'"
    )
    port = _free_port()
    while 10002 <= port <= 19999:
        port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.1)
        else:
            pytest.skip("moto server did not start within 30 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def s3_options(endpoint: str) -> dict[str, object]:
    """fsspec options for the local S3 (moto accepts any credentials)."""
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}


def row_of(name: str) -> str:
    """The row id in an image's name or URI (``<id>-<request digest>.jpg``)."""
    return name.rstrip("/").rsplit("/", 1)[-1].rsplit("-", 1)[0]


def image_of(directory: Path, row_id: object) -> Path:
    """The one image of a row in a local out_dir."""
    (found,) = directory.glob(f"{row_id}-*.*")
    return found
