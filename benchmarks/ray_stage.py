"""friendli_image.ray's ImageStage against Ray's own HTTP stage, on the same servers.

    python benchmarks/ray_stage.py                 # about 2 minutes on 2 cores
    python benchmarks/ray_stage.py --quick         # seconds (fewer rows)

Both run at 4 actors on one local Ray cluster, against the bundled server (thread mode,
a fixed image, ``--latency-ms`` of simulated GPU time per request, slots enough that the
server is never the bottleneck):

- ours: ``generate_images(ds, url, num_actors=4, per_endpoint_limit=64)``, images written
  to a local out_dir as they arrive;
- Ray's: ``ray.data.llm.HttpRequestProcessorConfig`` + ``build_processor`` (4 actors,
  the same batch size, ``max_retries=3`` so that 503s do not fail the job: its default
  is 0, and a row that runs out of retries raises and fails the block).

Two cases: throughput with no faults, then requests sent per row with 5 % of requests
answered 503 (``FaultRates(p_503=0.05)``), counted by the server. Prints a JSON line and
a Markdown table; ``--write`` puts the table in its own section of ``RESULTS.md``
(``run.py`` rewrites that file: run this again after it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from PIL import Image

from friendli_image.ray import generate_images
from friendli_image.server import FaultRates, LocalServer, ServerConfig

ACTORS = 4
BATCH = 64
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
_SECTION = re.compile(r"<!-- ray_stage -->.*<!-- /ray_stage -->\n?", re.DOTALL)


def _image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 90, 160)).save(buffer, "JPEG")
    return buffer.getvalue()


def _server(latency_ms: float, p_503: float) -> LocalServer:
    faults = FaultRates(p_503=p_503, seed=7) if p_503 else None
    config = ServerConfig(
        static_image=_image(),
        step_latency_ms=latency_ms,
        max_concurrency=512,
        faults=faults,
        max_records=200_000,
    )
    return LocalServer(config).start()


def _rows(n: int) -> Any:
    return ray.data.from_items(
        [{"id": i, "prompt": f"a lighthouse no. {i}"} for i in range(n)],
        override_num_blocks=max(ACTORS * 2, n // BATCH),
    )


def run_ours(url: str, n: int, out_dir: str) -> dict[str, Any]:
    started = time.perf_counter()
    out = generate_images(
        _rows(n),
        url,
        num_actors=ACTORS,
        calls_per_actor=2,
        batch_size=BATCH,
        per_endpoint_limit=64,
        out_dir=out_dir,
        request={"num_inference_steps": 1},
        client_options={"token": ""},
    )
    statuses = [row["status"] for row in out.iter_rows()]
    elapsed = time.perf_counter() - started
    return {"rows": n, "ok": statuses.count("ok"), "elapsed": elapsed}


def run_ray_http(url: str, n: int) -> dict[str, Any]:
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    config = HttpRequestProcessorConfig(
        url=f"{url}/v1/images/generations",
        concurrency=ACTORS,
        batch_size=BATCH,
        max_retries=3,
        base_retry_wait_time_in_s=0.05,
    )
    processor = build_processor(
        config,
        preprocess=lambda row: {
            "payload": {"prompt": row["prompt"], "num_inference_steps": 1, "seed": row["id"]}
        },
        postprocess=lambda row: {"ok": len(row["http_response"]["image"]) > 0},
    )
    started = time.perf_counter()
    done = [row["ok"] for row in processor(_rows(n)).iter_rows()]
    elapsed = time.perf_counter() - started
    return {"rows": n, "ok": sum(done), "elapsed": elapsed}


def measure(args: argparse.Namespace, p_503: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, n in (("ours", args.rows_ours), ("ray_http", args.rows_ray)):
        srv = _server(args.latency_ms, p_503)
        try:
            with tempfile.TemporaryDirectory() as out_dir:
                row = run_ours(srv.url, n, out_dir) if name == "ours" else run_ray_http(srv.url, n)
            stats = srv.stats
            arrivals = [record.received_at for record in srv.records]
        finally:
            srv.close()
        row["requests"] = stats.total_requests
        row["requests_per_row"] = stats.total_requests / n
        row["rps"] = row["ok"] / row["elapsed"]
        # The server's view, from the first request to the last: Ray's actor start-up
        # (seconds, the same for both stages) is left out.
        window = max(arrivals) - min(arrivals) if len(arrivals) > 1 else row["elapsed"]
        row["steady_rps"] = len(arrivals) / window
        row["max_in_flight"] = stats.max_in_flight
        row["faults"] = dict(stats.faults)
        results[name] = row
        print(f"p_503={p_503} {name}: {json.dumps(row)}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--rows-ours", type=int, default=6000)
    parser.add_argument("--rows-ray", type=int, default=400)
    parser.add_argument("--write", action="store_true", help="update RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.rows_ours, args.rows_ray = 300, 40
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=8,
        object_store_memory=512 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        clean = measure(args, 0.0)
        faulty = measure(args, 0.05)
    finally:
        ray.shutdown()
    ratio = clean["ours"]["steady_rps"] / clean["ray_http"]["steady_rps"]
    summary = {
        "latency_ms": args.latency_ms,
        "actors": ACTORS,
        "throughput_ratio": ratio,
        "clean": clean,
        "p_503_0.05": faulty,
    }
    print(json.dumps(summary))
    table = _markdown(summary, args)
    print(table)
    if args.write:
        text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
        text = _SECTION.sub("", text).rstrip("\n")
        RESULTS.write_text(f"{text}\n\n{table}", encoding="utf-8")
        print(f"wrote the ray_stage section of {RESULTS}")


def _markdown(summary: dict[str, Any], args: argparse.Namespace) -> str:
    clean, faulty = summary["clean"], summary["p_503_0.05"]
    lines = [
        "<!-- ray_stage -->",
        "## Ray Data: ImageStage vs Ray's HttpRequestProcessorConfig",
        "",
        f"`python benchmarks/ray_stage.py` on {platform.platform()}, "
        f"{os.cpu_count()} CPUs, Ray {ray.__version__}: one local cluster, 4 actors each, "
        f"the bundled server with {args.latency_ms:g} ms per request. Wall: rows / "
        "(dataset start to last row), Ray's actor start-up included; steady: the "
        "server's requests / (first to last arrival).",
        "",
        "| case | stage | rows | img/s (wall) | req/s (steady) | requests/row | max in flight |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for case, data in (("no faults", clean), ("5 % 503", faulty)):
        for name, label in (("ours", "ImageStage"), ("ray_http", "HttpRequestProcessorConfig")):
            row = data[name]
            lines.append(
                f"| {case} | {label} | {row['rows']} | {row['rps']:.1f} | "
                f"{row['steady_rps']:.1f} | {row['requests_per_row']:.3f} | "
                f"{row['max_in_flight']} |"
            )
    wall = clean["ours"]["rps"] / clean["ray_http"]["rps"]
    lines += [
        "",
        f"Throughput ratio (no faults): **{summary['throughput_ratio']:.1f}x** steady, "
        f"{wall:.1f}x wall. Under 503s, requests/row is 1 + (503s answered) / rows for "
        "both: every 503 costs one more request and nothing else (no duplicates); "
        "1 / (1 - 0.05) = 1.053 is the floor for any client that retries each 503 "
        "until it succeeds, and the realised 503 share varies with the draw.",
        "<!-- /ray_stage -->",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
