"""Reading and decoding a 200's body: capped reads into reused buffers, then the base64 image.

The common body (``{"image": "<base64>"}``) is decoded without a JSON parse; anything else
is parsed only when small or shallow. Large bodies are joined and decoded off the loop.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Mapping
from typing import Final

import aiohttp
import orjson
import pybase64

from friendli_image._blocking import run_blocking
from friendli_image._exceptions import FriendliResponseError, FriendliResponseTooLarge
from friendli_image._secrets import Redactor

from ._errors import body_text

__all__ = [
    "OFFLOOP_DECODE_BYTES",
    "BodyBuffers",
    "decode_image",
    "read_body",
    "settle_allocator",
]

#: Bodies above this are joined, parsed and decoded on a worker thread (the loop stays free).
OFFLOOP_DECODE_BYTES: Final = 4 * 1024 * 1024
_PREFIX: Final = re.compile(rb'\s*\{\s*"image"\s*:\s*"')
_SUFFIX: Final = re.compile(rb'"\s*\}\s*$')
#: A 200 body that is not the fast-path shape is parsed in full only when small, or
#: when it holds at most this many JSON members (``,`` and ``:``; base64 has neither):
#: an image response is one key plus the few fields a server may add, and a body of
#: millions of small keys would cost gigabytes to parse.
_MAX_JSON_MEMBERS: Final = 1024
_SMALL_BODY_BYTES: Final = 64 * 1024


#: One block this large, freed, lifts glibc's mmap threshold to it and its trim threshold
#: to twice it (see `settle_allocator`): the bodies decoded on the loop then come from the
#: heap, which keeps up to 8 MiB free for the next ones.
_SETTLE_BYTES: Final = OFFLOOP_DECODE_BYTES
_settled = False


def settle_allocator() -> None:
    """Free one 4 MiB block, once per process, so small bodies stop page-faulting.

    glibc's malloc serves blocks over its mmap threshold (128 KiB at start) with a fresh
    ``mmap`` each, and trims the heap top above twice that; both adapt upwards only when
    a larger mmap'd block is freed. Until then asyncio's 256 KiB socket read buffer is
    mapped and unmapped for every read, and the heap top holding bodies and images is
    trimmed and faulted in again: at 64 KiB images 14-40 minor page faults per request
    and up to a third of the client's CPU (23 per call on a `SyncFriendli` loop thread);
    afterwards under one at C=64 (benchmarks/ANALYSIS.md). An image over 4 MiB does the
    same by itself. Elsewhere (another allocator, or thresholds fixed by ``MALLOC_*``
    variables) this is one allocation that changes nothing. ``bytes(n)`` is calloc'd, so
    its pages are never touched.
    """
    global _settled  # noqa: PLW0603  (once per process: the allocator is the process's)
    if not _settled:
        _settled = True
        block = bytes(_SETTLE_BYTES)
        del block


class BodyBuffers:
    """Buffers for large response bodies, reused while such bodies are in flight.

    A fresh buffer of tens of MiB is page-faulted in by the kernel on first touch; with
    many large bodies in flight that costs more CPU than decoding them. A buffer is kept
    for the next body only while another large body is still being read, so an idle
    client holds none: the memory held is bounded by the peak number of large bodies in
    flight, and returned when the burst ends.
    """

    __slots__ = ("_busy", "_free")

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._busy = 0

    async def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes (a new one is zeroed on a worker thread)."""
        self._busy += 1
        fitting = [buffer for buffer in self._free if len(buffer) >= size]
        if fitting:
            buffer = min(fitting, key=len)
            self._free.remove(buffer)
            return buffer
        try:
            return await run_blocking(bytearray, size)
        except BaseException:
            self._busy -= 1
            raise

    def give(self, buffer: bytearray) -> None:
        """Hand a buffer back once its body is decoded."""
        self._busy -= 1
        if self._busy > 0:
            self._free.append(buffer)
        else:
            self._free.clear()


async def read_body(
    response: aiohttp.ClientResponse, limit: int, request_id: str, buffers: BodyBuffers
) -> tuple[bytes | memoryview, bytearray | None]:
    """The body, and the pooled buffer holding it (to give back once decoded) if any."""
    length = response.content_length
    if length is not None and length > limit:
        response.close()
        raise FriendliResponseTooLarge(
            f"the response is {length:,} bytes, over max_response_bytes={limit:,}",
            status=response.status,
            request_id=request_id,
        )
    compressed = "Content-Encoding" in response.headers
    if length is not None and length <= OFFLOOP_DECODE_BYTES and not compressed:
        return await response.read(), None
    if length is not None and not compressed:
        # Sized large bodies go into a reused buffer (see BodyBuffers); aiohttp's framing
        # stops the body at Content-Length, so it cannot overflow.
        buffer = await buffers.take(length)
        try:
            with memoryview(buffer) as view:
                position = 0
                async for chunk in response.content.iter_any():
                    end = position + len(chunk)
                    view[position:end] = chunk
                    position = end
            return memoryview(buffer)[:position], buffer
        except BaseException:
            buffers.give(buffer)
            raise
    # Unsized or compressed bodies: keep aiohttp's chunks and join them once. Above 1 MiB
    # bytes.join copies without holding the GIL, so on a worker thread it never stalls
    # the loop.
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            response.close()
            raise FriendliResponseTooLarge(
                f"the response exceeded max_response_bytes={limit:,} while streaming",
                status=response.status,
                request_id=request_id,
            )
        chunks.append(chunk)
    if size <= OFFLOOP_DECODE_BYTES:
        return b"".join(chunks), None
    return await run_blocking(b"".join, chunks), None


def decode_image(
    data: bytes | memoryview,
    status: int,
    request_id: str,
    redactor: Redactor,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """Parse ``{"image": "<base64>"}`` and decode it; raise FriendliResponseError if not."""
    head = _PREFIX.match(data, 0, 32)
    if head is not None:
        tail = _SUFFIX.search(data, max(head.end(), len(data) - 16))
        if tail is not None:
            # Base64 has no quote or backslash, so when the bytes between the prefix and
            # the suffix decode as strict base64, the body is exactly this JSON object:
            # decode in place, without building the JSON string first.
            with memoryview(data) as view:
                try:
                    image = pybase64.b64decode(view[head.end() : tail.start()], validate=True)
                except (binascii.Error, ValueError):
                    image = None
            if image:
                return image
    if isinstance(data, memoryview):
        data = data.tobytes()  # only a body off the fast path pays for this copy
    if len(data) > _SMALL_BODY_BYTES:
        members = data.count(b",") + data.count(b":")
        if members > _MAX_JSON_MEMBERS:
            # Refused before parsing: see _MAX_JSON_MEMBERS.
            raise FriendliResponseError(
                f"the server answered 200 with {len(data):,} bytes holding about "
                f"{members:,} JSON members; an image response is one object "
                '{"image": "<base64>"} (plus a few fields), so it was not parsed',
                status=status,
                body=body_text(data, redactor),
                headers=headers,
                request_id=request_id,
            )
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise FriendliResponseError(
            "the server answered 200 with a body that is not JSON",
            status=status,
            body=body_text(data, redactor),
            headers=headers,
            request_id=request_id,
        ) from None
    if not isinstance(parsed, dict):
        raise FriendliResponseError(
            f"expected a JSON object with an 'image' field, got a JSON {type(parsed).__name__}",
            status=status,
            body=body_text(data, redactor),
            headers=headers,
            request_id=request_id,
        )
    encoded = parsed.get("image")
    if not isinstance(encoded, str) or not encoded:
        what = "is missing" if "image" not in parsed else f"is {type(encoded).__name__}"
        raise FriendliResponseError(
            f"the response's 'image' field {what}; expected base64 text",
            status=status,
            body=body_text(data, redactor),
            headers=headers,
            request_id=request_id,
        )
    try:
        image = pybase64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise FriendliResponseError(
            "the response's 'image' field is not valid base64",
            status=status,
            body=body_text(data, redactor),
            headers=headers,
            request_id=request_id,
        ) from None
    if not image:
        raise FriendliResponseError(
            "the response's image is empty",
            status=status,
            body=body_text(data, redactor),
            headers=headers,
            request_id=request_id,
        )
    return image
