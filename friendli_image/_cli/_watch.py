"""A CLI batch job you can watch: a Prometheus page while it runs, ``run.json`` when it ends.

`JobWatch` learns what happens from the client's `Hooks` (every attempt's outcome, every
retry) and the batch's progress callback; it keeps counts, nothing else. With
``--metrics-port`` it serves them for Prometheus to scrape (``prometheus_client``, the
``prometheus`` extra) from a thread of its own; at the end, or when the job is interrupted,
it writes ``run.json`` beside the output: the input's fingerprint, the counts, the timings
and the figures of each endpoint.
"""

from __future__ import annotations

import datetime
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import orjson

from friendli_image._batch_models import BatchProgress
from friendli_image._exceptions import FriendliUsageError
from friendli_image._store import Directory, Location
from friendli_image._telemetry import ErrorEvent, Hooks, ResponseEvent, RetryEvent
from friendli_image._version import __version__

from ._options import within

__all__ = ["RUN_NAME", "JobWatch", "fingerprint"]

RUN_NAME: Final = "run.json"
_CHUNK: Final = 1024 * 1024


def fingerprint(path: Path) -> str:
    """``sha256:<hex>`` of the input file's bytes (run on a worker thread)."""
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


class JobWatch:
    """The counts of one CLI batch job, served to Prometheus and written to ``run.json``."""

    def __init__(self, out_dir: Path | str, input_name: str, input_fingerprint: str | None) -> None:
        self._out_dir = out_dir
        self._input = {"path": input_name, "fingerprint": input_fingerprint}
        self._started_at = datetime.datetime.now(datetime.timezone.utc)
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self.progress: BatchProgress | None = None
        #: (endpoint, outcome) -> attempts; outcome is "ok" or a failure reason.
        self._requests: Counter[tuple[str, str]] = Counter()
        self._retries: Counter[str] = Counter()
        self._received: Counter[str] = Counter()
        self._seconds: dict[str, float] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.hooks = Hooks(on_response=self._response, on_retry=self._retry, on_error=self._error)

    # -- what the client and the batch tell -------------------------------------------------

    def _response(self, event: ResponseEvent) -> None:
        with self._lock:
            self._requests[event.endpoint, "ok"] += 1
            self._received[event.endpoint] += len(event.result.data)
            self._seconds[event.endpoint] = self._seconds.get(event.endpoint, 0.0) + event.elapsed

    def _retry(self, event: RetryEvent) -> None:
        with self._lock:
            self._requests[event.endpoint, event.reason] += 1
            self._retries[event.reason] += 1

    def _error(self, event: ErrorEvent) -> None:
        with self._lock:
            self._requests[event.endpoint, event.reason] += 1

    def on_progress(
        self, then: Callable[[BatchProgress], object]
    ) -> Callable[[BatchProgress], None]:
        """A progress callback that keeps the snapshot, then calls ``then``."""

        def report(progress: BatchProgress) -> None:
            self.progress = progress
            then(progress)

        return report

    # -- Prometheus ---------------------------------------------------------------------------

    def serve(self, port: int, host: str) -> str:
        """Serve the metrics at ``http://host:port/metrics``; return that URL."""
        try:
            import prometheus_client  # noqa: PLC0415  (an optional extra)
            from prometheus_client.registry import CollectorRegistry  # noqa: PLC0415
        except ImportError:
            raise FriendliUsageError(
                "--metrics-port needs prometheus_client: pip install 'friendli-image[prometheus]'"
            ) from None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        try:
            self._server, self._thread = prometheus_client.start_http_server(
                port, addr=host, registry=registry
            )
        except OSError as exc:
            raise FriendliUsageError(
                f"--metrics-port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                "pick a free port"
            ) from None
        return f"http://{host}:{self._server.server_port}/metrics"

    def samples(self) -> Iterator[tuple[str, str, str, dict[str, str], float]]:
        """Every sample: (family, type, help, labels, value)."""
        progress = self.progress
        with self._lock:
            requests = dict(self._requests)
            retries = dict(self._retries)
            received = dict(self._received)
        if progress is not None:
            for status, count in (
                ("ok", progress.succeeded),
                ("failed", progress.failed),
                ("skipped", progress.skipped),
                ("resumed", progress.resumed),
            ):
                yield "batch_items", "counter", "Items by status", {"status": status}, count
            gauges = {
                "batch_total": ("Items in the input (when known)", progress.total),
                "batch_in_flight": ("Requests in flight", progress.in_flight),
                "batch_limit": ("The current in-flight limit", progress.limit),
                "batch_rate": ("Items per second in this run", progress.rate),
                "batch_eta_seconds": ("Seconds to the last item at the rate", progress.eta),
                "batch_elapsed_seconds": ("Seconds since the batch started", progress.elapsed),
            }
            for name, (text, value) in gauges.items():
                if value is not None:
                    yield name, "gauge", text, {}, float(value)
            for stats in progress.endpoints:
                labels = {"endpoint": stats.url}
                yield "fleet_ejections", "counter", "Ejections", labels, stats.ejections
        for (endpoint, outcome), count in sorted(requests.items()):
            labels = {"endpoint": endpoint, "outcome": outcome}
            yield "requests", "counter", "HTTP attempts by outcome", labels, count
        for reason, count in sorted(retries.items()):
            yield "retries", "counter", "Retries by reason", {"reason": reason}, count
        for endpoint, size in sorted(received.items()):
            labels = {"endpoint": endpoint}
            yield "received_bytes", "counter", "Image bytes received (decoded)", labels, size

    # -- the end ------------------------------------------------------------------------------

    def finish(self, status: str) -> Path | str:
        """Stop serving and write ``run.json`` (``status``: completed, interrupted, failed)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = None
        return self._write(self.report(status))

    def report(self, status: str) -> dict[str, Any]:
        """What ``run.json`` holds."""
        progress = self.progress
        with self._lock:
            requests = dict(self._requests)
            retries = dict(self._retries)
            received = dict(self._received)
            seconds = dict(self._seconds)
        endpoints: dict[str, dict[str, Any]] = {}
        for (endpoint, outcome), count in requests.items():
            figures = endpoints.setdefault(endpoint, {"requests": {}, "received_bytes": 0})
            figures["requests"][outcome] = count
        for endpoint, size in received.items():
            figures = endpoints[endpoint]
            figures["received_bytes"] = size
            figures["mean_ok_seconds"] = seconds[endpoint] / figures["requests"]["ok"]
        if progress is not None:
            for stats in progress.endpoints:
                figures = endpoints.setdefault(stats.url, {"requests": {}, "received_bytes": 0})
                figures.update(
                    latency_p50=stats.latency_p50,
                    latency_p95=stats.latency_p95,
                    ejections=stats.ejections,
                    failures=dict(stats.failures),
                )
        counts = (
            {}
            if progress is None
            else {
                "total": progress.total,
                "done": progress.done,
                "succeeded": progress.succeeded,
                "failed": progress.failed,
                "skipped": progress.skipped,
                "resumed": progress.resumed,
            }
        )
        ended = datetime.datetime.now(datetime.timezone.utc)
        return {
            "friendli_image": __version__,
            "status": status,
            "input": self._input,
            "counts": counts,
            "timings": {
                "started_at": self._started_at.isoformat(),
                "ended_at": ended.isoformat(),
                "elapsed_seconds": time.monotonic() - self._t0,
                "rate": None if progress is None else progress.rate,
            },
            "retries": retries,
            "endpoints": dict(sorted(endpoints.items())),
        }

    def _write(self, report: dict[str, Any]) -> Path | str:
        # Through the store, like every file in an output location: atomic, never through
        # a link, with the umask's mode; on a URL location, one PUT.
        data = orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n"
        if isinstance(self._out_dir, str):
            Location(self._out_dir, {}).write(RUN_NAME, data)
            return within(self._out_dir, RUN_NAME)
        location = Directory(self._out_dir, create=True)
        try:
            location.write_atomic(RUN_NAME, data)
        finally:
            location.close()
        return self._out_dir / RUN_NAME


class _Collector:
    """A ``prometheus_client`` collector reading a `JobWatch` at each scrape."""

    def __init__(self, watch: JobWatch) -> None:
        self._watch = watch

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (  # noqa: PLC0415  (an optional extra)
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        families: dict[str, Any] = {}
        for name, kind, text, labels, value in self._watch.samples():
            family = families.get(name)
            if family is None:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = families[name] = cls(f"friendli_image_{name}", text, labels=sorted(labels))
            family.add_metric([labels[key] for key in sorted(labels)], value)
        yield from families.values()
