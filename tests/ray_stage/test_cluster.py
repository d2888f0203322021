"""ImageStage on a 2-node ``ray.cluster_utils.Cluster``, in a process of its own.

(This module sorts before the ones using the session's local cluster, so the two
clusters never run at once.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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
        print(sorted({r["status"] for r in rows}), len(rows), srv.stats.total_requests)
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_the_stage_pickles_and_runs_on_a_second_node() -> None:
    """On a 2-node ray.cluster_utils.Cluster the actors can only run on node 2, and do."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, "-c", _TWO_NODES],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['ok'] 40 40"
