"""The driver's memory while ``batch --ray`` reads a million-line INPUT.

    python benchmarks/ray_input_memory.py             # 1,000,000 lines, a few minutes
    python benchmarks/ray_input_memory.py --lines 100000

Runs what the command's driver runs around the image stage, on a local cluster: INPUT
read by Ray tasks in byte ranges (both passes: the checks and the occurrence counts,
then the rows), the rows written by Ray as parquet (where the stage's output would go),
and the summary read back in batches. Prints the driver's peak RSS (``ru_maxrss``) after
``ray.init`` and at the end, and, for comparison, what a list of the same rows on the
driver (the command before) adds. One JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import ray

from friendli_image._cli._batch import _Input
from friendli_image._cli._ray import _dataset, _summary


def _as_output(batch: pa.Table) -> pa.Table:
    rows = batch.num_rows
    return (
        batch.append_column("status", pa.array(["ok"] * rows))
        .append_column("error_type", pa.nulls(rows, pa.string()))
        .append_column("error", pa.nulls(rows, pa.string()))
    )


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--list", action="store_true", help="also measure a driver-side list")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "prompts.jsonl"
        with source.open("w", encoding="utf-8") as handle:
            for i in range(args.lines):
                prompt = f"a lighthouse at dusk no. {i % 50_000}"
                handle.write(f'{{"prompt": "{prompt}", "seed": {i}}}\n')
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        gc.collect()
        after_init = _peak_mib()
        started = time.perf_counter()
        rows, keys, total = _dataset(ray, str(source), True, _Input, actors=4)
        manifest = f"{work}/manifest"
        # Where the stage's output rows would go, with the columns the summary reads.
        rows = rows.map_batches(_as_output, batch_format="pyarrow")
        rows.write_parquet(manifest)
        statuses, _failed = _summary(manifest, fsspec.filesystem("file"))
        elapsed = time.perf_counter() - started
        peak = _peak_mib()
        ray.shutdown()
        result = {
            "lines": args.lines,
            "rows": sum(statuses.values()),
            "total": total,
            "keys": keys,
            "seconds": round(elapsed, 1),
            "driver_peak_mib_after_init": round(after_init, 1),
            "driver_peak_mib": round(peak, 1),
        }
        if args.list:
            before = _peak_mib()
            with source.open(encoding="utf-8") as handle:
                listed = [_Input().parse(line.rstrip("\n"), 1) for line in handle]
            result["list_adds_mib"] = round(_peak_mib() - before, 1)
            del listed
    print(json.dumps(result))


if __name__ == "__main__":
    main()
