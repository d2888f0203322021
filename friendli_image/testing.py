"""Test code that calls this SDK without waiting for its retries.

``no_wait()`` is the zero-wait testing mode. Inside its ``with`` block every retry
decision is made exactly as in production (which failures are retried, how many
attempts, the backoff and ``Retry-After`` delays, the retry budget, ``max_elapsed`` and
``Timeout.total``), but no wait is slept: each delay is recorded, and the SDK's clock
moves forward by it, so a deadline that a real run would hit is hit here too::

    from friendli_image import RetryConfig, SyncFriendli
    from friendli_image.server import Action, LocalServer
    from friendli_image.testing import no_wait

    with LocalServer() as server, no_wait() as waits:
        server.script(None, [Action.status(503), Action.status(503)])
        with SyncFriendli(server_url=server.url, retries=RetryConfig(jitter=0)) as client:
            client.container.image.generate(prompt="a lighthouse")
    assert waits.delays == [0.5, 1.0]  # the default backoff: 0.5 s, then twice that

With pytest, ``pytest_plugins = ["friendli_image.testing"]`` in a ``conftest.py`` adds
the ``friendli_no_wait`` fixture, which yields the same `RecordedWaits` for one test.

It cannot be left on by accident: there is no switch to turn it on, only the ``with``
block (or the fixture), which turns it off when it ends, exceptions included; it reads
no environment variable; and a forked child starts with it off. Only the SDK's own
decided waits are skipped: socket timeouts and a server's slowness stay real.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import attrs

from ._clock import pop_recorder, push_recorder

__all__ = ["RecordedWait", "RecordedWaits", "no_wait"]


@attrs.frozen
class RecordedWait:
    """One wait the SDK decided on and the testing mode skipped."""

    #: Seconds it would have slept.
    delay: float
    #: Which decision it belongs to: ``"retry"`` (before a call's next attempt) or
    #: ``"pace"`` (a batch spacing its requests after a 429).
    reason: str


@attrs.define
class RecordedWaits:
    """The waits skipped inside one ``no_wait()`` block, in the order they were decided."""

    waits: list[RecordedWait] = attrs.field(factory=list)

    @property
    def delays(self) -> list[float]:
        """The seconds of each retry wait (before a next attempt), in order."""
        return [wait.delay for wait in self.waits if wait.reason == "retry"]

    @property
    def total(self) -> float:
        """All the seconds skipped, retry waits and pacing alike."""
        return sum(wait.delay for wait in self.waits)

    def __len__(self) -> int:
        return len(self.waits)

    def _record(self, delay: float, reason: str) -> None:
        self.waits.append(RecordedWait(delay, reason))


@contextmanager
def no_wait() -> Iterator[RecordedWaits]:
    """Skip and record the SDK's waits for the duration of the ``with`` block.

    Process-wide: calls on any thread (the blocking facade's included) and any event loop
    are covered. Nested blocks record into the innermost one.
    """
    recorded = RecordedWaits()
    recorder = recorded._record
    push_recorder(recorder)
    try:
        yield recorded
    finally:
        pop_recorder(recorder)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixture
    pass
else:

    @pytest.fixture
    def friendli_no_wait() -> Iterator[RecordedWaits]:
        """The zero-wait testing mode for one test: yields its `RecordedWaits`."""
        with no_wait() as waits:
            yield waits
