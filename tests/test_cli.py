"""The friendli-image command line: generate, edit, demo, serve, and its exit codes."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from friendli_image._cli import main
from friendli_image._formats import sniff_format
from friendli_image.server import LocalServer, ServerConfig


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer(ServerConfig(image_size=64)) as local:
        yield local


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_generate_writes_the_image(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`generate` saves a JPEG where -o says and reports it on stdout."""
    out = tmp_path / "fox.jpg"
    code = main(
        ["generate", "a red fox", "-o", str(out), "--seed", "3", "--server-url", server.url]
    )
    assert code == 0
    assert sniff_format(out.read_bytes()) == "jpeg"
    assert "wrote" in capsys.readouterr().out


def test_generate_adds_the_extension_for_raw(server: LocalServer, tmp_path: Path) -> None:
    """`--format raw` gives a PNG, and an output path without extension gets `.png`."""
    code = main(
        [
            "generate",
            "a fox",
            "-o",
            str(tmp_path / "fox"),
            "--format",
            "raw",
            "--server-url",
            server.url,
        ]
    )
    assert code == 0
    assert sniff_format((tmp_path / "fox.png").read_bytes()) == "png"


def test_same_seed_same_bytes(server: LocalServer, tmp_path: Path) -> None:
    """Two runs with the same prompt and seed write identical files."""
    for name in ("a.jpg", "b.jpg"):
        args = ["generate", "dunes", "-o", str(tmp_path / name), "--seed", "9"]
        assert main([*args, "--server-url", server.url]) == 0
    assert (tmp_path / "a.jpg").read_bytes() == (tmp_path / "b.jpg").read_bytes()


def test_edit_reads_a_local_file(server: LocalServer, tmp_path: Path) -> None:
    """`edit` sends a local image and saves the edited result."""
    source = tmp_path / "in.jpg"
    assert main(["generate", "a lake", "-o", str(source), "--server-url", server.url]) == 0
    out = tmp_path / "out.jpg"
    code = main(
        ["edit", str(source), "-p", "make it snow", "-o", str(out), "--server-url", server.url]
    )
    assert code == 0
    assert sniff_format(out.read_bytes()) == "jpeg"


def test_bad_argument_is_exit_2_without_traceback(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An out-of-range step count exits 2 with a one-line message naming the field."""
    code = main(
        ["generate", "x", "-o", str(tmp_path / "x.jpg"), "--steps", "0", "--server-url", server.url]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "num_inference_steps" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert server.stats.total_requests == 0


def test_missing_edit_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Editing a file that does not exist exits 2 and says which file."""
    code = main(["edit", str(tmp_path / "nope.png"), "-p", "x", "-o", str(tmp_path / "o.jpg")])
    assert code == 2
    assert "nope.png" in capsys.readouterr().err


def test_unreachable_server_is_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A refused connection exits 3 with a one-line hint about the server URL."""
    url = f"http://127.0.0.1:{_free_port()}"
    code = main(
        ["generate", "x", "-o", str(tmp_path / "x.jpg"), "--server-url", url, "--retries", "0"]
    )
    err = capsys.readouterr().err
    assert code == 3
    assert "cannot reach the server" in err
    assert "Traceback" not in err


def test_server_rejection_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 401 from a server that wants a token exits 1 and shows the status."""
    with LocalServer(ServerConfig(token="right", image_size=64)) as local:
        code = main(["generate", "x", "-o", str(tmp_path / "x.jpg"), "--server-url", local.url])
    assert code == 1
    assert "401" in capsys.readouterr().err


def test_demo_saves_five_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`demo` starts its own server and saves four generations and one edit."""
    code = main(["demo", "--out-dir", str(tmp_path), "--step-latency-ms", "0"])
    assert code == 0
    files = sorted(path.name for path in tmp_path.iterdir())
    assert len(files) == 5
    assert all(sniff_format((tmp_path / name).read_bytes()) == "jpeg" for name in files)
    assert str(tmp_path) in capsys.readouterr().out


@pytest.mark.subprocess
def test_serve_answers_and_stops_on_sigint(tmp_path: Path) -> None:
    """`python -m friendli_image serve` serves the API and exits cleanly on Ctrl-C."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "friendli_image", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert f"127.0.0.1:{port}" in banner
        out = tmp_path / "x.jpg"
        url = f"http://127.0.0.1:{port}"
        assert main(["generate", "a tree", "-o", str(out), "--server-url", url]) == 0
        process.send_signal(2)
        _, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in err


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    """Running without a subcommand exits 2 with the usage line."""
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: friendli-image" in capsys.readouterr().err


def test_help_lists_every_command() -> None:
    """`python -m friendli_image --help` lists the subcommands."""
    result = subprocess.run(
        [sys.executable, "-m", "friendli_image", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    for command in ("generate", "edit", "serve", "demo"):
        assert command in result.stdout
