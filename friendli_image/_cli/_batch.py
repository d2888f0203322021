"""``friendli-image batch``: run a file of requests into a directory, resumably.

INPUT is read lazily, one line per request: a JSON object of ``generate`` arguments
(``{"prompt": ..., "seed": ...}``; with an ``"image"`` key the whole file is edits), or
plain text, taken as the prompt. Blank lines are skipped. ``-`` reads standard input.
Images and ``manifest.jsonl`` go to ``--out-dir``; running the same command again
resumes (items done are skipped), so Ctrl-C or a crash loses nothing.

Exit status: 0 every item has an image; 1 some failed or were skipped; 2 bad arguments
or input; 3 the batch stopped because the server could not be reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Final

import orjson

from friendli_image._exceptions import (
    FriendliConnectionError,
    FriendliUsageError,
    FriendliValidationError,
)
from friendli_image._models import BatchItem, BatchProgress, BatchResult
from friendli_image._sink import MANIFEST_NAME

from ._options import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, add_client_options, make_client
from ._ray import add_ray_options, run_ray_batch

__all__ = ["add_batch_command"]

#: Without tqdm, a plain progress line is printed this often (seconds).
_PLAIN_INTERVAL: Final = 2.0
#: Failures listed in the summary (all of them are in the manifest).
_LISTED_FAILURES: Final = 10
_IMAGE_KEYS: Final = ("image", "control_images")
_DESCRIPTION: Final = """\
Run every request of INPUT, writing images and manifest.jsonl into --out-dir.

INPUT has one request per line: a JSON object of generate arguments, e.g.
{"prompt": "a red fox", "seed": 7} (with an "image" key, the file is edits; image
values may be local paths, URLs or data: URIs), or plain text, taken as the prompt.
Blank lines are skipped; '-' reads standard input.

Running the same command again resumes: items already in the manifest, with their
file intact, are skipped. Exit status: 0 every item has an image; 1 some failed or
were skipped; 2 bad arguments or input; 3 the server could not be reached;
130 interrupted (rerun to resume)."""


def add_batch_command(commands: Any) -> None:
    """Register the ``batch`` subcommand on the ``friendli-image`` parser."""
    batch = commands.add_parser(
        "batch",
        help="run a file of prompts or JSON requests into a directory (resumable)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument("input", metavar="INPUT", help="JSONL or text file, '-' for stdin")
    batch.add_argument("--out-dir", required=True, type=Path, metavar="DIR", help="where images go")
    batch.add_argument(
        "--concurrency", type=int, default=16, metavar="N", help="requests in flight (16)"
    )
    batch.add_argument(
        "--rps", type=float, default=None, metavar="R", help="at most R requests per second"
    )
    batch.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip items already done in --out-dir (default); --no-resume starts over",
    )
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_client_options(batch)
    add_ray_options(batch)
    batch.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> Any:
    return run_ray_batch(args, _requests) if args.ray else _run_batch(args)


# -- input --------------------------------------------------------------------------------


def _local_images(value: Any) -> Any:
    """Turn strings naming existing files into paths (URLs, data: and base64 stay text)."""
    if isinstance(value, list):
        return [_local_images(item) for item in value]
    if (
        isinstance(value, str)
        and not value.startswith(("http://", "https://", "data:"))
        and len(value) < 4096
    ):
        with contextlib.suppress(OSError, ValueError):
            path = Path(value)
            if path.is_file():
                return path
    return value


def _parse_line(line: str, number: int) -> dict[str, Any]:
    if not line.lstrip().startswith("{"):
        return {"prompt": line}
    try:
        request = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise FriendliValidationError(
            f"INPUT line {number}", f"is not valid JSON ({exc}); fix the line and rerun"
        ) from None
    if not isinstance(request, dict):  # pragma: no cover - a line starting with { is an object
        raise FriendliValidationError(f"INPUT line {number}", "must be a JSON object")
    for key in _IMAGE_KEYS:
        if key in request:
            request[key] = _local_images(request[key])
    return request


def _lines(stream: IO[str]) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(stream, start=1):
        line = raw.rstrip("\r\n")
        if line.strip():
            yield number, line


def _requests(stream: IO[str]) -> Iterator[dict[str, Any]]:
    for number, line in _lines(stream):
        yield _parse_line(line, number)


def _scan(path: Path) -> tuple[int, bool]:
    """Count the requests of a file and check its JSON before anything is sent."""
    count = 0
    edits = False
    with path.open(encoding="utf-8") as stream:
        for number, line in _lines(stream):
            request = _parse_line(line, number)
            if count == 0:
                edits = "image" in request
            count += 1
    return count, edits


# -- progress -----------------------------------------------------------------------------


class _Progress:
    """A tqdm bar on stderr when tqdm is installed, else a plain line every few seconds."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self._bar: Any = None
        self._last_line = 0.0
        self._enabled = enabled
        if not enabled:
            return
        try:
            from tqdm import tqdm  # noqa: PLC0415  (the optional cli extra)
        except ImportError:
            return
        self._bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, progress: BatchProgress) -> None:
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.n = progress.done
            self._bar.set_postfix(
                ok=progress.succeeded + progress.resumed,
                failed=progress.failed,
                in_flight=progress.in_flight,
                refresh=False,
            )
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last_line < _PLAIN_INTERVAL and progress.done != progress.total:
            return
        self._last_line = now
        total = "?" if progress.total is None else f"{progress.total:,}"
        eta = "" if progress.eta is None else f", ETA {progress.eta:.0f}s"
        print(
            f"batch: {progress.done:,}/{total} done ({progress.succeeded + progress.resumed:,} ok, "
            f"{progress.failed:,} failed), {progress.rate:.1f} img/s{eta}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- running ------------------------------------------------------------------------------


def _summary(result: BatchResult, out_dir: Path) -> str:
    counts = {"ok": 0, "resumed": 0, "failed": 0, "skipped": 0}
    for item in result:
        counts[item.status] += 1
    rate = (counts["ok"] + counts["failed"]) / result.elapsed if result.elapsed > 0 else 0.0
    rows = [
        ("items", f"{len(result):,}"),
        ("ok", f"{counts['ok'] + counts['resumed']:,} ({counts['resumed']:,} from earlier runs)"),
        ("failed", f"{counts['failed']:,}"),
        ("skipped", f"{counts['skipped']:,}"),
        ("elapsed", f"{result.elapsed:.1f}s ({rate:.1f} img/s)"),
        ("manifest", str(out_dir / MANIFEST_NAME)),
    ]
    lines = ["batch summary:"] + [f"  {name:<9} {value}" for name, value in rows]
    failed: list[BatchItem] = result.failed
    lines.extend(f"  failed #{item.index}: {item.error}" for item in failed[:_LISTED_FAILURES])
    if len(failed) > _LISTED_FAILURES:
        lines.append(f"  ... and {len(failed) - _LISTED_FAILURES:,} more (see the manifest)")
    if result.aborted is not None:
        lines.append(f"  stopped: {result.aborted.cause}")
    if not result.ok:
        lines.append("  rerun the same command to retry what did not finish")
    return "\n".join(lines)


async def _run_batch(args: argparse.Namespace) -> int:
    total: int | None = None
    edits = False
    if args.input != "-":
        source = Path(args.input)
        loop = asyncio.get_running_loop()
        try:
            total, edits = await loop.run_in_executor(None, _scan, source)
            stream: IO[str] = await loop.run_in_executor(None, _open_text, source)
        except (OSError, UnicodeDecodeError) as exc:
            raise FriendliUsageError(
                f"cannot read INPUT {str(source)!r}: {exc}; pass a UTF-8 text or JSONL file"
            ) from None
    else:
        stream = sys.stdin
    progress = _Progress(total, enabled=not args.no_progress)
    try:
        requests = _requests(stream)
        if args.input == "-":
            first = next(requests, None)
            edits = first is not None and "image" in first
            requests = _chain(first, requests)
        async with make_client(args) as client:
            image = client.container.image
            start: Callable[..., Any] = image.edit_batch if edits else image.generate_batch
            result: BatchResult = await start(
                requests,
                concurrency=args.concurrency,
                rps=args.rps,
                out_dir=args.out_dir,
                resume=args.resume,
                on_progress=progress,
                total=total,
            )
    finally:
        progress.close()
        if stream is not sys.stdin:
            stream.close()
    print(_summary(result, args.out_dir))
    if result.ok:
        return EXIT_OK
    if result.aborted is not None and isinstance(result.aborted.cause, FriendliConnectionError):
        return EXIT_UNREACHABLE
    return EXIT_FAILED


def _open_text(path: Path) -> IO[str]:
    return path.open(encoding="utf-8")


def _chain(first: dict[str, Any] | None, rest: Iterator[dict[str, Any]]) -> Iterator[Any]:
    if first is not None:
        yield first
        yield from rest
