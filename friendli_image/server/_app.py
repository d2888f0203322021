"""The aiohttp.web application: routes, validation, fault actions, simulated GPU work."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import hmac
import ipaddress
import logging
import socket
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import aiohttp
import attrs
import orjson
import pybase64
import yarl
from aiohttp import web
from aiohttp.abc import AbstractResolver
from PIL import Image

from . import _render
from ._config import Action, Credential, ServerConfig, credential
from ._guard import ConnectionGuard
from ._state import RequestRecord, ServerState, action_label
from ._validation import (
    ErrorDetail,
    ImageRef,
    Operation,
    ParsedRequest,
    RequestTooComplexError,
    RequestValidationError,
    parse_json,
    validate_request,
)

if TYPE_CHECKING:
    from aiohttp.abc import ResolveResult

logger = logging.getLogger("friendli_image.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@attrs.define(kw_only=True)
class _Runtime:
    """Per-application resources, created on startup and released on cleanup."""

    slots: asyncio.Semaphore
    executor: ThreadPoolExecutor
    static_body: bytes | None
    token: Credential | None
    session: aiohttp.ClientSession | None = None


@attrs.define(kw_only=True)
class _Current:
    request_id: str
    record: RequestRecord


STATE_KEY = web.AppKey("friendli_image_server_state", ServerState)
_RUNTIME_KEY = web.AppKey("friendli_image_server_runtime", _Runtime)
GUARD_KEY = web.AppKey("friendli_image_server_guard", ConnectionGuard)
# Each request runs in its own task with a copied context, so this is per request.
_current: contextvars.ContextVar[_Current] = contextvars.ContextVar("friendli_image_request")

# Bodies above this are parsed in a worker thread: the loop may be shared with a client
# under test (async LocalServer), whose latency measurements must not include our work.
_PARSE_OFF_LOOP_BYTES = 256 * 1024
_MALFORMED_BODY = b'{"image": "<html>this is not JSON'
_MAX_REQUEST_ID = 200


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


def _send_and_close(
    request: web.Request, response: web.Response, connection: Any | None
) -> web.Response:
    """Write ``response`` straight to the socket and close it.

    For a client that stalls mid-body: aiohttp would otherwise keep reading (lingering) what
    is left of the body before closing.
    """
    body = bytes(response.body) if isinstance(response.body, (bytes, bytearray)) else b""
    head = [f"HTTP/1.1 {response.status} {response.reason}"]
    headers = dict(response.headers)
    headers.update({"Content-Length": str(len(body)), "Connection": "close"})
    headers["x-request-id"] = _current.get().request_id
    head.extend(f"{name}: {value}" for name, value in headers.items())
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        if connection is not None:
            connection.mark("timed_out")
        transport.close()
    _current.get().record.status = response.status
    return web.Response(status=response.status)


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
    # Echoed in the response: a client's own id is kept only while it is short, so the
    # server never sends back more than it must.
    given = request.headers.get("X-Request-ID", "")
    request_id = given if 0 < len(given) <= _MAX_REQUEST_ID else uuid.uuid4().hex
    probe = request.path == "/health"
    record = state.begin(request.path, request.method, request.headers, probe=probe)
    _current.set(_Current(request_id=request_id, record=record))
    guard = request.app.get(GUARD_KEY)
    connection = guard.connection(request.transport) if guard is not None else None
    if connection is not None:
        connection.request_started()
    try:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            message = exc.text if exc.status in (408, 413) and exc.text else exc.reason
            response = _detail(exc.status, message or "Error")
            if exc.status == 408:
                response = _send_and_close(request, response, connection)
            for name in ("Allow", "Retry-After"):
                if name in exc.headers:
                    response.headers[name] = exc.headers[name]
        except asyncio.CancelledError:
            record.disconnected = True
            raise
        except ConnectionResetError:
            # The client went away while its body was being read (a stopped batch
            # does): nobody is left to answer, and nothing went wrong here.
            record.disconnected = True
            logger.debug("client gone mid-request: %s %s", request.method, request.path)
            response = _detail(400, "the client closed the connection")
        except Exception:
            logger.exception("Unhandled error while serving %s %s", request.method, request.path)
            response = _detail(500, "Internal Server Error")
        if not response.prepared:
            response.headers["x-request-id"] = request_id
            if request.transport is not None and not request.transport.is_closing():
                record.status = response.status
        return response
    finally:
        if connection is not None:
            connection.request_finished()
        state.end(record)


async def _health(request: web.Request) -> web.Response:
    if request.app[STATE_KEY].healthy:
        return _json(200, {"status": "ok"})
    return _json(503, {"status": "unhealthy"})


async def _read_body(request: web.Request, config: ServerConfig) -> bytearray:
    """Read the body under the size cap, with a gap and a total deadline (else 408)."""
    limit = config.client_max_size
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.body_timeout_s
    body = bytearray()
    while True:
        wait = min(config.idle_timeout_s, deadline - loop.time())
        try:
            if wait <= 0:
                raise asyncio.TimeoutError  # noqa: TRY301 -- one path for both deadlines
            chunk = await asyncio.wait_for(request.content.readany(), wait)
        except asyncio.TimeoutError:
            raise web.HTTPRequestTimeout(
                text=(
                    f"request body not received within {config.body_timeout_s:g} s, or "
                    f"stalled for {config.idle_timeout_s:g} s"
                )
            ) from None
        if not chunk:
            return body
        body += chunk
        if len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))


def _decode_base64(text: str, what: str) -> bytes:
    compact = "".join(text.split())
    try:
        return pybase64.b64decode(compact, validate=True)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid base64") from exc


_REFUSED_TARGET = (
    "could not fetch image from URL: the server does not fetch from loopback, private, "
    "link-local or other non-public addresses (start it with allow_private_urls=True to "
    "allow them)"
)
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 5


def _is_public(address: str) -> bool:
    """Whether an IP address is one the server may fetch from without allow_private_urls."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _RefusedAddressError(OSError):
    """A host name resolved only to addresses the server must not fetch from."""


class _PublicOnlyResolver(AbstractResolver):
    """Drops non-public addresses from every lookup, so the checked address is the one used.

    Filtering at resolution (not before the request) leaves no window for a name that
    resolves to a public address when checked and to a private one when connecting.
    """

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        public = [entry for entry in found if _is_public(entry["host"])]
        if not public:
            raise _RefusedAddressError(f"{host} has no public address")
        return public

    async def close(self) -> None:
        await self._inner.close()


def _check_target(url: yarl.URL, config: ServerConfig) -> None:
    """Refuse a URL before connecting: not http(s), an IP literal that is not public, or
    IPv4 in a legacy form (``2130706433``, ``0x7f.1``, ``127.1``).

    Host names are checked by `_PublicOnlyResolver` as they are resolved. aiohttp
    connects to a legacy-form address without asking the resolver (3.14.5 refuses it
    itself, older releases do not), so it is refused here, whatever allow_private_urls.
    """
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("could not fetch image from URL: only http(s) URLs with a host")
    host = url.host.strip("[]")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        if _is_legacy_ipv4(host):
            raise ValueError(
                f"could not fetch image from URL: {host} is not a canonical IPv4 address; "
                "write it as four decimal numbers (a.b.c.d)"
            ) from None
        return
    if not config.allow_private_urls and not _is_public(host):
        raise ValueError(_REFUSED_TARGET)


def _is_legacy_ipv4(host: str) -> bool:
    """Whether the C library reads ``host`` as an IPv4 address (``ipaddress`` did not)."""
    try:
        socket.inet_aton(host)
    except (OSError, ValueError):
        return False
    return True


def _session(runtime: _Runtime, config: ServerConfig) -> aiohttp.ClientSession:
    if runtime.session is None:
        connector = (
            aiohttp.TCPConnector()
            if config.allow_private_urls
            else aiohttp.TCPConnector(resolver=_PublicOnlyResolver())
        )
        runtime.session = aiohttp.ClientSession(connector=connector, trust_env=False)
    return runtime.session


async def _fetch(url: str, runtime: _Runtime, config: ServerConfig) -> bytes:
    session = _session(runtime, config)
    timeout = aiohttp.ClientTimeout(total=config.fetch_timeout_s)
    try:
        target = yarl.URL(url)
    except ValueError as exc:
        raise ValueError("could not fetch image from URL: not a valid URL") from exc
    try:
        # Redirects are followed here, not by aiohttp, so that every hop is checked.
        for _hop in range(_MAX_REDIRECTS + 1):
            _check_target(target, config)
            async with session.get(target, timeout=timeout, allow_redirects=False) as resp:
                location = resp.headers.get("Location")
                if resp.status in _REDIRECTS and location:
                    try:
                        target = target.join(yarl.URL(location))
                    except ValueError:
                        raise ValueError(
                            "could not fetch image from URL: invalid redirect Location"
                        ) from None
                    continue
                if resp.status != 200:
                    raise ValueError(f"could not fetch image from URL: HTTP {resp.status}")
                too_big = "image at URL is larger than the size limit"
                if resp.content_length is not None and resp.content_length > config.fetch_max_bytes:
                    raise ValueError(too_big)
                buffer = bytearray()
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    buffer += chunk
                    if len(buffer) > config.fetch_max_bytes:
                        raise ValueError(too_big)
                return bytes(buffer)
        raise ValueError(f"could not fetch image from URL: more than {_MAX_REDIRECTS} redirects")
    except asyncio.TimeoutError as exc:
        raise ValueError(
            f"could not fetch image from URL: no answer within {config.fetch_timeout_s:g} s"
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, _RefusedAddressError):
            raise ValueError(_REFUSED_TARGET) from None  # noqa: TRY004 -- a 422, not a bug
        raise ValueError(f"could not fetch image from URL: {type(exc).__name__}") from exc
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


async def _serve(
    request: web.Request, body: bytes | bytearray, operation: Operation
) -> web.Response:
    """Validate, queue for a GPU slot, simulate the work, render: the normal response."""
    config = request.app[STATE_KEY].config
    runtime = request.app[_RUNTIME_KEY]
    try:
        if len(body) > _PARSE_OFF_LOOP_BYTES:
            loop = asyncio.get_running_loop()
            data = await loop.run_in_executor(
                runtime.executor, parse_json, body, config.max_json_items
            )
        else:
            data = parse_json(body, config.max_json_items)
        record = _current.get().record
        if record.kept:
            request.app[STATE_KEY].keep_body(record, _redact(data))
        parsed = validate_request(data, operation)
        images = (
            [] if runtime.static_body is not None else await _load_images(parsed, runtime, config)
        )
    except RequestValidationError as exc:
        return _validation_response(exc.errors)
    except RequestTooComplexError as exc:
        return _detail(413, str(exc))

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
        token = request.app[_RUNTIME_KEY].token
        if token is not None:
            auth = request.headers.get("Authorization", "").encode("utf-8", "surrogatepass")
            expected = f"Bearer {token.reveal()}".encode("utf-8", "surrogatepass")
            if not hmac.compare_digest(auth, expected):
                return _detail(
                    401, "Invalid or missing bearer token", {"WWW-Authenticate": "Bearer"}
                )
        state.keep(_current.get().record)
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
    client going away cancels its request. The header and idle timeouts and the connection
    cap of `ServerConfig` need `LocalServer` or `run_server`; an application run by another
    runner bounds only the body read. The token is read here when it comes from a file or
    an environment variable (`ServerConfig.resolve_token`).
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
        token=credential(config.resolve_token()),
    )
    app.router.add_post("/v1/images/generations", _image_route("generate"))
    app.router.add_post("/v1/images/edits", _image_route("edit"))
    app.router.add_get("/health", _health)
    app.on_cleanup.append(_on_cleanup)
    return app
