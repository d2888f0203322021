"""Scenario 58: a client whose first call happens in an ``atexit`` hook, or at interpreter
shutdown: the call completes or fails typed, and the process exits.

Each case is a program of its own, run by this interpreter (each CI lane runs its own
Python), against the bundled server. What Python allows at exit differs by version:
3.12 refuses new threads in ``atexit`` hooks, where the blocking client then runs its
calls in the calling thread; once Python is finalizing (a ``__del__`` run at exit) no
thread runs at all, and before the fix a call there hung the exit for good on 3.10 and
3.11 (its loop thread never started, or never answered) and raised an untyped
``RuntimeError`` on 3.12 and 3.13.
"""

from __future__ import annotations

import io
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st
from PIL import Image

from friendli_image._transport._decode import OFFLOOP_DECODE_BYTES
from friendli_image.server import LocalServer, ServerConfig

from .harness import TINY_PNG, Figures, python_flags

pytestmark = [pytest.mark.subprocess, pytest.mark.scenario(58)]

# A hung exit never ends; a normal one takes under a second, several under load.
EXIT_TIMEOUT_S = 60.0

_PRELUDE = """
import asyncio, atexit, sys
from friendli_image import AsyncFriendli, FriendliError, SyncFriendli
URL = sys.argv[1]
"""


def _first_call_at_exit(url: str, *, opened: bool = False) -> str:
    """A blocking client to ``url`` (an expression) whose first request is made in an
    atexit hook; ``opened``: its loop thread was started before exit."""
    return (
        f"client = SyncFriendli(server_url={url})\n"
        + ("client.__enter__()\n" if opened else "")
        + "def at_exit():\n"
        + '    print("image", len(client.container.image.generate(prompt="a kite").data))\n'
        + "atexit.register(at_exit)\n"
    )


def _first_async_call_at_exit(url: str) -> str:
    """An async client to ``url`` (an expression) first used under ``asyncio.run`` in an
    atexit hook."""
    return (
        "async def call():\n"
        f"    async with AsyncFriendli(server_url={url}) as client:\n"
        '        return await client.container.image.generate(prompt="a kite")\n'
        'atexit.register(lambda: print("image", len(asyncio.run(call()).data)))\n'
    )


# A host name is resolved on a thread of the loop's executor, whose pool Python closes to
# new work at exit: the lookup then runs in the thread that asked.
_HOST_NAME = 'URL.replace("127.0.0.1", "localhost")'

PROGRAMS = {
    "a first blocking call in an atexit hook": (_first_call_at_exit("URL"), "completes"),
    "a first blocking call to a host name in an atexit hook": (
        _first_call_at_exit(_HOST_NAME),
        "completes",
    ),
    "a running blocking client's first host-name lookup in an atexit hook": (
        _first_call_at_exit(_HOST_NAME, opened=True),
        "completes",
    ),
    "a blocking batch iterated, collected and closed in an atexit hook": (
        """
        client = SyncFriendli(server_url=URL)
        def at_exit():
            items = list(client.container.image.generate_batch(["a", "b", "c"]))
            result = client.container.image.generate_batch(["d", "e"]).collect()
            client.close()
            print("image", sum(item.ok for item in items) + len(result.succeeded))
        atexit.register(at_exit)
        """,
        "completes",
    ),
    "a first async call in an atexit hook": (_first_async_call_at_exit("URL"), "completes"),
    "a first async call to a host name in an atexit hook": (
        _first_async_call_at_exit(_HOST_NAME),
        "completes",
    ),
    "an async batch into a folder in an atexit hook": (
        """
        import tempfile
        async def run():
            async with AsyncFriendli(server_url=URL) as client:
                batch = client.container.image.generate_batch(
                    ["a", "b", "c"], out_dir=tempfile.mkdtemp()
                )
                return sum([item.ok async for item in batch])
        atexit.register(lambda: print("image", asyncio.run(run())))
        """,
        "completes",
    ),
    "a first async call in an atexit hook answered with a large image": (
        _first_async_call_at_exit("sys.argv[2]"),
        "completes",
    ),
    "a first blocking call in a __del__ run at exit": (
        """
        class Late:
            def __del__(self):
                try:
                    with SyncFriendli(server_url=URL) as client:
                        print("image", len(client.container.image.generate(prompt="k").data))
                except FriendliError as exc:
                    print("typed", type(exc).__name__, exc)
        late = Late()
        """,
        "fails typed",
    ),
    "a running blocking client called again in a __del__ run at exit": (
        """
        client = SyncFriendli(server_url=URL)
        client.container.image.generate(prompt="before exit")
        class Late:
            def __del__(self):
                try:
                    print("image", len(client.container.image.generate(prompt="k").data))
                except FriendliError as exc:
                    print("typed", type(exc).__name__, exc)
        late = Late()
        """,
        "fails typed",
    ),
}


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer(ServerConfig(static_image=TINY_PNG, max_concurrency=16)) as srv:
        yield srv


@pytest.fixture(scope="module")
def large_image_server() -> Iterator[LocalServer]:
    """A server whose image is larger than what the client decodes on the event loop."""
    noise = Image.frombytes("RGB", (1400, 1400), random.Random(58).randbytes(1400 * 1400 * 3))
    png = io.BytesIO()
    noise.save(png, format="PNG", compress_level=1)
    assert png.tell() > OFFLOOP_DECODE_BYTES
    with LocalServer(ServerConfig(static_image=png.getvalue(), max_concurrency=4)) as srv:
        yield srv


def _run_at_exit(
    body: str, server: LocalServer, large_image_server: LocalServer, expected: str
) -> None:
    """Run ``body`` after the prelude as a program of its own; it must print "main done",
    then the outcome of its call at exit: ``completes`` (``image <n>``, n > 0) or ``fails
    typed`` (a `FriendliUsageError` that says why and what to do), and exit cleanly."""
    program = _PRELUDE + textwrap.dedent(body) + 'print("main done", flush=True)\n'
    try:
        done = subprocess.run(
            [*python_flags(), "-c", program, server.url, large_image_server.url],
            capture_output=True,
            text=True,
            timeout=EXIT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the process did not exit within {EXIT_TIMEOUT_S:.0f} s:\n{program}")
    assert done.returncode == 0, (program, done.stderr[-3000:])
    lines = done.stdout.splitlines()
    assert lines[0] == "main done", (program, done.stdout)
    assert len(lines) == 2, (program, done.stdout, done.stderr[-3000:])
    if expected == "completes":
        word, count = lines[1].split()
        assert word == "image", (program, lines[1])
        assert int(count) > 0
    else:
        assert lines[1].startswith("typed FriendliUsageError"), (program, lines[1])
        assert "finalizing" in lines[1]
        assert "atexit" in lines[1]  # says what to do instead
    assert "Traceback" not in done.stderr, (program, done.stderr[-3000:])
    assert "Exception ignored" not in done.stderr, (program, done.stderr[-3000:])


@pytest.mark.parametrize("case", sorted(PROGRAMS))
def test_a_call_at_exit_completes_or_fails_typed_and_the_process_exits(
    case: str, server: LocalServer, large_image_server: LocalServer, figures: Figures
) -> None:
    body, expected = PROGRAMS[case]
    _run_at_exit(body, server, large_image_server, expected)
    figures.add("exit.cases")
    figures.add(f"exit.{expected.replace(' ', '_')}")


# The generated programs: a client (blocking or async; made at exit, or used before it),
# a moment (an atexit hook; a non-daemon thread still running once the main thread is
# done; a __del__ run while Python is finalizing), a server address (an IP, a host name),
# and a call (one image, a large one, an edit, a batch in memory or into a folder).
_CLIENTS = {
    "a blocking client made then": (
        "def work():\n    with SyncFriendli(server_url=URL) as c:\n        return {sync}\n"
    ),
    "a blocking client used before": (
        "client = SyncFriendli(server_url=URL)\n"
        'client.container.image.generate(prompt="before exit")\n'
        "def work():\n    c = client\n    return {sync}\n"
    ),
    "an async client made then": (
        "async def call():\n"
        "    async with AsyncFriendli(server_url=URL) as c:\n"
        "        return {awaited}\n"
        "def work():\n    return asyncio.run(call())\n"
    ),
    "an async client used before on another loop": (
        "client = AsyncFriendli(server_url=URL)\n"
        "async def call():\n    c = client\n    return {awaited}\n"
        "asyncio.run(call())\n"
        "def work():\n    return asyncio.run(call())\n"
    ),
}
_MOMENTS = {
    "in an atexit hook": "atexit.register(report)\n",
    "in a thread still running after the main thread": (
        "def late():\n    threading.main_thread().join()\n    report()\n"
        "threading.Thread(target=late).start()\n"
    ),
    "in a __del__ while Python is finalizing": (
        "class Late:\n    def __del__(self):\n        report()\nlate = Late()\n"
    ),
}
_CALLS = {  # (blocking, awaited), each the number of images
    "one image": (
        'len(c.container.image.generate(prompt="k").data)',
        'len((await c.container.image.generate(prompt="k")).data)',
    ),
    "one large image": (
        'len(c.container.image.generate(prompt="k").data)',
        'len((await c.container.image.generate(prompt="k")).data)',
    ),
    "an edit": (
        'len(c.container.image.edit(prompt="k", image=IMAGE).data)',
        'len((await c.container.image.edit(prompt="k", image=IMAGE)).data)',
    ),
    "a batch": (
        'sum(i.ok for i in c.container.image.generate_batch(["a", "b", "c"]))',
        'sum([i.ok async for i in c.container.image.generate_batch(["a", "b", "c"])])',
    ),
    "a batch into a folder": (
        "sum(i.ok for i in c.container.image.generate_batch("
        '["a", "b", "c"], out_dir=tempfile.mkdtemp()))',
        "sum([i.ok async for i in c.container.image.generate_batch("
        '["a", "b", "c"], out_dir=tempfile.mkdtemp())])',
    ),
}


@st.composite
def exit_programs(draw: st.DrawFn) -> tuple[str, str, str]:
    """(description, program body, expected outcome) of one generated program."""
    client = draw(st.sampled_from(sorted(_CLIENTS)))
    moments = sorted(_MOMENTS)
    if client.startswith("an async"):
        # asyncio itself cannot start a loop once Python is finalizing (its import of the
        # event loop policy fails), before any code of this package runs.
        moments.remove("in a __del__ while Python is finalizing")
    moment = draw(st.sampled_from(moments))
    address = draw(st.sampled_from(["an IP address", "a host name"]))
    call = draw(st.sampled_from(sorted(_CALLS)))
    sync, awaited = _CALLS[call]
    url = "sys.argv[2]" if call == "one large image" else "sys.argv[1]"
    if address == "a host name":
        url += '.replace("127.0.0.1", "localhost")'
    body = (
        f"import tempfile, threading\nURL = {url}\nIMAGE = {TINY_PNG!r}\n"
        + _CLIENTS[client].format(sync=sync, awaited=awaited)
        + "def report():\n"
        + "    try:\n"
        + '        print("image", work(), flush=True)\n'
        + "    except FriendliError as exc:\n"
        + '        print("typed", type(exc).__name__, exc, flush=True)\n'
        + _MOMENTS[moment]
    )
    expected = "fails typed" if "finalizing" in moment else "completes"
    return f"{client}, {call} to {address}, {moment}", body, expected


# A few programs per run, a different few on each Python (the seed is its version), so
# the CI lanes cover the space between them (4 x 3 x 2 x 5 less the impossible ones).
@settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@seed(sys.version_info.minor)
@given(case=exit_programs())
def test_generated_programs_at_exit_complete_or_fail_typed(
    case: tuple[str, str, str], server: LocalServer, large_image_server: LocalServer
) -> None:
    description, body, expected = case
    note(description)
    _run_at_exit(body, server, large_image_server, expected)
