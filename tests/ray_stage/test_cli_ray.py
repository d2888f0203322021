"""``friendli-image batch --ray``: a local Ray cluster from the command line, resumable."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import orjson
import pytest

pytest.importorskip("pyarrow", reason="the stage needs pyarrow: pip install 'friendli-image[ray]'")
pytest.importorskip("ray", reason="Ray is not installed: pip install 'friendli-image[ray]'")

from friendli_image._requests import GenerateRequest
from friendli_image._resources import GENERATIONS_PATH
from friendli_image._store import request_digest, row_image_name
from friendli_image.ray import seed_for
from friendli_image.server import LocalServer, ServerConfig

from .conftest import prompts_seen

pytestmark = [
    pytest.mark.subprocess,
    # Ray Data warns about its own deprecated settings when the joined cluster starts.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
]

_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore"}


def _batch(url: str, source: pathlib.Path, out: pathlib.Path) -> list[str]:
    return [
        sys.executable, "-m", "friendli_image", "batch", str(source), "--ray",
        "--out-dir", str(out), "--server-url", url, "--actors", "2", "--concurrency", "4",
        "--no-progress",
    ]  # fmt: skip


def _prompt_of_image(prompts: list[str], **fields: object) -> dict[str, str]:
    """Image name -> prompt, for distinct prompts without seeds (each row id 0)."""
    named = {}
    for prompt in prompts:
        request = GenerateRequest(prompt=prompt, seed=seed_for(0), **fields)  # type: ignore[arg-type]
        named[row_image_name(0, request_digest(GENERATIONS_PATH, request), None)] = prompt
    return named


_LATE_WORKER = """
import os, signal, subprocess, sys, time
from friendli_image._cli._ray import _RUN_MARK, _watchdog

sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
with _watchdog("this-run"):
    # Started after the watchdog's list was taken, as a worker Ray starts late.
    late = subprocess.Popen(sleeper, env={**os.environ, _RUN_MARK: "this-run"}, **quiet)
    other = subprocess.Popen(sleeper, env={**os.environ, _RUN_MARK: "another-run"}, **quiet)
    time.sleep(1.0)  # both are running Python by now
    print(late.pid, other.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_watchdog_stops_a_process_of_the_run_started_after_its_list() -> None:
    """``kill -9`` of the command: the watchdog stops a process that carries the run's
    mark though it started after the list of processes was taken (a worker Ray was still
    starting, which CI once saw left behind), and leaves another run's alone."""
    psutil = pytest.importorskip("psutil", reason="Ray ships psutil")
    done = subprocess.run(
        [sys.executable, "-c", _LATE_WORKER],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    late, other = (int(pid) for pid in done.stdout.split())
    try:
        deadline = time.monotonic() + 30
        while psutil.pid_exists(late) and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(late).status() == psutil.STATUS_ZOMBIE:
                    break
            time.sleep(0.1)
        assert not psutil.pid_exists(late) or psutil.Process(late).status() == "zombie"
        assert psutil.Process(other).is_running()
    finally:
        for pid in (late, other):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _marked(psutil: Any) -> list[str]:
    """The command lines of the processes that carry a ``batch --ray`` run's mark."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if "FRIENDLI_IMAGE_RAY_RUN" in process.environ():
                found.append(" ".join(process.cmdline()))
    return found


@pytest.mark.scenario(56)
def test_cli_ray_resumes_after_sigkill(tmp_path: pathlib.Path, joined_env: dict[str, str]) -> None:
    """SIGKILL of the driver alone mid-run leaves no process of its local cluster behind
    and keeps the images written; the rerun (on a joined cluster: resuming is the same
    there) requests only the rest, and writes the manifest and a summary."""
    psutil = pytest.importorskip("psutil", reason="Ray ships psutil")
    source = tmp_path / "prompts.jsonl"
    lines = [f'{{"prompt": "a castle no. {i}", "num_inference_steps": 10}}' for i in range(150)]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    config = ServerConfig(image_size=64, step_latency_ms=10.0, max_concurrency=4)
    with LocalServer(config) as srv:
        first = subprocess.Popen(
            _batch(srv.url, source, out),
            env=_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if out.exists() and len(list(out.glob("*.jpg"))) >= 30:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the first run wrote no images within 120 s")
            started = psutil.Process(first.pid).children(recursive=True)
            assert len(started) > 3  # Ray's processes
            first.send_signal(signal.SIGKILL)
            first.wait(30)
            _, alive = psutil.wait_procs(started, timeout=30)
            assert alive == [], [" ".join(p.cmdline()) for p in alive]
            # Nor any process of its cluster started after that list (a worker Ray was
            # still starting): each carries the run's mark in its environment.
            deadline = time.monotonic() + 30
            while (marked := _marked(psutil)) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert marked == [], marked
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(first.pid, signal.SIGKILL)
            first.wait(30)
        prompt_of = _prompt_of_image(
            [f"a castle no. {i}" for i in range(150)], num_inference_steps=10
        )
        kept = {prompt_of[p.name] for p in out.glob("*.jpg")}
        assert 30 <= len(kept) < 150
        second = subprocess.run(
            _batch(srv.url, source, out),
            env=joined_env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert "items     150" in second.stdout, second.stdout
        # The command exits before the interpreter's teardown, where Arrow can abort a
        # finished process (apache/arrow#34314): a complete run exits 0.
        assert second.returncode == 0, second.stderr[-3000:]
        # Actors of the killed driver may write a few more images before they notice.
        resumed = re.search(r"ok +150 \((\d+) from earlier runs\)", second.stdout)
        assert resumed is not None, second.stdout
        assert len(kept) <= int(resumed.group(1)) < 150
        seen = prompts_seen(srv)
    assert sorted(prompt_of[p.name] for p in out.glob("*.jpg")) == sorted(prompt_of.values())
    assert all(seen[prompt] == 1 for prompt in kept)
    assert max(seen.values()) <= 2
    assert list((out / "manifest").glob("*.parquet"))


def test_cli_ray_reads_stdin_and_writes_a_gallery(
    tmp_path: pathlib.Path, joined_env: dict[str, str]
) -> None:
    """INPUT '-' reads the requests from stdin, as the local batch does; --gallery
    writes the page of the Ray output, and the gallery command reads it too."""
    out = tmp_path / "out"
    prompts = "".join(f"a lighthouse no. {i}\n" for i in range(6))
    with LocalServer(ServerConfig(image_size=32, step_latency_ms=1.0)) as srv:
        done = subprocess.run(
            [*_batch(srv.url, pathlib.Path("-"), out), "--gallery"],
            input=prompts,
            env=joined_env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        seen = prompts_seen(srv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "items     6" in done.stdout, done.stdout
    prompt_of = _prompt_of_image([f"a lighthouse no. {i}" for i in range(6)])
    assert sorted(prompt_of[p.name] for p in out.glob("*.jpg")) == sorted(prompt_of.values())
    assert seen == {f"a lighthouse no. {i}": 1 for i in range(6)}
    page = (out / "index.html").read_text(encoding="utf-8")
    assert f"gallery   {out / 'index.html'}" in done.stdout
    assert all(f"a lighthouse no. {i}" in page for i in range(6))
    assert all(f'href="{p.name}"' in page for p in out.glob("*.jpg"))
    (out / "index.html").unlink()
    from friendli_image._cli import main

    assert main(["gallery", str(out)]) == 0
    assert (out / "index.html").read_text(encoding="utf-8") == page


def test_cli_ray_writes_parquet_shards_resumes_from_them_and_shows_them(
    tmp_path: pathlib.Path, joined_env: dict[str, str]
) -> None:
    """--output-format parquet on Ray: every row once in a published shard, a rerun sends
    nothing, and the gallery shows each image taken out of its shard."""
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out"
    source = tmp_path / "prompts.txt"
    source.write_text("".join(f"a reef no. {i}\n" for i in range(6)))
    command = [*_batch("", source, out), "--output-format", "parquet", "--shard-size", "2"]
    with LocalServer(ServerConfig(image_size=32, step_latency_ms=1.0)) as srv:
        command[command.index("--server-url") + 1] = srv.url
        for run in range(2):
            done = subprocess.run(
                [*command, "--gallery"],
                env=joined_env,
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            assert f"ok        6 ({6 * run} from earlier runs)" in done.stdout, done.stdout
        seen = prompts_seen(srv)
    assert seen == {f"a reef no. {i}": 1 for i in range(6)}
    table = pq.read_table(sorted(str(path) for path in out.glob("train-*.parquet")))
    assert sorted(table.column("prompt").to_pylist()) == [f"a reef no. {i}" for i in range(6)]
    assert len(set(table.column("key").to_pylist())) == 6
    page = (out / "index.html").read_text(encoding="utf-8")
    shown = re.findall(r'src="(\.thumbs/[^"]+)"', page)
    assert len(shown) == 6
    assert all((out / name).is_file() for name in shown)


def test_cli_ray_refuses_zero_actors_before_starting_ray(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    """A bad --actors exits 2 with a message, and no cluster is started."""
    from friendli_image._cli import main

    source = tmp_path / "p.txt"
    source.write_text("a fox\n", encoding="utf-8")
    assert main(["batch", str(source), "--ray", "--actors", "0", "--out-dir", "x"]) == 2
    assert "--actors" in capsys.readouterr().err


def test_an_object_store_out_dir_survives_argparse() -> None:
    """--out-dir s3://bucket/x reaches Ray as the URI (argparse's Path collapses '//')."""
    from friendli_image._cli._options import out_uri

    assert out_uri(pathlib.Path("s3://bucket/images")) == "s3://bucket/images"
    assert out_uri(pathlib.Path("gs://b/x/y")) == "gs://b/x/y"
    assert out_uri("s3://bucket/images") == "s3://bucket/images"
    assert out_uri(pathlib.Path("/data/images")) == "/data/images"
    assert out_uri(pathlib.Path("out")) == "out"


def test_cli_ray_makes_variants_and_resumes_them(
    tmp_path: pathlib.Path, joined_env: dict[str, str]
) -> None:
    """--variants on Ray: n images per line, each its own seed, and the rerun sends
    nothing (a line's variants are the same items on every run)."""
    source = tmp_path / "prompts.txt"
    source.write_text("a kite\na gull\na kite\n")
    out = tmp_path / "out"
    with LocalServer(ServerConfig(image_size=32, step_latency_ms=1.0)) as srv:
        command = [*_batch(srv.url, source, out), "--variants", "2"]
        for run in range(2):
            done = subprocess.run(
                command, env=joined_env, capture_output=True, text=True, timeout=180, check=False
            )
            assert done.returncode == 0, done.stderr[-3000:]
            assert "items     6" in done.stdout, done.stdout
            assert f"ok        6 ({6 * run} from earlier runs)" in done.stdout, done.stdout
        seeds = [record.body["seed"] for record in srv.records if isinstance(record.body, dict)]
    assert len(seeds) == len(set(seeds)) == 6
    assert len(list(out.glob("*.jpg"))) == 6


def test_ray_variants_have_the_seeds_of_the_local_batch(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The rows --variants makes on Ray carry the seeds the local batch sends for the
    same INPUT (its own code path: `generate_batch(n=)`), in the same item order."""
    from friendli_image._cli import main

    source = tmp_path / "in.jsonl"
    requests = [{"prompt": "a kite"}, {"prompt": "a gull", "seed": 7}, {"prompt": "a kite"}]
    source.write_text("".join(orjson.dumps(r).decode() + "\n" for r in requests))
    keys, rows = _read_as_ray_does(source, n=3)
    assert "seed" in keys
    assert rows["_line"] == list(range(9))
    with LocalServer(ServerConfig(image_size=16, step_latency_ms=0.0)) as srv:
        command = ["batch", str(source), "--server-url", srv.url, "--no-progress"]
        assert main([*command, "--out-dir", str(tmp_path / "local"), "--variants", "3"]) == 0
    capsys.readouterr()
    manifest = (tmp_path / "local" / "manifest.jsonl").read_bytes().splitlines()
    local = {line["index"]: line for line in map(orjson.loads, manifest)}
    assert [local[index]["seed"] for index in range(9)] == rows["seed"]
    assert [local[index]["prompt"] for index in range(9)] == rows["prompt"]
    assert rows["seed"][3] == 7  # the request's own seed is its first variant's


def _read_as_ray_does(
    source: pathlib.Path, n: int = 1
) -> tuple[list[str], dict[str, list[object]]]:
    """Both passes of batch --ray over INPUT, range by range, without a cluster."""
    from friendli_image._cli._batch import _Input
    from friendli_image._cli._ray import (
        _check_rules,
        _occurrences_before,
        _parse_ranges,
        _ranges,
        _scan_range,
    )

    common = {"uri": str(source), "cwd": str(source.parent), "rules": _Input}
    specs = [{**common, "start": s, "end": e} for s, e in _ranges(str(source), actors=8)]
    scans = [_scan_range(spec) for spec in specs]
    first_line, first_number = _check_rules(scans, _Input)
    keys = sorted({key for scan in scans for key in scan["keys"]} | ({"seed"} if n > 1 else set()))
    parts, line, index = [], 0, 0
    for spec, scan, earlier in zip(specs, scans, _occurrences_before(scans), strict=True):
        parts.append(
            {**spec, "line": line + 1, "index": index * n, "n": n, "earlier": earlier,
             "keys": keys, "first_line": first_line, "first_number": first_number}
        )  # fmt: skip
        line += scan["lines"]
        index += scan["requests"]
    rows = _parse_ranges({"part": list(range(len(parts)))}, parts, _Input)
    return keys, rows


def test_ray_reads_input_in_ranges_with_the_ids_and_indices_of_one_pass(
    tmp_path: pathlib.Path,
) -> None:
    """INPUT cut into byte ranges (many here) gives the rows a single pass gives: each
    request once, in order, its index, and its occurrence among identical requests,
    duplicates spread over ranges included; blank lines skipped."""
    source = tmp_path / "in.jsonl"
    requests = [{"prompt": f"a fox {i % 37}", "seed": i % 5} for i in range(3000)]
    lines = [orjson.dumps(r).decode() for r in requests]
    lines[10:10] = ["", "   "]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    keys, rows = _read_as_ray_does(source)
    assert keys == ["prompt", "seed"]
    assert rows["_line"] == list(range(3000))
    assert [
        {"prompt": p, "seed": s} for p, s in zip(rows["prompt"], rows["seed"], strict=True)
    ] == requests
    seen: Counter[str] = Counter()
    expected = []
    for request in requests:
        expected.append(seen[repr(request)])
        seen[repr(request)] += 1
    assert rows["_item"] == expected
    assert max(expected) > 0  # duplicates across ranges


def test_ray_input_errors_name_the_line_wherever_it_is(tmp_path: pathlib.Path) -> None:
    """A line breaking the first line's rules far into INPUT (another range) is the
    same error the local batch gives, with its line number, before anything runs."""
    from friendli_image._exceptions import FriendliValidationError

    source = tmp_path / "in.txt"
    lines = [f"a fox {i}" for i in range(3000)]
    lines[2500] = '{"prompt": "json among text"}'
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(FriendliValidationError, match=r"INPUT line 2501.*line 1 is plain text"):
        _read_as_ray_does(source)


def test_ray_input_that_is_not_utf8_or_empty(tmp_path: pathlib.Path) -> None:
    """A line that is not UTF-8 is a usage error naming it; an empty INPUT has no rows."""
    from friendli_image._exceptions import FriendliUsageError

    source = tmp_path / "in.txt"
    source.write_bytes(b"a fox\n" * 2000 + b"an \xff owl\n")
    with pytest.raises(FriendliUsageError, match=r"INPUT line 2001 is not UTF-8"):
        _read_as_ray_does(source)
    source.write_bytes(b"\n  \n")
    keys, rows = _read_as_ray_does(source)
    assert keys == []
    assert rows.get("_line", []) == []
