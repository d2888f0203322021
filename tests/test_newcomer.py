"""A newcomer follows the README alone, on a machine with only Python and pip: install from
the checkout into a clean virtual environment, start the bundled server, get a picture.

The commands are read from the README (its console and python blocks), so a README whose
steps stop working fails here. It pip-installs the checkout with its dependencies from
the configured index (pip's cache makes a second run quick), so it is a slow test.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.subprocess,
    pytest.mark.skipif(not README.is_file(), reason="README.md is not beside the tests"),
    pytest.mark.skipif(sys.platform == "win32", reason="the venv layout differs on Windows"),
]


def _blocks(kind: str) -> list[list[str]]:
    """The lines of each ```kind block of the README."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            if current is None and line.strip() == f"```{kind}":
                current = []
            elif current is not None:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _command(predicate: str) -> list[str]:
    """The README's console command holding ``predicate``, without its comment."""
    for block in _blocks("console"):
        for line in block:
            if predicate in line:
                return shlex.split(line.split("  #")[0])
    raise AssertionError(f"the README shows no command with {predicate!r}")


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def clean_env() -> dict[str, str]:
    """The environment without this SDK's settings or this test run's virtualenv."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FRIENDLI_", "VIRTUAL_ENV", "PYTHON"))
    }


@pytest.fixture
def served(tmp_path: Path, clean_env: dict[str, str]) -> Iterator[tuple[Path, str]]:
    """The venv the README's install line made, and the server its serve line started."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, clean_env)
    bin_dir = venv / "bin"
    install = _command("pip install '.[all]'")
    assert install[0] == "python", install
    _run([str(bin_dir / "python"), *install[1:], "--disable-pip-version-check"], ROOT, clean_env)
    serve = _command("friendli-image serve")
    assert serve == ["friendli-image", "serve"], serve
    # Port 8000 may be taken on this machine: the same command on a free port.
    port = _free_port()
    server = subprocess.Popen(
        [str(bin_dir / "friendli-image"), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=clean_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "friendli-image serve did not listen in 60 s"
                time.sleep(0.1)
        yield venv, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stderr:
            server.stderr.close()


def test_the_readme_gets_a_newcomer_to_a_picture(
    served: tuple[Path, str], tmp_path: Path, clean_env: dict[str, str]
) -> None:
    """Install, serve, then the README's first Python block writes lighthouse.jpg; and
    ``friendli-image demo`` saves its pictures."""
    venv, url = served
    work = tmp_path / "work"
    work.mkdir()
    first = "\n".join(_blocks("python")[0]) + "\n"
    (work / "first.py").write_text(first, encoding="utf-8")
    env = {**clean_env, "FRIENDLI_SERVER_URL": url}
    _run([str(venv / "bin" / "python"), "-W", "error", "first.py"], work, env)
    with Image.open(work / "lighthouse.jpg") as picture:
        assert (picture.format, picture.size) == ("JPEG", (512, 512))
    assert "`friendli-image demo`" in README.read_text(encoding="utf-8")
    _run([str(venv / "bin" / "friendli-image"), "demo", "--out-dir", "shots"], work, clean_env)
    assert len(list((work / "shots").glob("*.jpg"))) >= 4
