"""``friendli-image batch``: run a file of requests into a directory, resumably.

INPUT is read lazily, one line per request, and its first line sets the rules for the
rest: a JSON object makes it JSONL (every line a JSON object of arguments; with an
``"image"`` key the whole file is edits, without it generations), plain text makes it a
list of prompts. A line that breaks the rules is an error naming both lines. Blank lines
are skipped. ``-`` reads standard input. A ``*.csv`` INPUT is CSV instead (``_csv``):
a header row names the columns. Images and ``manifest.jsonl`` go to
``--out-dir``; running the same command again resumes (items done are skipped, wherever
they sit in INPUT now), so Ctrl-C or a crash loses nothing; images of earlier runs that
match no line of INPUT are kept, listed in ``unmatched.jsonl`` and counted in the
summary. ``--no-resume`` moves an earlier run's manifests and images into
``previous-run-<time>/`` first, so a fresh manifest never sits beside old images.

Exit status: 0 every item has an image; 1 some failed or were skipped; 2 bad arguments
or input; 3 the batch stopped because the server could not be reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final

import orjson

from friendli_image._batch import Batch
from friendli_image._batch_models import (
    OUTPUT_FORMATS,
    BatchItem,
    BatchProgress,
    EndpointStats,
)
from friendli_image._exceptions import (
    FriendliConnectionError,
    FriendliUsageError,
    FriendliValidationError,
)
from friendli_image._gallery import GALLERY_NAME, write_gallery
from friendli_image._store import MANIFEST_NAME, set_aside_previous_run

from ._csv import CsvInput, is_csv
from ._options import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    add_client_options,
    make_client,
    out_location,
    within,
)
from ._ray import add_ray_options, run_ray_batch
from ._watch import RUN_NAME, JobWatch, fingerprint

__all__ = ["add_batch_command"]

#: Without tqdm, a plain progress line is printed this often (seconds).
_PLAIN_INTERVAL: Final = 2.0
#: Failures listed in the summary (all of them are in the manifest).
_LISTED_FAILURES: Final = 10
_IMAGE_KEYS: Final = ("image", "control_images")
_DESCRIPTION: Final = """\
Run every request of INPUT, writing images and manifest.jsonl into --out-dir.

INPUT has one request per line, and its first line decides the kind of file: a JSON
object of generate arguments, e.g. {"prompt": "a red fox", "seed": 7}, makes it JSONL
(every line must then be such an object; with an "image" key on the first line the
file is edits and every line needs one; image values may be local paths, URLs or
data: URIs), plain text makes every line a prompt. Blank lines are skipped; '-' reads
standard input. A file named *.csv is CSV: its header row names the columns, a
'prompt' column is required and the others are request fields (seed, model,
num_inference_steps, image, ...); an empty cell leaves its field out.

Running the same command again resumes: an item is its request (and its occurrence
among identical lines), not its line number, so items already made, with their file
intact, are skipped wherever they sit in INPUT now, and counted apart from the rate.
Images of earlier runs that match no line of INPUT (say, after --steps changed) are
kept, listed in DIR/unmatched.jsonl and counted in the summary. --no-resume moves the
earlier run's manifests and images into DIR/previous-run-<time>/ and starts over.
--out-dir may be a URL of any fsspec file system (s3://bucket/run, needs fsspec and
its file system's package): images and shards are written there, the manifests when
the run ends (--no-resume and --gallery need a local --out-dir).
When the server is unreachable, the first item to exhaust its retries fails, the
batch stops, and the rest (those in flight included) are skipped.

Exit status: 0 every item has an image; 1 some failed or were skipped; 2 bad
arguments or input; 3 the server could not be reached; 130 interrupted (rerun to
resume)."""


def add_batch_command(commands: Any) -> None:
    """Register the ``batch`` subcommand on the ``friendli-image`` parser."""
    batch = commands.add_parser(
        "batch",
        help="run a file of prompts or JSON requests into a directory (resumable)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument("input", metavar="INPUT", help="JSONL, CSV or text file, '-' for stdin")
    batch.add_argument(
        "--out-dir",
        required=True,
        type=str,  # a Path would turn file:///x into file:/x
        metavar="DIR",
        help="where images go: a folder, or a URL (s3://bucket/run)",
    )
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
        help="skip items already done in --out-dir (default); --no-resume moves the "
        "earlier run into DIR/previous-run-<time>/ and starts over",
    )
    batch.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        default="files",
        help="files: one image per item and metadata.jsonl (datasets' imagefolder); "
        "webdataset: tar shards; parquet: Parquet shards (default: files)",
    )
    batch.add_argument(
        "--shard-size",
        type=int,
        default=1000,
        metavar="N",
        help="items per shard for webdataset and parquet (1000)",
    )
    batch.add_argument(
        "--variants",
        dest="n",
        type=int,
        default=1,
        metavar="N",
        help="images per request, each with its own seed derived from the request (the "
        "request's seed first): generate_batch(n=N) (1)",
    )
    batch.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw progress on stderr (default: only when stderr is a terminal)",
    )
    batch.add_argument(
        "--gallery",
        action="store_true",
        help=f"write DIR/{GALLERY_NAME}, a page of the images, at the end",
    )
    batch.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the job's metrics for Prometheus at http://HOST:PORT/metrics while it "
        "runs (needs friendli-image[prometheus])",
    )
    batch.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="the address --metrics-port listens on (127.0.0.1; 0.0.0.0 for every interface)",
    )
    add_client_options(batch)
    add_ray_options(batch)
    batch.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> Any:
    if args.ray and is_csv(args.input):
        raise FriendliUsageError(
            "--ray reads text or JSONL INPUT, not CSV; write the rows as JSONL "
            '({"prompt": ..., "seed": ...} per line), or run without --ray'
        )
    if args.ray:
        return run_ray_batch(args, _Input)
    args.out_dir = out_location(args.out_dir)
    if not args.resume and not isinstance(args.out_dir, Path):
        raise FriendliUsageError(
            f"--no-resume moves an earlier run aside in a local --out-dir; for the URL "
            f"{args.out_dir!r}, pass a new --out-dir (or delete the earlier run there)"
        )
    return _run_batch(args)


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


def _json_object(line: str | bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class _Input:
    """The rules of an INPUT, set by its first request line.

    JSONL or prompts: a first line that is a JSON object makes every line one; a plain
    first line makes every line a prompt (a JSON object there is a mistake, not a
    prompt). Generations or edits: the first JSON line's ``"image"`` key decides, as
    one batch runs one of the two.
    """

    def __init__(self) -> None:
        self.first = 0
        self.jsonl = False
        self.edits = False

    def parse(self, line: str, number: int) -> dict[str, Any]:
        looks_json = line.lstrip().startswith("{")
        if not self.first:
            self.first, self.jsonl = number, looks_json
        if not self.jsonl:
            if looks_json and _json_object(line) is not None:
                raise FriendliValidationError(
                    f"INPUT line {number}",
                    f"is a JSON object, but line {self.first} is plain text, which makes "
                    "every line a prompt; write every line as JSON, or none",
                )
            return {"prompt": line}
        if not looks_json:
            raise FriendliValidationError(
                f"INPUT line {number}",
                f"is plain text, but line {self.first} is JSON, which makes the file JSONL; "
                f'write it as {{"prompt": {orjson.dumps(line).decode()}}}',
            )
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise FriendliValidationError(
                f"INPUT line {number}", f"is not valid JSON ({exc}); fix the line and rerun"
            ) from None
        if not isinstance(request, dict):  # pragma: no cover - a line starting with { is an object
            raise FriendliValidationError(f"INPUT line {number}", "must be a JSON object")
        edits = "image" in request
        if number == self.first:
            self.edits = edits
        elif edits != self.edits:
            kind, has = ("edits", "has") if self.edits else ("generations", "has no")
            raise FriendliValidationError(
                f"INPUT line {number}",
                f'{"has" if edits else "has no"} "image", but line {self.first} {has} one, '
                f"which makes this file a batch of {kind}; put generations and edits in "
                "separate files",
            )
        for key in _IMAGE_KEYS:
            if key in request:
                request[key] = _local_images(request[key])
        return request


def _lines(stream: IO[str]) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(stream, start=1):
        line = raw.rstrip("\r\n")
        if line.strip():
            yield number, line


def _requests(stream: IO[str], rules: _Input) -> Iterator[dict[str, Any]]:
    for number, line in _lines(stream):
        yield rules.parse(line, number)


def _scan(path: Path) -> tuple[int, bool]:
    """Count the requests of a file and check every line before anything is sent."""
    if is_csv(path.name):
        with _open_text(path) as stream:
            table = CsvInput(stream, _local_images)
            return sum(1 for _ in table), table.edits
    count = 0
    rules = _Input()
    with path.open(encoding="utf-8") as stream:
        for number, line in _lines(stream):
            rules.parse(line, number)
            count += 1
    return count, rules.edits


# -- progress -----------------------------------------------------------------------------


def _counts(progress: BatchProgress) -> str:
    resumed = f", {progress.resumed:,} resumed" if progress.resumed else ""
    skipped = f", {progress.skipped:,} skipped" if progress.skipped else ""
    return f"{progress.succeeded:,} ok, {progress.failed:,} failed{resumed}{skipped}"


def _rate(progress: BatchProgress) -> str:
    """The rate and ETA of this run: resumed items are not work done now."""
    eta = "" if progress.eta is None else f", ETA {progress.eta:.0f}s"
    return f"{progress.rate:.1f} img/s{eta}"


class _Progress:
    """A tqdm bar on stderr when tqdm is installed, else a plain line every few seconds.

    The bar's rate and ETA are the batch's own (`BatchProgress`: items of this run
    only), not tqdm's, so the last one drawn is the one the summary prints.
    """

    def __init__(self, total: int | None, enabled: bool) -> None:
        self._bar: Any = None
        self._last_line = 0.0
        self._enabled = enabled
        self.last: BatchProgress | None = None
        if not enabled:
            return
        try:
            from tqdm import tqdm  # noqa: PLC0415  (the optional cli extra)
        except ImportError:
            return
        counter = "{n_fmt}" if total is None else "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}"
        self._bar = tqdm(
            total=total,
            unit="img",
            dynamic_ncols=True,
            file=sys.stderr,
            bar_format="batch: " + counter + " [{elapsed}{postfix}]",
        )

    def __call__(self, progress: BatchProgress) -> None:
        self.last = progress
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.n = progress.done
            self._bar.set_postfix_str(
                f"{_counts(progress)}, {progress.in_flight} in flight, {_rate(progress)}",
                refresh=False,
            )
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last_line < _PLAIN_INTERVAL and progress.done != progress.total:
            return
        self._last_line = now
        total = "?" if progress.total is None else f"{progress.total:,}"
        print(
            f"batch: {progress.done:,}/{total} done ({_counts(progress)}), {_rate(progress)}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- running ------------------------------------------------------------------------------


class _Tally:
    """What the summary needs of a batch, counted as its items arrive: the counts and
    the first failures in input order (every failure is in the manifest), never the
    items themselves, so memory stays flat however long INPUT is."""

    def __init__(self) -> None:
        self.counts = {"ok": 0, "resumed": 0, "failed": 0, "skipped": 0}
        self.failures: list[BatchItem] = []

    def add(self, item: BatchItem) -> None:
        self.counts[item.status] += 1
        if item.status == "failed":
            failures = self.failures
            if len(failures) < _LISTED_FAILURES or item.index < failures[-1].index:
                bisect.insort(failures, item, key=_index_of)
                del failures[_LISTED_FAILURES:]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def ok(self) -> bool:
        return self.counts["failed"] == self.counts["skipped"] == 0


def _index_of(item: BatchItem) -> int:
    return item.index


def _summary(tally: _Tally, batch: Batch, out_dir: Path | str, final: BatchProgress | None) -> str:
    counts = tally.counts
    if final is not None:
        # The very numbers the progress bar ended on.
        elapsed, rate = final.elapsed, final.rate
    else:  # pragma: no cover - the batch always reports once at the end
        elapsed = batch.progress().elapsed
        rate = (counts["ok"] + counts["failed"]) / elapsed if elapsed > 0 else 0.0
    rows = [
        ("items", f"{tally.total:,}"),
        ("ok", f"{counts['ok']:,}"),
        ("resumed", f"{counts['resumed']:,} from earlier runs (not counted in the rate)"),
        ("failed", f"{counts['failed']:,}"),
        ("skipped", f"{counts['skipped']:,}"),
        ("elapsed", f"{elapsed:.1f}s ({rate:.1f} img/s)"),
        ("manifest", within(out_dir, MANIFEST_NAME)),
    ]
    unmatched = batch.unmatched
    if unmatched is not None and unmatched.count:
        rows.append(
            (
                "unmatched",
                f"{unmatched.count:,} image(s) of earlier runs match no item of this input: "
                f"kept in {out_dir}, listed in {unmatched.listing}",
            )
        )
    lines = ["batch summary:"] + [f"  {name:<9} {value}" for name, value in rows]
    listed = tally.failures
    lines.extend(f"  failed #{item.index}: {item.error}" for item in listed)
    if counts["failed"] > len(listed):
        lines.append(f"  ... and {counts['failed'] - len(listed):,} more (see the manifest)")
    aborted = batch.aborted
    if aborted is not None:
        if any(item.index == aborted.index for item in listed):
            lines.append(
                f"  stopped: after failed #{aborted.index}, which every other item would "
                "meet; the rest were skipped"
            )
        else:
            lines.append(f"  stopped: {aborted.cause}")
    if not tally.ok:
        lines.append("  rerun the same command to retry what did not finish")
    return "\n".join(lines)


def _endpoint_table(endpoints: Sequence[EndpointStats]) -> str:
    """One line per endpoint of a fleet: what it served, how it failed, how fast."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    lines = [f"  {'endpoint':<32} {'ok':>7} {'failed':>7} {'p50 ms':>7} {'p95 ms':>7}  failures"]
    for stats in endpoints:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(stats.failures.items()))
        ejected = " (ejected)" if stats.ejected_until is not None else ""
        lines.append(
            f"  {stats.url:<32} {stats.successes:>7,} {sum(stats.failures.values()):>7,} "
            f"{ms(stats.latency_p50):>7} {ms(stats.latency_p95):>7}  {kinds or '-'}{ejected}"
        )
    return "endpoints:\n" + "\n".join(lines)


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
    enabled = sys.stderr.isatty() if args.progress is None else args.progress
    watch = JobWatch(
        args.out_dir,
        args.input,
        None
        if args.input == "-"
        else await asyncio.get_running_loop().run_in_executor(None, fingerprint, source),
    )
    if args.metrics_port is not None:
        try:
            metrics_page = watch.serve(args.metrics_port, args.metrics_host)
        except FriendliUsageError:
            if stream is not sys.stdin:
                stream.close()
            raise
        print(f"friendli-image: metrics at {metrics_page}", file=sys.stderr)
    progress = _Progress(total, enabled=enabled)
    tally = _Tally()
    finished = "interrupted"
    try:
        rules = _Input()
        requests = (
            iter(CsvInput(stream, _local_images))
            if is_csv(args.input)
            else _requests(stream, rules)
        )
        if args.input == "-":
            first = next(requests, None)
            edits = rules.edits
            requests = _chain(first, requests)
        if not args.resume:
            moved = await asyncio.get_running_loop().run_in_executor(
                None, set_aside_previous_run, args.out_dir
            )
            if moved is not None:
                print(
                    f"friendli-image: --no-resume: moved the earlier run's manifest and "
                    f"{moved[1]:,} image(s) to {moved[0]}",
                    file=sys.stderr,
                )
        async with make_client(args, watch.hooks) as client:
            image = client.container.image
            start: Callable[..., Any] = image.edit_batch if edits else image.generate_batch
            batch: Batch = start(
                requests,
                concurrency=args.concurrency,
                rps=args.rps,
                out_dir=args.out_dir,
                resume=args.resume,
                output_format=args.output_format,
                shard_size=args.shard_size,
                n=args.n,
                on_progress=watch.on_progress(progress),
                total=total,
            )
            # Counted as they arrive: a summary of a million items holds none of them.
            async with batch:
                async for item in batch:
                    tally.add(item)
            endpoints = client.endpoints
        finished = "completed"
    except Exception:
        finished = "failed"
        raise
    finally:
        progress.close()
        # Written however the job ends (Ctrl-C included), beside the manifest.
        await asyncio.get_running_loop().run_in_executor(None, watch.finish, finished)
        if stream is not sys.stdin:
            stream.close()
    print(_summary(tally, batch, args.out_dir, progress.last))
    print(f"  run       {within(args.out_dir, RUN_NAME)}")
    if endpoints:
        print(_endpoint_table(endpoints))
    if args.gallery and isinstance(args.out_dir, Path):
        page = await asyncio.get_running_loop().run_in_executor(None, write_gallery, args.out_dir)
        print(f"  gallery   {page}")
    elif args.gallery:
        print("  gallery   not written: the gallery needs a local --out-dir")
    if tally.ok:
        return EXIT_OK
    if batch.aborted is not None and isinstance(batch.aborted.cause, FriendliConnectionError):
        return EXIT_UNREACHABLE
    return EXIT_FAILED


def _open_text(path: Path) -> IO[str]:
    # The csv module reads line breaks itself (a quoted cell may hold one).
    return path.open(encoding="utf-8", newline="" if is_csv(path.name) else None)


def _chain(first: dict[str, Any] | None, rest: Iterator[dict[str, Any]]) -> Iterator[Any]:
    if first is not None:
        yield first
        yield from rest
