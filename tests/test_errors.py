"""Errors: status → class mapping, bad 200 bodies, transport failures, pickling, no token leak."""

from __future__ import annotations

import asyncio
import base64
import logging
import pickle
import socket
import traceback
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from friendli_image import (
    AsyncFriendli,
    FriendliAPIError,
    FriendliAPIStatusError,
    FriendliAuthenticationError,
    FriendliBadRequestError,
    FriendliConnectionError,
    FriendliError,
    FriendliInvalidValueError,
    FriendliNotFoundError,
    FriendliPayloadTooLargeError,
    FriendliPermissionDeniedError,
    FriendliRateLimitError,
    FriendliResponseError,
    FriendliServerError,
    FriendliTimeoutError,
    FriendliUnprocessableEntityError,
    FriendliValidationError,
    RetryConfig,
    Timeout,
)
from friendli_image.server import Action, LocalServer, ServerConfig

BASE = "https://friendli.test"
GENERATE = f"{BASE}/v1/images/generations"


@pytest.fixture
async def mocked_client() -> AsyncIterator[AsyncFriendli]:
    """A client for the aioresponses host, without retries."""
    async with AsyncFriendli(token="mock-token", server_url=BASE, retries=0) as client:
        yield client


def _sent_request_id(mock_http: Any) -> str:
    ((_key, calls),) = mock_http.requests.items()
    return str(calls[-1].kwargs["headers"]["X-Request-ID"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- status mapping ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, FriendliBadRequestError),
        (401, FriendliAuthenticationError),
        (403, FriendliPermissionDeniedError),
        (404, FriendliNotFoundError),
        (413, FriendliPayloadTooLargeError),
        (418, FriendliAPIStatusError),
        (429, FriendliRateLimitError),
        (500, FriendliServerError),
        (502, FriendliServerError),
        (503, FriendliServerError),
        (504, FriendliServerError),
    ],
)
async def test_status_maps_to_its_error_class(
    mock_http: Any, mocked_client: AsyncFriendli, status: int, cls: type[Exception]
) -> None:
    """Each HTTP status raises its class, with status, request id, headers and a body excerpt."""
    mock_http.post(
        GENERATE, status=status, payload={"detail": "the server's reason"}, headers={"X-A": "b"}
    )
    with pytest.raises(FriendliAPIStatusError) as caught:
        await mocked_client.container.image.generate(prompt="p")
    error = caught.value
    assert type(error) is cls
    assert error.status == status
    assert error.request_id == _sent_request_id(mock_http)
    assert error.headers["X-A"] == "b"
    assert "the server's reason" in error.body
    assert f"HTTP {status}" in str(error)
    assert "the server's reason" in str(error)
    assert error.attempts == 1


async def test_422_detail_is_mapped_to_field_names(
    mock_http: Any, mocked_client: AsyncFriendli
) -> None:
    """A FastAPI 422 names the refused arguments in ``fields`` (loc without 'body')."""
    detail = [
        {
            "loc": ["body", "num_inference_steps"],
            "msg": "Input should be less than or equal to 50",
            "type": "less_than_equal",
        },
        {"loc": ["body", "control_images", 1, "image"], "msg": "bad image", "type": "value_error"},
    ]
    mock_http.post(GENERATE, status=422, payload={"detail": detail})
    with pytest.raises(FriendliUnprocessableEntityError) as caught:
        await mocked_client.container.image.generate(prompt="p")
    error = caught.value
    assert error.fields == {
        "num_inference_steps": "Input should be less than or equal to 50",
        "control_images.1.image": "bad image",
    }
    assert error.details == detail
    assert "num_inference_steps" in str(error)


async def test_422_with_a_string_detail_keeps_the_message(
    mock_http: Any, mocked_client: AsyncFriendli
) -> None:
    """A 422 whose detail is plain text has no fields but shows the text."""
    mock_http.post(GENERATE, status=422, payload={"detail": "prompt is too long"})
    with pytest.raises(FriendliUnprocessableEntityError) as caught:
        await mocked_client.container.image.generate(prompt="p")
    assert caught.value.fields == {}
    assert "prompt is too long" in str(caught.value)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), (" 007 ", 7.0), ("0.5", None), ("1e1", None), ("1_0", None), ("+5", None)],
)
async def test_429_retry_after_is_parsed(
    mock_http: Any, mocked_client: AsyncFriendli, header: str, seconds: float | None
) -> None:
    """A 429's Retry-After delay-seconds (RFC 9110: digits only) is ``retry_after``."""
    mock_http.post(GENERATE, status=429, headers={"Retry-After": header}, payload={})
    with pytest.raises(FriendliRateLimitError) as caught:
        await mocked_client.container.image.generate(prompt="p")
    assert caught.value.retry_after == seconds
    assert ("Retry-After" in str(caught.value)) is (seconds is not None)


async def test_429_with_junk_retry_after_has_none(
    mock_http: Any, mocked_client: AsyncFriendli
) -> None:
    """An unparsable Retry-After gives retry_after=None, not an exception."""
    mock_http.post(GENERATE, status=429, headers={"Retry-After": "soon-ish"}, body=b"")
    with pytest.raises(FriendliRateLimitError) as caught:
        await mocked_client.container.image.generate(prompt="p")
    assert caught.value.retry_after is None


async def test_redirect_off_http_is_not_followed(
    mock_http: Any, mocked_client: AsyncFriendli
) -> None:
    """A 302 to a non-http(s) Location raises FriendliAPIStatusError carrying it."""
    mock_http.post(GENERATE, status=302, headers={"Location": "ftp://elsewhere.test/x"})
    with pytest.raises(FriendliAPIStatusError) as caught:
        await mocked_client.container.image.generate(prompt="p")
    assert type(caught.value) is FriendliAPIStatusError
    assert caught.value.status == 302
    assert caught.value.location == "ftp://elsewhere.test/x"
    assert "redirect" in str(caught.value)
    assert len(mock_http.requests) == 1


async def test_error_body_excerpt_is_short(capture_client: Any, capture_server: Any) -> None:
    """A huge error page is read up to 64 KiB into body, and the message shows 200 characters."""
    capture_server.respond(500, b"<html>" + b"x" * 1_000_000, content_type="text/html")
    with pytest.raises(FriendliServerError) as caught:
        await capture_client.container.image.generate(prompt="p")
    assert len(caught.value.body) == 64 * 1024
    assert caught.value.raw_response.text == caught.value.body
    assert len(str(caught.value)) < 400
    assert len(str(caught.value)) < 500


# -- bad 200 bodies -----------------------------------------------------------------------

_PNG_HEAD_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(24)).decode()

_BAD_BODIES = [
    pytest.param(b"<html>gateway says hi</html>", "not JSON", id="not-json"),
    pytest.param(b"", "not JSON", id="empty-body"),
    pytest.param(b"{}", "missing", id="empty-object"),
    pytest.param(b'{"image": null}', "NoneType", id="image-null"),
    pytest.param(b'{"image": 123}', "int", id="image-int"),
    pytest.param(b'{"image": ""}', "str", id="image-empty"),
    pytest.param(b'{"image": "@@@"}', "base64", id="image-not-base64"),
    pytest.param(b'{"image": "iVBORw0KGgo"}', "base64", id="image-bad-padding"),
    pytest.param(orjson.dumps([_PNG_HEAD_B64]), "JSON list", id="top-level-array"),
    pytest.param(b'"just a string"', "JSON str", id="top-level-string"),
    pytest.param(b"\xef\xbb\xbf" + orjson.dumps({"image": _PNG_HEAD_B64}), "not JSON", id="bom"),
]


@pytest.mark.parametrize(("body", "match"), _BAD_BODIES)
async def test_bad_200_body_is_a_response_error(
    mock_http: Any, mocked_client: AsyncFriendli, body: bytes, match: str
) -> None:
    """A 200 without a usable image raises FriendliResponseError, never a raw parsing error."""
    mock_http.post(GENERATE, status=200, body=body)
    with pytest.raises(FriendliError) as caught:
        await mocked_client.container.image.generate(prompt="p")
    error = caught.value
    assert type(error) is FriendliResponseError
    assert match in str(error)
    assert error.status == 200
    assert error.request_id == _sent_request_id(mock_http)
    assert len(error.body) <= 64 * 1024
    assert not isinstance(error, ValueError | KeyError | TypeError)
    assert error.__cause__ is None
    assert error.__suppress_context__ or error.__context__ is None


async def test_huge_non_json_body_gives_a_short_excerpt(
    capture_client: Any, capture_server: Any
) -> None:
    """A large non-JSON 200 body keeps its first 64 KiB, and the message a short excerpt."""
    capture_server.respond(200, b"x" * 6_000_000)
    with pytest.raises(FriendliResponseError) as caught:
        await capture_client.container.image.generate(prompt="p")
    assert caught.value.body == "x" * 64 * 1024
    assert len(str(caught.value)) < 500


async def test_jpeg_requested_but_png_returned(
    capture_client: Any, capture_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """response_format='jpeg' answered with a valid PNG returns the PNG, logged once at INFO."""
    with caplog.at_level(logging.INFO, logger="friendli_image"):
        first = await capture_client.container.image.generate(prompt="p", response_format="jpeg")
        second = await capture_client.container.image.generate(prompt="p", response_format="jpeg")
    assert first.format == second.format == "png"
    assert first.request_id == capture_server.requests[0].headers["X-Request-ID"]
    notes = [r for r in caplog.records if "response_format='jpeg'" in r.getMessage()]
    assert [r.levelno for r in notes] == [logging.INFO]


async def test_jpeg_requested_and_returned(
    capture_client: Any, capture_server: Any, tiny_jpeg: bytes
) -> None:
    """response_format='jpeg' answered with a JPEG is a result."""
    capture_server.image = tiny_jpeg
    result = await capture_client.container.image.generate(prompt="p", response_format="jpeg")
    assert result.format == "jpeg"


async def test_text_plain_json_is_parsed(
    capture_client: Any, capture_server: Any, tiny_png: bytes
) -> None:
    """A valid JSON body labelled text/plain is parsed: the content type is not trusted."""
    capture_server.respond(200, capture_server.image_body(), content_type="text/plain")
    result = await capture_client.container.image.generate(prompt="p")
    assert result.data == tiny_png


async def test_json_with_spaces_and_extra_keys_is_parsed(
    capture_client: Any, capture_server: Any, tiny_png: bytes
) -> None:
    """Pretty-printed JSON with extra keys still yields the image."""
    encoded = base64.b64encode(tiny_png).decode()
    capture_server.respond(200, f'{{\n  "seed": 3,\n  "image" : "{encoded}"\n}}\n')
    result = await capture_client.container.image.generate(prompt="p")
    assert result.data == tiny_png


async def test_body_without_content_type_is_parsed(raw_http_server: Any, tiny_png: bytes) -> None:
    """A valid JSON body sent with no Content-Type header is parsed."""
    body = b'{"image":"' + base64.b64encode(tiny_png) + b'"}'
    url = await raw_http_server(body)
    async with AsyncFriendli(server_url=url, retries=0) as client:
        result = await client.container.image.generate(prompt="p")
    assert result.data == tiny_png


async def test_non_json_without_content_type_is_a_response_error(raw_http_server: Any) -> None:
    """A non-JSON body sent with no Content-Type header is a FriendliResponseError."""
    url = await raw_http_server(b"plain words")
    async with AsyncFriendli(server_url=url, retries=0) as client:
        with pytest.raises(FriendliResponseError) as caught:
            await client.container.image.generate(prompt="p")
    assert caught.value.body == "plain words"


# -- transport failures -------------------------------------------------------------------


async def test_connection_refused_is_a_connection_error() -> None:
    """A refused connection raises FriendliConnectionError saying what to check."""
    url = f"http://127.0.0.1:{_free_port()}"
    async with AsyncFriendli(server_url=url, retries=0) as client:
        with pytest.raises(FriendliConnectionError) as caught:
            await client.container.image.generate(prompt="p")
    error = caught.value
    assert not isinstance(error, FriendliTimeoutError)
    assert error.maybe_processed is False
    assert error.request_id
    assert "server_url" in str(error)


async def test_connection_refused_is_retried(fast_retry: RetryConfig) -> None:
    """A refused connection is safe to retry: attempts counts every try."""
    url = f"http://127.0.0.1:{_free_port()}"
    async with AsyncFriendli(server_url=url, retries=fast_retry) as client:
        with pytest.raises(FriendliConnectionError) as caught:
            await client.container.image.generate(prompt="p")
    assert caught.value.attempts == 3
    assert "after 3 attempts" in str(caught.value)


async def test_attempt_timeout_is_a_timeout_error() -> None:
    """A server slower than timeout_ms raises FriendliTimeoutError (kind 'attempt')."""
    async with LocalServer(ServerConfig(static_image=b'{"image":"iVBORw0KGgo="}')) as server:
        server.script("slow", [Action.delay(2.0)])
        async with AsyncFriendli(server_url=server.url, retries=0) as client:
            with pytest.raises(FriendliTimeoutError) as caught:
                await client.container.image.generate(
                    prompt="p", timeout_ms=100, http_headers={"x-test-id": "slow"}
                )
    assert caught.value.kind == "attempt"
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.maybe_processed is True


async def test_cancellation_is_not_wrapped() -> None:
    """Cancelling a call raises CancelledError itself, not a FriendliError."""
    async with LocalServer(ServerConfig(static_image=b'{"image":"iVBORw0KGgo="}')) as server:
        server.script("slow", [Action.delay(5.0)])
        async with AsyncFriendli(server_url=server.url, retries=0) as client:
            task = asyncio.ensure_future(
                client.container.image.generate(prompt="p", http_headers={"x-test-id": "slow"})
            )
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


# -- pickling -----------------------------------------------------------------------------


async def test_status_errors_pickle_with_their_attributes(
    mock_http: Any, mocked_client: AsyncFriendli
) -> None:
    """Status errors survive pickle (e.g. from a worker process) with every attribute."""
    detail = [{"loc": ["body", "seed"], "msg": "too big", "type": "x"}]
    mock_http.post(GENERATE, status=422, payload={"detail": detail}, headers={"Retry-After": "3"})
    mock_http.post(GENERATE, status=302, headers={"Location": "ftp://x.test/"})
    errors: list[FriendliAPIStatusError] = []
    for _ in range(2):
        with pytest.raises(FriendliAPIStatusError) as caught:
            await mocked_client.container.image.generate(prompt="p")
        errors.append(caught.value)
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301  (our own data)
        assert type(copy) is type(error)
        for name in ("status", "headers", "body", "request_id", "attempts", "retry_after"):
            assert getattr(copy, name) == getattr(error, name)
        assert copy.location == error.location
        assert str(copy) == str(error)
        assert copy.args == error.args
    unprocessable = pickle.loads(pickle.dumps(errors[0]))  # noqa: S301
    assert unprocessable.fields == {"seed": "too big"}
    assert unprocessable.details == detail
    assert unprocessable.retry_after == 3.0


@pytest.mark.parametrize(
    "error",
    [
        FriendliValidationError("seed", "must be in [0, 4294967295], got -1"),
        FriendliConnectionError("refused", request_id="r1", attempts=3, maybe_processed=True),
        FriendliTimeoutError("slow", kind="read", request_id="r2", maybe_processed=True),
        FriendliResponseError("not JSON", status=200, body="<html>", request_id="r3"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_errors_pickle_with_their_attributes(error: FriendliError) -> None:
    """Every error class round-trips through pickle with its attributes and message."""
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301  (our own data)
    assert type(copy) is type(error)
    assert vars(copy) == vars(error)
    assert str(copy) == str(error)


# -- the token never leaks ----------------------------------------------------------------


def _assert_no_token(error: BaseException, token: str) -> None:
    texts = [
        str(error),
        repr(error),
        repr(error.args),
        repr(vars(error)),
        "".join(traceback.format_exception(type(error), error, error.__traceback__)),
    ]
    for text in texts:
        assert token not in text
    assert token.encode() not in pickle.dumps(error)


async def test_token_is_in_no_error(
    probe_token: str, capture_server: Any, tiny_png: bytes, fast_retry: RetryConfig
) -> None:
    """No error of a call made with a token shows it: str, repr, args, pickle or traceback."""
    capture_server.respond(401, {"detail": "bad token"})
    capture_server.respond(503, b"busy")
    capture_server.respond(503, b"busy")
    capture_server.respond(503, b"busy")
    capture_server.respond(200, b"not json")
    refused = f"http://127.0.0.1:{_free_port()}"
    errors: list[BaseException] = []
    async with AsyncFriendli(
        token=probe_token, server_url=capture_server.url, retries=fast_retry
    ) as client:
        image = client.container.image
        for call in (
            image.generate(prompt="p"),
            image.generate(prompt="p"),
            image.generate(prompt="p"),
            image.generate(prompt="p", server_url=refused, retries=0),
            image.edit(image=b"not an image", prompt="p"),
            image.generate(prompt="p", num_inference_steps=0),
        ):
            with pytest.raises(FriendliError) as caught:
                await call
            errors.append(caught.value)
        result = await image.generate(prompt="p")
    assert [type(error) for error in errors] == [
        FriendliAuthenticationError,
        FriendliServerError,
        FriendliResponseError,
        FriendliConnectionError,
        FriendliValidationError,
        FriendliInvalidValueError,
    ]
    assert capture_server.requests[0].headers["Authorization"] == f"Bearer {probe_token}"
    for error in errors:
        _assert_no_token(error, probe_token)
    assert probe_token not in repr(result)
    assert probe_token.encode() not in pickle.dumps(result)


async def test_token_is_in_no_timeout_error(probe_token: str) -> None:
    """A timeout (aiohttp's timeout carries the request) does not show the token."""
    async with LocalServer(ServerConfig(static_image=b'{"image":"iVBORw0KGgo="}')) as server:
        server.script("slow", [Action.delay(2.0)])
        async with AsyncFriendli(
            token=probe_token, server_url=server.url, retries=0, timeout=Timeout(attempt=0.1)
        ) as client:
            with pytest.raises(FriendliTimeoutError) as caught:
                await client.container.image.generate(
                    prompt="p", http_headers={"x-test-id": "slow"}
                )
    _assert_no_token(caught.value, probe_token)


def test_error_tree() -> None:
    """The error classes form the documented tree (catching a parent catches the children)."""
    assert issubclass(FriendliValidationError, ValueError)
    assert issubclass(FriendliTimeoutError, FriendliConnectionError)
    assert issubclass(FriendliConnectionError, FriendliAPIError)
    assert issubclass(FriendliServerError, FriendliAPIStatusError)
    assert issubclass(FriendliResponseError, FriendliAPIError)
    assert issubclass(FriendliAPIError, FriendliError)


async def test_token_echoed_by_the_server_is_redacted(
    probe_token: str, capture_server: Any
) -> None:
    """A server that echoes the Authorization header does not put the token into the error."""
    capture_server.respond(400, {"detail": f"bad header Bearer {probe_token}"})
    async with AsyncFriendli(token=probe_token, server_url=capture_server.url, retries=0) as client:
        with pytest.raises(FriendliBadRequestError) as caught:
            await client.container.image.generate(prompt="p")
    assert "***" in caught.value.body
    _assert_no_token(caught.value, probe_token)


# -- messages that say what to do ---------------------------------------------------------


async def test_404_under_v1_says_server_url_is_the_root() -> None:
    """server_url=".../v1" (the base_url habit) gets a 404 whose message gives the root."""
    async with (
        LocalServer(ServerConfig(image_size=16)) as local,
        AsyncFriendli(server_url=f"{local.url}/v1", retries=0) as client,
    ):
        with pytest.raises(FriendliNotFoundError) as info:
            await client.container.image.generate(prompt="p")
    message = str(info.value)
    assert "server_url is the server's root, without /v1" in message
    assert f"use {local.url} " in message


async def test_a_plain_404_has_no_v1_hint() -> None:
    """A 404 on the right root is not blamed on /v1."""
    async with (
        LocalServer(ServerConfig(image_size=16)) as local,
        AsyncFriendli(server_url=f"{local.url}/other", retries=0) as client,
    ):
        with pytest.raises(FriendliNotFoundError) as info:
            await client.container.image.generate(prompt="p")
    assert "/v1" not in info.value.message


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_401_names_the_token_and_quotes_the_server_once(
    token: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 401 says token= / FRIENDLI_TOKEN (sent or not) and quotes the server's text once."""
    monkeypatch.delenv("FRIENDLI_TOKEN", raising=False)
    async with (
        LocalServer(ServerConfig(token="right", image_size=16)) as local,
        AsyncFriendli(server_url=local.url, token=token, retries=0) as client,
    ):
        with pytest.raises(FriendliAuthenticationError) as info:
            await client.container.image.generate(prompt="p")
    message = str(info.value)
    assert "token=" in message
    assert "FRIENDLI_TOKEN" in message
    assert ("no token was sent" in message) == (token is None)
    assert message.count("Invalid or missing bearer token") == 1
    assert info.value.body  # the whole answer is still there for code that reads it


async def test_https_against_plain_http_says_the_server_may_not_speak_tls() -> None:
    """An https:// URL to the bundled (plain HTTP) server blames TLS, not a certificate."""
    async with LocalServer(ServerConfig(image_size=16)) as local:
        url = local.url.replace("http://", "https://")
        async with AsyncFriendli(server_url=url, retries=0) as client:
            with pytest.raises(FriendliConnectionError) as info:
                await client.container.image.generate(prompt="p")
    message = str(info.value)
    assert "may not speak TLS" in message
    assert "http://" in message
    assert "certificate" not in message


async def test_image_passed_to_generate_points_to_edit_and_control_images() -> None:
    """generate(image=...) is a FriendliArgumentError (a TypeError too) with the way out."""
    from friendli_image import FriendliArgumentError

    async with AsyncFriendli(server_url="http://127.0.0.1:9") as client:
        with pytest.raises(FriendliArgumentError) as info:
            await client.container.image.generate(prompt="p", image="cat.png")  # type: ignore[call-arg]
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, FriendliValidationError)
    assert "edit(image=...)" in str(info.value)
    assert "control_images" in str(info.value)


def test_image_passed_to_sync_generate_is_the_same_error() -> None:
    """The blocking facade raises the same error on the caller's thread."""
    from friendli_image import FriendliArgumentError, SyncFriendli

    with SyncFriendli(server_url="http://127.0.0.1:9") as client:
        with pytest.raises(FriendliArgumentError, match="edit"):
            client.container.image.generate(prompt="p", image="cat.png")  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="it takes"):
            client.container.image.edit(image="x.png", prompt="p", colour="red")  # type: ignore[call-arg]
