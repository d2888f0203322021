"""`friendli-image batch`: inputs, outputs, exit codes, resume, and surviving SIGKILL/Ctrl-C."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from friendli_image._cli import main
from friendli_image._store import MANIFEST_NAME
from friendli_image.server import Action, FaultRates, LocalServer, ServerConfig


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
        b'{"prompt": "b", "num_inference_steps": 0}\n'
        b'{"prompt": "c"}\n'
    )
    out = tmp_path / "out"
    assert _batch(str(source), "--out-dir", str(out), "--server-url", server.url) == 1
    lines = {line["index"]: line for line in _manifest(out)}
    assert lines[0]["status"] == "ok"
    assert lines[0]["seed"] == 1
    assert lines[1]["status"] == "failed"
    assert lines[2]["status"] == "ok"
    output = capsys.readouterr().out
    assert "failed #1: invalid num_inference_steps" in output
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
    assert "resumed   8 from earlier runs" in capsys.readouterr().out
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
    command = ["batch", str(source), "--out-dir", str(out), "--server-url", server.url]
    assert main([*command, "--progress"]) == 0
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
    command = ["batch", str(source), "--out-dir", str(out), "--server-url", server.url]
    assert main([*command, "--progress"]) == 0
    assert "2/2" in capsys.readouterr().err


@pytest.mark.subprocess
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_run_resumes_with_every_item_done_once(
    tmp_path: Path, tiny_jpeg: bytes, sig: signal.Signals
) -> None:
    """Killed mid-run (SIGKILL, or Ctrl-C), the command run again with --resume finishes the
    job: every item has exactly one ok manifest line and a file with its sha256.

    The first run cannot finish before the signal, however loaded the machine: after its
    first 40 requests the server holds every answer until the run is stopped.
    """
    count = 300
    served = 40
    source = tmp_path / "prompts.txt"
    source.write_text("".join(f"prompt number {i}\n" for i in range(count)), encoding="utf-8")
    out = tmp_path / "out"
    config = ServerConfig(
        static_image=tiny_jpeg, max_concurrency=64, faults=FaultRates(delay_ms=(20, 80), seed=1)
    )
    with LocalServer(config) as local:
        local.script(None, [Action.ok()] * served + [Action.delay(600)] * (count - served))
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
            while time.monotonic() < deadline and first.poll() is None:
                if manifest.exists() and manifest.read_bytes().count(b"\n") >= served // 2:
                    break
                time.sleep(0.02)
            first.send_signal(sig)
            _, err = first.communicate(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
                first.communicate()  # and closes its pipes
        if sig == signal.SIGINT:
            assert first.returncode == 130, err
        else:
            assert first.returncode == -signal.SIGKILL
        done_before = {line["index"] for line in _manifest(out) if line["status"] == "ok"}
        assert served // 2 <= len(done_before) <= served
        local.clear_scripts()
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


# -- the rules of INPUT -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b'{"prompt": "a"}\nplain text prompt\n',
            "INPUT line 2: is plain text, but line 1 is JSON, which makes the file JSONL",
        ),
        (
            b'a prompt\n{"prompt": "b"}\n',
            "INPUT line 2: is a JSON object, but line 1 is plain text",
        ),
        (
            b'{"image": "https://example.com/a.png", "prompt": "a hat"}\n\n{"prompt": "b"}\n',
            'INPUT line 3: has no "image", but line 1 has one, which makes this file a '
            "batch of edits",
        ),
        (
            b'{"prompt": "a"}\n{"image": "https://example.com/a.png", "prompt": "b"}\n',
            'INPUT line 2: has "image", but line 1 has no one, which makes this file a '
            "batch of generations",
        ),
    ],
    ids=["text-in-jsonl", "json-in-text", "generate-in-edits", "edit-in-generations"],
)
def test_a_line_that_breaks_the_first_lines_rules_exits_2_unsent(
    server: LocalServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    expected: str,
) -> None:
    """The first line sets JSONL vs prompts and edits vs generations; a misfit is named."""
    source = tmp_path / "requests.jsonl"
    source.write_bytes(content)
    out = tmp_path / "out"
    assert _batch(str(source), "--out-dir", str(out), "--server-url", server.url) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert len(err.strip().splitlines()) == 1
    assert server.stats.total_requests == 0


def test_a_misfit_line_on_stdin_stops_with_its_line_number(
    server: LocalServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Standard input is read once, so the same rule is enforced as the line arrives."""
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"prompt": "x"}\nnot json\n'))
    assert _batch("-", "--out-dir", str(tmp_path / "out"), "--server-url", server.url) == 2
    assert "INPUT line 2: is plain text" in capsys.readouterr().err


# -- an unreachable server: one problem, reported once ------------------------------------


def test_unreachable_server_is_one_failure_and_the_rest_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """16 requests in flight meet a closed port: 1 failed, the other 29 skipped, one line."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = tmp_path / "prompts.txt"
    source.write_text("".join(f"prompt {i}\n" for i in range(30)), encoding="utf-8")
    out = tmp_path / "out"
    url = f"http://127.0.0.1:{port}"
    code = _batch(str(source), "--out-dir", str(out), "--server-url", url, "--retries", "0")
    assert code == 3
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "  failed    1\n" in captured.out
    assert "  skipped   29\n" in captured.out
    assert captured.out.count("cannot connect") == 1
    assert [line["status"] for line in _manifest(out)] == ["failed"]


# -- progress: this run's rate, on a terminal only -----------------------------------------


def _summary_rate(output: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith("  elapsed")]
    return line.split("(")[1].split(")")[0]


def test_resumed_items_are_apart_and_the_bar_ends_on_the_summary_rate(
    server: LocalServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resumed run: the summary counts resumed items apart, and the last rate the bar
    drew is the summary's (both this run's items only)."""
    pytest.importorskip("tqdm")
    # Wide enough for the whole bar: where tqdm before 4.68 cannot read the width (in an
    # xdist worker) it cuts the line short, and the rate's tail with it.
    monkeypatch.setenv("COLUMNS", "200")
    source = tmp_path / "prompts.txt"
    out = tmp_path / "out"
    source.write_text("".join(f"prompt {i}\n" for i in range(6)), encoding="utf-8")
    assert _batch(str(source), "--out-dir", str(out), "--server-url", server.url) == 0
    source.write_text("".join(f"prompt {i}\n" for i in range(8)), encoding="utf-8")
    capsys.readouterr()
    command = ["batch", str(source), "--out-dir", str(out), "--server-url", server.url]
    assert main([*command, "--progress"]) == 0
    captured = capsys.readouterr()
    assert "  ok        2\n" in captured.out
    assert "  resumed   6 from earlier runs" in captured.out
    last_bar = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    assert "2 ok, 0 failed, 6 resumed" in last_bar
    assert last_bar.rstrip("]").endswith(_summary_rate(captured.out) + ", ETA 0s")


def test_progress_rate_counts_only_work_done_in_this_run(
    server: LocalServer, tmp_path: Path
) -> None:
    """BatchProgress.rate * elapsed is the number of items sent and finished now."""
    from friendli_image import SyncFriendli

    seen = []
    with SyncFriendli(server_url=server.url) as client:
        prompts = [f"p{i}" for i in range(5)]
        client.container.image.generate_batch(prompts, out_dir=tmp_path).collect()
        client.container.image.generate_batch(
            [*prompts, "p5", "p6"], out_dir=tmp_path, on_progress=seen.append
        ).collect()
    final = seen[-1]
    assert (final.succeeded, final.resumed) == (2, 5)
    assert final.rate * final.elapsed == pytest.approx(2)


def _run_with_stderr(command: list[str], tty: bool) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal (tty) or a pipe; return its stderr."""
    if not tty:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        return done.returncode, done.stderr
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    # A fresh pseudo-terminal is 0 columns wide, where a bar has no room at all.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.subprocess
@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "pipe"])
def test_progress_only_on_a_terminal_by_default(
    server: LocalServer, tmp_path: Path, tty: bool
) -> None:
    """Without --progress/--no-progress, the bar is drawn only when stderr is a terminal."""
    source = tmp_path / "prompts.txt"
    source.write_text("a\nb\n", encoding="utf-8")
    command = [sys.executable, "-m", "friendli_image", "batch", str(source)]
    command += ["--out-dir", str(tmp_path / "out"), "--server-url", server.url]
    code, err = _run_with_stderr(command, tty)
    assert code == 0
    assert ("2/2" in err) == tty
    if not tty:
        assert err == ""


# -- --no-resume and --gallery ------------------------------------------------------------


def test_no_resume_moves_the_earlier_run_aside(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--no-resume moves the old manifest and its images into previous-run-*/ and says so;
    files the manifest does not name stay."""
    source = tmp_path / "prompts.txt"
    source.write_text("one\ntwo\nthree\n", encoding="utf-8")
    out = tmp_path / "out"
    args = [str(source), "--out-dir", str(out), "--server-url", server.url]
    assert _batch(*args, "--gallery") == 0
    old_files = sorted(line["file"] for line in _manifest(out))
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    source.write_text("four\n", encoding="utf-8")
    capsys.readouterr()
    assert _batch(*args, "--no-resume") == 0
    err = capsys.readouterr().err
    (previous,) = out.glob("previous-run-*")
    assert f"moved the earlier run's manifest and 3 image(s) to {previous}" in err
    assert sorted(path.name for path in previous.glob("*.jpg")) == old_files
    assert (previous / MANIFEST_NAME).exists()
    assert (previous / "index.html").exists()
    assert [line["prompt"] for line in _manifest(out)] == ["four"]
    assert sorted(path.name for path in out.glob("*.jpg")) == [_manifest(out)[0]["file"]]
    assert (out / "notes.txt").exists()


def test_gallery_flag_writes_the_page(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """batch --gallery writes index.html at the end and names it in the summary."""
    source = tmp_path / "prompts.txt"
    source.write_text("a fox\n", encoding="utf-8")
    out = tmp_path / "out"
    assert _batch(str(source), "--out-dir", str(out), "--server-url", server.url, "--gallery") == 0
    assert f"gallery   {out / 'index.html'}" in capsys.readouterr().out
    assert "a fox" in (out / "index.html").read_text(encoding="utf-8")


def _invalid_lines(tmp_path: Path, count: int) -> Path:
    """A JSONL INPUT whose every line fails on its own (steps 0 is refused before sending)."""
    source = tmp_path / f"invalid-{count}.jsonl"
    source.write_bytes(
        b"".join(b'{"prompt": "p%d", "num_inference_steps": 0}\n' % i for i in range(count))
    )
    return source


def test_the_summary_lists_the_first_failures_and_counts_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Thousands of failures: the summary names the first ten in input order and counts
    the others, which the manifest lists."""
    source = _invalid_lines(tmp_path, 3000)
    out = tmp_path / "out"
    assert _batch(str(source), "--out-dir", str(out), "--server-url", "http://127.0.0.1:9") == 1
    summary = capsys.readouterr().out
    listed = [line.split(":")[0].strip() for line in summary.splitlines() if "failed #" in line]
    assert listed == [f"failed #{index}" for index in range(10)]
    assert "... and 2,990 more (see the manifest)" in summary
    assert "failed    3,000" in summary
    assert len(_manifest(out)) == 3000


def test_memory_does_not_grow_with_the_number_of_items(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command counts items as they arrive: ten times the items, the same peak (it
    kept every item for its summary: 1.16 KiB each)."""
    peaks = {}
    for count in (500, 5000):
        source = _invalid_lines(tmp_path, count)
        tracemalloc.start()
        try:
            _batch(str(source), "--out-dir", str(tmp_path / f"out-{count}"), "--server-url",
                   "http://127.0.0.1:9")  # fmt: skip
            peaks[count] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        capsys.readouterr()
    grown = peaks[5000] - peaks[500]
    assert grown < 4500 * 200, f"peak grew {grown:,} bytes for 4,500 more items"


#: Runs the command as its entry point does, with a teardown hook that says it ran.
_ENTRY_WITH_TEARDOWN_PROBE = """
import atexit, sys
atexit.register(print, "teardown ran")
from friendli_image._cli import run
run()
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("output_format", ["parquet", "files"])
def test_a_run_that_loaded_pyarrow_exits_with_its_status_before_the_teardown(
    server: LocalServer, tmp_path: Path, output_format: str
) -> None:
    """Arrow can abort a finished process in the interpreter's teardown (apache/arrow#34314,
    exit 134 after a complete run): once pyarrow is loaded, the command exits with its
    status, its output flushed and its files complete, without that teardown. A run
    without pyarrow exits as any program does."""
    if output_format == "parquet":
        pytest.importorskip("pyarrow", reason="Parquet needs the datasets extra")
    source = tmp_path / "prompts.txt"
    source.write_text("a red fox\na lighthouse\n", encoding="utf-8")
    out = tmp_path / "out"
    command = [sys.executable, "-c", _ENTRY_WITH_TEARDOWN_PROBE, "batch", str(source)]
    command += ["--out-dir", str(out), "--output-format", output_format]
    command += ["--server-url", server.url, "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "ok        2" in done.stdout
    assert ("teardown ran" in done.stdout) is (output_format == "files")
    if output_format == "parquet":
        import pyarrow.parquet as pq

        (shard,) = out.glob("*.parquet")
        assert pq.read_table(shard).num_rows == 2
    assert len(_manifest(out)) == 2


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_cancels_the_command_at_an_await_and_lets_its_cleanup_run(
    monkeypatch: pytest.MonkeyPatch, presses: int
) -> None:
    """Ctrl-C during a command cancels its task at its next await, never in the middle of
    other code (asyncio's own included): the cleanup (a batch closing its store) runs,
    then KeyboardInterrupt; a second Ctrl-C, during a long cleanup, raises it at once.
    Python 3.11's asyncio.run does this; on 3.10 the command does it itself (the default
    handler raises inside whatever runs, which could hang the exit)."""
    import threading

    from friendli_image import _cli

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are set from the main thread only")
    monkeypatch.setattr(_cli, "_RUN_CANCELS_ON_SIGINT", False)  # 3.10's path, on any version
    steps: list[str] = []

    async def command() -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            busy_until = time.monotonic() + 0.2
            while time.monotonic() < busy_until:  # code between awaits: not interrupted
                pass
            steps.append("reached its await")
            await asyncio.sleep(30)
        finally:
            steps.append("cleanup started")
            if presses == 2:
                os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(30 if presses == 2 else 0)
            steps.append("cleanup finished")
        return 0

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            _cli._run_async(command())
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 20
    expected = ["reached its await", "cleanup started", "cleanup finished"]
    assert steps == (expected if presses == 1 else expected[:2])
