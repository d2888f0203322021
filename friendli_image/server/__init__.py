"""A Friendli-Container-compatible image server for tests, demos and development.

Start one with `LocalServer` (``async with`` on the current loop, or ``with`` on a thread),
or blocking with `run_server` (what ``friendli-image serve`` runs). It speaks
``POST /v1/images/generations`` and ``POST /v1/images/edits`` like the real container,
draws deterministic pictures with Pillow, and can inject faults (`Action`, `FaultRates`).
"""

from __future__ import annotations

try:
    import PIL  # noqa: F401 -- checked here to say how to install it
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "friendli_image.server needs Pillow: pip install 'friendli-image[server]'"
    ) from exc

from ._app import create_app
from ._config import Action, Credential, FaultRates, ServerConfig
from ._local import LocalServer, run_server
from ._state import RequestRecord, ServerStats

__all__ = [
    "Action",
    "Credential",
    "FaultRates",
    "LocalServer",
    "RequestRecord",
    "ServerConfig",
    "ServerStats",
    "create_app",
    "run_server",
]
