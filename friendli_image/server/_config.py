"""Configuration value objects of the bundled server: settings, fault rates, scripted actions."""

from __future__ import annotations

import hmac
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import orjson

ActionKind = Literal[
    "ok",
    "status",
    "delay",
    "drop_before_read",
    "drop_after_read",
    "truncate",
    "malformed_json",
    "invalid_base64",
    "trickle",
]

_MiB = 1024 * 1024


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


def _positive_int(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an int >= 1, got {value!r}")


def _probability(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{attribute.name} must be within [0, 1], got {value!r}")


def _delay_range(
    _inst: object, attribute: attrs.Attribute[Any], value: tuple[float, float]
) -> None:
    low, high = value
    if not (0 <= low <= high and math.isfinite(high)):
        raise ValueError(
            f"{attribute.name} must be (low, high) with 0 <= low <= high, got {value!r}"
        )


def _pair(value: tuple[float, float] | list[float]) -> tuple[float, float]:
    low, high = value
    return (float(low), float(high))


class Credential:
    """A credential the server holds (its token, a recorded ``Authorization`` value).

    No repr, str or pickle shows it: ``reveal()`` is the one way to the text. Two
    credentials are equal when their texts are (compared in constant time).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a credential is a str, got {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        """The credential itself."""
        return self._value

    def __repr__(self) -> str:
        return "Credential('***')"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Credential):
            return NotImplemented
        return hmac.compare_digest(
            self._value.encode("utf-8", "surrogatepass"),
            other._value.encode("utf-8", "surrogatepass"),
        )

    def __hash__(self) -> int:
        return hash((Credential, len(self._value)))

    def __reduce__(self) -> Any:
        raise TypeError(
            "a credential is not picklable; pass token_file= or token_env= to hand a "
            "server's token to another process"
        )


def credential(value: str | Credential | None) -> Credential | None:
    """``value`` as a `Credential` (None stays None)."""
    if value is None or isinstance(value, Credential):
        return value
    return Credential(value)


@attrs.frozen(kw_only=True)
class FaultRates:
    """Random faults applied to every image request that no script handles.

    Each request first sleeps a uniform random time within ``delay_ms`` (milliseconds), then
    with probability ``p_503`` answers 503, with ``p_429`` answers 429 with
    ``Retry-After`` (whole seconds, rounded up; a fraction also as ``retry-after-ms``), with
    ``p_drop_after_read`` reads the body and closes the
    connection without a reply; otherwise it is served normally. ``seed`` makes the sequence
    reproducible.
    """

    p_503: float = attrs.field(default=0.0, validator=_probability)
    p_429: float = attrs.field(default=0.0, validator=_probability)
    retry_after_s: float = attrs.field(default=1.0, validator=_non_negative)
    p_drop_after_read: float = attrs.field(default=0.0, validator=_probability)
    delay_ms: tuple[float, float] = attrs.field(
        default=(0.0, 0.0), converter=_pair, validator=_delay_range
    )
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.p_503 + self.p_429 + self.p_drop_after_read > 1.0:
            raise ValueError("p_503 + p_429 + p_drop_after_read must not exceed 1")


def _optional_positive_int(_inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _positive_int(_inst, attribute, value)


def _timeout(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a finite number > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Settings of the bundled Friendli Container image server.

    ``token``: when set, image requests must carry ``Authorization: Bearer <token>`` (else 401).
    ``token_file`` / ``token_env``: read the token from a file (surrounding whitespace
    stripped) or an environment variable when the server starts, so it never appears in a
    process list; give at most one of ``token``, ``token_file`` and ``token_env``.
    ``image_size``: width and height of generated images. ``step_latency_ms``: simulated GPU
    time per inference step. ``max_concurrency``: GPU slots; further requests queue.
    ``client_max_size``: larger request bodies get 413. ``max_json_items``: a body with more
    JSON values (list items plus object members) gets 413 before it is parsed.
    ``fetch_timeout_s`` / ``fetch_max_bytes``: limits for image inputs given as URLs.
    ``allow_private_urls``: fetch image URLs on loopback, private, link-local and other
    non-public addresses (refused by default, so the server cannot be used to probe the
    network it runs in). ``static_image``: encoded image bytes returned for every valid
    request without rendering (benchmark mode). ``faults``: random fault rates.
    ``echo_prompt_hash``: send ``x-prompt-sha256``. ``record_requests``: keep a list of
    `RequestRecord` for the requests the server accepts (past the token check), at most
    ``max_records`` of them and ``max_record_bytes`` of headers and bodies (the oldest
    go first); a refused request leaves no record. ``token`` is held as a `Credential`.

    Connection limits (applied by `LocalServer` and `run_server`): a request line and headers
    must arrive within ``header_timeout_s`` of the connection opening or of the request's
    first byte; a connection with no request in progress is closed after ``idle_timeout_s``;
    a request body must arrive within ``body_timeout_s``, with no gap longer than
    ``idle_timeout_s`` (else 408). ``max_connections`` caps open connections (default: the
    process's file-descriptor limit minus a reserve); at the cap the oldest connection with
    no request in progress is closed to admit a new one.
    """

    token: Credential | None = attrs.field(default=None, converter=credential, repr=False)
    token_file: str | os.PathLike[str] | None = None
    token_env: str | None = None
    image_size: int = attrs.field(default=512, validator=_positive_int)
    step_latency_ms: float = attrs.field(default=0, validator=_non_negative)
    max_concurrency: int = attrs.field(default=4, validator=_positive_int)
    client_max_size: int = attrs.field(default=80 * _MiB, validator=_positive_int)
    max_json_items: int = attrs.field(default=10_000, validator=_positive_int)
    fetch_timeout_s: float = attrs.field(default=10, validator=_non_negative)
    fetch_max_bytes: int = attrs.field(default=50 * _MiB, validator=_positive_int)
    allow_private_urls: bool = False
    header_timeout_s: float = attrs.field(default=10.0, validator=_timeout)
    idle_timeout_s: float = attrs.field(default=60.0, validator=_timeout)
    body_timeout_s: float = attrs.field(default=120.0, validator=_timeout)
    max_connections: int | None = attrs.field(default=None, validator=_optional_positive_int)
    static_image: bytes | None = attrs.field(default=None, repr=False)
    faults: FaultRates | None = None
    echo_prompt_hash: bool = True
    record_requests: bool = True
    max_records: int = attrs.field(default=100_000, validator=_positive_int)
    max_record_bytes: int = attrs.field(default=16 * _MiB, validator=_positive_int)

    def __attrs_post_init__(self) -> None:
        if self.image_size > 4096:
            raise ValueError(f"image_size must be <= 4096, got {self.image_size}")
        sources = [self.token is not None, self.token_file is not None, self.token_env is not None]
        if sum(sources) > 1:
            raise ValueError("token: give at most one of token, token_file and token_env")

    def resolve_token(self) -> str | None:
        """The bearer token the server requires: ``token``, or read from its file or variable.

        Raises ``ValueError`` when the file cannot be read or is empty, or the
        variable is unset or empty (a server that silently dropped its token would be open).
        """
        if self.token_file is not None:
            path = Path(self.token_file)
            try:
                text = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(
                    "token_file: "
                    f"cannot read {str(path)!r} ({type(exc).__name__}); "
                    "give a readable UTF-8 file that holds the token",
                ) from None
            if not text:
                raise ValueError(f"token_file: {str(path)!r} is empty; write the token into it")
            return text
        if self.token_env is not None:
            value = os.environ.get(self.token_env, "").strip()
            if not value:
                raise ValueError(
                    "token_env: "
                    f"environment variable {self.token_env} is unset or empty; "
                    "export the token in it",
                )
            return value
        return None if self.token is None else self.token.reveal()


def _body_bytes(body: bytes | str | Mapping[str, Any] | None, code: int) -> bytes:
    if body is None:
        return orjson.dumps({"detail": f"Injected fault: HTTP {code}"})
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return orjson.dumps(dict(body))


@attrs.frozen(kw_only=True)
class Action:
    """One scripted server behaviour, consumed by one request (see ``LocalServer.script``).

    Build actions with the class methods: `status`, `delay`, `drop_before_read`,
    `drop_after_read`, `truncate`, `malformed_json`, `invalid_base64`, `trickle`, `ok`.
    Every action may first sleep ``delay_s`` seconds before doing what it names.
    """

    kind: ActionKind
    delay_s: float = attrs.field(default=0.0, validator=_non_negative)
    status_code: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    content_type: str = "application/json"
    chunk_size: int = 1024
    interval_s: float = 0.0
    total_chunks: int = 1

    @classmethod
    def ok(cls, *, delay: float = 0.0) -> Action:
        """Serve the request normally (after an optional delay)."""
        return cls(kind="ok", delay_s=delay)

    @classmethod
    def status(
        cls,
        code: int,
        headers: Mapping[str, str] | None = None,
        body: bytes | str | Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        *,
        delay: float = 0.0,
    ) -> Action:
        """Read the body, then answer ``code`` with ``headers`` and ``body``.

        ``body`` may be bytes, text or a JSON-able mapping; by default a JSON
        ``{"detail": "..."}``.
        """
        if not 100 <= code <= 599:
            raise ValueError(f"status code must be within [100, 599], got {code}")
        return cls(
            kind="status",
            delay_s=delay,
            status_code=code,
            headers=tuple((headers or {}).items()),
            body=_body_bytes(body, code),
            content_type=content_type,
        )

    @classmethod
    def delay(cls, seconds: float) -> Action:
        """Sleep ``seconds`` before handling the request, then answer normally."""
        return cls(kind="delay", delay_s=seconds)

    @classmethod
    def drop_before_read(cls, *, delay: float = 0.0) -> Action:
        """Close the connection without reading the body or replying."""
        return cls(kind="drop_before_read", delay_s=delay)

    @classmethod
    def drop_after_read(cls, *, delay: float = 0.0) -> Action:
        """Read the whole body, then close the connection without replying (maybe processed)."""
        return cls(kind="drop_after_read", delay_s=delay)

    @classmethod
    def truncate(cls, *, delay: float = 0.0) -> Action:
        """Send the normal response's headers with its full Content-Length, half its body, close."""
        return cls(kind="truncate", delay_s=delay)

    @classmethod
    def malformed_json(cls, *, delay: float = 0.0) -> Action:
        """Answer 200 with a body that is not JSON."""
        return cls(kind="malformed_json", delay_s=delay)

    @classmethod
    def invalid_base64(cls, *, delay: float = 0.0) -> Action:
        """Answer 200 ``{"image": "@@@"}``."""
        return cls(kind="invalid_base64", delay_s=delay)

    @classmethod
    def trickle(
        cls, chunk_size: int = 1024, interval_s: float = 0.1, total_chunks: int = 10
    ) -> Action:
        """Trickle a valid JSON response: ``total_chunks`` writes, ``interval_s`` apart.

        The first ``total_chunks - 1`` writes carry ``chunk_size`` bytes each (the body is
        padded with JSON whitespace when shorter), the last write carries the rest.
        """
        if chunk_size < 1 or total_chunks < 1:
            raise ValueError("chunk_size and total_chunks must be >= 1")
        if not (math.isfinite(interval_s) and interval_s >= 0):
            raise ValueError("interval_s must be a finite number >= 0")
        return cls(
            kind="trickle",
            chunk_size=chunk_size,
            interval_s=interval_s,
            total_chunks=total_chunks,
        )
