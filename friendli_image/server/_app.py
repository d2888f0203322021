"""The aiohttp.web application: routes, validation, fault actions, simulated GPU work."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import logging
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import attrs
import orjson
import pybase64
from aiohttp import web
from PIL import Image

from . import _render
from ._config import Action, ServerConfig
from ._state import RequestRecord, ServerState, action_label
from ._validation import (
    ErrorDetail,
    ImageRef,
    Operation,
    ParsedRequest,
    RequestValidationError,
    parse_json,
    validate_request,
)

logger = logging.getLogger("friendli_image.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@attrs.define(kw_only=True)
class _Runtime:
    """Per-application resources, created on startup and released on cleanup."""

    slots: asyncio.Semaphore
    executor: ThreadPoolExecutor
    static_body: bytes | None
    session: aiohttp.ClientSession | None = None


@attrs.define(kw_only=True)
class _Current:
    request_id: str
    record: RequestRecord


STATE_KEY = web.AppKey("friendli_image_server_state", ServerState)
_RUNTIME_KEY = web.AppKey("friendli_image_server_runtime", _Runtime)
# Each request runs in its own task with a copied context, so this is per request.
_current: contextvars.ContextVar[_Current] = contextvars.ContextVar("friendli_image_request")

# Bodies above this are parsed in a worker thread: the loop may be shared with a client
# under test (async LocalServer), whose latency measurements must not include our work.
_PARSE_OFF_LOOP_BYTES = 256 * 1024
_MALFORMED_BODY = b'{"image": "<html>this is not JSON'


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers
    )


def _detail(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json(status, {"detail": message}, headers)


def _validation_response(errors: list[ErrorDetail]) -> web.Response:
    return _json(422, {"detail": errors})


def _drop(request: web.Request) -> web.Response:
    """Close the connection; aiohttp then finds the transport closing and sends nothing."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=200)


def _redact(body: Any) -> Any:
    """Copy a request body with image strings replaced by their length, to keep records small."""
    if not isinstance(body, dict):
        return body

    def shrink(item: Any) -> Any:
        if isinstance(item, dict) and isinstance(item.get("image"), str):
            return {**item, "image": f"<{len(item['image'])} chars>"}
        return item

    redacted = dict(body)
    for key in ("image", "control_images"):
        if key in redacted:
            value = redacted[key]
            redacted[key] = [shrink(v) for v in value] if isinstance(value, list) else shrink(value)
    return redacted


@web.middleware
async def _outer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and record every request, echo its id, and turn surprises into JSON errors."""
    state = request.app[STATE_KEY]
    request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
    record = state.begin(request.path, request.method, request.headers)
    _current.set(_Current(request_id=request_id, record=record))
    try:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            message = exc.text if exc.status == 413 and exc.text else exc.reason
            response = _detail(exc.status, message or "Error")
            for name in ("Allow", "Retry-After"):
                if name in exc.headers:
                    response.headers[name] = exc.headers[name]
        except asyncio.CancelledError:
            record.disconnected = True
            raise
        except Exception:
            logger.exception("Unhandled error while serving %s %s", request.method, request.path)
            response = _detail(500, "Internal Server Error")
        if not response.prepared:
            response.headers["x-request-id"] = request_id
            if request.transport is not None and not request.transport.is_closing():
                record.status = response.status
        return response
    finally:
        state.end(record)


async def _health(_request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


async def _read_body(request: web.Request, config: ServerConfig) -> bytes:
    if request.content_length is not None and request.content_length > config.client_max_size:
        raise web.HTTPRequestEntityTooLarge(
            max_size=config.client_max_size, actual_size=request.content_length
        )
    return await request.read()


def _decode_base64(text: str, what: str) -> bytes:
    compact = "".join(text.split())
    try:
        return pybase64.b64decode(compact, validate=True)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid base64") from exc


async def _fetch(url: str, runtime: _Runtime, config: ServerConfig) -> bytes:
    if runtime.session is None:
        runtime.session = aiohttp.ClientSession(trust_env=False)
    timeout = aiohttp.ClientTimeout(total=config.fetch_timeout_s)
    try:
        async with runtime.session.get(url, timeout=timeout, max_redirects=5) as resp:
            if resp.status != 200:
                raise ValueError(f"could not fetch image from URL: HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > config.fetch_max_bytes:
                raise ValueError("image at URL is larger than the size limit")
            buffer = bytearray()
            async for chunk in resp.content.iter_chunked(256 * 1024):
                buffer += chunk
                if len(buffer) > config.fetch_max_bytes:
                    raise ValueError("image at URL is larger than the size limit")
            return bytes(buffer)
    except asyncio.TimeoutError as exc:
        raise ValueError(
            f"could not fetch image from URL: no answer within {config.fetch_timeout_s:g} s"
        ) from exc
    except aiohttp.ClientError as exc:
        raise ValueError(f"could not fetch image from URL: {type(exc).__name__}") from exc


def _inline_image(value: str, max_bytes: int) -> Image.Image:
    """Decode a ``data:`` URI or bare base64 image (in a worker thread: inputs can be 50 MiB)."""
    scheme = value.split(":", 1)[0].lower() if ":" in value[:12] else ""
    if scheme == "data":
        header, sep, payload = value.partition(",")
        if not sep:
            raise ValueError("data: URI has no ',' before its payload")
        if not header.lower().endswith(";base64"):
            data = urllib.parse.unquote_to_bytes(payload)
        elif len(payload) > max_bytes * 4 // 3 + 4:
            raise ValueError("image is larger than the size limit")
        else:
            data = _decode_base64(payload, "data: URI payload")
    elif scheme:
        raise ValueError(f"unsupported URL scheme {scheme!r}; use http(s), data: or base64")
    elif len(value) > max_bytes * 4 // 3 + 4:
        raise ValueError("image is larger than the size limit")
    else:
        data = _decode_base64(value, "image (neither a URL nor a data: URI)")
    if len(data) > max_bytes:
        raise ValueError("image is larger than the size limit")
    return _render.decode_image(data)


async def _load_image(ref: ImageRef, runtime: _Runtime, config: ServerConfig) -> Image.Image:
    value = ref.value.strip()
    loop = asyncio.get_running_loop()
    if value[:8].lower().startswith(("http://", "https://")):
        data = await _fetch(value, runtime, config)
        return await loop.run_in_executor(runtime.executor, _render.decode_image, data)
    return await loop.run_in_executor(
        runtime.executor, _inline_image, value, config.fetch_max_bytes
    )


async def _load_images(
    parsed: ParsedRequest, runtime: _Runtime, config: ServerConfig
) -> list[Image.Image]:
    results = await asyncio.gather(
        *(_load_image(ref, runtime, config) for ref in parsed.images), return_exceptions=True
    )
    errors: list[ErrorDetail] = []
    images: list[Image.Image] = []
    for ref, result in zip(parsed.images, results):  # noqa: B905 -- same length by construction
        if isinstance(result, ValueError):
            errors.append(
                {"loc": ["body", *ref.loc], "msg": f"Value error, {result}", "type": "value_error"}
            )
        elif isinstance(result, BaseException):
            raise result
        else:
            images.append(result)
    if errors:
        raise RequestValidationError(errors)
    return images


def _render_response(parsed: ParsedRequest, images: list[Image.Image], size: int) -> bytes:
    """Render, encode and wrap in the response JSON (all CPU work, run in a worker thread)."""
    if parsed.operation == "edit":
        picture = _render.edit_image(
            parsed.prompt, parsed.seed, parsed.steps, parsed.guidance, inputs=images, size=size
        )
    else:
        picture = _render.render_landscape(
            parsed.prompt, parsed.seed, parsed.steps, parsed.guidance, size
        )
        if images:
            picture = _render.apply_control(picture, images, parsed.weights)
    encoded = _render.encode_image(picture, parsed.image_format)
    return b'{"image":"' + pybase64.b64encode(encoded) + b'"}'


async def _serve(request: web.Request, body: bytes, operation: Operation) -> web.Response:
    """Validate, queue for a GPU slot, simulate the work, render: the normal response."""
    config = request.app[STATE_KEY].config
    runtime = request.app[_RUNTIME_KEY]
    try:
        if len(body) > _PARSE_OFF_LOOP_BYTES:
            loop = asyncio.get_running_loop()
            data = await loop.run_in_executor(runtime.executor, parse_json, body)
        else:
            data = parse_json(body)
        _current.get().record.body = _redact(data) if config.record_requests else None
        parsed = validate_request(data, operation)
        images = (
            [] if runtime.static_body is not None else await _load_images(parsed, runtime, config)
        )
    except RequestValidationError as exc:
        return _validation_response(exc.errors)

    headers: dict[str, str] = {}
    if config.echo_prompt_hash:
        prompt_bytes = parsed.prompt.encode("utf-8", "surrogatepass")
        headers["x-prompt-sha256"] = hashlib.sha256(prompt_bytes).hexdigest()

    async with runtime.slots:
        if config.step_latency_ms:
            await asyncio.sleep(parsed.steps * config.step_latency_ms / 1000)
        if runtime.static_body is not None:
            payload = runtime.static_body
        else:
            loop = asyncio.get_running_loop()
            payload = await loop.run_in_executor(
                runtime.executor,
                functools.partial(_render_response, parsed, images, config.image_size),
            )
    return web.Response(body=payload, content_type="application/json", headers=headers)


def _truncate(request: web.Request, response: web.Response) -> web.Response:
    """Write the status line, headers and half the body straight to the socket, then close."""
    body = bytes(response.body) if isinstance(response.body, (bytes, bytearray)) else b""
    head = [f"HTTP/1.1 {response.status} {response.reason}"]
    headers = dict(response.headers)
    headers["Content-Length"] = str(len(body))
    headers["x-request-id"] = _current.get().request_id
    head.extend(f"{name}: {value}" for name, value in headers.items())
    transport = request.transport
    if transport is not None:
        transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        transport.write(body[: len(body) // 2])
    _current.get().record.status = response.status
    return _drop(request)


async def _trickle(
    request: web.Request, response: web.Response, action: Action
) -> web.StreamResponse:
    body = bytes(response.body) if isinstance(response.body, (bytes, bytearray)) else b""
    minimum = action.chunk_size * (action.total_chunks - 1) + 1
    if len(body) < minimum:
        body += b" " * (minimum - len(body))
    stream = web.StreamResponse(status=response.status, headers=response.headers)
    stream.content_length = len(body)
    stream.headers["x-request-id"] = _current.get().request_id
    await stream.prepare(request)
    _current.get().record.status = response.status
    offset = 0
    for index in range(action.total_chunks):
        await asyncio.sleep(action.interval_s)
        last = index == action.total_chunks - 1
        end = len(body) if last else offset + action.chunk_size
        await stream.write(body[offset:end])
        offset = end
    await stream.write_eof()
    return stream


def _image_route(operation: Operation) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        config = state.config
        if config.token is not None:
            auth = request.headers.get("Authorization", "")
            if auth != f"Bearer {config.token}":
                return _detail(
                    401, "Invalid or missing bearer token", {"WWW-Authenticate": "Bearer"}
                )
        action = state.next_action(request.headers.get("x-test-id"))
        kind = "ok" if action is None else action.kind
        if action is not None:
            if kind != "ok":
                _current.get().record.action = action_label(action)
            if action.delay_s:
                await asyncio.sleep(action.delay_s)
        if kind == "drop_before_read":
            return _drop(request)
        body = await _read_body(request, config)
        if action is None or kind in ("ok", "delay"):
            return await _serve(request, body, operation)
        if kind == "drop_after_read":
            return _drop(request)
        if kind == "status":
            headers = dict(action.headers)
            headers.setdefault("Content-Type", action.content_type)
            return web.Response(status=action.status_code, body=action.body, headers=headers)
        if kind == "malformed_json":
            return web.Response(body=_MALFORMED_BODY, content_type="application/json")
        if kind == "invalid_base64":
            return _json(200, {"image": "@@@"})
        response = await _serve(request, body, operation)
        if kind == "truncate":
            return _truncate(request, response)
        return await _trickle(request, response, action)

    return handle


async def _on_cleanup(app: web.Application) -> None:
    runtime = app[_RUNTIME_KEY]
    if runtime.session is not None:
        await runtime.session.close()
    # Waiting (a render takes milliseconds) keeps finished work from calling into a closed loop.
    runtime.executor.shutdown(wait=True, cancel_futures=True)


def create_app(
    config: ServerConfig | None = None, *, state: ServerState | None = None
) -> web.Application:
    """Build the aiohttp application of the Friendli Container image API.

    Run it with `handler_cancellation=True` (as `LocalServer` and `run_server` do) so that a
    client going away cancels its request.
    """
    if state is None:
        state = ServerState(config or ServerConfig())
    elif config is not None and config is not state.config:
        raise ValueError("pass either config or state, not both")
    app = web.Application(
        client_max_size=state.config.client_max_size, middlewares=[_outer_middleware]
    )
    app[STATE_KEY] = state
    config = state.config
    static_body = None
    if config.static_image is not None:
        static_body = b'{"image":"' + pybase64.b64encode(config.static_image) + b'"}'
    # The executor starts its threads on first use, so an app that never runs costs nothing.
    app[_RUNTIME_KEY] = _Runtime(
        slots=asyncio.Semaphore(config.max_concurrency),
        executor=ThreadPoolExecutor(
            max_workers=max(2, config.max_concurrency), thread_name_prefix="friendli-image-render"
        ),
        static_body=static_body,
    )
    app.router.add_post("/v1/images/generations", _image_route("generate"))
    app.router.add_post("/v1/images/edits", _image_route("edit"))
    app.router.add_get("/health", _health)
    app.on_cleanup.append(_on_cleanup)
    return app
