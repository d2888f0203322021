"""Programs written for the official ``friendli`` SDK give the same results through ours.

Each program in ``programs/`` is run twice against a fresh bundled server: as written,
with the official SDK (``friendli==0.16.3``), and with only its import lines rewritten
to ``friendli_image``. What a user can observe must match: what it prints, the files it
writes (by hash) and its exit status.

A program states what it needs in header comments:

- ``# server: static-image``: the server answers every valid request with one fixed PNG
  (for programs that pass image URLs, which the server would otherwise fetch);
  ``# server: token=<value>``: the server requires that token.
- ``# script: <expression>``: `Action` objects queued for each run's requests
  (e.g. ``[Action.status(503), Action.status(503)]``).
- ``# differs: <key> — <reason>`` (``<key>`` one of ``_compat.DIFFERENCES``) with
  ``# official-prints: <regex>`` and ``# ours-prints: <regex>``: a deliberate
  difference. Lines fully matching the regex are taken out of each run's output before
  comparing; each regex must match at least one line, so the written difference stays
  true. The porting guide (docs/guides/porting.md) lists every declared difference.
- ``# pending: <reason>``: the program needs what is not built yet; it is expected to
  fail (not strictly).

Environment of a program: ``IMAGE_SERVER_URL`` (the server), ``DEAD_SERVER_URL`` (a port
nothing listens on), ``FRIENDLI_TOKEN`` (the server's token if it requires one, else any
token), and a fresh empty working directory.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

pytest.importorskip("friendli", reason="the differential suite needs friendli==0.16.3")

from friendli_image.server import Action, LocalServer, ServerConfig

PROGRAMS = sorted((Path(__file__).parent / "programs").glob("*.py"))
IMPORT_LINE = re.compile(r"^(\s*)(from|import)\s+friendli(\.core)?(?=[\s.,]|$)", re.MULTILINE)
TIMEOUT_S = 90


@attrs.frozen
class Header:
    """What a program's header comments ask for."""

    server: dict[str, Any]
    script: list[Action]
    differs: str | None
    official_prints: list[str]
    ours_prints: list[str]
    pending: str | None


def _header(source: str) -> Header:
    values: dict[str, list[str]] = {}
    for line in source.splitlines():
        match = re.match(r"#\s*([a-z-]+):\s*(.*)$", line)
        if match:
            values.setdefault(match.group(1), []).append(match.group(2).strip())
    server: dict[str, Any] = {"image_size": 64}
    for item in values.get("server", []):
        if item == "static-image":
            server["static_image"] = _tiny_png()
        elif item.startswith("token="):
            server["token"] = item.removeprefix("token=")
        else:
            raise ValueError(f"unknown server setting {item!r}")
    script: list[Action] = []
    for expression in values.get("script", []):
        script.extend(eval(expression, {"Action": Action}))  # noqa: S307  (our own files)
    differs = " ".join(values.get("differs", [])) or None
    header = Header(
        server=server,
        script=script,
        differs=differs,
        official_prints=values.get("official-prints", []),
        ours_prints=values.get("ours-prints", []),
        pending=" ".join(values.get("pending", [])) or None,
    )
    if bool(differs) != bool(header.official_prints or header.ours_prints):
        raise ValueError("'differs:' needs 'official-prints:' / 'ours-prints:' lines and back")
    return header


def _tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def rewrite_imports(source: str) -> str:
    """Map ``friendli`` (and ``friendli.core``) to ``friendli_image`` on import lines only."""
    rewritten = IMPORT_LINE.sub(r"\1\2 friendli_image", source)
    before, after = source.splitlines(), rewritten.splitlines()
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        if old != new:
            assert re.match(r"\s*(from|import)\s", old), f"not an import line: {old!r}"
    return rewritten


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.frozen
class Run:
    """What one run of a program let a user observe."""

    lines: list[str]
    files: dict[str, str]
    returncode: int
    stderr: str


def _run(source: str, header: Header, workdir: Path) -> Run:
    workdir.mkdir()
    program = workdir / "program.py"
    program.write_text(source)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FRIENDLI_", "PYTHONWARNINGS"))
    }
    with LocalServer(ServerConfig(**header.server)) as server:
        if header.script:
            server.script(None, header.script)
        env["FRIENDLI_TOKEN"] = header.server.get("token", "differential-token")
        env["IMAGE_SERVER_URL"] = server.url
        env["DEAD_SERVER_URL"] = f"http://127.0.0.1:{_free_port()}"
        result = subprocess.run(
            [sys.executable, program.name],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    program.unlink()
    files = {
        str(path.relative_to(workdir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(workdir.rglob("*"))
        if path.is_file()
    }
    return Run(result.stdout.splitlines(), files, result.returncode, result.stderr[-3000:])


def _without(lines: list[str], patterns: list[str], who: str) -> list[str]:
    kept = list(lines)
    for pattern in patterns:
        regex = re.compile(pattern)
        matched = [line for line in kept if regex.fullmatch(line)]
        assert matched, f"the written difference {pattern!r} no longer shows in the {who} run"
        kept = [line for line in kept if not regex.fullmatch(line)]
    return kept


def _params() -> list[Any]:
    params = []
    for path in PROGRAMS:
        header = _header(path.read_text())
        marks = []
        if header.pending:
            marks.append(pytest.mark.xfail(strict=False, reason=header.pending))
        params.append(pytest.param(path, id=path.stem, marks=marks))
    return params


@pytest.mark.subprocess
@pytest.mark.parametrize("path", _params())
def test_same_observable_result(path: Path, tmp_path: Path) -> None:
    """The program prints, saves and exits the same through both SDKs (but as written)."""
    source = path.read_text()
    header = _header(source)
    official = _run(source, header, tmp_path / "official")
    assert official.returncode == 0, f"the official run failed:\n{official.stderr}"
    ours = _run(rewrite_imports(source), header, tmp_path / "ours")
    assert ours.returncode == 0, f"the friendli_image run failed:\n{ours.stderr}"
    assert ours.files == official.files
    assert _without(ours.lines, header.ours_prints, "friendli_image") == _without(
        official.lines, header.official_prints, "official"
    )


def test_enough_programs() -> None:
    """The suite keeps at least 25 programs, and the rewrite touches only import lines."""
    assert len(PROGRAMS) >= 25
    for path in PROGRAMS:
        source = path.read_text()
        assert rewrite_imports(source) != source, f"{path.name} imports nothing from friendli"
