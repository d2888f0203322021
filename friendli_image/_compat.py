"""The official ``friendli`` 0.16.3 SDK's own names, and where friendli_image differs from it.

`BackoffStrategy` and `OfficialRetryConfig` (``friendli_image.utils``' ``RetryConfig``)
take the official retry settings, positional and in milliseconds, and map them onto ours.

`UNSUPPORTED` names the parts of the official surface (``friendli.models``,
``friendli.utils``, the client, its resources, the result and the errors) that this SDK
does not offer, with the reason. ``tests/official/test_surface.py`` reads the installed
official package and holds every public name to this: it exists here, or an entry covers
it (and every entry still covers something missing).

`DIFFERENCES` names what behaves otherwise on purpose. The generative differential
harness (``tests/official/test_generative.py``) runs both SDKs on the same calls and
excuses a mismatch only by one of these keys.

The porting guide (docs/guides/porting.md) shows both tables as `porting_markdown`
renders them; a test checks that it does.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from typing import Any, Final

import attrs

from ._config import RetryConfig
from ._exceptions import FriendliValidationError

__all__ = [
    "DIFFERENCES",
    "UNSUPPORTED",
    "BackoffStrategy",
    "Difference",
    "OfficialRetryConfig",
    "Unsupported",
    "official_policy",
    "porting_markdown",
]


@attrs.frozen
class Unsupported:
    """Official names this SDK does not offer (fnmatch patterns of qualified names)."""

    names: tuple[str, ...]
    """Patterns such as ``models.Security`` or ``container.chat``; ``*`` matches any run."""
    reason: str

    def covers(self, name: str) -> bool:
        """True when one of the patterns matches ``name``."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names)

    @property
    def family(self) -> bool:
        """True for an entry that names a whole namespace (``models.*``), not attributes."""
        return any(pattern.endswith(".*") for pattern in self.names)


@attrs.frozen
class Difference:
    """A behaviour that differs from the official SDK on purpose."""

    key: str
    """How tests name it (``differs: <key>``)."""
    what: str
    """What a ported program observes."""


_OTHER_APIS = (
    "the other APIs of the official SDK (chat, completions, audio, embeddings, "
    "serverless, dedicated, files, datasets, ...) and their models: this SDK is the "
    "container image API only"
)
_PYDANTIC_REST = (
    "the rest of pydantic's model API on the result (v1 methods, schema building hooks): "
    "the result is no pydantic model; `model_dump`, `model_dump_json`, `model_copy`, "
    "`model_validate(_json)`, `model_json_schema`, `dict()`/`json()`/`copy()` and use as a "
    "pydantic field are offered"
)

UNSUPPORTED: Final[tuple[Unsupported, ...]] = (
    Unsupported(("models.*",), _OTHER_APIS),
    Unsupported(
        (
            "*Friendli.serverless",
            "*Friendli.dedicated",
            "*Friendli.dataset",
            "*Friendli.cost",
            "*Friendli.usage",
            "container.audio",
            "container.chat",
            "container.completions",
            "container.messages",
            "container.responses",
            "container.text_classification",
            "container.token",
        ),
        "the namespaces of the other APIs",
    ),
    Unsupported(
        ("utils.*",),
        "Speakeasy's request plumbing in `friendli.utils` (serializers, URL, header and "
        "security helpers, retry internals, dataset helpers); `RetryConfig`, "
        "`BackoffStrategy` and `Logger` are offered",
    ),
    Unsupported(
        ("models.Security", "models.SecurityTypedDict"),
        "the hosted API's security scheme object: pass `token=` (or set `FRIENDLI_TOKEN`)",
    ),
    Unsupported(
        (
            "*.do_request",
            "*.do_request_async",
            "*.sdk_configuration",
            "*.parent_ref",
            "*Friendli.dynamic_import",
            "*Friendli.core",
            "*Friendli.config",
        ),
        "the Speakeasy client internals (the httpx request path, its configuration object "
        "and hooks): the transport is aiohttp; settings are constructor arguments",
    ),
    Unsupported(
        (
            "result.construct",
            "result.from_orm",
            "result.parse_file",
            "result.schema",
            "result.schema_json",
            "result.update_forward_refs",
            "result.validate",
            "result.model_parametrized_name",
            "result.model_post_init",
            "result.model_rebuild",
            "result.model_validate_strings",
        ),
        _PYDANTIC_REST,
    ),
    Unsupported(("VERSION",), "the official package's version: ours is `__version__`"),
)

DIFFERENCES: Final[tuple[Difference, ...]] = (
    Difference(
        "client-server-url",
        "A client-level `server_url` is honoured (the official SDK ignores it for container "
        "calls and goes to `http://localhost:8000` unless each call passes `server_url=`).",
    ),
    Difference(
        "empty-token",
        '`token=""` sends no `Authorization` header; the official SDK sends `Bearer ` and '
        "httpx refuses it.",
    ),
    Difference(
        "retry-500",
        "A 500 is not retried by default: on an inference server it usually means this very "
        'input failed (`status_codes_override=["5XX"]` retries it).',
    ),
    Difference(
        "bounded-attempts",
        "The backoff strategy stops after 5 attempts (`max_attempts`), not only after "
        "`max_elapsed_time`.",
    ),
    Difference(
        "no-blind-resend",
        "A request the server may have processed (the connection broke after it was sent) "
        "is not resent unless `retry_ambiguous=True`; failures before sending are always "
        "retried.",
    ),
    Difference(
        "stale-reconnect",
        "A reused keep-alive connection that breaks before any byte of the answer is "
        "reopened once per attempt, even with `retries=None` (the server most likely "
        "closed it while idle, or after the answer a retry follows); a result obtained so "
        "has `maybe_duplicated=True`. "
        "`RetryConfig(reconnect_reused=False)` turns it off.",
    ),
    Difference(
        "slow-attempt",
        "One attempt may take up to 300 s (`Timeout(attempt=...)`, `timeout_ms=` per call) "
        "before it is cut off.",
    ),
    Difference("repr", "`print(res)` / `repr(res)` is a one-line summary, not the base64 text."),
    Difference(
        "error-classes",
        "Errors are our classes (`type(e).__name__` is e.g. `FriendliServerError`), each one "
        "of the official classes it replaces (`SDKError`, `FriendliCoreError`, ...); their "
        "messages are ours.",
    ),
    Difference(
        "connection-error",
        "A refused connection raises `FriendliConnectionError` (the builtin "
        "`ConnectionError`, and `models.NoResponseError`), not `httpx.ConnectError`; a "
        "timeout is the builtin `TimeoutError`.",
    ),
    Difference(
        "httpx-clients",
        "`client=` / `async_client=` (httpx clients) are refused with a `FriendliUsageError`.",
    ),
    Difference(
        "wrong-types",
        "A wrong type (which the official SDK refuses with pydantic's `ValidationError`) "
        "raises `FriendliValidationError`, a `ValueError`.",
    ),
    Difference(
        "refused-before-sending",
        "A value the OpenAPI file forbids (steps outside [1, 50], a ControlNet weight "
        "outside [0, 1] or not one per control image) never reaches the wire: it raises "
        "the `SDKError` 422 the server would have answered, to the byte; the official SDK "
        "sends the request to get it.",
    ),
    Difference(
        "image-text",
        "Image text that does not decode (bad base64, a `data:` URI that is no image) is "
        "refused before sending as an `SDKError` 422 whose `msg` is ours; the official SDK "
        "sends it and the server words the 422.",
    ),
    Difference(
        "first-refusal",
        "A call with several values the server would refuse is refused before sending with "
        "the first of them in `detail`; the server lists them all.",
    ),
    Difference(
        "lenient-200",
        "A 200 with a valid image body is taken whatever its `Content-Type`; the official "
        "SDK raises `SDKError` unless it is `application/json`.",
    ),
    Difference(
        "decoded-result",
        "A 200 whose `image` is not base64 of an image is a `ResponseValidationError` "
        "(an `SDKError` too); the official model takes any text as bytes. "
        "`ContainerImageGenerateSuccess(image=...)` likewise decodes.",
    ),
    Difference(
        "truncated-error-body",
        "An error answer whose body breaks off is still an `SDKError` with its status and "
        "the part of the body that came; httpx raises its `RemoteProtocolError`.",
    ),
    Difference(
        "redirect-limit",
        "A redirect that cannot be followed (more than 20, no http(s) `Location`) is an "
        "`SDKError` with its 3xx status; httpx raises its own `TooManyRedirects`.",
    ),
    Difference(
        "null-fields",
        "An optional argument passed as `None` is left out of the body; the official SDK "
        "sends `null` for the nullable ones. The server treats a missing key and `null` "
        "alike.",
    ),
    Difference(
        "team-header",
        "`x_friendli_team=` on the client is sent as `X-Friendli-Team` (for a gateway in "
        "front of containers); the official SDK keeps it for its hosted APIs and sends "
        "nothing to a container.",
    ),
    Difference(
        "user-agent",
        '`http_headers={"User-Agent": ...}` replaces our `User-Agent`; the official SDK '
        "sends it beside its own `user-agent`, two headers a strict server refuses (400).",
    ),
    Difference(
        "debug-log",
        "`FRIENDLI_DEBUG=1` logs one line per attempt to the `friendli_image` logger on "
        "stderr, never a body or a header value; the official SDK logs whole requests.",
    ),
)


def porting_markdown() -> str:
    """The two tables as the porting guide shows them (docs/guides/porting.md, between
    its ``porting`` markers)."""
    lines = ["| not offered | why |", "|---|---|"]
    for entry in UNSUPPORTED:
        names = ", ".join(f"`{name}`" for name in entry.names)
        lines.append(f"| {names} | {entry.reason} |")
    lines += ["", "Different on purpose:", ""]
    lines += [f"- **{difference.key}**: {difference.what}" for difference in DIFFERENCES]
    return "\n".join(lines)


class BackoffStrategy:
    """The official SDK's backoff settings, in milliseconds (``friendli_image.utils``).

    Args:
        initial_interval: the first backoff, in milliseconds.
        max_interval: the longest backoff, in milliseconds.
        exponent: the growth factor of the backoff on each retry.
        max_elapsed_time: no retry sleep ends later than this many milliseconds after
            the call started.
        jitter_ms: random delay added to each backoff, in milliseconds (default 1000,
            as in the official SDK).
    """

    __slots__ = ("exponent", "initial_interval", "jitter_ms", "max_elapsed_time", "max_interval")

    def __init__(
        self,
        initial_interval: int,
        max_interval: int,
        exponent: float,
        max_elapsed_time: int,
        jitter_ms: int | None = None,
    ) -> None:
        for name, value in (
            ("initial_interval", initial_interval),
            ("max_interval", max_interval),
            ("exponent", exponent),
            ("max_elapsed_time", max_elapsed_time),
            ("jitter_ms", 0 if jitter_ms is None else jitter_ms),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise FriendliValidationError(name, f"must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise FriendliValidationError(name, f"must be finite and >= 0, got {value!r}")
        self.initial_interval = initial_interval
        self.max_interval = max_interval
        self.exponent = exponent
        self.max_elapsed_time = max_elapsed_time
        self.jitter_ms = jitter_ms

    def __repr__(self) -> str:
        return (
            f"BackoffStrategy({self.initial_interval}, {self.max_interval}, {self.exponent}, "
            f"{self.max_elapsed_time}, jitter_ms={self.jitter_ms})"
        )


_OFFICIAL_STRATEGIES = ("backoff", "none")


def _status_codes(codes: Iterable[str | int]) -> frozenset[int]:
    """Expand the official SDK's status patterns (``"503"``, ``"5XX"``) into statuses."""
    statuses: set[int] = set()
    for code in codes:
        text = str(code).strip().upper()
        if len(text) == 3 and text[0] in "12345" and text[1:] == "XX":
            first = int(text[0]) * 100
            statuses.update(range(first, first + 100))
        elif text.isdigit():
            statuses.add(int(text))
        else:
            raise FriendliValidationError(
                "status_codes_override", f"{code!r} is not a status code or a pattern like '5XX'"
            )
    return frozenset(statuses)  # RetryConfig's converter checks that each is a status


def official_policy(
    strategy: str,
    backoff: BackoffStrategy | None,
    retry_connection_errors: bool,
    status_codes_override: Iterable[str | int] | None = None,
) -> dict[str, Any]:
    """Map the official SDK's retry settings onto ``RetryConfig`` fields.

    ``"none"`` makes one attempt; ``"backoff"`` keeps our attempt cap (5), the statuses
    retried by default (not 500) unless ``status_codes_override`` names others, and
    the rule that a request the server may have processed is not resent.
    ``retry_connection_errors`` is accepted for its meaning there: failures where nothing
    reached the server are always retried, as they are safe.
    """
    if strategy not in _OFFICIAL_STRATEGIES:
        raise FriendliValidationError("strategy", f"must be 'backoff' or 'none', got {strategy!r}")
    if not isinstance(retry_connection_errors, bool):
        raise FriendliValidationError(
            "retry_connection_errors", f"must be True or False, got {retry_connection_errors!r}"
        )
    fields: dict[str, Any] = {}
    if strategy == "none":
        fields["max_attempts"] = 1
    if backoff is not None:
        if not isinstance(backoff, BackoffStrategy):
            raise FriendliValidationError(
                "backoff", f"must be a BackoffStrategy, got {type(backoff).__name__}"
            )
        fields["initial_delay"] = backoff.initial_interval / 1000
        fields["max_delay"] = backoff.max_interval / 1000
        fields["multiplier"] = float(backoff.exponent)
        fields["max_elapsed"] = backoff.max_elapsed_time / 1000 or None
        fields["jitter"] = (1000 if backoff.jitter_ms is None else backoff.jitter_ms) / 1000
    if status_codes_override:
        fields["retry_statuses"] = _status_codes(status_codes_override)
    return fields


class OfficialRetryConfig(RetryConfig):
    """The official SDK's ``RetryConfig``, positional and in milliseconds.

    ``friendli_image.utils.RetryConfig`` is this class: a `RetryConfig` built from the
    official arguments (see `official_policy` for the mapping), so ``retries=`` and
    ``retry_config=`` take it wherever they take ours. The official arguments stay
    readable as attributes. Keyword arguments of `RetryConfig` (``max_attempts=``, ...)
    are applied on top.
    """

    strategy: str
    backoff: BackoffStrategy | None
    retry_connection_errors: bool
    status_codes_override: list[str] | None

    def __init__(
        self,
        strategy: str = "backoff",
        backoff: BackoffStrategy | None = None,
        retry_connection_errors: bool = True,
        status_codes_override: list[str] | None = None,
        **policy: Any,
    ) -> None:
        fields = official_policy(strategy, backoff, retry_connection_errors, status_codes_override)
        super().__init__(**{**fields, **policy})
        object.__setattr__(self, "strategy", strategy)
        object.__setattr__(self, "backoff", backoff)
        object.__setattr__(self, "retry_connection_errors", retry_connection_errors)
        object.__setattr__(self, "status_codes_override", status_codes_override)
