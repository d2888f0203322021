"""A CLI batch job you can watch: ``--metrics-port`` for Prometheus, ``run.json`` at the end."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from friendli_image._cli import main
from friendli_image.server import Action, LocalServer, ServerConfig


@pytest.fixture
def server(tiny_jpeg: bytes) -> Iterator[LocalServer]:
    with LocalServer(ServerConfig(static_image=tiny_jpeg, max_concurrency=64)) as local:
        yield local


def _prompts(tmp_path: Path, count: int) -> Path:
    source = tmp_path / "prompts.txt"
    source.write_text("".join(f"prompt {index}\n" for index in range(count)), encoding="utf-8")
    return source


def _start(source: Path, out: Path, server: LocalServer, port: int) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "friendli_image", "batch", str(source)]
    command += ["--out-dir", str(out), "--server-url", server.url, "--concurrency", "2"]
    command += ["--no-progress", "--metrics-port", str(port)]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _scrape(port: int, process: subprocess.Popen[str]) -> dict[str, list[Any]]:
    """The page's samples by family name, once the job serves it."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                text = page.read().decode()
        except OSError:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the metrics page never answered"
            time.sleep(0.05)
            continue
        families = {family.name: family.samples for family in text_string_to_metric_families(text)}
        if "friendli_image_batch_items" in families:
            return families
        time.sleep(0.05)


@pytest.mark.subprocess
def test_metrics_port_serves_the_running_job_and_run_json_sums_it_up(
    server: LocalServer, tmp_path: Path, unused_tcp_port: int
) -> None:
    """Scraped mid-run with prometheus_client's parser; run.json once it ends."""
    count = 30
    server.script(None, [Action.status(503)] + [Action.delay(0.15)] * count)
    source = _prompts(tmp_path, count)
    out = tmp_path / "out"
    process = _start(source, out, server, unused_tcp_port)
    try:
        families = _scrape(unused_tcp_port, process)
    finally:
        stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    items = {
        sample.labels["status"]: sample.value for sample in families["friendli_image_batch_items"]
    }
    assert set(items) == {"ok", "failed", "skipped", "resumed"}
    assert 0 <= items["ok"] < count  # scraped while it ran
    assert families["friendli_image_batch_total"][0].value == count
    assert "friendli_image_batch_rate" in families
    assert f"metrics at http://127.0.0.1:{unused_tcp_port}/metrics" in stderr
    report = orjson.loads((out / "run.json").read_bytes())
    assert report["status"] == "completed"
    assert report["input"] == {
        "path": str(source),
        "fingerprint": "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest(),
    }
    assert report["counts"] == {
        "total": count,
        "done": count,
        "succeeded": count,
        "failed": 0,
        "skipped": 0,
        "resumed": 0,
    }
    assert report["retries"] == {"status_503": 1}
    figures = report["endpoints"][server.url]
    assert figures["requests"] == {"ok": count, "status_503": 1}
    assert figures["received_bytes"] > 0
    assert report["timings"]["elapsed_seconds"] > 0
    assert "run.json" in stdout


@pytest.mark.subprocess
def test_an_interrupted_job_still_writes_run_json(
    server: LocalServer, tmp_path: Path, unused_tcp_port: int
) -> None:
    count = 200
    # Four answers, then the server holds the rest: the job is still running when the
    # signal comes, however loaded the machine.
    server.script(None, [Action.ok()] * 4 + [Action.delay(600)] * (count - 4))
    out = tmp_path / "out"
    process = _start(_prompts(tmp_path, count), out, server, unused_tcp_port)
    try:
        _scrape(unused_tcp_port, process)
        process.send_signal(signal.SIGINT)
    finally:
        _stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    report = orjson.loads((out / "run.json").read_bytes())
    assert report["status"] == "interrupted"
    assert report["counts"]["done"] < count
    assert not [name for name in os.listdir(out) if name.startswith(".run-")]


def test_run_json_without_a_metrics_port(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run.json needs no extra; --metrics-port without prometheus_client says what to install."""
    out = tmp_path / "out"
    source = _prompts(tmp_path, 3)
    assert main(["batch", str(source), "--out-dir", str(out), "--server-url", server.url]) == 0
    assert orjson.loads((out / "run.json").read_bytes())["counts"]["succeeded"] == 3
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    arguments = ["batch", str(source), "--out-dir", str(out), "--server-url", server.url]
    code = main([*arguments, "--metrics-port", "9"])
    assert code == 2
