"""The official SDK's ``friendli.utils`` names: the retry settings and ``Logger``.

``Logger`` is the protocol of ``debug_logger=``: any object with a ``debug`` method.

``from friendli.utils import RetryConfig, BackoffStrategy`` becomes
``from friendli_image.utils import RetryConfig, BackoffStrategy``, with the official
positional signatures and milliseconds::

    RetryConfig("backoff", BackoffStrategy(500, 60000, 1.5, 3600000), True)

This ``RetryConfig`` is a subclass of ``friendli_image.RetryConfig`` (keyword-only, in
seconds), so ``retries=`` takes either. What maps onto what:

- ``strategy="none"``: one attempt; ``"backoff"``: up to 5 attempts (``max_attempts=``
  raises the cap);
- ``initial_interval``, ``max_interval``, ``exponent``, ``max_elapsed_time``,
  ``jitter_ms``: the backoff, converted to seconds;
- ``status_codes_override`` (``["503", "5XX"]``): the statuses retried; without it,
  429, 502, 503 and 504, as there (but not 500, which on an inference server usually means this very
  input failed);
- ``retry_connection_errors``: failures where nothing reached the server are always
  retried (they are safe); a request the server may have processed is not resent
  unless ``retry_ambiguous=True`` is given.
"""

from __future__ import annotations

from ._compat import BackoffStrategy
from ._compat import OfficialRetryConfig as RetryConfig
from ._config import DebugLogger as Logger

__all__ = ["BackoffStrategy", "Logger", "RetryConfig"]
