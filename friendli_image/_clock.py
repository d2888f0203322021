"""The SDK's clock and its one way to wait, with the zero-wait testing mode behind both.

Every wait the SDK decides on (a retry's backoff or ``Retry-After``, a batch's pacing
after a 429) goes through `pause`, and every decision measured against time (a call's
``max_elapsed``, ``Timeout.total``) reads `monotonic`. In the testing mode
(``friendli_image.testing.no_wait``) `pause` records the delay instead of sleeping it and
moves `monotonic` forward by it, so each decision is the one a real run would make, at no cost
in wall time. The mode is process-wide (the blocking facade's loop thread sees it too),
is only ever on inside a ``with`` block, and a forked child starts with it off.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable

__all__ = ["monotonic", "pause", "pop_recorder", "push_recorder"]

Recorder = Callable[[float, str], None]

_lock = threading.Lock()
#: The active recorders, innermost last; waits go to the innermost one.
_recorders: list[Recorder] = []
#: How far the testing mode has moved the clock: the sum of every wait it skipped.
#: It never goes back, so `monotonic` never goes back across blocks.
_skipped = 0.0


def monotonic() -> float:
    """``time.monotonic()``, plus every wait the testing mode has skipped."""
    return time.monotonic() + _skipped


async def pause(delay: float, reason: str = "retry") -> None:
    """Wait ``delay`` seconds; in the testing mode, record it and return at once.

    ``reason`` says which decision the wait belongs to (``"retry"``, ``"pace"``); the
    testing mode records it with the delay.
    """
    global _skipped  # noqa: PLW0603  (the mode is process-wide by design)
    if _recorders:
        with _lock:
            if _recorders:
                _skipped += max(0.0, delay)
                _recorders[-1](delay, reason)
                recorded = True
            else:
                recorded = False
        if recorded:
            # Still a checkpoint: a cancelled call stops here as it would in a real wait.
            await asyncio.sleep(0)
            return
    await asyncio.sleep(delay)


def push_recorder(recorder: Recorder) -> None:
    """Turn the testing mode on (again, when nested) with ``recorder`` as the innermost."""
    with _lock:
        _recorders.append(recorder)


def pop_recorder(recorder: Recorder) -> None:
    """Remove ``recorder``; the mode is off once no recorder is left."""
    with _lock:
        if recorder in _recorders:
            _recorders.remove(recorder)


def _off_in_child() -> None:
    # A forked worker must not silently inherit a test's "never sleep".
    global _lock  # noqa: PLW0603
    _lock = threading.Lock()
    _recorders.clear()


os.register_at_fork(after_in_child=_off_in_child)
