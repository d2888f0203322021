"""Quiet by default, loud when asked: retries never reach an unconfigured user's stderr."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import pytest

from friendli_image import FriendliConnectionError, RetryConfig, SyncFriendli

_SCRIPT = """
import socket, sys
from friendli_image import FriendliConnectionError, RetryConfig, SyncFriendli
retries = RetryConfig(max_attempts=4, initial_delay=0.001, max_delay=0.002, jitter=0.0)
with SyncFriendli(server_url=sys.argv[1], retries=retries) as client:
    try:
        client.container.image.generate(prompt="x")
    except FriendliConnectionError:
        print("refused")
"""


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _run(env_log: str | None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "FRIENDLI_LOG"}
    if env_log is not None:
        env["FRIENDLI_LOG"] = env_log
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT, _closed_port_url()],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.mark.subprocess
def test_a_refused_connection_with_retries_prints_nothing_on_stderr() -> None:
    """No logging configured: 4 refused attempts, 0 lines on stderr (no last-resort output)."""
    done = _run(None)
    assert done.stdout.strip() == "refused"
    assert done.stderr == ""


@pytest.mark.subprocess
def test_friendli_log_turns_the_retry_lines_on() -> None:
    """FRIENDLI_LOG=info prints one line per retry on stderr."""
    done = _run("info")
    assert done.stdout.strip() == "refused"
    assert done.stderr.count("retrying in") == 3


def test_nothing_is_logged_at_warning_or_above_on_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Python's last-resort handler prints WARNING+ records: retries stay below it."""
    retries = RetryConfig(max_attempts=3, initial_delay=0.001, max_delay=0.002, jitter=0.0)
    with (
        caplog.at_level(logging.DEBUG, logger="friendli_image"),
        SyncFriendli(server_url=_closed_port_url(), retries=retries) as client,
        pytest.raises(FriendliConnectionError),
    ):
        client.container.image.generate(prompt="x")
    records = [r for r in caplog.records if r.name.startswith("friendli_image")]
    assert [r.levelname for r in records if "retrying in" in r.getMessage()] == ["INFO"] * 2
    assert [r for r in records if r.levelno >= logging.WARNING] == []


def test_debug_logger_receives_the_retries() -> None:
    """debug_logger= gets the client's records, so an app can route them."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    mine = logging.getLogger("test_quiet.app")
    mine.setLevel(logging.DEBUG)
    mine.propagate = False
    handler = _Keep()
    mine.addHandler(handler)
    try:
        retries = RetryConfig(max_attempts=2, initial_delay=0.001, max_delay=0.002, jitter=0.0)
        with (
            SyncFriendli(server_url=_closed_port_url(), retries=retries, debug_logger=mine) as c,
            pytest.raises(FriendliConnectionError),
        ):
            c.container.image.generate(prompt="x")
    finally:
        mine.removeHandler(handler)
    assert any("retrying in" in record.getMessage() for record in records)
