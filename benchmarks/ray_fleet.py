"""The Ray stage over a fleet: does ``per_endpoint_limit`` hold per endpoint?

    python benchmarks/ray_fleet.py            # about a minute on 2 cores
    python benchmarks/ray_fleet.py --rows 800 # quicker, noisier

Four bundled servers (thread mode, a fixed image, ``--latency-ms`` per request, slots
enough that a server is never the bottleneck) as one fleet, given as the comma-joined
``server_url`` the CLI passes; ``generate_images(..., num_actors=4,
per_endpoint_limit=8)``. The configured rate is endpoints x limit / latency (4 x 8 /
0.2 s = 160 rows/s); the measured one is the servers' own: requests / (first to last
arrival), so Ray's actor start-up is left out. Each server's most requests in flight
shows that the cap holds (at most 8). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import ray
from PIL import Image

from friendli_image.ray import generate_images
from friendli_image.server import LocalServer, ServerConfig

ENDPOINTS = 4
ACTORS = 4
LIMIT = 8


def _image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 90, 160)).save(buffer, "JPEG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2400)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--list", action="store_true", help="pass the URLs as a list")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    config = ServerConfig(
        static_image=_image(), step_latency_ms=args.latency_ms, max_concurrency=64
    )
    servers = [LocalServer(config).start() for _ in range(ENDPOINTS)]
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        urls = [srv.url for srv in servers]
        rows = [{"id": i, "prompt": f"a lighthouse no. {i}"} for i in range(args.rows)]
        ds = ray.data.from_items(rows, override_num_blocks=max(2 * ACTORS, args.rows // 64))
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as out_dir:
            out = generate_images(
                ds,
                urls if args.list else ",".join(urls),
                num_actors=ACTORS,
                per_endpoint_limit=LIMIT,
                out_dir=out_dir,
                request={"num_inference_steps": 1},
            )
            statuses = [row["status"] for row in out.iter_rows()]
        elapsed = time.perf_counter() - started
        arrivals = sorted(record.received_at for srv in servers for record in srv.records)
    finally:
        ray.shutdown()
        for srv in servers:
            srv.close()
    configured = ENDPOINTS * LIMIT / (args.latency_ms / 1000)
    steady = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    result = {
        "rows": args.rows,
        "ok": statuses.count("ok"),
        "cpus": os.cpu_count(),
        "configured_rps": configured,
        "steady_rps": round(steady, 1),
        "ratio": round(steady / configured, 3),
        "wall_rps": round(args.rows / elapsed, 1),
        "max_in_flight": [srv.stats.max_in_flight for srv in servers],
        "requests": [srv.stats.total_requests for srv in servers],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
