"""Telemetry: OpenTelemetry spans and metrics for every call and attempt, and plain hooks.

The request path reports five facts and nothing else: a call starts (`Instrumentation.start`
returns its `CallObserver`, or None when nobody listens), an attempt starts, an attempt
fails, a retry is decided (with its reason and delay), and the call ends. From those this
module builds

* spans, with ``opentelemetry-api`` only (the ``otel`` extra): one ``CLIENT`` span per
  call under the GenAI conventions, one child span per attempt under the HTTP client
  conventions, and the W3C ``traceparent`` of the attempt span in the attempt's headers;
* metrics by the same conventions (`METRICS`);
* the `Hooks` callbacks, for people without OpenTelemetry.

Without the extra nothing of OpenTelemetry is imported; with the API but no SDK (no
provider set), a call costs a clock read (the providers are looked for once a second).
The token is never recorded: URLs are recorded without user info, the headers are only
written to (the ``traceparent``), and the errors handed to spans and hooks are the
transport's, already cleaned of the credentials. The prompt is recorded only when asked
(`Telemetry.record_prompt`).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

import attrs
from yarl import URL

from ._batch_models import BatchProgress, EndpointStats
from ._exceptions import (
    FriendliAPIError,
    FriendliAPIStatusError,
    FriendliConnectionError,
    FriendliResponseError,
    FriendliTimeoutError,
    FriendliValidationError,
)
from ._requests import EditRequest, RequestModel
from ._results import ImageResult
from ._version import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import (
        CallbackOptions,
        Counter,
        Histogram,
        Meter,
        MeterProvider,
        Observation,
        UpDownCounter,
    )
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = [
    "ATTRIBUTE_PREFIX",
    "METRICS",
    "ErrorEvent",
    "Hooks",
    "Instrumentation",
    "RequestEvent",
    "ResponseEvent",
    "RetryEvent",
    "Telemetry",
]

#: Our own span and metric attributes all start with this.
ATTRIBUTE_PREFIX: Final = "friendli_image."
#: The GenAI conventions' opt-in for recording prompts (read when ``record_prompt`` is None).
ENV_CAPTURE_CONTENT: Final = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
#: Seconds between two looks for a provider while none is set.
_LOOK_AGAIN: Final = 1.0
#: The instrumentation scope of our tracer and meter.
SCOPE: Final = "friendli_image"

_OPERATION: Final = "generate_content"  # the GenAI conventions' multimodal generation
_PROVIDER: Final = "friendli"

#: Every metric, by name: (instrument kind, unit, description).
METRICS: Final[dict[str, tuple[str, str, str]]] = {
    "gen_ai.client.operation.duration": (
        "histogram",
        "s",
        "Duration of each call, all its attempts and retry waits included",
    ),
    "http.client.request.duration": ("histogram", "s", "Duration of each HTTP attempt"),
    "http.client.active_requests": ("up_down_counter", "{request}", "HTTP attempts in flight"),
    "friendli_image.client.requests": (
        "counter",
        "{request}",
        "HTTP attempts by outcome (ok or the failure's reason) and endpoint",
    ),
    "friendli_image.client.retries": ("counter", "{retry}", "Retries decided, by reason"),
    "friendli_image.client.received": (
        "counter",
        "By",
        "Image bytes received (decoded), by endpoint",
    ),
    "friendli_image.fleet.ejections": (
        "observable_counter",
        "{ejection}",
        "Times each endpoint of a fleet was ejected",
    ),
    "friendli_image.batch.items": (
        "counter",
        "{item}",
        "Batch items finished, by status (ok, failed, skipped, resumed)",
    ),
    "friendli_image.batch.rate": (
        "observable_gauge",
        "{item}/s",
        "Items per second of the running batches (sent and finished in this run)",
    ),
}

logger = logging.getLogger("friendli_image")


# -- hooks ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class CallEvent:
    """What every hook event tells: which call, which attempt, where it went."""

    operation: str
    """``"generate"`` or ``"edit"``."""
    request_id: str
    """The call's ``X-Request-ID`` (the same on every attempt)."""
    attempt: int
    """The attempt's number, 1 for the first."""
    url: str
    """The URL of the attempt, without user info."""
    endpoint: str
    """The base URL of the endpoint the attempt went to."""


@attrs.frozen(kw_only=True)
class RequestEvent(CallEvent):
    """An attempt is about to be sent (``Hooks.on_request``)."""

    model: str | None
    """The request's ``model`` (None: the server's default)."""


@attrs.frozen(kw_only=True)
class ResponseEvent(CallEvent):
    """An attempt returned an image and the call succeeded (``Hooks.on_response``)."""

    result: ImageResult
    """The call's result."""
    elapsed: float
    """Seconds of this attempt."""
    call_elapsed: float
    """Seconds of the whole call, retries included."""


@attrs.frozen(kw_only=True)
class RetryEvent(CallEvent):
    """An attempt failed and another is decided (``Hooks.on_retry``), before the wait."""

    error: FriendliAPIError
    """The attempt's error."""
    reason: str
    """Why it failed, as the metrics name it: ``status_503``, ``timeout_read``, ..."""
    delay: float
    """Seconds until the next attempt."""
    failover: bool
    """The next attempt goes to another endpoint of the fleet at once."""


@attrs.frozen(kw_only=True)
class ErrorEvent(CallEvent):
    """The call failed for good (``Hooks.on_error``); ``attempt`` is its last attempt."""

    error: FriendliAPIError
    """The error the call raises."""
    reason: str
    """Why the last attempt failed, as `RetryEvent.reason`."""
    call_elapsed: float
    """Seconds of the whole call, retries included."""


def _optional_callable(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not callable(value):
        raise FriendliValidationError(attribute.name, f"must be callable or None, got {value!r}")


@attrs.frozen(kw_only=True)
class Hooks:
    """Plain callbacks on a client's calls, for people without OpenTelemetry.

    Every attempt calls ``on_request`` and then exactly one of ``on_response`` (the call
    got its image), ``on_retry`` (another attempt follows) or ``on_error`` (the call
    fails). They run on the event loop, inline, so keep them quick; one that raises is
    logged (on the client's logger, at WARNING) and the call goes on as if it had not.
    The events carry no token, and no prompt.
    """

    on_request: Callable[[RequestEvent], object] | None = attrs.field(
        default=None, validator=_optional_callable
    )
    on_response: Callable[[ResponseEvent], object] | None = attrs.field(
        default=None, validator=_optional_callable
    )
    on_retry: Callable[[RetryEvent], object] | None = attrs.field(
        default=None, validator=_optional_callable
    )
    on_error: Callable[[ErrorEvent], object] | None = attrs.field(
        default=None, validator=_optional_callable
    )


@attrs.frozen(kw_only=True)
class Telemetry:
    """How a client reports to OpenTelemetry (needs ``pip install friendli-image[otel]``).

    By default a client uses the global tracer and meter providers: it reports once the
    application sets them up (looked for at most once a second) and costs next to nothing
    until then.

    Attributes:
        enabled: False: this client makes no spans and records no metrics.
        record_prompt: record the prompt on the call span (``gen_ai.input.messages``).
            None (the default) follows ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``
            (``true`` records). Images and the token are never recorded.
        tracer_provider: an OpenTelemetry ``TracerProvider`` (None: the global one).
        meter_provider: an OpenTelemetry ``MeterProvider`` (None: the global one).
    """

    enabled: bool = True
    record_prompt: bool | None = None
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    def prompt_recorded(self) -> bool:
        """Whether the prompt goes on the call span."""
        if self.record_prompt is not None:
            return self.record_prompt
        return os.environ.get(ENV_CAPTURE_CONTENT, "").strip().lower() == "true"


# -- OpenTelemetry, when installed --------------------------------------------------------


class _OTel:
    """The OpenTelemetry API modules, imported at the first call that could use them."""

    __slots__ = ("metrics", "propagate", "trace")

    def __init__(self) -> None:
        self.trace: ModuleType = importlib.import_module("opentelemetry.trace")
        self.metrics: ModuleType = importlib.import_module("opentelemetry.metrics")
        self.propagate: ModuleType | None = None  # imported with the first span

    def tracer_provider(self, given: TracerProvider | None) -> TracerProvider | None:
        """``given`` or the global provider; None while that is the API's no-op proxy."""
        provider: TracerProvider = given or self.trace.get_tracer_provider()
        if isinstance(provider, self.trace.ProxyTracerProvider | self.trace.NoOpTracerProvider):
            return None
        return provider

    def meter_provider(self, given: MeterProvider | None) -> MeterProvider | None:
        """``given`` or the global provider; None while that is the API's no-op proxy."""
        provider: MeterProvider = given or self.metrics.get_meter_provider()
        # The API's stand-in before set_meter_provider() has no public class name.
        if isinstance(provider, self.metrics.NoOpMeterProvider) or (
            type(provider).__name__ == "_ProxyMeterProvider"
        ):
            return None
        return provider

    def inject(self, headers: dict[str, str], span: Span) -> None:
        """Put the span's W3C trace context (``traceparent``) into the headers."""
        if self.propagate is None:
            self.propagate = importlib.import_module("opentelemetry.propagate")
        self.propagate.inject(headers, context=self.trace.set_span_in_context(span))


#: None: not looked for yet; False: not installed.
_otel: _OTel | bool | None = None


def _load_otel() -> _OTel | None:
    global _otel  # noqa: PLW0603  (one import attempt per process)
    if _otel is None:
        try:
            _otel = _OTel()
        except ImportError:
            _otel = False
    return _otel if isinstance(_otel, _OTel) else None


class _Instruments:
    """The instruments of one meter provider, shared by every client that reports to it."""

    def __init__(self, meter: Meter) -> None:
        def made(name: str) -> Any:
            kind, unit, description = METRICS[name]
            create = getattr(meter, f"create_{kind}")
            return create(name, unit=unit, description=description)

        self.operation: Histogram = made("gen_ai.client.operation.duration")
        self.attempt: Histogram = made("http.client.request.duration")
        self.active: UpDownCounter = made("http.client.active_requests")
        self.requests: Counter = made("friendli_image.client.requests")
        self.retries: Counter = made("friendli_image.client.retries")
        self.received: Counter = made("friendli_image.client.received")
        self.batch_items: Counter = made("friendli_image.batch.items")
        #: Live fleets' endpoint snapshots and live batches' progress, read when collected.
        self.fleets: weakref.WeakSet[Instrumentation] = weakref.WeakSet()
        self.batches: set[BatchMeter] = set()
        for name, callback in (
            ("friendli_image.fleet.ejections", self._ejections),
            ("friendli_image.batch.rate", self._rates),
        ):
            kind, unit, description = METRICS[name]
            getattr(meter, f"create_{kind}")(
                name, callbacks=[callback], unit=unit, description=description
            )
        self._observation = importlib.import_module("opentelemetry.metrics").Observation

    def _ejections(self, _options: CallbackOptions) -> Iterable[Observation]:
        counts: dict[str, int] = {}
        for instrumentation in list(self.fleets):
            for stats in instrumentation.endpoints():
                counts[stats.url] = counts.get(stats.url, 0) + stats.ejections
        return [self._observation(count, {_ENDPOINT: url}) for url, count in sorted(counts.items())]

    def _rates(self, _options: CallbackOptions) -> Iterable[Observation]:
        if not self.batches:
            return []
        rate = sum(monitor.progress().rate for monitor in list(self.batches))
        return [self._observation(rate)]


_INSTRUMENTS: dict[int, tuple[MeterProvider, _Instruments]] = {}


def _instruments_for(provider: MeterProvider) -> _Instruments:
    found = _INSTRUMENTS.get(id(provider))
    if found is None or found[0] is not provider:
        meter = provider.get_meter(SCOPE, __version__)
        found = _INSTRUMENTS[id(provider)] = (provider, _Instruments(meter))
    return found[1]


# -- attribute names ------------------------------------------------------------------------

_ENDPOINT: Final = "friendli_image.endpoint"
_OUTCOME: Final = "friendli_image.outcome"
_REASON: Final = "friendli_image.retry.reason"
_ERROR_TYPE: Final = "error.type"


def failure_reason(error: FriendliAPIError) -> str:
    """A failure as a short, low-cardinality word: ``status_503``, ``timeout_read``, ..."""
    if isinstance(error, FriendliAPIStatusError):
        return f"status_{error.status}"
    if isinstance(error, FriendliTimeoutError):
        return f"timeout_{error.kind}"
    if isinstance(error, FriendliConnectionError):
        return "stale_connection" if error.stale_connection else "connection"
    if isinstance(error, FriendliResponseError):
        return "response"
    return type(error).__name__  # pragma: no cover - every attempt error is one of those


def _error_type(error: BaseException) -> str:
    """``error.type`` of the HTTP conventions: the status code, else the error's class."""
    if isinstance(error, FriendliAPIStatusError):
        return str(error.status)
    return type(error).__name__


# -- the runtime ----------------------------------------------------------------------------


class Instrumentation:
    """One client's telemetry: its `Telemetry` options, its `Hooks`, and their state."""

    __slots__ = (
        "__weakref__",
        "_endpoints",
        "_instruments",
        "_logger",
        "_next_look",
        "_tracer",
        "_urls",
        "hooks",
        "telemetry",
    )

    def __init__(
        self,
        telemetry: Telemetry | None,
        hooks: Hooks | None,
        logger: logging.Logger,
        endpoints: Callable[[], tuple[EndpointStats, ...]] | None = None,
    ) -> None:
        if telemetry is not None and not isinstance(telemetry, Telemetry):
            raise FriendliValidationError("telemetry", "must be a friendli_image.Telemetry or None")
        if hooks is not None and not isinstance(hooks, Hooks):
            raise FriendliValidationError("hooks", "must be a friendli_image.Hooks or None")
        self.telemetry = telemetry or Telemetry()
        self.hooks = hooks
        self._logger = logger
        self._endpoints = endpoints
        self._tracer: Tracer | None = None
        self._instruments: _Instruments | None = None
        self._urls: dict[URL, str] = {}
        self._next_look = 0.0

    def endpoints(self) -> tuple[EndpointStats, ...]:
        """The client's fleet, for the ejection metric."""
        return () if self._endpoints is None else self._endpoints()

    def _signals(self) -> tuple[Tracer | None, _Instruments | None]:
        """The tracer and instruments in use, None for each signal nobody collects."""
        tracer, instruments = self._tracer, self._instruments
        if (tracer is None or instruments is None) and self._next_look != math.inf:
            now = time.monotonic()
            if now >= self._next_look:
                # Asking OpenTelemetry costs microseconds (it reads the environment), a
                # few percent of a call: while a provider is missing, ask once a second.
                self._next_look = now + _LOOK_AGAIN
                tracer, instruments = self._look()
        return tracer, instruments

    def _look(self) -> tuple[Tracer | None, _Instruments | None]:
        otel = _load_otel() if self.telemetry.enabled else None
        if otel is None:
            self._next_look = math.inf  # off for good: disabled, or not installed
            return None, None
        # A provider once set is never replaced (OpenTelemetry sets the global once), so
        # what is found is kept.
        if self._tracer is None:
            provider = otel.tracer_provider(self.telemetry.tracer_provider)
            if provider is not None:
                self._tracer = provider.get_tracer(SCOPE, __version__)
        if self._instruments is None:
            meter_provider = otel.meter_provider(self.telemetry.meter_provider)
            if meter_provider is not None:
                self._instruments = _instruments_for(meter_provider)
                if self._endpoints is not None:
                    self._instruments.fleets.add(self)
        return self._tracer, self._instruments

    def start(self, request: RequestModel, request_id: str) -> CallObserver | None:
        """Observe one call; None (nothing to do) when no span, metric or hook listens."""
        tracer, instruments = self._signals()
        if tracer is None and instruments is None and self.hooks is None:
            return None
        return CallObserver(self, request, request_id, tracer, instruments)

    def monitor_batch(self, progress: Callable[[], BatchProgress]) -> BatchMeter | None:
        """Count a batch's items and report its rate; None when no metric is collected."""
        _tracer, instruments = self._signals()
        if instruments is None:
            return None
        return BatchMeter(instruments, progress)

    def clean_url(self, url: URL) -> str:
        """The URL as recorded: without user info (made once per URL)."""
        text = self._urls.get(url)
        if text is None:
            if len(self._urls) > 256:
                self._urls.clear()
            text = self._urls[url] = str(url.with_user(None))
        return text

    def call_hook(self, hook: Callable[[Any], object] | None, event: CallEvent) -> None:
        """Run ``hook``; an exception in it is logged, never raised into the call."""
        if hook is None:
            return
        try:
            hook(event)
        except Exception:
            self._logger.warning(
                "a friendli_image hook (%s) raised; the call goes on",
                getattr(hook, "__qualname__", repr(hook)),
                exc_info=True,
            )


class BatchMeter:
    """One running batch's metrics: items by status, and its rate while it runs."""

    __slots__ = ("_instruments", "progress")

    def __init__(self, instruments: _Instruments, progress: Callable[[], BatchProgress]) -> None:
        self._instruments = instruments
        self.progress = progress
        instruments.batches.add(self)

    def item(self, status: str, count: int = 1) -> None:
        """Items finished with ``status`` (``ok``, ``failed``, ``skipped``, ``resumed``):
        one, or ``count`` of them at once (a resume's claimed group)."""
        if count:
            self._instruments.batch_items.add(count, {"friendli_image.batch.status": status})

    def close(self) -> None:
        """The batch ended: its rate is no longer reported."""
        self._instruments.batches.discard(self)


class CallObserver:
    """One call's spans, metrics and hook events, fed by the retry loop."""

    __slots__ = (
        "_attempt_attributes",
        "_attempt_end",
        "_attempt_span",
        "_attempt_started",
        "_call_attributes",
        "_call_span",
        "_endpoint",
        "_error",
        "_instrumentation",
        "_instruments",
        "_number",
        "_operation",
        "_request",
        "_request_id",
        "_started",
        "_tracer",
        "_url",
    )

    def __init__(
        self,
        instrumentation: Instrumentation,
        request: RequestModel,
        request_id: str,
        tracer: Tracer | None,
        instruments: _Instruments | None,
    ) -> None:
        self._instrumentation = instrumentation
        self._request = request
        self._request_id = request_id
        self._tracer = tracer
        self._instruments = instruments
        self._operation = "edit" if isinstance(request, EditRequest) else "generate"
        self._started = time.perf_counter()
        self._number = 0
        self._url = ""
        self._endpoint = ""
        self._attempt_span: Span | None = None
        self._attempt_started = 0.0
        self._attempt_end: int | None = None
        self._attempt_attributes: dict[str, Any] = {}
        self._error: FriendliAPIError | None = None
        self._call_attributes = attributes = self._request_attributes(request)
        self._call_span: Span | None = None
        if tracer is not None:
            if instrumentation.telemetry.prompt_recorded():
                attributes = {**attributes, "gen_ai.input.messages": _messages(request.prompt)}
            model = request.model
            self._call_span = tracer.start_span(
                f"{_OPERATION} {model}" if model else _OPERATION,
                kind=_otel_module().trace.SpanKind.CLIENT,
                attributes={**attributes, "friendli_image.request_id": request_id},
            )

    def _request_attributes(self, request: RequestModel) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": _OPERATION,
            "gen_ai.provider.name": _PROVIDER,
            "gen_ai.output.type": "image",
            "friendli_image.operation": self._operation,
        }
        if request.model:
            attributes["gen_ai.request.model"] = request.model
        if request.seed is not None:
            attributes["gen_ai.request.seed"] = request.seed
        if request.num_inference_steps is not None:
            attributes["friendli_image.request.num_inference_steps"] = request.num_inference_steps
        if request.guidance_scale is not None:
            attributes["friendli_image.request.guidance_scale"] = request.guidance_scale
        if request.response_format is not None:
            attributes["friendli_image.request.response_format"] = request.response_format
        return attributes

    # -- attempts ----------------------------------------------------------------------

    def attempt(self, number: int, url: URL, endpoint: str, headers: dict[str, str]) -> None:
        """Attempt ``number`` goes to ``url`` now; its trace context goes into ``headers``."""
        instrumentation = self._instrumentation
        self._number = number
        self._url = instrumentation.clean_url(url)
        self._endpoint = endpoint
        self._attempt_end = None
        self._attempt_started = time.perf_counter()
        attributes: dict[str, Any] = {
            "http.request.method": "POST",
            "server.address": url.host or "",
            "server.port": url.port or 0,
        }
        self._attempt_attributes = attributes
        if self._instruments is not None:
            self._instruments.active.add(1, attributes)
        if self._tracer is not None and self._call_span is not None:
            otel = _otel_module()
            span = self._attempt_span = self._tracer.start_span(
                f"POST {url.path}",
                context=otel.trace.set_span_in_context(self._call_span),
                kind=otel.trace.SpanKind.CLIENT,
                attributes={
                    **attributes,
                    "url.full": self._url,
                    "url.template": url.path,
                    "friendli_image.attempt": number,
                    _ENDPOINT: endpoint,
                    "friendli_image.request_id": self._request_id,
                },
            )
            if number > 1:
                span.set_attribute("http.request.resend_count", number - 1)
            otel.inject(headers, span)
        hook = self._hook("on_request")
        if hook is not None:
            instrumentation.call_hook(
                hook,
                RequestEvent(model=self._request.model, **self._event_fields()),
            )

    def _hook(self, name: str) -> Callable[[Any], object] | None:
        hooks = self._instrumentation.hooks
        return None if hooks is None else getattr(hooks, name)

    def _event_fields(self) -> dict[str, Any]:
        return {
            "operation": self._operation,
            "request_id": self._request_id,
            "attempt": self._number,
            "url": self._url,
            "endpoint": self._endpoint,
        }

    def _attempt_done(self, outcome: str, status: int | None, error: BaseException | None) -> float:
        """Record the attempt's metrics; its span stays open for the retry decision."""
        elapsed = time.perf_counter() - self._attempt_started
        self._attempt_end = time.time_ns()
        instruments = self._instruments
        attributes = self._attempt_attributes
        if instruments is not None:
            instruments.active.add(-1, attributes)
            measured = dict(attributes)
            if status is not None:
                measured["http.response.status_code"] = status
            if error is not None:
                measured[_ERROR_TYPE] = _error_type(error)
            instruments.attempt.record(elapsed, measured)
            instruments.requests.add(1, {_ENDPOINT: self._endpoint, _OUTCOME: outcome})
        span = self._attempt_span
        if span is not None:
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            if error is not None:
                span.set_attribute(_ERROR_TYPE, _error_type(error))
                if isinstance(error, FriendliAPIError):
                    span.set_attribute("friendli_image.maybe_processed", error.maybe_processed)
                    span.set_status(_otel_module().trace.StatusCode.ERROR, failure_reason(error))
        return elapsed

    def _end_attempt(self) -> None:
        span, self._attempt_span = self._attempt_span, None
        if span is not None:
            span.end(end_time=self._attempt_end)

    def failed(self, error: FriendliAPIError) -> None:
        """The attempt failed with ``error`` (a retry may follow: see `retrying`)."""
        self._error = error
        status = (
            error.status
            if isinstance(error, FriendliAPIStatusError | FriendliResponseError)
            else None
        )
        self._attempt_done(failure_reason(error), status, error)

    def retrying(self, error: FriendliAPIError, delay: float, *, failover: bool = False) -> None:
        """Another attempt follows the failed one, in ``delay`` seconds."""
        reason = failure_reason(error)
        span = self._attempt_span
        if span is not None:
            span.set_attribute(_REASON, reason)
            span.set_attribute("friendli_image.retry.delay", delay)
            span.set_attribute("friendli_image.retry.failover", failover)
        self._end_attempt()
        if self._instruments is not None:
            self._instruments.retries.add(1, {_REASON: reason, _ENDPOINT: self._endpoint})
        hook = self._hook("on_retry")
        if hook is not None:
            self._instrumentation.call_hook(
                hook,
                RetryEvent(
                    error=error,
                    reason=reason,
                    delay=delay,
                    failover=failover,
                    **self._event_fields(),
                ),
            )

    # -- the end of the call -------------------------------------------------------------

    def succeeded(self, result: ImageResult) -> None:
        """The call got ``result`` from its current attempt."""
        elapsed = self._attempt_done("ok", 200, None)
        self._end_attempt()
        call_elapsed = time.perf_counter() - self._started
        instruments = self._instruments
        if instruments is not None:
            instruments.received.add(len(result.data), {_ENDPOINT: self._endpoint})
            instruments.operation.record(call_elapsed, self._operation_attributes(None))
        span = self._call_span
        if span is not None:
            span.set_attributes(
                {
                    "friendli_image.response.format": result.format,
                    "friendli_image.response.size": len(result.data),
                    "friendli_image.attempts": self._number,
                    "friendli_image.maybe_duplicated": result.maybe_duplicated,
                    _ENDPOINT: self._endpoint,
                }
            )
            if result.width is not None and result.height is not None:
                span.set_attribute("friendli_image.response.width", result.width)
                span.set_attribute("friendli_image.response.height", result.height)
            span.end()
        hook = self._hook("on_response")
        if hook is not None:
            self._instrumentation.call_hook(
                hook,
                ResponseEvent(
                    result=result,
                    elapsed=elapsed,
                    call_elapsed=call_elapsed,
                    **self._event_fields(),
                ),
            )

    def gave_up(self, error: FriendliAPIError) -> None:
        """The call raises ``error``: no retry after its last failed attempt."""
        call_elapsed = time.perf_counter() - self._started
        self._end_attempt()
        reason = failure_reason(self._error or error)
        if self._instruments is not None:
            self._instruments.operation.record(call_elapsed, self._operation_attributes(error))
        span = self._call_span
        if span is not None:
            span.set_attributes(
                {
                    _ERROR_TYPE: _error_type(error),
                    "friendli_image.attempts": self._number,
                    "friendli_image.maybe_processed": error.maybe_processed,
                    _ENDPOINT: self._endpoint,
                }
            )
            span.set_status(_otel_module().trace.StatusCode.ERROR, reason)
            span.end()
        hook = self._hook("on_error")
        if hook is not None:
            self._instrumentation.call_hook(
                hook,
                ErrorEvent(
                    error=error, reason=reason, call_elapsed=call_elapsed, **self._event_fields()
                ),
            )

    def abandoned(self, error: BaseException, *, in_attempt: bool) -> None:
        """The call ends with ``error`` that is not an attempt's failure (a cancel, a bug).

        ``in_attempt``: it interrupted an attempt on the wire. No hook is called: the
        hooks tell what the server did, and it did nothing more.
        """
        if in_attempt:
            self._attempt_done("abandoned", None, error)
        self._end_attempt()
        call_elapsed = time.perf_counter() - self._started
        if self._instruments is not None:
            self._instruments.operation.record(call_elapsed, self._operation_attributes(error))
        span = self._call_span
        if span is not None:
            span.set_attribute(_ERROR_TYPE, _error_type(error))
            span.set_status(_otel_module().trace.StatusCode.ERROR, type(error).__name__)
            span.end()

    def _operation_attributes(self, error: BaseException | None) -> dict[str, Any]:
        attributes = {
            "gen_ai.operation.name": _OPERATION,
            "gen_ai.provider.name": _PROVIDER,
            "friendli_image.operation": self._operation,
            **self._attempt_attributes,
        }
        attributes.pop("http.request.method", None)
        model = self._call_attributes.get("gen_ai.request.model")
        if model is not None:
            attributes["gen_ai.request.model"] = model
        if error is not None:
            attributes[_ERROR_TYPE] = _error_type(error)
        return attributes


def _otel_module() -> _OTel:
    """The loaded API (only called where a tracer or instruments exist, so it is loaded)."""
    otel = _load_otel()
    assert otel is not None  # noqa: S101  (a span exists only once the API is loaded)
    return otel


def _messages(prompt: str) -> str:
    """The prompt as the GenAI conventions' ``gen_ai.input.messages`` (JSON text)."""
    return json.dumps([{"role": "user", "parts": [{"type": "text", "content": prompt}]}])
