"""Server-wide state shared across restarts: counters, request records, fault scripts."""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ._config import Action, ServerConfig


@attrs.define(kw_only=True)
class RequestRecord:
    """What the server saw of one request (image strings in the body replaced by their length)."""

    path: str
    method: str
    headers: dict[str, str]
    body: Any | None = None
    """The parsed JSON body, or None when it was not read or not JSON."""
    received_at: float
    """``time.monotonic()`` when the request arrived."""
    action: str | None = None
    """The scripted or random fault applied, if any (e.g. ``"status:503"``)."""
    status: int | None = None
    """The status sent, or None when no response was sent."""
    disconnected: bool = False
    """True when the client went away before the response was sent."""
    probe: bool = attrs.field(default=False, repr=False)
    """True for a ``GET /health`` probe (not counted in flight)."""


@attrs.frozen(kw_only=True)
class ServerStats:
    """A snapshot of the server's counters."""

    total_requests: int
    requests_by_path: Mapping[str, int]
    in_flight: int
    """Requests being handled now (``GET /health`` probes are not counted)."""
    max_in_flight: int
    faults: Mapping[str, int]
    """Scripted or random fault actions taken, by kind (``"status:503"``, ``"truncate"``...)."""
    responses_by_status: Mapping[int, int]
    disconnects: int
    open_connections: int = 0
    """TCP connections open now."""
    max_open_connections: int = 0
    timed_out_connections: int = 0
    """Connections closed for a late request head, idleness or a stalled body."""
    evicted_connections: int = 0
    """Idle connections closed to admit a new one at ``ServerConfig.max_connections``."""
    refused_connections: int = 0
    """New connections closed at once because the cap was reached with every one busy."""


def action_label(action: Action) -> str:
    """Name an action for counters and records."""
    if action.kind == "status":
        return f"status:{action.status_code}"
    return action.kind


class ServerState:
    """Thread-safe counters, records and per-test scripts of one server (kept across restarts)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._scripts: dict[str | None, deque[Action]] = {}
        self._rng = random.Random(  # noqa: S311 -- fault injection, not secrets
            config.faults.seed if config.faults else None
        )
        self._records: deque[RequestRecord] = deque(maxlen=config.max_records)
        self._in_flight = 0
        self._connections = 0
        self.healthy = True
        """What ``GET /health`` reports: 200 ``{"status": "ok"}`` when True, else 503."""
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._total = 0
        self._by_path: dict[str, int] = {}
        self._max_in_flight = self._in_flight
        self._faults: dict[str, int] = {}
        self._by_status: dict[int, int] = {}
        self._disconnects = 0
        self._max_connections = self._connections
        self._connection_events = {"timed_out": 0, "evicted": 0, "refused": 0}
        self._records.clear()

    def reset_stats(self) -> None:
        """Zero the counters and forget the records (requests in flight stay counted)."""
        with self._lock:
            self._reset_counters()

    def script(self, test_id: str | None, actions: Iterable[Action]) -> None:
        """Replace the action queue for requests whose ``x-test-id`` equals ``test_id``."""
        queue = deque(actions)
        for action in queue:
            if not isinstance(action, Action):
                raise TypeError(f"expected Action, got {type(action).__name__}")
        with self._lock:
            self._scripts[test_id] = queue

    def clear_scripts(self) -> None:
        """Drop every scripted action not yet consumed."""
        with self._lock:
            self._scripts.clear()

    def pending_actions(self, test_id: str | None) -> int:
        """How many scripted actions are left for ``test_id``."""
        with self._lock:
            return len(self._scripts.get(test_id, ()))

    def next_action(self, test_id: str | None) -> Action | None:
        """Pop the next scripted action, else draw a random fault, else None."""
        with self._lock:
            queue = self._scripts.get(test_id)
            action = queue.popleft() if queue else self._random_fault()
            if action is not None and action.kind != "ok":
                label = action_label(action)
                self._faults[label] = self._faults.get(label, 0) + 1
            return action

    def _random_fault(self) -> Action | None:
        faults = self.config.faults
        if faults is None:
            return None
        low, high = faults.delay_ms
        delay = self._rng.uniform(low, high) / 1000 if high > 0 else 0.0
        draw = self._rng.random()
        if draw < faults.p_503:
            return Action.status(503, delay=delay)
        draw -= faults.p_503
        if draw < faults.p_429:
            # Retry-After is whole seconds (RFC 9110 delay-seconds); a fraction goes in
            # retry-after-ms too, which clients that know it read first.
            seconds = faults.retry_after_s
            hint = {"Retry-After": str(math.ceil(seconds))}
            if seconds != int(seconds):
                hint["retry-after-ms"] = str(round(seconds * 1000))
            return Action.status(429, headers=hint, delay=delay)
        draw -= faults.p_429
        if draw < faults.p_drop_after_read:
            return Action.drop_after_read(delay=delay)
        return Action.delay(delay) if delay > 0 else None

    def begin(
        self, path: str, method: str, headers: Mapping[str, str], *, probe: bool = False
    ) -> RequestRecord:
        """Count an arriving request and return its record (``probe``: a health check)."""
        record = RequestRecord(
            path=path, method=method, headers=dict(headers), received_at=time.monotonic()
        )
        record.probe = probe
        with self._lock:
            self._total += 1
            self._by_path[path] = self._by_path.get(path, 0) + 1
            if not probe:
                self._in_flight += 1
                self._max_in_flight = max(self._max_in_flight, self._in_flight)
            if self.config.record_requests:
                self._records.append(record)
        return record

    def end(self, record: RequestRecord) -> None:
        """Count a finished request (answered, dropped or abandoned)."""
        with self._lock:
            if not record.probe:
                self._in_flight -= 1
            if record.disconnected:
                self._disconnects += 1
            if record.status is not None:
                self._by_status[record.status] = self._by_status.get(record.status, 0) + 1

    def connection_opened(self) -> None:
        """Count an accepted TCP connection."""
        with self._lock:
            self._connections += 1
            self._max_connections = max(self._max_connections, self._connections)

    def connection_closed(self, reason: str | None = None) -> None:
        """Count a closed connection; ``reason``: ``timed_out``, ``evicted`` or ``refused``."""
        with self._lock:
            self._connections -= 1
            if reason is not None:
                self._connection_events[reason] += 1

    def stats(self) -> ServerStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return ServerStats(
                total_requests=self._total,
                requests_by_path=dict(self._by_path),
                in_flight=self._in_flight,
                max_in_flight=self._max_in_flight,
                faults=dict(self._faults),
                responses_by_status=dict(self._by_status),
                disconnects=self._disconnects,
                open_connections=self._connections,
                max_open_connections=self._max_connections,
                timed_out_connections=self._connection_events["timed_out"],
                evicted_connections=self._connection_events["evicted"],
                refused_connections=self._connection_events["refused"],
            )

    def records(self) -> list[RequestRecord]:
        """The records kept so far, oldest first."""
        with self._lock:
            return list(self._records)
