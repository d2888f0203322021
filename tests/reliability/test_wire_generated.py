"""Generated HTTP responses at the byte level, against a reference reading of each.

A raw listener answers one generate call with a response built from parts: the status
line, the headers, the body (an image in any valid JSON spelling, an error, garbage), its
content coding (none, gzip, deflate, or a broken stream), its framing (Content-Length,
chunked with extensions and trailers, delimited by the close, or lying about its length),
and how the bytes arrive (at once or in pieces; then kept open, closed, stalled or reset).

The oracle is independent of the client: the standard library's ``json``, ``base64``
and ``zlib`` read what the response carries, and HTTP/1.1's framing rules say whether it
arrived whole. A whole 200 whose body reads as an image must give exactly that image; a
whole 4xx or 5xx must raise the status error of that status; anything else must raise a
`FriendliError`. Every call ends within its attempt timeout, never with another exception.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import sys
import zlib
from collections.abc import Callable
from typing import Any, Final

import attrs
import pytest
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st

from friendli_image import (
    AsyncFriendli,
    FriendliAPIStatusError,
    FriendliError,
    FriendliTimeoutError,
    RetryConfig,
    Timeout,
)
from friendli_image.testing import no_wait

from .harness import TINY_PNG, TOKEN, read_request, reset

pytestmark = [pytest.mark.scenario(28), pytest.mark.scenario(31), pytest.mark.scenario(32)]

ATTEMPT_S: Final = 2.0  # a whole answer on loopback is never this late, even on a busy machine
ATTEMPTS: Final = 3
#: How much longer than its attempt timeout a call may take on a loaded machine.
SLACK_S: Final = 4.0
B64: Final = base64.b64encode(TINY_PNG).decode()

# -- bodies -------------------------------------------------------------------------------


@st.composite
def image_json(draw: st.DrawFn) -> bytes:
    """The image response in any spelling a JSON encoder might produce."""
    encoded = B64
    if draw(st.booleans()):
        encoded = encoded.replace("/", "\\/")  # a valid JSON escape some encoders use
    if draw(st.booleans()):
        # Any character may be written as a \\u escape.
        at = draw(st.integers(0, len(encoded) - 1))
        if encoded[at] != "\\" and (at == 0 or encoded[at - 1] != "\\"):
            encoded = encoded[:at] + f"\\u{ord(encoded[at]):04x}" + encoded[at + 1 :]
    space = draw(st.sampled_from(["", " ", "\n", "\t ", "\r\n  "]))
    members = [f'"image":{space}"{encoded}"']
    extras = draw(
        st.lists(
            st.sampled_from(['"seed":7', '"model":"flux"', '"nsfw":false', '"x":[1,{"y":null}]']),
            max_size=3,
        )
    )
    members += extras
    order = draw(st.permutations(members))
    return ("{" + space + ("," + space).join(order) + space + "}" + space).encode()


BODIES: dict[str, st.SearchStrategy[bytes]] = {
    "image": image_json(),
    "error detail": st.just(b'{"detail":"model overloaded"}'),
    "no image field": st.just(b'{"images":[]}'),
    "image not a string": st.just(b'{"image":42}'),
    "bad base64": st.just(b'{"image":"not base64!!"}'),
    "empty image": st.just(b'{"image":""}'),
    "a list": st.just(b"[1,2,3]"),
    "text": st.binary(min_size=0, max_size=64),
    "empty": st.just(b""),
}


def reference_image(body: bytes) -> bytes | None:
    """What the standard library reads as the response's image, None if no image."""
    try:
        parsed = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("image"), str):
        return None
    try:
        image = base64.b64decode(parsed["image"], validate=True)
    except ValueError:
        return None
    return image or None


# -- the response --------------------------------------------------------------------------


@attrs.frozen
class Response:
    """One generated response: the bytes to send, how, and what they mean."""

    status: int
    status_line: bytes
    received: bytes | None
    """The body the client reads once the framing and the coding are undone (None: the
    coding is broken)."""
    framing: str
    wire: bytes
    pieces: tuple[int, ...]
    ending: str
    whole_at: int | None
    """How many bytes of ``wire`` make the response whole (None: never whole)."""

    def expected(self) -> str:
        """``image``, ``status`` or ``error``; ``either``: the image (or the status error)
        or any typed error, where HTTP lets a reader go both ways (a lenient status line)
        or the outcome is a race (a reset right after the whole response)."""
        if self.whole_at is None or self.status_line_lenient is None:
            return "error"
        if self.ending in ("stall", "reset") and self.cut < self.whole_at:
            return "error"
        if self.received is None:
            # aiohttp decodes the body as it parses the head: when both arrive together,
            # a broken coding fails the whole answer and the status is lost with it.
            return "error"
        if self.status >= 400:
            outcome = "status"
        elif self.status == 200 and self.received is not None and reference_image(self.received):
            outcome = "image"
        else:
            return "error"
        return "either" if self.status_line_lenient or self.ending == "reset" else outcome

    @property
    def cut(self) -> int:
        """Bytes sent before a stall or a reset."""
        return sum(self.pieces)

    @property
    def status_line_lenient(self) -> bool | None:
        """False: a well-formed status line; True: one HTTP allows parsers to refuse or
        accept; None: not a status line."""
        line = self.status_line
        if line == f"HTTP/1.1 {self.status} X".encode():
            return False
        if line in (f"HTTP/1.1 {self.status} ".encode(), f"HTTP/1.0 {self.status} X".encode()):
            return True
        return None


STATUS_LINES: dict[str, Callable[[int], bytes]] = {
    "well-formed": lambda status: f"HTTP/1.1 {status} X".encode(),
    "empty reason": lambda status: f"HTTP/1.1 {status} ".encode(),
    "HTTP/1.0": lambda status: f"HTTP/1.0 {status} X".encode(),
    "letters for digits": lambda status: f"HTTP/1.1 {str(status).replace('0', 'O')} X".encode(),
    "no version": lambda status: f"{status} X".encode(),
    "garbage": lambda status: b"\x00\xffhello",
}


def _decoded(payload: bytes, coding: str) -> bytes | None:
    """What a reader makes of ``payload`` under the coding (None: it cannot)."""
    try:
        if coding in ("gzip", "broken"):
            return gzip.decompress(payload)
        if coding == "deflate":
            return zlib.decompress(payload)
    except (OSError, EOFError, zlib.error):
        return None
    return payload


def _coded(body: bytes, coding: str) -> tuple[bytes, str | None]:
    if coding == "gzip":
        return gzip.compress(body), "gzip"
    if coding == "deflate":
        return zlib.compress(body), "deflate"
    if coding == "broken":
        packed = gzip.compress(body)
        return packed[: max(1, len(packed) // 2)] + b"\x00garbage", "gzip"
    return body, None


@st.composite
def responses(draw: st.DrawFn) -> Response:
    status = draw(st.sampled_from([200] * 5 + [400, 401, 404, 422, 429, 500, 502, 503, 504]))
    status_kind = draw(
        st.sampled_from(["well-formed"] * 6 + [k for k in STATUS_LINES if k != "well-formed"])
    )
    status_line = STATUS_LINES[status_kind](status)
    body = draw(BODIES[draw(st.sampled_from(["image"] * 4 + sorted(BODIES)))])
    coding = draw(st.sampled_from(["none", "none", "gzip", "deflate", "broken"]))
    payload, content_coding = _coded(body, coding)
    headers = [b"Content-Type: application/json"] if draw(st.booleans()) else []
    if content_coding is not None:
        headers.append(b"Content-Encoding: " + content_coding.encode())
    headers += [
        f"X-Noise-{i}: {value}".encode()
        for i, value in enumerate(draw(st.lists(st.text("abc xyz=;,", max_size=40), max_size=3)))
    ]
    # Waits for the attempt timeout (a length that lies long, a stall) are kept rare:
    # each costs ATTEMPT_S.
    framing = draw(st.sampled_from(["length"] * 3 + ["chunked"] * 3 + ["close", "short", "long"]))
    if framing == "short" and len(payload) < 2:
        framing = "length"
    ending = draw(st.sampled_from(["keep"] * 4 + ["close", "close", "stall", "reset", "reset"]))
    if framing == "close":
        headers.append(b"Connection: close")
        ending = "close" if ending == "keep" else ending
    head_end = len(status_line) + 2 + sum(len(h) + 2 for h in headers) + 2
    if framing in ("length", "long", "short"):
        declared = len(payload) + {"length": 0, "long": 7, "short": -1}[framing]
        headers.append(f"Content-Length: {declared}".encode())
        head_end += len(headers[-1]) + 2
        framed = payload[:declared] if framing == "short" else payload
        whole = head_end + len(framed) if framing != "long" else None
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        head_end += len(headers[-1]) + 2
        sizes = draw(st.lists(st.integers(1, 64), max_size=8))
        chunks, at = [], 0
        for size in [*sizes, len(payload)]:
            piece = payload[at : at + size]
            at += len(piece)
            if piece:
                ext = b";note=1" if draw(st.booleans()) else b""
                chunks.append(f"{len(piece):x}".encode() + ext + b"\r\n" + piece + b"\r\n")
        trailer = b"X-Trailer: done\r\n" if draw(st.booleans()) else b""
        framed = b"".join(chunks) + b"0\r\n" + trailer + b"\r\n"
        whole = head_end + len(framed)
    else:  # delimited by the close
        framed = payload
        whole = head_end + len(framed) if ending == "close" else None
    wire = status_line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + framed
    if ending in ("stall", "reset"):
        cut = draw(st.integers(0, len(wire)))
        pieces = tuple(draw(st.lists(st.integers(1, 97), max_size=4)))
        pieces = _split(cut, pieces)
    else:
        pieces = _split(len(wire), tuple(draw(st.lists(st.integers(1, 97), max_size=6))))
    return Response(
        status=status,
        status_line=status_line,
        received=_decoded(framed if framing != "chunked" else payload, coding),
        framing=framing,
        wire=wire,
        pieces=pieces,
        ending=ending,
        whole_at=whole,
    )


def _split(total: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Piece sizes that add up to ``total``: the drawn ones, then the rest."""
    pieces, left = [], total
    for size in sizes:
        if left <= 0:
            break
        pieces.append(min(size, left))
        left -= pieces[-1]
    if left > 0:
        pieces.append(left)
    return tuple(pieces)


# -- one call ------------------------------------------------------------------------------


async def _serve_and_call(response: Response) -> tuple[Any, float, int]:
    """(the call's result or exception, its seconds, the requests the listener read)
    against a listener answering every request with ``response``, under the default
    retry policy's rules (three attempts; the waits skipped)."""
    stop = asyncio.Event()
    requests = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        try:
            while await read_request(reader):
                requests += 1
                at = 0
                for size in response.pieces:
                    writer.write(response.wire[at : at + size])
                    at += size
                    await writer.drain()
                    await asyncio.sleep(0)
                if response.ending == "reset":
                    reset(writer)
                    return
                if response.ending == "close":
                    writer.close()
                    return
                if response.whole_at is None or at < response.whole_at:
                    await stop.wait()  # nothing more comes: the client decides
                    return
                # A whole answer on an open connection: the next request may follow.
        except ConnectionError:
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = AsyncFriendli(
        server_url=f"http://127.0.0.1:{port}",
        token=TOKEN,
        retries=RetryConfig(max_attempts=ATTEMPTS),
        timeout=Timeout(connect=2.0, attempt=ATTEMPT_S),
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with no_wait():
            outcome: Any = await client.container.image.generate(prompt="a kite")
    except Exception as exc:  # the oracle judges every outcome
        outcome = exc
    elapsed = loop.time() - started
    stop.set()
    await client.close()
    server.close()
    await server.wait_closed()
    return outcome, elapsed, requests


# A different 80 on each Python (the seed is its version), the same 80 on each run.
# Long: most of its time is the attempt timeouts it waits out.
@pytest.mark.long
@settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@seed(sys.version_info.minor)
@given(response=responses())
def test_generated_responses_are_read_as_http_and_json_say(response: Response) -> None:
    """Read as the oracle reads the bytes; sent again only when the policy says so: a
    whole 429/502/503/504 up to the attempts, anything the server may have acted on
    (it read the request) never."""
    expected = response.expected()
    note(f"expected {expected}; wire {response.wire[:300]!r}; pieces {response.pieces}")
    outcome, elapsed, requests = asyncio.run(_serve_and_call(response))
    note(f"outcome {outcome!r} after {requests} requests")
    assert elapsed < ATTEMPT_S + SLACK_S, elapsed
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, FriendliError), repr(outcome)
        # aiohttp reports a malformed answer as its own 400: shown as the server's, it
        # would send the reader after a request that was never refused.
        assert "400, message" not in str(outcome), repr(outcome)
        assert expected in ("error", "status", "either"), repr(outcome)
        if expected == "status":
            assert isinstance(outcome, FriendliAPIStatusError), repr(outcome)
        if isinstance(outcome, FriendliAPIStatusError):
            # The head came whole (a body may break off after it: the status is the error).
            assert outcome.status == response.status
            resent = response.status in RetryConfig().retry_statuses
            assert requests == (ATTEMPTS if resent else 1)
        else:
            # The server read the request and its answer was no use: it may have made
            # the image, so it is not made again, and the error says so.
            assert requests == 1
            assert getattr(outcome, "maybe_processed", False), repr(outcome)
        waiting = response.whole_at is None or response.cut < response.whole_at
        if (
            waiting
            and response.ending in ("keep", "stall")
            and response.status_line_lenient is False
            and response.received is not None
        ):
            # A valid beginning, then nothing more on an open connection: only the clock
            # ends it.
            assert isinstance(outcome, FriendliTimeoutError), repr(outcome)
    else:
        assert expected in ("image", "either"), (expected, outcome)
        assert outcome.data == TINY_PNG
        assert requests == 1
