"""`friendli-image batch`: inputs, outputs, exit codes, resume, and surviving SIGKILL/Ctrl-C."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from friendli_image._cli import main
from friendli_image._sink import MANIFEST_NAME
from friendli_image.server import FaultRates, LocalServer, ServerConfig


@pytest.fixture
def server(tiny_jpeg: bytes) -> Iterator[LocalServer]:
    """A fast-mode bundled server on its own thread."""
    with LocalServer(ServerConfig(static_image=tiny_jpeg, max_concurrency=64)) as local:
        yield local


def _manifest(directory: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (directory / MANIFEST_NAME).read_bytes().splitlines()]


def _batch(*args: str) -> int:
    return main(["batch", *args, "--no-progress"])


def test_a_prompt_file_becomes_images_and_a_manifest(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A text file of prompts writes one image and one manifest line per non-blank line."""
    source = tmp_path / "prompts.txt"
    source.write_text("a red fox\n\na lighthouse\n  a mountain  \n", encoding="utf-8")
    out = tmp_path / "out"
    assert _batch(str(source), "--out-dir", str(out), "--server-url", server.url) == 0
    lines = sorted(_manifest(out), key=lambda line: line["index"])
    assert [line["prompt"] for line in lines] == ["a red fox", "a lighthouse", "  a mountain  "]
    for line in lines:
        assert hashlib.sha256((out / line["file"]).read_bytes()).hexdigest() == line["sha256"]
    summary = capsys.readouterr().out
    assert "batch summary" in summary
    assert "ok        3" in summary


def test_jsonl_requests_and_failures_exit_1(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON lines carry arguments; an invalid one fails alone, is listed, and exits 1."""
    source = tmp_path / "requests.jsonl"
    source.write_bytes(
        b'{"prompt": "a", "seed": 1, "num_inference_steps": 4}\n'
        b'{"prompt": "b", "seed": -5}\n'
        b"plain text prompt\n"
    )
    out = tmp_path / "out"
    assert _batch(str(source), "--out-dir", str(out), "--server-url", server.url) == 1
    lines = {line["index"]: line for line in _manifest(out)}
    assert lines[0]["status"] == "ok"
    assert lines[0]["seed"] == 1
    assert lines[1]["status"] == "failed"
    assert lines[2]["prompt"] == "plain text prompt"
    output = capsys.readouterr().out
    assert "failed #1: invalid seed" in output
    assert "rerun the same command" in output


def test_rerun_resumes_and_no_resume_starts_over(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same command again sends nothing; --no-resume sends everything again."""
    source = tmp_path / "prompts.txt"
    source.write_text("".join(f"prompt {i}\n" for i in range(8)), encoding="utf-8")
    out = tmp_path / "out"
    args = [str(source), "--out-dir", str(out), "--server-url", server.url]
    assert _batch(*args) == 0
    assert _batch(*args) == 0
    assert server.stats.total_requests == 8
    assert "8 from earlier runs" in capsys.readouterr().out
    assert _batch(*args, "--no-resume") == 0
    assert server.stats.total_requests == 16


def test_stdin_input(server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """INPUT '-' reads the requests from standard input."""
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"prompt": "x"}\n{"prompt": "y"}\n'))
    out = tmp_path / "out"
    assert _batch("-", "--out-dir", str(out), "--server-url", server.url) == 0
    assert len(_manifest(out)) == 2


def test_edits_with_local_image_paths(server: LocalServer, tmp_path: Path, tiny_png: bytes) -> None:
    """A JSONL whose requests have "image" runs edits; local paths are read as images."""
    picture = tmp_path / "in.png"
    picture.write_bytes(tiny_png)
    source = tmp_path / "edits.jsonl"
    source.write_bytes(orjson.dumps({"image": str(picture), "prompt": "add a hat"}) + b"\n")
    out = tmp_path / "out"
    assert _batch(str(source), "--out-dir", str(out), "--server-url", server.url) == 0
    assert server.stats.requests_by_path == {"/v1/images/edits": 1}


def test_bad_json_exits_2_before_sending(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed JSON line is reported with its line number and nothing is sent."""
    source = tmp_path / "requests.jsonl"
    source.write_text('{"prompt": "ok"}\n{"prompt": oops}\n', encoding="utf-8")
    code = _batch(str(source), "--out-dir", str(tmp_path / "out"), "--server-url", server.url)
    assert code == 2
    assert "INPUT line 2" in capsys.readouterr().err
    assert server.stats.total_requests == 0


def test_missing_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing INPUT file is a usage error saying which file."""
    assert _batch(str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path)) == 2
    assert "nope.txt" in capsys.readouterr().err


def test_unreachable_server_exits_3(tmp_path: Path) -> None:
    """When the server cannot be reached the batch stops and exits 3."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = tmp_path / "prompts.txt"
    source.write_text("a\nb\nc\n", encoding="utf-8")
    url = f"http://127.0.0.1:{port}"
    out = str(tmp_path / "out")
    assert _batch(str(source), "--out-dir", out, "--server-url", url, "--retries", "1") == 3


def test_plain_progress_without_tqdm(
    server: LocalServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without tqdm, progress is plain lines on stderr with the rate and ETA."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    source = tmp_path / "prompts.txt"
    source.write_text("a\nb\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["batch", str(source), "--out-dir", str(out), "--server-url", server.url]) == 0
    err = capsys.readouterr().err
    assert "batch: 2/2 done (2 ok, 0 failed)" in err
    assert "img/s, ETA 0s" in err


def test_tqdm_progress_bar(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With tqdm installed, the progress bar is drawn on stderr."""
    pytest.importorskip("tqdm")
    source = tmp_path / "prompts.txt"
    source.write_text("a\nb\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["batch", str(source), "--out-dir", str(out), "--server-url", server.url]) == 0
    assert "2/2" in capsys.readouterr().err


@pytest.mark.subprocess
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_run_resumes_with_every_item_done_once(
    tmp_path: Path, tiny_jpeg: bytes, sig: signal.Signals
) -> None:
    """Killed mid-run (SIGKILL, or Ctrl-C), the command run again with --resume finishes the
    job: every item has exactly one ok manifest line and a file with its sha256."""
    count = 300
    source = tmp_path / "prompts.txt"
    source.write_text("".join(f"prompt number {i}\n" for i in range(count)), encoding="utf-8")
    out = tmp_path / "out"
    config = ServerConfig(
        static_image=tiny_jpeg, max_concurrency=64, faults=FaultRates(delay_ms=(20, 80), seed=1)
    )
    with LocalServer(config) as local:
        command = [
            sys.executable,
            "-m",
            "friendli_image",
            "batch",
            str(source),
            "--out-dir",
            str(out),
            "--concurrency",
            "8",
            "--no-progress",
            "--server-url",
            local.url,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            manifest = out / MANIFEST_NAME
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if manifest.exists() and manifest.stat().st_size > 40 * 150:
                    break
                time.sleep(0.02)
            first.send_signal(sig)
            _, err = first.communicate(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        if sig == signal.SIGINT:
            assert first.returncode == 130, err
        else:
            assert first.returncode == -signal.SIGKILL
        done_before = {line["index"] for line in _manifest(out) if line["status"] == "ok"}
        assert 0 < len(done_before) < count
        again = subprocess.run(
            [*command, "--resume"], capture_output=True, timeout=120, env=env, check=False
        )
        assert again.returncode == 0, again.stderr
    lines = _manifest(out)
    ok = Counter(line["index"] for line in lines if line["status"] == "ok")
    assert sorted(ok) == list(range(count))
    assert set(ok.values()) == {1}
    for line in lines:
        data = (out / line["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == line["sha256"]
        assert line["prompt"] == f"prompt number {line['index']}"
    assert not [path for path in out.iterdir() if path.name.endswith(".part")]
    files = [path for path in out.iterdir() if path.suffix == ".jpg"]
    assert len(files) == count
