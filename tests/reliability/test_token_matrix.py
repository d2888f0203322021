"""Scenario 36, second pass: every place a server can echo the token x every surface.

A hostile (or merely echoing) server or proxy gets the request, ``Authorization`` header
included, and sends it back in some part of its answer. Each source below is served by a
raw socket that echoes the header it really received; each surface is then searched for
the token in every form a server may write it (as sent, JSON-escaped with ``\\/``,
percent-encoded). The token contains ``/`` and ``+`` so that those forms differ.
Expected: 0 occurrences in every cell. The matrix goes into docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import traceback
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from friendli_image import AsyncFriendli, FriendliError, RetryConfig
from friendli_image._cli import main

from .harness import Figures, RawHandler, RawServer, gen, http_response, read_request

StartRaw = Callable[[RawHandler], Awaitable[RawServer]]

MATRIX_TOKEN = "sk-matrix/9Zq+4e7c1f0a2b8d"
FORMS = (
    MATRIX_TOKEN,
    MATRIX_TOKEN.replace("/", "\\/"),
    urllib.parse.quote(MATRIX_TOKEN, safe=""),
)


def _json(value: object) -> bytes:
    # As PHP and some gateways write JSON: every "/" escaped.
    return json.dumps(value).replace("/", "\\/").encode()


def _authorization(request: bytes) -> str:
    for line in request.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            return value.strip().decode()
    return ""


def _head(request: bytes) -> bytes:
    return request.split(b"\r\n\r\n", 1)[0]


# source -> response built from (request bytes, Authorization value as received)
SOURCES: dict[str, Callable[[bytes, str], bytes]] = {
    "200 body, not JSON": lambda req, auth: http_response(b"echo:\n" + _head(req)),
    "200 body, image field": lambda req, auth: http_response(_json({"image": auth})),
    "200 body, JSON-escaped": lambda req, auth: http_response(_json({"seen": auth})),
    "400 body": lambda req, auth: http_response(
        json.dumps({"detail": f"bad header {auth}"}).encode(), "400 Bad Request"
    ),
    "400 body, JSON-escaped": lambda req, auth: http_response(
        _json({"detail": f"bad header {auth}"}), "400 Bad Request"
    ),
    "422 details": lambda req, auth: http_response(
        json.dumps({"detail": [{"loc": ["body", "prompt"], "msg": auth, "type": "x"}]}).encode(),
        "422 Unprocessable Entity",
    ),
    "503 body (retried)": lambda req, auth: http_response(
        b"overloaded; you sent " + auth.encode(), "503 Service Unavailable", "text/plain"
    ),
    "401 reason phrase": lambda req, auth: http_response(b"", f"401 denied {auth}"),
    "503 reason phrase (retried)": lambda req, auth: http_response(b"", f"503 busy {auth}"),
    "400 headers": lambda req, auth: http_response(
        b"{}", "400 Bad Request", extra=f"X-Echo: {auth}\r\nX-{auth[7:15]}: 1\r\n"
    ),
    "302 Location": lambda req, auth: http_response(
        b"",
        "302 Found",
        extra=f"Location: http://127.0.0.1:9/cb?raw={auth[7:]}"
        f"&enc={urllib.parse.quote(auth[7:], safe='')}\r\n",
    ),
    "malformed status line": lambda req, auth: f"HTTP/1.1 2OO {auth}\r\n\r\n".encode(),
}

SURFACES = (
    "str",
    "repr",
    "args",
    "vars",
    "pickle",
    "traceback",
    "log (DEBUG)",
    "client state",
    "CLI generate",
    "CLI batch",
    "manifest",
)


def _count(text: str) -> int:
    return sum(text.count(form) for form in FORMS)


def _state(obj: object, seen: set[int] | None = None, depth: int = 0) -> Iterator[str]:
    """repr of every value held by our objects (as a debugger's variable view shows it)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    yield repr(obj)
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield repr(key)
            yield from _state(value, seen, depth + 1)
        return
    if isinstance(obj, list | tuple | set | frozenset):
        for value in obj:
            yield from _state(value, seen, depth + 1)
        return
    module = type(obj).__module__ or ""
    if not module.startswith("friendli_image") or type(obj).__name__ == "Secret":
        return  # aiohttp's own objects; a Secret is the wrapper that hides the token
    names = list(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        names += [n for n in getattr(cls, "__slots__", ()) if isinstance(n, str)]
    for name in names:
        if hasattr(obj, name):
            yield from _state(getattr(obj, name), seen, depth + 1)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(self.format(record))
        if record.exc_info and record.exc_info[1] is not None:
            self.text.append("".join(traceback.format_exception(*record.exc_info)))


def _error_surfaces(error: BaseException) -> dict[str, str]:
    return {
        "str": str(error),
        "repr": repr(error),
        "args": repr(error.args),
        "vars": repr(vars(error)),
        "pickle": repr(pickle.dumps(error)),
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
    }


async def _echo_server(raw_server: StartRaw, build: Callable[[bytes, str], bytes]) -> RawServer:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            writer.write(build(request, _authorization(request)))
            await writer.drain()

    return await raw_server(handler)


async def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = await asyncio.to_thread(main, argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.scenario(42)
@pytest.mark.slow
@pytest.mark.scenario(36)
async def test_no_echo_of_the_token_reaches_any_surface(
    raw_server: StartRaw,
    figures: Figures,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """12 echo sources x 11 surfaces: 0 occurrences of the token in any form."""
    monkeypatch.setenv("FRIENDLI_TOKEN", MATRIX_TOKEN)
    records = _Records()
    root = logging.getLogger()
    root.addHandler(records)
    matrix: dict[str, dict[str, int]] = {}
    echoed = 0
    try:
        for number, (source, build) in enumerate(SOURCES.items()):
            raw = await _echo_server(raw_server, build)
            row = matrix[source] = {}
            records.text.clear()
            policy = RetryConfig(max_attempts=2, initial_delay=0.01, jitter=0.0)
            client = AsyncFriendli(token=MATRIX_TOKEN, server_url=raw.url, retries=policy)
            try:
                with pytest.raises(FriendliError) as caught:
                    await gen(client)
                for surface, text in _error_surfaces(caught.value).items():
                    row[surface] = _count(text)
                row["log (DEBUG)"] = _count("\n".join(records.text))
                row["client state"] = _count("\n".join(_state(client)))
            finally:
                await client.close()
            base = ["--server-url", raw.url, "--retries", "0"]
            out = tmp_path / f"{number}.jpg"
            code, text = await _cli(["generate", "a cat", "-o", str(out), *base], capsys)
            assert code != 0, text
            row["CLI generate"] = _count(text)
            prompts = tmp_path / f"{number}.txt"
            prompts.write_text("a cat\na dog\n")
            out_dir = tmp_path / f"out{number}"
            argv = ["batch", str(prompts), "--out-dir", str(out_dir), "--no-progress", *base]
            code, text = await _cli(argv, capsys)
            row["CLI batch"] = _count(text)
            manifest = (out_dir / "manifest.jsonl").read_text()
            assert '"failed"' in manifest
            row["manifest"] = _count(manifest)
            echoed += raw.connections > 0
    finally:
        root.removeHandler(records)
    total = sum(sum(row.values()) for row in matrix.values())
    lines = [
        "| source | " + " | ".join(SURFACES) + " |",
        "|---" * (len(SURFACES) + 1) + "|",
    ]
    lines += [
        f"| {source} | " + " | ".join(str(row[s]) for s in SURFACES) + " |"
        for source, row in matrix.items()
    ]
    figures.set("token_matrix", "\n".join(lines))
    figures.set(
        "token_matrix.total",
        f"{len(SOURCES)} sources x {len(SURFACES)} surfaces = {len(SOURCES) * len(SURFACES)} "
        f"cells, each searched for the token as sent, JSON-escaped and percent-encoded: "
        f"{total} occurrences (target 0)",
    )
    figures.add("secret.surfaces", len(SOURCES) * len(SURFACES))
    figures.add("secret.found", total)
    assert echoed == len(SOURCES)
    leaks = {s: {k: n for k, n in row.items() if n} for s, row in matrix.items()}
    assert total == 0, {s: cells for s, cells in leaks.items() if cells}
