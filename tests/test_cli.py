"""The friendli-image command line: generate, edit, demo, serve, and its exit codes."""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import friendli_image
from friendli_image._cli import build_parser, main
from friendli_image._formats import sniff_format
from friendli_image.server import LocalServer, ServerConfig
from friendli_image.testing import RecordedWaits


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


@pytest.mark.subprocess
def test_serve_reads_its_token_from_a_file_not_the_command_line(tmp_path: Path) -> None:
    """`serve --token-file` requires that token; the token is not in the process's argv."""
    token_file = tmp_path / "token"
    token_file.write_text("file-token-123\n")
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "friendli_image",
            "serve",
            "--port",
            str(port),
            "--token-file",
            str(token_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert f"127.0.0.1:{port}" in process.stdout.readline()
        assert "file-token-123" not in " ".join(process.args)  # type: ignore[arg-type]
        url = f"http://127.0.0.1:{port}"
        out = tmp_path / "x.jpg"
        assert main(["generate", "a tree", "-o", str(out), "--server-url", url]) == 1
        assert (
            main(
                [
                    "generate",
                    "a tree",
                    "-o",
                    str(out),
                    "--server-url",
                    url,
                    "--token-file",
                    str(token_file),
                ]
            )
            == 0
        )
    finally:
        process.kill()
        process.communicate(timeout=15)


def test_serve_with_a_missing_token_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token file that cannot be read stops `serve` before it listens, with exit 2."""
    assert main(["serve", "--token-file", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "token_file" in err
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


# -- files are what their names say -------------------------------------------------------


def test_generate_to_png_writes_a_png_and_says_so(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-o cat.png` for a JPEG answer writes PNG bytes, and the report names png."""
    pytest.importorskip("PIL")
    out = tmp_path / "cat.png"
    assert main(["generate", "a cat", "-o", str(out), "--server-url", server.url]) == 0
    assert sniff_format(out.read_bytes()) == "png"
    report = capsys.readouterr().out
    assert f"wrote {out} (png " in report
    assert "converted from jpeg" in report
    assert f"{out.stat().st_size:,} bytes" in report


@pytest.mark.parametrize("name", ["missing/cat.jpg", "cat.txt"])
def test_a_bad_output_path_fails_before_the_request(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """A missing -o directory or an extension naming no format: exit 2, nothing sent."""
    out = tmp_path / name
    assert main(["generate", "a cat", "-o", str(out), "--server-url", server.url]) == 2
    err = capsys.readouterr().err
    assert "cannot save" in err
    assert len(err.strip().splitlines()) == 1
    assert server.stats.total_requests == 0
    assert not out.exists()


def test_without_pillow_a_conversion_fails_before_the_request(
    server: LocalServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without Pillow, `-o cat.png` for a JPEG is refused with the install line, unsent."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "PIL" else real_find_spec(name, *args),
    )
    out = tmp_path / "cat.png"
    assert main(["generate", "a cat", "-o", str(out), "--server-url", server.url]) == 2
    err = capsys.readouterr().err
    assert "pip install 'friendli-image[pil]'" in err
    assert server.stats.total_requests == 0
    # --format raw sends PNG: no conversion needed, so no Pillow needed.
    assert (
        main(["generate", "a cat", "-o", str(out), "--format", "raw", "--server-url", server.url])
        == 0
    )
    assert sniff_format(out.read_bytes()) == "png"


# -- the parser ------------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`--version` prints the package version."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"friendli-image {friendli_image.__version__}"


@pytest.mark.parametrize("command", ["generate", "edit", "batch", "gallery", "serve", "demo"])
def test_an_unknown_flag_prints_the_subcommand_usage(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in a subcommand's flag shows that subcommand's usage, not the top one."""
    arguments = {
        "generate": ["x", "-o", "x.jpg"],
        "edit": ["in.jpg", "-p", "x", "-o", "x.jpg"],
        "batch": ["in.txt", "--out-dir", "out"],
        "gallery": ["out"],
        "serve": [],
        "demo": [],
    }[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *arguments, "--no-such-flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: friendli-image {command} " in err
    assert "unrecognized arguments: --no-such-flag" in err


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_has_help_text() -> None:
    """Walking the parser: every argument of every command has a help string."""
    missing = [
        f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        for parser in _parsers(build_parser())
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert missing == []


def test_raw_is_documented_as_png(capsys: pytest.CaptureFixture[str]) -> None:
    """`generate --help` says that --format raw is PNG."""
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "raw, a lossless PNG" in text


# -- the token ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "file", "env"])
def test_the_token_from_flag_file_or_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """--token, --token-file and $FRIENDLI_TOKEN all authenticate against a server."""
    monkeypatch.delenv("FRIENDLI_TOKEN", raising=False)
    secret = tmp_path / "token"
    secret.write_text("right\n", encoding="utf-8")
    extra = {
        "flag": ["--token", "right"],
        "file": ["--token-file", str(secret)],
        "env": [],
    }[how]
    if how == "env":
        monkeypatch.setenv("FRIENDLI_TOKEN", "right")
    with LocalServer(ServerConfig(token="right", image_size=64)) as local:
        out = tmp_path / "x.jpg"
        assert main(["generate", "x", "-o", str(out), "--server-url", local.url, *extra]) == 0


def test_an_unreadable_token_file_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --token-file that does not exist is a usage error naming it."""
    code = main(
        ["generate", "x", "-o", str(tmp_path / "x.jpg"), "--token-file", str(tmp_path / "nope")]
    )
    assert code == 2
    assert "--token-file" in capsys.readouterr().err


def test_a_401_names_the_token_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused token: one line that names --token/FRIENDLI_TOKEN, the server text once."""
    monkeypatch.delenv("FRIENDLI_TOKEN", raising=False)
    with LocalServer(ServerConfig(token="right", image_size=64)) as local:
        code = main(["generate", "x", "-o", str(tmp_path / "x.jpg"), "--server-url", local.url])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "FRIENDLI_TOKEN" in err
    assert err.count("Invalid or missing bearer token") == 1


# -- one line per problem, install hints once ------------------------------------------------


def test_unreachable_with_retries_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], friendli_no_wait: RecordedWaits
) -> None:
    """Retries against a closed port print nothing per attempt: one line in all."""
    url = f"http://127.0.0.1:{_free_port()}"
    out = str(tmp_path / "x.jpg")
    assert main(["generate", "x", "-o", out, "--server-url", url, "--retries", "2"]) == 3
    assert len(friendli_no_wait.delays) == 2  # two retries, their backoff recorded, not slept
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1
    assert "after 3 attempts" in captured.err
    assert captured.out == ""


def test_missing_pillow_for_serve_says_the_install_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve` without Pillow: one line with one install hint."""
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.delitem(sys.modules, "friendli_image.server")
    monkeypatch.delattr(friendli_image, "server")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("pip install") == 1
    assert "friendli-image[server]" in err


# -- gallery ------------------------------------------------------------------------------


def test_gallery_command_writes_the_page(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gallery OUT_DIR` writes OUT_DIR/index.html with a tile per batch item."""
    source = tmp_path / "prompts.txt"
    source.write_text("a fox\na lake\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["batch", str(source), "--out-dir", str(out), "--server-url", server.url]) == 0
    assert not (out / "index.html").exists()
    capsys.readouterr()
    assert main(["gallery", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out / 'index.html'}"
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "a fox" in page
    assert "a lake" in page


def test_gallery_without_a_manifest_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gallery` on a folder that holds no batch says so in one line."""
    assert main(["gallery", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_every_documented_command_line_parses(capsys: pytest.CaptureFixture[str]) -> None:
    """The friendli-image lines of the console blocks of the README and the documentation
    site's pages are valid invocations."""
    root = Path(__file__).resolve().parent.parent
    readme = root / "README.md"
    if not readme.is_file():
        pytest.skip("README.md is not beside the tests")
    pages = [readme, *sorted((root / "docs").rglob("*.md"))]
    lines = []
    for page in pages:
        console = False
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.startswith("```"):
                console = line.strip() == "```console"
            elif console and line.startswith("friendli-image "):
                lines.append(line.split("  #")[0].strip())
    assert len(lines) >= 8
    for line in (line for line in lines if line != "friendli-image --version"):
        build_parser().parse_args(shlex.split(line)[1:])
    assert "friendli-image --version" in lines
    capsys.readouterr()
