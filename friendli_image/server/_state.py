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
import orjson

from ._config import Action, Credential, ServerConfig

#: Request headers that carry credentials: recorded as `Credential`, not as text.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})


@attrs.define(kw_only=True)
class RequestRecord:
    """What the server saw of one request it accepted (image strings in the body replaced by
    their length; credential headers held apart, as `Credential`)."""

    path: str
    method: str
    headers: dict[str, str]
    """The request headers, except the credential ones (``Authorization``, ``Cookie``...)."""
    credentials: dict[str, Credential] = attrs.field(factory=dict)
    """The credential headers, by name as sent: ``record.credentials["Authorization"]``."""
    body: Any | None = None
    """The parsed JSON body, or None when it was not read, not JSON, or over the byte bound."""
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
    size: int = attrs.field(default=0, repr=False, eq=False)
    """The bytes this record counts against ``ServerConfig.max_record_bytes``."""
    kept: bool = attrs.field(default=False, repr=False, eq=False)
    """True while the server's list holds this record."""

    @classmethod
    def arriving(
        cls, path: str, method: str, headers: Mapping[str, str], *, probe: bool = False
    ) -> RequestRecord:
        """The record of a request that just arrived: its headers split, its size counted."""
        plain: dict[str, str] = {}
        credentials: dict[str, Credential] = {}
        size = len(path) + len(method)
        for name, value in headers.items():
            size += len(name) + len(value)
            if name.lower() in CREDENTIAL_HEADERS:
                credentials[name] = Credential(value)
            else:
                plain[name] = value
        record = cls(
            path=path,
            method=method,
            headers=plain,
            credentials=credentials,
            received_at=time.monotonic(),
            probe=probe,
        )
        record.size = size
        return record


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
        self._records: deque[RequestRecord] = deque()
        self._record_bytes = 0
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
        for record in self._records:
            record.kept = False
        self._records.clear()
        self._record_bytes = 0

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
        """Count an arriving request and return its record (not kept until `keep`)."""
        record = RequestRecord.arriving(path, method, headers, probe=probe)
        with self._lock:
            self._total += 1
            self._by_path[path] = self._by_path.get(path, 0) + 1
            if not probe:
                self._in_flight += 1
                self._max_in_flight = max(self._max_in_flight, self._in_flight)
        return record

    def keep(self, record: RequestRecord) -> None:
        """Add an accepted request's record to the list (when ``record_requests``).

        Called once the request passed the token check, so a refused request costs
        nothing beyond its counters. The list is bounded by ``max_records`` and by
        ``max_record_bytes``: the oldest records go first; one larger than the whole
        byte bound is not kept.
        """
        config = self.config
        if not config.record_requests or record.size > config.max_record_bytes:
            return
        with self._lock:
            record.kept = True
            self._records.append(record)
            self._record_bytes += record.size
            self._trim()

    def keep_body(self, record: RequestRecord, body: Any) -> None:
        """Attach the (redacted) JSON body to a kept record, if it fits the byte bound."""
        if not record.kept:
            return
        try:
            cost = len(orjson.dumps(body))
        except (TypeError, orjson.JSONEncodeError):
            return
        with self._lock:
            if not record.kept or record.size + cost > self.config.max_record_bytes:
                return
            record.body = body
            record.size += cost
            self._record_bytes += cost
            self._trim()

    def _trim(self) -> None:
        records, config = self._records, self.config
        while records and (
            len(records) > config.max_records or self._record_bytes > config.max_record_bytes
        ):
            oldest = records.popleft()
            oldest.kept = False
            self._record_bytes -= oldest.size

    def record_bytes(self) -> int:
        """The bytes the kept records count against ``ServerConfig.max_record_bytes``."""
        with self._lock:
            return self._record_bytes

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
