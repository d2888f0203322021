"""ImageStage on a 2-node ``ray.cluster_utils.Cluster``, in a process of its own.

(This module sorts before the ones using the session's local cluster, so the two
clusters never run at once.)
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("pyarrow", reason="the stage needs pyarrow: pip install 'friendli-image[ray]'")
pytest.importorskip("ray", reason="Ray is not installed: pip install 'friendli-image[ray]'")

pytestmark = pytest.mark.subprocess

_TWO_NODES = textwrap.dedent(
    """
    import ray
    from ray.cluster_utils import Cluster
    from friendli_image.ray import generate_images
    from friendli_image.server import LocalServer, ServerConfig

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 256 * 2**20,
                        "include_dashboard": False},
    )
    cluster.add_node(num_cpus=4, resources={"second_node": 4},
                     object_store_memory=256 * 2**20)
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with LocalServer(ServerConfig(image_size=64)) as srv:
        ds = ray.data.from_items([{"id": i, "prompt": f"p{i}"} for i in range(40)])
        out = generate_images(ds, srv.url, num_actors=1, request={"num_inference_steps": 1},
                              map_batches_options={"resources": {"second_node": 1}})
        rows = out.take_all()
        print("RESULT", sorted({r["status"] for r in rows}), len(rows), srv.stats.total_requests)
    ray.shutdown()
    cluster.shutdown()
    """
)


def _script(script: str, *args: str) -> list[str]:
    """Run the script in a Python of its own; its lines that start with RESULT (Ray's
    raylet writes warnings to the same stdout)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    return [line.removeprefix("RESULT ") for line in lines if line.startswith("RESULT ")]


def test_the_stage_pickles_and_runs_on_a_second_node() -> None:
    """On a 2-node ray.cluster_utils.Cluster the actors can only run on node 2, and do."""
    assert _script(_TWO_NODES)[-1] == "['ok'] 40 40"


_LAPTOP = textwrap.dedent(
    """
    import sys, time
    import pyarrow as pa, pyarrow.parquet as pq
    import ray
    from friendli_image import FriendliUsageError
    from friendli_image.ray import generate_images
    from friendli_image.server import LocalServer, ServerConfig

    source = sys.argv[1]
    for part in range(4):
        ids = list(range(part * 25, part * 25 + 25))
        pq.write_table(pa.table({"id": ids, "prompt": [f"p{i}" for i in ids]}),
                       f"{source}/{part}.parquet")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with LocalServer(ServerConfig(image_size=32)) as srv:
        endpoints = [srv.url] * 8
        # The Ray guide's example (docs/guides/ray.md): read_parquet, a map task, 16 actors.
        prompts = ray.data.read_parquet(source).repartition(16)
        prompts = prompts.add_column(
            "endpoint",
            lambda batch: pa.array([endpoints[i % 8] for i in batch["id"].to_pylist()]),
            batch_format="pyarrow",
        )
        out = generate_images(
            prompts, num_actors=16, per_endpoint_limit=32,
            columns={"prompt": "prompt", "server_url": "endpoint"},
            request={"num_inference_steps": 1}, out_dir=f"{source}/images",
        )
        rows = out.take_all()
        print("RESULT", sorted({r["status"] for r in rows}), len(rows))
        # Another job holds 1.5 of the 2 CPUs: the pool and a reading task must wait.
        holder = ray.remote(num_cpus=1.5)(type("Hold", (), {"ping": lambda self: 1})).remote()
        ray.get(holder.ping.remote())
        for options in ({"num_gpus": 1}, {}):
            started = time.monotonic()
            try:
                generate_images(prompts, srv.url, num_actors=2, map_batches_options=options,
                                placement_timeout=5)
            except FriendliUsageError as exc:
                print("RESULT", round(time.monotonic() - started, 1), str(exc))
    ray.shutdown()
    """
)


@pytest.mark.scenario(56)
def test_the_readme_example_runs_on_2_cpus_and_an_unplaceable_pool_says_so(
    tmp_path: pathlib.Path,
) -> None:
    """On a 2-CPU cluster the Ray guide's example (read_parquet, a map task, 16 actors)
    finishes; a pool the cluster cannot place (a GPU it lacks: at once; CPUs another job
    holds: after the placement timeout) is a FriendliUsageError, not a hang."""
    started = time.monotonic()
    first, gpu, busy = _script(_LAPTOP, str(tmp_path))
    assert first == "['ok'] 100"
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 100
    gpu_seconds, gpu_message = gpu.split(" ", 1)
    assert float(gpu_seconds) < 2  # the cluster has no GPU at all: at once
    assert "GPU 0 in total" in gpu_message
    assert "num_actors" in gpu_message
    busy_seconds, busy_message = busy.split(" ", 1)
    # 2 x 0.25 CPUs and 1 for reading fit, but not beside the other job's 1.5.
    assert 4 <= float(busy_seconds) < 15, busy
    assert "within 5 s" in busy_message
    assert "CPU 2 in total, CPU 0.5 free" in busy_message
    print(f"Ray guide example and two refusals: {time.monotonic() - started:.1f} s")
