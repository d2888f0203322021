"""The option checks of ``friendli_image._config`` as tables: each bad value names its field.

Construction does no I/O, so every row is checked where the user passes it (the client's
constructor, `RetryConfig`, `Timeout`) without a server. What a refused per-call value
sends (nothing) is tests/test_client.py's.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from friendli_image import AsyncFriendli, FriendliValidationError, RetryConfig, Timeout
from friendli_image._config import check_headers, check_server_url, resolve_retries
from friendli_image._secrets import check_token

NAN, INF = math.nan, math.inf


def _refused(field: str, build: Any, **kwargs: Any) -> FriendliValidationError:
    with pytest.raises(FriendliValidationError) as caught:
        build(**kwargs)
    assert caught.value.field == field
    return caught.value


# -- RetryConfig and Timeout ------------------------------------------------------------

_BAD_RETRY = [
    ("max_attempts", 0),
    ("max_attempts", -1),
    ("max_attempts", True),
    ("max_attempts", 2.0),
    ("max_attempts", "3"),
    *[
        (field, value)
        for field in (
            "initial_delay",
            "multiplier",
            "max_delay",
            "jitter",
            "max_retry_after",
            "budget_ratio",
            "budget_floor",
            "budget_cap",
        )
        for value in (-1, -0.001, NAN, INF, -INF, True, "0.5", None)
    ],
    *[("max_elapsed", value) for value in (0, -1, NAN, INF, False, "60")],
    *[("retry_statuses", value) for value in ({99}, {600}, {True}, {"503"}, {503.0})],
]


@pytest.mark.parametrize(("field", "value"), _BAD_RETRY, ids=repr)
def test_a_bad_retry_setting_is_refused_naming_it(field: str, value: object) -> None:
    """Negative, infinite, NaN, boolean or text values of a RetryConfig field are refused."""
    error = _refused(field, RetryConfig, **{field: value})
    assert repr(value) in str(error) or field == "retry_statuses"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 1},
        {"initial_delay": 0, "jitter": 0, "max_delay": 0, "max_retry_after": 0},
        {"max_elapsed": None},
        {"max_elapsed": 0.001},
        {"retry_statuses": []},
        {"retry_statuses": range(500, 505)},
        {"budget_floor": 0, "budget_cap": 0, "budget_ratio": 0},
    ],
    ids=repr,
)
def test_edge_retry_settings_are_taken(kwargs: dict[str, Any]) -> None:
    """Zeros where zero means "none", None where it means "no limit", an empty status set."""
    config = RetryConfig(**kwargs)
    for field, value in kwargs.items():
        expected = frozenset(value) if field == "retry_statuses" else value
        assert getattr(config, field) == expected


@pytest.mark.parametrize("field", ["connect", "read", "attempt", "total"])
@pytest.mark.parametrize("value", [0, -1, NAN, INF, True, "5"], ids=repr)
def test_a_bad_timeout_is_refused_naming_it(field: str, value: object) -> None:
    """A Timeout is a positive finite number of seconds, or None for no limit."""
    _refused(field, Timeout, **{field: value})


@pytest.mark.parametrize("field", ["connect", "read", "attempt", "total"])
def test_a_timeout_may_be_none_or_tiny(field: str) -> None:
    """None turns a timer off; any positive number is a timer."""
    assert getattr(Timeout(**{field: None}), field) is None
    assert getattr(Timeout(**{field: 0.001}), field) == 0.001


# -- the client's arguments -------------------------------------------------------------

_BAD_CLIENT = [
    ("server_url", {"server_url": "ftp://host"}),
    ("server_url", {"server_url": "localhost:8000"}),
    ("server_url", {"server_url": ""}),
    ("server_url", {"server_url": "   "}),
    ("server_url", {"server_url": 8000}),
    ("max_connections", {"max_connections": 0}),
    ("max_connections", {"max_connections": True}),
    ("max_connections", {"max_connections": 1.0}),
    ("max_response_bytes", {"max_response_bytes": 0}),
    ("timeout", {"timeout": 5}),
    ("timeout_ms", {"timeout_ms": 0}),
    ("timeout_ms", {"timeout_ms": -1}),
    ("timeout_ms", {"timeout_ms": True}),
    ("timeout_ms", {"timeout_ms": "100"}),
    ("retries", {"retries": -1}),
    ("retries", {"retries": True}),
    ("retries", {"retries": 1.5}),
    ("retries", {"retries": "3"}),
    ("trust_env", {"trust_env": "yes"}),
    ("verify", {"verify": 42}),
    ("verify", {"verify": "/nonexistent/ca-bundle.pem"}),
    ("token", {"token": "sk-abc\n"}),
    ("token", {"token": b"sk-abc"}),
    ("http_headers", {"http_headers": {"Content-Length": "1"}}),
]


@pytest.mark.parametrize(("field", "kwargs"), _BAD_CLIENT, ids=lambda v: repr(v)[:40])
def test_a_bad_client_argument_is_refused_at_construction(
    field: str, kwargs: dict[str, Any]
) -> None:
    """Every constructor argument is checked when the client is built, naming the field."""
    _refused(field, AsyncFriendli, **kwargs)


@pytest.mark.parametrize(
    ("retries", "attempts"), [(0, 1), (3, 4), (None, 5), (RetryConfig(max_attempts=2), 2)]
)
def test_retries_is_a_number_of_retries_or_a_policy(retries: Any, attempts: int) -> None:
    """retries=N means N retries on top of the first attempt; a RetryConfig is taken as is."""
    assert resolve_retries(retries, RetryConfig()).max_attempts == attempts


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("http://h", "http://h"),
        ("https://h:8443/", "https://h:8443"),
        (" http://h/base/ ", "http://h/base"),
        ("HTTP://H", "HTTP://H"),
        ("http://[::1]:8000", "http://[::1]:8000"),
    ],
)
def test_a_server_url_is_taken_without_its_trailing_slash(url: str, kept: str) -> None:
    """An http(s) URL is kept as given, minus surrounding space and trailing slashes."""
    assert check_server_url(url) == kept


@pytest.mark.parametrize(
    "url", ["http://user:hunter2@h", "https://:hunter2@h:1/v1", "http://hunter2@h/?q=@"]
)
def test_credentials_in_a_server_url_are_refused_without_echoing_them(url: str) -> None:
    """user:password@ is refused, and the message does not repeat the password."""
    error = _refused("server_url", check_server_url, value=url)
    assert "hunter2" not in str(error)
    assert "token=" in str(error)


# -- tokens and headers -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\r\nX-Injected: 1", "\x00", "\x7f", "\x1b"])
def test_a_token_with_a_control_character_is_refused_unshown(suffix: str) -> None:
    """A token that cannot go into a header is refused; the message says strip(), not it."""
    error = _refused("token", check_token, value="sk-secret-abc" + suffix)
    assert "sk-secret-abc" not in str(error)
    assert "strip()" in str(error)


@pytest.mark.parametrize("token", [None, ""])
def test_no_token_is_none(token: str | None) -> None:
    """None and the empty string both mean "send no Authorization header"."""
    assert check_token(token) is None


#: What tests/reliability/test_security.py's table (through a client, on the wire) lacks.
_BAD_HEADERS = [
    ({"X-Id\n": "x"}, "not a valid HTTP header name"),
    ({"X-Id": "a\rb"}, "line break"),
    ({"X-Id": "a\x7fb"}, "control character"),
    ({"X-Id": 1}, "mapping of str to str"),
    ([("X-Id", "1")], "mapping of str to str"),
]


@pytest.mark.parametrize(("headers", "words"), _BAD_HEADERS, ids=lambda v: repr(v)[:32])
def test_a_header_that_cannot_be_sent_safely_is_refused(headers: Any, words: str) -> None:
    """Malformed names and values, duplicates and the client's own headers are refused."""
    error = _refused("http_headers", check_headers, value=headers)
    assert words in str(error)


def test_safe_headers_are_kept_and_authorization_is_normalised() -> None:
    """Visible ASCII, spaces and tabs pass; an Authorization of any case is kept under
    that exact name (it replaces the bearer token)."""
    checked = check_headers({"X-Id": "a b\tc", "authorization": "Basic abc", "x-B": "!~"})
    assert checked == {"X-Id": "a b\tc", "Authorization": "Basic abc", "x-B": "!~"}
    assert check_headers(None) == {}
