"""Scenario 52: ``os.fork()`` at random points around a `SyncFriendli`'s first call.

A fork once hung the child for good when it landed while the first call was starting the
client's loop thread (11-15 children of 20): the child inherited a lock held by a
thread that does not exist there. Each trial here is a fresh process (forked from a
worker that imported the package and nothing else, so the first call's imports still
lie ahead), where several threads make their first calls while one of them, or the
main thread, forks after a random delay. The grandchild uses a new client and the
inherited one; it must finish (an image, or a typed error) within its own timeout.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from friendli_image.server import LocalServer, ServerConfig

from .harness import TINY_PNG, Figures

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

TRIALS = 200
PARALLEL = 10
# A hung child never finishes; a slow one on a loaded 2-core machine took over 10 s.
CHILD_TIMEOUT_S = 30.0

# Outcomes, as the trial process's exit status.
OK, TYPED, UNTYPED, HUNG, TRIAL_FAILED = 0, 3, 4, 5, 6

WORKER = textwrap.dedent(
    """
    import os, random, signal, sys, threading, time, traceback

    import friendli_image
    from friendli_image import FriendliError, SyncFriendli

    URL, TRIALS, PARALLEL, SEED, CHILD_TIMEOUT = (
        sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    )
    OK, TYPED, UNTYPED, HUNG, TRIAL_FAILED = 0, 3, 4, 5, 6


    def wait(pid, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return None


    def grandchild(inherited):
        code = OK
        try:
            with SyncFriendli(server_url=URL, timeout_ms=3000) as fresh:
                fresh.container.image.generate(prompt="grandchild, new client")
            inherited.container.image.generate(prompt="grandchild, inherited client")
        except FriendliError:
            code = TYPED
        except BaseException:
            traceback.print_exc()
            code = UNTYPED
        os._exit(code)


    def trial(rng):
        client = SyncFriendli(server_url=URL, timeout_ms=3000)
        forked = []
        where = rng.choice(["main", "caller", "other"])
        delay = rng.uniform(0, 0.03)

        def do_fork():
            time.sleep(delay)
            pid = os.fork()
            if pid == 0:
                grandchild(client)
            forked.append(pid)

        def caller(index):
            if where == "caller" and index == 0:
                threading.Thread(target=do_fork).start()
            try:
                client.container.image.generate(prompt=f"trial caller {index}")
            except FriendliError:
                pass

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        if where == "other":
            helper = threading.Thread(target=do_fork)
            helper.start()
            helper.join()
        elif where == "main":
            do_fork()
        end = time.monotonic() + CHILD_TIMEOUT
        while not forked and time.monotonic() < end:
            time.sleep(0.001)
        if not forked:
            os._exit(TRIAL_FAILED)
        code = wait(forked[0], CHILD_TIMEOUT)
        os._exit(HUNG if code is None else code)


    rng = random.Random(SEED)
    results = []
    running = {}
    for number in range(TRIALS):
        seed = rng.randrange(2**32)
        pid = os.fork()
        if pid == 0:
            trial(random.Random(seed))
        running[pid] = time.monotonic()
        while len(running) >= PARALLEL or (number == TRIALS - 1 and running):
            for pid, started in list(running.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    results.append(os.waitstatus_to_exitcode(status))
                    del running[pid]
                elif time.monotonic() - started > 3 * CHILD_TIMEOUT:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    results.append(TRIAL_FAILED)
                    del running[pid]
            time.sleep(0.002)
    print(" ".join(str(code) for code in results))
    """
)


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer(ServerConfig(static_image=TINY_PNG, max_concurrency=64)) as srv:
        yield srv


def run_trials(url: str, trials: int, seed: int) -> tuple[collections.Counter[int], str]:
    """Run ``trials`` fork trials in a worker process: the count of each outcome, and
    what the processes wrote to stderr."""
    command = [
        sys.executable,
        "-W",
        "ignore::DeprecationWarning",  # 3.12+: fork() in a multi-threaded process
        "-c",
        WORKER,
        url,
        str(trials),
        str(PARALLEL),
        str(seed),
        str(CHILD_TIMEOUT_S),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return collections.Counter(int(code) for code in done.stdout.split()), done.stderr


# Slow: run once, alone, in CI (200 forked processes making calls load the machine).
@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.scenario(52)
def test_fork_at_random_points_never_hangs_the_child(server: LocalServer, figures: Figures) -> None:
    """200 forks at random points before, during and after the first calls of three
    threads, from the main thread, a calling thread or another one: no child hangs; each
    gets its images from a new client and from the inherited one."""
    outcomes, stderr = run_trials(server.url, TRIALS, seed=52)
    assert sum(outcomes.values()) == TRIALS
    assert outcomes[HUNG] == 0, outcomes
    assert outcomes[TRIAL_FAILED] == 0, outcomes
    assert outcomes[UNTYPED] == 0, (outcomes, stderr[-3000:])
    # The server is up and the timeouts generous: a typed error would be a defect too.
    assert outcomes[OK] == TRIALS, (outcomes, stderr[-3000:])
    figures.set(
        "fork.random",
        f"{TRIALS} forks at random points (0-30 ms into three threads' first calls; from "
        f"the main thread, a calling thread or another), {PARALLEL} at a time: "
        f"{outcomes[HUNG]} hung children (before the fix: 225 of 240 here), {outcomes[OK]} made "
        f"their calls with a new client and the inherited one, {outcomes[TYPED]} typed errors",
    )
