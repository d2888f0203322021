"""SyncFriendli across process boundaries: seed snippets, Ctrl-C, exit without close, fork.

Each test runs a script with ``sys.executable -X dev -W error`` under a hard timeout,
against the bundled server running in this process.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from friendli_image.server import Action, LocalServer, ServerConfig

pytestmark = pytest.mark.subprocess

#: Hard limit for every subprocess: a hang fails the test instead of stalling the run.
HARD_TIMEOUT_S = 20.0
#: What a script would wait for if it waited for its request in flight.
SLOW_REQUEST_S = 30.0


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRIENDLI_", "PYTHON"))}
    env.update(extra)
    return env


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-X", "dev", "-W", "error", "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env if env is not None else _env(),
    )


class _Lines:
    """Reads a process's stdout on a thread, so waiting for a line can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                self._queue.put(line.rstrip("\n"))

        self._thread = threading.Thread(target=pump, daemon=True)
        self._thread.start()

    def wait_for(self, prefix: str, timeout: float = HARD_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line starting with {prefix!r}; saw {self.seen}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def rest(self) -> list[str]:
        self._thread.join(HARD_TIMEOUT_S)
        while not self._queue.empty():
            self.seen.append(self._queue.get())
        return self.seen


def _finish(proc: subprocess.Popen[str], clean: Callable[[str], str]) -> tuple[int, str]:
    """Wait for the script under the hard timeout; its exit code and ``clean``-ed stderr."""
    try:
        proc.wait(timeout=HARD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the subprocess hung") from None
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert proc.stdout is not None
    proc.stdout.close()
    return proc.returncode, clean(stderr)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    """The bundled server rendering small images, on its own thread."""
    with LocalServer(ServerConfig(image_size=32)) as srv:
        yield srv


# -- the seed's snippets ----------------------------------------------------------------

SEED_DIR = Path(__file__).parent / "data" / "seed"
SEED_GENERATE = (SEED_DIR / "generate.py.txt").read_text()
SEED_EDIT = (SEED_DIR / "edit.py.txt").read_text()


@pytest.mark.parametrize("snippet", [SEED_GENERATE, SEED_EDIT], ids=["generate", "edit"])
def test_seed_snippet_runs_verbatim(
    snippet: str, tiny_jpeg: bytes, dev_mode_stderr: Callable[[str], str]
) -> None:
    """The seed's snippet runs with only the import changed and sends no Authorization header."""
    # Static mode: the server answers without fetching the snippet's URL (no internet here).
    with LocalServer(ServerConfig(static_image=tiny_jpeg)) as srv:
        proc = _run(snippet, env=_env(FRIENDLI_SERVER_URL=srv.url))
        code, stderr = _finish(proc, dev_mode_stderr)
        records = srv.records
    assert (code, stderr) == (0, "")
    assert len(records) == 1
    assert "authorization" not in {name.lower() for name in records[0].headers}
    assert records[0].body["model"] == "(adapter-route)"


def test_seed_snippet_prints_a_short_result(
    tiny_jpeg: bytes, dev_mode_stderr: Callable[[str], str]
) -> None:
    """``print(res)`` prints one short line naming the format, size and request id."""
    with LocalServer(ServerConfig(static_image=tiny_jpeg)) as srv:
        proc = _run(SEED_GENERATE, env=_env(FRIENDLI_SERVER_URL=srv.url))
        lines = _Lines(proc)
        code, stderr = _finish(proc, dev_mode_stderr)
    (line,) = lines.rest()
    assert (code, stderr) == (0, "")
    assert line.startswith("ImageResult(format='jpeg', 4x3")
    assert "request_id=" in line
    assert len(line) < 160


# -- Ctrl-C -------------------------------------------------------------------------------

CTRL_C = """
import sys, time
from friendli_image import SyncFriendli
friendli = SyncFriendli(server_url=sys.argv[1])
print("calling", flush=True)
try:
    friendli.container.image.generate(prompt="a slow one", num_inference_steps=20)
except KeyboardInterrupt:
    print(f"interrupted {time.time()!r}", flush=True)
    time.sleep(1.5)  # still alive: a retry would arrive now
    print("exiting", flush=True)
else:
    print("returned", flush=True)
"""


@pytest.mark.scenario(22)
@pytest.mark.slow
def test_ctrl_c_interrupts_promptly_and_cancels_the_request(
    dev_mode_stderr: Callable[[str], str],
) -> None:
    """SIGINT mid-call raises KeyboardInterrupt in < 1 s; the request is cancelled, not retried."""
    # 20 steps x 500 ms: the generation would take 10 s.
    with LocalServer(ServerConfig(image_size=32, step_latency_ms=500)) as srv:
        proc = _run(CTRL_C, srv.url)
        lines = _Lines(proc)
        lines.wait_for("calling")
        deadline = time.monotonic() + HARD_TIMEOUT_S
        while srv.stats.in_flight == 0:
            assert time.monotonic() < deadline, "the request never reached the server"
            assert proc.poll() is None, lines.rest()
            time.sleep(0.01)
        time.sleep(0.2)  # well inside the simulated GPU work
        sent_at = time.time()
        proc.send_signal(signal.SIGINT)
        interrupted_at = float(lines.wait_for("interrupted", timeout=5).split()[1])
        # The child is still alive (sleeping), so a disconnect now is the cancellation.
        deadline = time.monotonic() + 1.0
        while not srv.stats.disconnects and time.monotonic() < deadline:
            time.sleep(0.01)
        disconnects_while_alive = srv.stats.disconnects
        code, stderr = _finish(proc, dev_mode_stderr)
        records, stats = srv.records, srv.stats
    assert interrupted_at - sent_at < 1.0
    assert disconnects_while_alive == 1
    assert (code, stderr) == (0, "")
    assert lines.rest()[-1] == "exiting"
    assert stats.total_requests == 1
    assert len(records) == 1
    assert records[0].disconnected
    assert records[0].status is None


# -- exit without close -------------------------------------------------------------------

NEVER_CLOSED = """
import logging, sys, threading, time
from friendli_image import FriendliUsageError, SyncFriendli
friendli = SyncFriendli(server_url=sys.argv[1], retries=0)
mode = sys.argv[2]
if mode == "log":
    log = logging.getLogger("friendli_image")
    log.setLevel(logging.DEBUG)
    log.addHandler(logging.StreamHandler(sys.stdout))
friendli.container.image.generate(prompt="before exit")
if mode == "in-flight":
    def call():
        try:
            friendli.container.image.generate(prompt="slow", http_headers={"x-test-id": "slow"})
        except FriendliUsageError:
            pass
    threading.Thread(target=call, daemon=True).start()
    time.sleep(0.3)
print("called", flush=True)
if mode == "raise":
    raise RuntimeError("boom")
if mode == "exit":
    sys.exit(3)
"""


@pytest.mark.parametrize(
    ("mode", "expected_code"),
    [("end", 0), ("exit", 3), ("raise", 1), ("log", 0), ("in-flight", 0)],
)
@pytest.mark.scenario(24)
def test_never_closed_client_exits_fast_and_clean(
    server: LocalServer, mode: str, expected_code: int, dev_mode_stderr: Callable[[str], str]
) -> None:
    """A script that never closes its client exits at once with its code and no warnings,
    without waiting for the request still in flight."""
    server.script("slow", [Action.delay(SLOW_REQUEST_S)])
    proc = _run(NEVER_CLOSED, server.url, mode)
    lines = _Lines(proc)
    lines.wait_for("called")
    started = time.monotonic()
    code, stderr = _finish(proc, dev_mode_stderr)
    elapsed = time.monotonic() - started
    # Waiting for the request would take SLOW_REQUEST_S; an interpreter's exit, even with
    # two busy loops on two cores, takes a small fraction of it.
    assert elapsed < SLOW_REQUEST_S / 3
    assert code == expected_code
    if mode == "raise":
        assert stderr.startswith("Traceback")
        assert stderr.endswith("RuntimeError: boom\n")
        assert "Warning" not in stderr
        assert "Exception ignored" not in stderr
    else:
        assert stderr == ""
    if mode == "log":
        assert any("closed" in line for line in lines.rest()[1:])


# -- fork ---------------------------------------------------------------------------------

FORK = """
import os, sys, time, warnings
# Python 3.12+ warns that fork() in a multi-threaded process is risky; that is the point.
warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
from friendli_image import FriendliUsageError, SyncFriendli
friendli = SyncFriendli(server_url=sys.argv[1])
if sys.argv[2] == "used":
    friendli.container.image.generate(prompt="parent before fork")
pid = os.fork()
if pid == 0:
    try:
        result = friendli.container.image.generate(prompt="child")
        print(f"child ok {result.format}", flush=True)
    except FriendliUsageError as exc:
        print(f"child usage error {exc}", flush=True)
    sys.exit(0)
deadline = time.monotonic() + 10
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        print("child hung", flush=True)
        sys.exit(1)
    time.sleep(0.01)
print(f"child exit {os.waitstatus_to_exitcode(status)}", flush=True)
print(f"parent ok {friendli.container.image.generate(prompt='parent after fork').format}")
friendli.close()
"""


@pytest.mark.scenario(23)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("state", ["used", "unused"])
def test_call_in_forked_child_works(
    server: LocalServer, state: str, dev_mode_stderr: Callable[[str], str]
) -> None:
    """After os.fork(), a call in the child gets a fresh loop and succeeds; nothing hangs."""
    proc = _run(FORK, server.url, state)
    lines = _Lines(proc)
    code, stderr = _finish(proc, dev_mode_stderr)
    assert (code, stderr) == (0, "")
    assert lines.rest() == ["child ok jpeg", "child exit 0", "parent ok jpeg"]
    prompts = [record.body["prompt"] for record in server.records]
    expected = {"child", "parent after fork"} | (
        {"parent before fork"} if state == "used" else set()
    )
    assert sorted(prompts) == sorted(expected)
