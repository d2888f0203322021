"""The benchmark harness runs end to end on a tiny N, so it cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.subprocess
def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    """`benchmarks/run.py --quick` measures baselines and AsyncFriendli and writes the report."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    data = json.loads((tmp_path / "results.json").read_text())
    measured = {(row["client"], row["c"]) for row in data["rows"]}
    for client in ("expert", "raw_aiohttp", "friendli"):
        assert {(client, 1), (client, 4)} <= measured
    for row in data["rows"]:
        assert row["rps"] > 0
        assert row["cpu_us"] > 0
        assert row["p50_ms"] <= row["p99_ms"]
    assert {row["scenario"] for row in data["memory"]} == {"big", "disk"}
    assert set(data["imports"]) == {"aiohttp", "friendli_image"}
    fleet = data["fleet"]
    assert "fleet_round_robin" in {row["client"] for row in fleet["rows"]}
    assert ("fleet" in {row["client"] for row in fleet["rows"]}) == fleet["available"]

    report = (tmp_path / "RESULTS.md").read_text()
    assert "### 64 KiB images" in report
    assert "| raw aiohttp | 4 |" in report
    assert "| AsyncFriendli | 4 |" in report
    assert "## Targets (PERFORMANCE.md)" in report
    assert "| expert aiohttp | 4 |" in report
    assert "## Against the expert hand-written client" in report
    assert "| 64 KiB | 4 |" in report.split("## Against the expert", 1)[1]
    assert "## Fleet (target 10)" in report
    if importlib.util.find_spec("friendli") is None:
        assert "official async" in report.split("Not measured", 1)[1].splitlines()[0]
    else:
        assert "| official async | 4 |" in report
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.slow
@pytest.mark.subprocess
def test_fleet_benchmark_runs(tmp_path: Path) -> None:
    """`benchmarks/fleet.py` runs both parts on a tiny N and reports what it measured."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "fleet.py"),
            "--n",
            "32",
            "--c",
            "8",
            "--scenarios",
            "steady",
            "--cpu-n",
            "500",
            "--baseline",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    cpu, table = (json.loads(line) for line in done.stdout.splitlines())
    assert cpu["this_us_per_request"] > 0
    assert cpu["baseline_us_per_request"] > 0
    schedulers = {row["scheduler"]: row for row in table["rows"]}
    assert set(schedulers) == {
        "ideal",
        "ours, nothing configured",
        "ours, hand-set to the slots",
        "round-robin",
    }
    assert schedulers["ideal"]["share_of_ideal"] == 1
    assert all(row["images_per_s"] > 0 and row["failed"] == 0 for row in table["rows"])
    assert "| steady | round-robin | 8 |" in done.stderr


def _run_script(*args: str, cwd: Path) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=240, check=False, cwd=cwd
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.subprocess
def test_dataset_formats_and_cli_memory_benchmarks_run(tmp_path: Path) -> None:
    """`benchmarks/dataset_formats.py` writes and resumes each format on a tiny N (only
    the new items are sent again); `benchmarks/memory.py cli` reports the command's peak."""
    runs = _run_script(
        str(ROOT / "benchmarks" / "dataset_formats.py"),
        *("--n", "300", "--new", "7", "--formats", "none", "files", "webdataset"),
        cwd=tmp_path,
    )
    writes = {run["format"]: run for run in runs if run["run"] == "write"}
    assert {run["ok"] for run in writes.values()} == {300}
    resumes = [run for run in runs if run["run"] == "resume"]
    assert [(run["format"], run["resumed"], run["sent"]) for run in resumes] == [
        ("files", 300, 7),
        ("webdataset", 300, 7),
    ]
    (cli,) = _run_script(
        str(ROOT / "benchmarks" / "memory.py"),
        *("cli", "--n", "300", "--c", "16", "--size", "256", "--out", str(tmp_path / "cli")),
        cwd=tmp_path,
    )
    assert cli["peak_mib"] > 0
    assert len(list((tmp_path / "cli").glob("*.jpg"))) == 300
