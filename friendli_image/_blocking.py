"""Blocking work handed off the event loop: to the loop's thread pool, or, once Python is
exiting, done in the thread that asks.

Once the main thread is done (the ``atexit`` hooks run, or non-daemon threads finish),
Python's thread pool takes no new work ("cannot schedule new futures after interpreter
shutdown"), and 3.12 refuses new threads. A client used then (a first call in an
``atexit`` hook under ``asyncio.run``, to ``http://localhost:...``, with an ``out_dir``, or
with a large image) would fail on the hop alone. Doing the work in place blocks the loop
for its duration, which is all that is left to do there; before exit nothing changes.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Lookups", "run_blocking"]

_T = TypeVar("_T")


async def run_blocking(function: Callable[..., _T], /, *args: Any) -> _T:
    """``function(*args)`` on the running loop's default executor; in the calling thread
    once Python is exiting (see the module's docstring)."""
    if threading.main_thread().is_alive():
        return await asyncio.get_running_loop().run_in_executor(None, function, *args)
    return function(*args)


class Lookups:
    """The two name lookups of an event loop (``getaddrinfo``, ``getnameinfo``) through
    `run_blocking`; everything else is the loop's own.

    aiohttp's ``ThreadedResolver`` makes exactly these two calls on the loop it is given,
    which hands them to its thread pool: a host name such as ``localhost`` could not be
    resolved at exit.
    """

    __slots__ = ("_loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def getaddrinfo(
        self,
        host: bytes | str | None,
        port: bytes | str | int | None,
        *,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, ...]]:
        """`socket.getaddrinfo`, off the loop (`run_blocking`)."""
        return await run_blocking(socket.getaddrinfo, host, port, family, type, proto, flags)

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int = 0) -> tuple[str, str]:
        """`socket.getnameinfo`, off the loop (`run_blocking`)."""
        return await run_blocking(socket.getnameinfo, sockaddr, flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)
