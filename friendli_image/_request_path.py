"""The request path: what the resources and the batch engine call, and the gate each attempt passes.

`RequestPath` is how everything above the client reaches its retry loop without importing
the client; `AttemptGate` and `BatchMonitor` are the protocols a batch plugs into it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal, Protocol, TypeAlias

import attrs

from ._batch_models import BatchProgress, EndpointStats
from ._config import CallOptions, CallOverrides
from ._requests import RequestModel
from ._results import ImageResult

__all__ = [
    "AttemptGate",
    "AttemptOutcome",
    "BatchMonitor",
    "RequestPath",
]

AttemptOutcome: TypeAlias = Literal["ok", "rate_limited", "other"]


class AttemptGate(Protocol):
    """Admission to each attempt of a call (a batch's adaptive in-flight limit).

    The client's retry loop acquires the gate before every attempt and releases it
    with how the attempt went, so the gate sees every 429, retried ones included.
    ``acquire`` may raise to stop the call (the batch stopped); that exception passes
    through the retry loop unchanged.
    """

    async def acquire(self) -> int:
        """Wait for admission; return a ticket to hand back to `release`."""
        ...

    def release(
        self, ticket: int, outcome: AttemptOutcome, retry_after: float | None = None
    ) -> None:
        """Hand the admission back, with the attempt's outcome."""
        ...


class BatchMonitor(Protocol):
    """What a batch tells the client's telemetry: each finished item, and that it ended."""

    def item(self, status: str, count: int = 1) -> None:
        """Items finished with ``status`` (a `BatchItem.status`): one, or ``count``."""
        ...

    def close(self) -> None:
        """The batch ended."""
        ...


def _no_monitor(_progress: Callable[[], BatchProgress]) -> BatchMonitor | None:
    return None


@attrs.frozen
class RequestPath:
    """A client's one request path, as the resources and the batch engine use it.

    ``send`` runs one call through the retry loop (every attempt admitted by ``gate``
    when given); ``resolve`` turns per-call options into the call's settings;
    ``endpoints`` reports the client's endpoints.
    """

    send: Callable[[str, RequestModel, CallOptions, AttemptGate | None], Awaitable[ImageResult]]
    resolve: Callable[[CallOverrides], CallOptions]
    endpoints: Callable[[], tuple[EndpointStats, ...]] = tuple
    """A snapshot of the client's endpoints (for the batch progress)."""
    monitor_batch: Callable[[Callable[[], BatchProgress]], BatchMonitor | None] = _no_monitor
    """A monitor for a batch's metrics, given its progress (None: no metric is collected)."""
