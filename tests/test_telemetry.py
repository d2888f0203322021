"""Telemetry: spans, metrics and hooks, checked with the OpenTelemetry SDK's in-memory exporters
against the bundled server (retries in the zero-wait testing mode)."""

from __future__ import annotations

import asyncio
import json
import logging
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from friendli_image import (
    AsyncFriendli,
    Endpoint,
    ErrorEvent,
    FleetConfig,
    FriendliAPIStatusError,
    FriendliValidationError,
    Hooks,
    RequestEvent,
    ResponseEvent,
    RetryConfig,
    RetryEvent,
    SyncFriendli,
    Telemetry,
)
from friendli_image.server import Action, LocalServer
from friendli_image.testing import no_wait

NO_JITTER = RetryConfig(jitter=0.0)
PATH = "/v1/images/generations"


class Exported:
    """A tracer and a meter provider that keep what they export, for one test."""

    def __init__(self) -> None:
        self.spans_exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans_exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def telemetry(self, **options: Any) -> Telemetry:
        return Telemetry(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **options
        )

    def spans(self) -> list[ReadableSpan]:
        return list(self.spans_exporter.get_finished_spans())

    def call_spans(self) -> list[ReadableSpan]:
        return [span for span in self.spans() if span.name.startswith("generate_content")]

    def attempt_spans(self) -> list[ReadableSpan]:
        return [span for span in self.spans() if span.name.startswith("POST ")]

    def metrics(self) -> dict[str, list[tuple[dict[str, Any], Any]]]:
        """Each metric's points: (attributes, value for sums and gauges / count for histograms)."""
        found: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        data = self.reader.get_metrics_data()
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found[metric.name] = [
                        (
                            dict(point.attributes or {}),
                            point.count if hasattr(point, "count") else point.value,
                        )
                        for point in metric.data.data_points
                    ]
        return found

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def exported() -> Iterator[Exported]:
    found = Exported()
    yield found
    found.shutdown()


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer() as running:
        yield running


def _points(metrics: dict[str, list[tuple[dict[str, Any], Any]]], name: str) -> dict[str, Any]:
    """A counter's values keyed by the sorted ``key=value`` of its attributes."""
    return {
        ",".join(f"{key}={value}" for key, value in sorted(attributes.items())): value
        for attributes, value in metrics.get(name, [])
    }


def _recording(events: list[Any]) -> Hooks:
    """Hooks that append every event to ``events``."""
    return Hooks(
        on_request=events.append,
        on_response=events.append,
        on_retry=events.append,
        on_error=events.append,
    )


def _test_id(request: pytest.FixtureRequest) -> str:
    return request.node.name.replace("[", "-").replace("]", "")


async def test_a_503_then_a_200_is_one_call_span_with_two_attempt_spans(
    server: LocalServer, exported: Exported, request: pytest.FixtureRequest
) -> None:
    """The span tree, its attributes, the retry's reason and delay (as the testing mode
    recorded it), and the traceparent the server received on each attempt."""
    test_id = _test_id(request)
    server.script(test_id, [Action.status(503)])
    with no_wait() as waits:
        async with AsyncFriendli(
            token="t0ken-value",
            server_url=server.url,
            retries=NO_JITTER,
            http_headers={"x-test-id": test_id},
            telemetry=exported.telemetry(),
        ) as client:
            result = await client.container.image.generate(
                prompt="a lighthouse", seed=7, num_inference_steps=4, guidance_scale=1.5
            )
    assert waits.delays == [0.5]
    (call,) = exported.call_spans()
    first, second = sorted(exported.attempt_spans(), key=lambda span: span.start_time or 0)
    assert call.kind is SpanKind.CLIENT
    assert call.parent is None
    for attempt in (first, second):
        assert attempt.kind is SpanKind.CLIENT
        assert attempt.parent is not None
        assert attempt.parent.span_id == call.context.span_id
        assert attempt.name == f"POST {PATH}"
    host, port = server.url.removeprefix("http://").split(":")
    assert call.attributes == {
        "gen_ai.operation.name": "generate_content",
        "gen_ai.provider.name": "friendli",
        "gen_ai.output.type": "image",
        "gen_ai.request.seed": 7,
        "friendli_image.operation": "generate",
        "friendli_image.request.num_inference_steps": 4,
        "friendli_image.request.guidance_scale": 1.5,
        "friendli_image.request_id": result.request_id,
        "friendli_image.response.format": result.format,
        "friendli_image.response.size": len(result.data),
        "friendli_image.response.width": result.width,
        "friendli_image.response.height": result.height,
        "friendli_image.attempts": 2,
        "friendli_image.maybe_duplicated": False,
        "friendli_image.endpoint": server.url,
    }
    common = {
        "http.request.method": "POST",
        "server.address": host,
        "server.port": int(port),
        "url.full": server.url + PATH,
        "url.template": PATH,
        "friendli_image.endpoint": server.url,
        "friendli_image.request_id": result.request_id,
    }
    assert first.attributes == {
        **common,
        "friendli_image.attempt": 1,
        "http.response.status_code": 503,
        "error.type": "503",
        "friendli_image.maybe_processed": False,
        "friendli_image.retry.reason": "status_503",
        "friendli_image.retry.delay": 0.5,
        "friendli_image.retry.failover": False,
    }
    assert first.status.status_code is StatusCode.ERROR
    assert second.attributes == {
        **common,
        "friendli_image.attempt": 2,
        "http.request.resend_count": 1,
        "http.response.status_code": 200,
    }
    assert call.status.status_code is StatusCode.UNSET
    received = [
        record.headers.get("traceparent")
        for record in server.records
        if record.headers.get("x-test-id") == test_id
    ]
    trace_id = format(call.context.trace_id, "032x")
    assert received == [
        f"00-{trace_id}-{span.context.span_id:016x}-{span.context.trace_flags:02x}"
        for span in (first, second)
    ]


async def test_metrics_count_attempts_retries_bytes_and_durations(
    server: LocalServer, exported: Exported, request: pytest.FixtureRequest
) -> None:
    """Requests by outcome and endpoint, retries by reason, image bytes, both histograms,
    and no attempt left in flight."""
    test_id = _test_id(request)
    server.script(test_id, [Action.status(503), Action.status(429), Action.ok()])
    with no_wait():
        async with AsyncFriendli(
            server_url=server.url,
            retries=NO_JITTER,
            http_headers={"x-test-id": test_id},
            telemetry=exported.telemetry(),
        ) as client:
            result = await client.container.image.generate(prompt="x", model="flux")
            await client.container.image.generate(prompt="y")
    metrics = exported.metrics()
    endpoint = f"friendli_image.endpoint={server.url}"
    assert _points(metrics, "friendli_image.client.requests") == {
        f"{endpoint},friendli_image.outcome=status_503": 1,
        f"{endpoint},friendli_image.outcome=status_429": 1,
        f"{endpoint},friendli_image.outcome=ok": 2,
    }
    assert _points(metrics, "friendli_image.client.retries") == {
        f"{endpoint},friendli_image.retry.reason=status_503": 1,
        f"{endpoint},friendli_image.retry.reason=status_429": 1,
    }
    assert sum(_points(metrics, "friendli_image.client.received").values()) >= len(result.data)
    assert list(_points(metrics, "http.client.active_requests").values()) == [0]
    attempts = {
        attributes.get("http.response.status_code"): count
        for attributes, count in metrics["http.client.request.duration"]
    }
    assert attempts == {503: 1, 429: 1, 200: 2}
    operations = {
        attributes.get("gen_ai.request.model"): count
        for attributes, count in metrics["gen_ai.client.operation.duration"]
    }
    assert operations == {"flux": 1, None: 1}


async def test_a_call_that_fails_for_good_ends_both_spans_in_error_and_calls_on_error(
    server: LocalServer, exported: Exported, request: pytest.FixtureRequest
) -> None:
    """A 400 is not retried: one attempt span, the call span in error, one ErrorEvent."""
    test_id = _test_id(request)
    server.script(test_id, [Action.status(400)])
    events: list[object] = []
    hooks = _recording(events)
    async with AsyncFriendli(
        server_url=server.url,
        http_headers={"x-test-id": test_id},
        telemetry=exported.telemetry(),
        hooks=hooks,
    ) as client:
        with pytest.raises(FriendliAPIStatusError) as raised:
            await client.container.image.generate(prompt="x")
    (call,) = exported.call_spans()
    (attempt,) = exported.attempt_spans()
    assert call.status.status_code is StatusCode.ERROR
    assert call.attributes is not None
    assert call.attributes["error.type"] == "400"
    assert attempt.attributes is not None
    assert attempt.attributes["http.response.status_code"] == 400
    assert "friendli_image.retry.reason" not in attempt.attributes
    assert [type(event) for event in events] == [RequestEvent, ErrorEvent]
    error_event = events[1]
    assert isinstance(error_event, ErrorEvent)
    assert error_event.error is raised.value
    assert error_event.reason == "status_400"
    assert error_event.attempt == 1
    (operation,) = exported.metrics()["gen_ai.client.operation.duration"]
    assert operation[0]["error.type"] == "400"


async def test_hooks_see_each_attempt_once_in_order(
    server: LocalServer, request: pytest.FixtureRequest
) -> None:
    """Without OpenTelemetry: on_request per attempt, then on_retry (with the decided
    delay, before it is waited) or on_response."""
    test_id = _test_id(request)
    server.script(test_id, [Action.status(503, {"Retry-After": "3"})])
    events: list[RequestEvent | ResponseEvent | RetryEvent | ErrorEvent] = []
    hooks = _recording(events)
    with no_wait() as waits:
        async with AsyncFriendli(
            server_url=server.url,
            retries=NO_JITTER,
            http_headers={"x-test-id": test_id},
            hooks=hooks,
            telemetry=Telemetry(enabled=False),
        ) as client:
            result = await client.container.image.generate(prompt="x")
    assert [type(event) for event in events] == [
        RequestEvent,
        RetryEvent,
        RequestEvent,
        ResponseEvent,
    ]
    retry = events[1]
    assert isinstance(retry, RetryEvent)
    assert retry.reason == "status_503"
    assert retry.delay == waits.delays[0]
    assert 3.0 <= retry.delay <= 3.25
    assert retry.failover is False
    response = events[3]
    assert isinstance(response, ResponseEvent)
    assert response.result is result
    assert response.attempt == 2
    assert {event.request_id for event in events} == {result.request_id}
    assert {event.url for event in events} == {server.url + PATH}


async def test_a_hook_that_raises_is_logged_and_the_call_goes_on(
    server: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_event: object) -> None:
        raise RuntimeError("hook bug")

    with caplog.at_level(logging.WARNING, logger="friendli_image"):
        async with AsyncFriendli(
            server_url=server.url, hooks=Hooks(on_request=broken, on_response=broken)
        ) as client:
            result = await client.container.image.generate(prompt="x")
    assert result.data
    hook_records = [record for record in caplog.records if "hook" in record.getMessage()]
    assert len(hook_records) == 2
    assert all(record.exc_info is not None for record in hook_records)


def test_hooks_and_telemetry_refuse_what_they_cannot_use() -> None:
    with pytest.raises(FriendliValidationError, match="on_retry"):
        Hooks(on_retry="print")  # type: ignore[arg-type]
    with pytest.raises(FriendliValidationError, match="hooks"):
        AsyncFriendli(hooks=print)  # type: ignore[arg-type]
    with pytest.raises(FriendliValidationError, match="telemetry"):
        AsyncFriendli(telemetry=True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("record_prompt", "env", "recorded"),
    [(None, None, False), (None, "true", True), (False, "true", False), (True, None, True)],
)
async def test_the_prompt_is_recorded_only_on_request(
    *,
    server: LocalServer,
    exported: Exported,
    monkeypatch: pytest.MonkeyPatch,
    record_prompt: bool | None,
    env: str | None,
    recorded: bool,
) -> None:
    if env is not None:
        monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", env)
    async with AsyncFriendli(
        server_url=server.url, telemetry=exported.telemetry(record_prompt=record_prompt)
    ) as client:
        await client.container.image.generate(prompt="a secret garden")
    (call,) = exported.call_spans()
    assert call.attributes is not None
    messages = call.attributes.get("gen_ai.input.messages")
    if recorded:
        assert isinstance(messages, str)
        assert json.loads(messages) == [
            {"role": "user", "parts": [{"type": "text", "content": "a secret garden"}]}
        ]
    else:
        assert messages is None
        assert "secret garden" not in repr(exported.spans()[0].to_json())


async def test_telemetry_enabled_false_makes_no_span_and_no_metric(
    server: LocalServer, exported: Exported
) -> None:
    async with AsyncFriendli(
        server_url=server.url, telemetry=exported.telemetry(enabled=False)
    ) as client:
        await client.container.image.generate(prompt="x")
    assert exported.spans() == []
    assert "friendli_image.client.requests" not in exported.metrics()
    assert server.records[-1].headers.get("traceparent") is None


async def test_a_cancelled_call_ends_its_spans_and_leaves_nothing_in_flight(
    server: LocalServer, exported: Exported, request: pytest.FixtureRequest
) -> None:
    test_id = _test_id(request)
    server.script(test_id, [Action.delay(30)])
    started = asyncio.Event()
    async with AsyncFriendli(
        server_url=server.url,
        http_headers={"x-test-id": test_id},
        telemetry=exported.telemetry(),
        hooks=Hooks(on_request=lambda _event: started.set()),
    ) as client:
        task = asyncio.create_task(client.container.image.generate(prompt="x"))
        await started.wait()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    (call,) = exported.call_spans()
    (attempt,) = exported.attempt_spans()
    for span in (call, attempt):
        assert span.attributes is not None
        assert span.attributes["error.type"] == "CancelledError"
    assert list(_points(exported.metrics(), "http.client.active_requests").values()) == [0]


async def test_a_fleet_fails_over_in_the_span_tree_and_reports_ejections(
    server: LocalServer, exported: Exported, unused_tcp_port: int
) -> None:
    """An endpoint that refuses connections: its attempt span says failover, the next
    attempt goes to the live endpoint, and the ejection count is an observed metric."""
    dead = f"http://127.0.0.1:{unused_tcp_port}"
    events: list[RetryEvent] = []
    async with AsyncFriendli(
        server_url=[Endpoint(dead, weight=1000.0), server.url],
        fleet=FleetConfig(failures_to_eject=1),
        telemetry=exported.telemetry(),
        hooks=Hooks(on_retry=events.append),
    ) as client:
        for _ in range(4):
            result = await client.container.image.generate(prompt="x")
            assert result.endpoint == server.url
    attempts = exported.attempt_spans()
    refused = [
        span for span in attempts if (span.attributes or {}).get("friendli_image.endpoint") == dead
    ]
    assert refused
    for span in refused:
        assert span.attributes is not None
        assert span.attributes["friendli_image.retry.failover"] is True
        assert span.attributes["friendli_image.retry.reason"] == "connection"
        assert span.attributes["friendli_image.retry.delay"] == 0.0
    assert events
    assert all(event.failover and event.endpoint == dead for event in events)
    ejections = _points(exported.metrics(), "friendli_image.fleet.ejections")
    assert set(ejections) == {
        f"friendli_image.endpoint={dead}",
        f"friendli_image.endpoint={server.url}",
    }


async def test_a_batch_counts_its_items_and_reports_its_rate_while_it_runs(
    server: LocalServer, exported: Exported, request: pytest.FixtureRequest
) -> None:
    test_id = _test_id(request)
    server.script(test_id, [Action.status(400)])
    rates: list[dict[str, Any]] = []

    def progress(_progress: object) -> None:
        rates.append(_points(exported.metrics(), "friendli_image.batch.rate"))

    async with AsyncFriendli(
        server_url=server.url,
        http_headers={"x-test-id": test_id},
        telemetry=exported.telemetry(),
    ) as client:
        batch = client.container.image.generate_batch(
            [f"prompt {index}" for index in range(6)],
            concurrency=1,
            retries=0,
            on_progress=progress,
        )
        result = await batch
    assert len(result.failed) == 1
    metrics = exported.metrics()
    assert _points(metrics, "friendli_image.batch.items") == {
        "friendli_image.batch.status=ok": 5,
        "friendli_image.batch.status=failed": 1,
    }
    assert rates
    assert all(list(rate) == [""] for rate in rates)
    assert "friendli_image.batch.rate" not in exported.metrics()  # reported only while running
    assert len(exported.call_spans()) == 6


async def test_a_rerun_counts_the_items_it_resumed_and_the_ones_it_sent(
    server: LocalServer, exported: Exported, tmp_path: Path
) -> None:
    async with AsyncFriendli(server_url=server.url, telemetry=exported.telemetry()) as client:
        generate_batch = client.container.image.generate_batch
        first = await generate_batch([f"prompt {index}" for index in range(300)], out_dir=tmp_path)
        assert len(first.succeeded) == 300
        rerun = await generate_batch([f"prompt {index}" for index in range(303)], out_dir=tmp_path)
    assert [item.status for item in rerun.items].count("resumed") == 300
    # 300 resumed items are more than one claimed group: each group is counted whole.
    assert _points(exported.metrics(), "friendli_image.batch.items") == {
        "friendli_image.batch.status=ok": 303,
        "friendli_image.batch.status=resumed": 300,
    }


#: Tokens as servers issue them. Letters, then a digit: a token of digits alone could
#: match a timestamp or an id in the exported text by chance, and letters alone a word
#: the exporter writes (``fi-generate`` is in ``generate_content``).
_TOKENS = st.builds(
    lambda head, tail: f"fi-{head}0{tail}",
    st.text(alphabet=string.ascii_letters, min_size=8, max_size=8),
    st.text(alphabet=string.ascii_letters + string.digits + "-._~+/", max_size=40),
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(token=_TOKENS)
def test_the_token_never_appears_in_a_span_a_metric_a_log_or_a_hook_event(
    server: LocalServer, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the blocking facade, with retries, a server that echoes the token in an
    error, debug logging on and the prompt recorded."""
    exported = Exported()
    test_id = f"token-{abs(hash(token))}"
    server.script(
        test_id,
        [
            Action.status(503, {"X-Echo": token}, {"detail": f"echo {token}"}),
            Action.ok(),
            Action.status(400, {"X-Echo": f"Bearer {token}"}, {"detail": f"Bearer {token}"}),
        ],
    )
    events: list[object] = []
    hooks = _recording(events)
    caplog.clear()
    try:
        with (
            caplog.at_level(logging.DEBUG, logger="friendli_image"),
            no_wait(),
            SyncFriendli(
                token=token,
                server_url=server.url,
                http_headers={"x-test-id": test_id},
                telemetry=exported.telemetry(record_prompt=True),
                hooks=hooks,
            ) as client,
        ):
            client.container.image.generate(prompt="p")
            with pytest.raises(FriendliAPIStatusError):
                client.container.image.generate(prompt="q")
        exported_text = "\n".join(span.to_json() for span in exported.spans())
        data = exported.reader.get_metrics_data()
        assert data is not None
        exported_text += data.to_json()
    finally:
        exported.shutdown()
    assert len(exported.spans()) == 5
    assert len(events) == 6
    texts = [exported_text, *(repr(event) for event in events), caplog.text]
    texts += [str(getattr(event, "error", "")) for event in events]
    for text in texts:
        assert token not in text
        assert token[3:] not in text


@pytest.mark.subprocess
def test_nothing_of_opentelemetry_is_imported_or_needed_until_a_call_looks() -> None:
    """``import friendli_image`` imports no OpenTelemetry; a call without the extra works;
    with the API installed and no provider set, a call makes no observer at all."""
    probe = (
        "import sys\n"
        "import friendli_image\n"
        "print(any(m.startswith('opentelemetry') and v for m, v in sys.modules.items()))\n"
        "from friendli_image._telemetry import Instrumentation\n"
        "import logging\n"
        "watch = Instrumentation(None, None, logging.getLogger('x'))\n"
        "request = friendli_image.GenerateRequest(prompt='p')\n"
        "print(watch.start(request, 'id') is None)\n"
        "print(any(m.startswith('opentelemetry') and v for m, v in sys.modules.items()))\n"
    )
    blocked = "import sys; sys.modules['opentelemetry'] = None\n"
    with_api = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert with_api.stdout.split() == ["False", "True", "True"], with_api.stderr
    without = subprocess.run(
        [sys.executable, "-c", blocked + probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert without.stdout.split() == ["False", "True", "False"], without.stderr
