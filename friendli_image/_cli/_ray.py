"""``friendli-image batch --ray``: the batch command on a Ray cluster (``friendli-image[ray]``).

Ray reads INPUT, not the driver: the file is cut into byte ranges, and Ray tasks parse
them twice. The first pass checks every line against the rules of the local batch (the
first line decides text or JSONL, generations or edits; an error names the line before
anything is sent) and returns, per range, its line count and a hash of each distinct
request; the driver keeps only these (8 bytes per distinct request). The second pass
makes the rows: each request, its index in INPUT, and its id, its occurrence among
identical requests (so that with the request's digest in the image name an item is the
same one wherever its line moves). `friendli_image.ray.ImageStage` runs on an actor
pool, images go to ``--out-dir`` (a path or any fsspec URI) and the output rows to
``<out-dir>/manifest/`` as parquet, which the summary and ``gallery`` read back. A rerun
skips every request whose image exists, so a killed job resumes, and an inserted or
moved line costs nothing.

A local cluster is started for the command and stopped with it; a watchdog process
stops it when the command dies without stopping it (``kill -9``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import importlib
import inspect
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Protocol

from friendli_image._exceptions import FriendliUsageError, FriendliValidationError
from friendli_image._gallery import write_gallery
from friendli_image._requests import EditRequest, GenerateRequest
from friendli_image._resources import EDITS_PATH, GENERATIONS_PATH
from friendli_image._store import (
    RAY_INDEX_COLUMN,
    RAY_MANIFEST_DIR,
    Location,
    request_digest,
    variant_seeds,
)

from ._options import EXIT_FAILED, EXIT_OK, out_uri, token_from_args

__all__ = ["add_ray_options", "run_ray_batch"]

#: The line column (the request's index in INPUT) and the id column (its occurrence
#: among identical requests): names no request field has.
LINE_COLUMN: Final = RAY_INDEX_COLUMN
ID_COLUMN: Final = "_item"
MANIFEST_DIR: Final = RAY_MANIFEST_DIR
_LISTED_FAILURES: Final = 10
#: INPUT is cut into ranges of this many bytes at most (and at least), about four per
#: actor: enough blocks for every actor, few enough tasks.
_RANGE_BYTES: Final = (1024, 4 * 1024 * 1024)
#: How a line stands against the rules (the first line of each kind is checked).
_TEXT, _JSON, _EDIT, _BAD_JSON = "text", "json", "edit", "bad json"


class _Rules(Protocol):
    """The local batch's parser of INPUT lines (``_batch._Input``)."""

    def parse(self, line: str, number: int) -> dict[str, Any]: ...


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--ray``, ``--address`` and ``--actors`` to the batch command."""
    group = parser.add_argument_group("Ray (pip install 'friendli-image[ray]')")
    group.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray Data; --out-dir (and INPUT) may then be any fsspec URI (s3://...)",
    )
    group.add_argument(
        "--address",
        default=None,
        help="the Ray cluster to join (default: $RAY_ADDRESS, else a local one)",
    )
    group.add_argument(
        "--actors", type=int, default=2, metavar="N", help="actors making requests (2)"
    )


# -- reading INPUT, in Ray tasks ------------------------------------------------------------


@contextlib.contextmanager
def _working_directory(path: str) -> Iterator[None]:
    """Run in the driver's directory, where INPUT's relative image paths point."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _range_lines(uri: str, start: int, end: int) -> Iterator[bytes]:
    """Every line (blank ones too, end of line removed) that starts in ``[start, end)``."""
    import fsspec  # noqa: PLC0415  (the optional ray extra)

    with fsspec.open(uri, "rb") as handle:
        if start > 0:
            handle.seek(start - 1)
            handle.readline()  # the line that started before this range
        while handle.tell() < end:
            raw = handle.readline()
            if not raw:
                return
            yield raw.rstrip(b"\r\n")


def _row(request: dict[str, Any]) -> dict[str, Any]:
    """The request as a row: local image files read into bytes."""
    return {
        key: value.read_bytes() if isinstance(value, Path) else value
        for key, value in request.items()
    }


def _variants(
    request: dict[str, Any], row: dict[str, Any], occurrence: int, n: int
) -> list[dict[str, Any]]:
    """The rows of a line's ``n`` variants, each with the seed the local batch gives
    that variant (`variant_seeds`: the request's own seed first)."""
    if n == 1:
        return [row]
    edit = "image" in request
    try:
        model = (EditRequest if edit else GenerateRequest)(**request)
    except (FriendliValidationError, TypeError, ValueError):
        return [row] * n  # each fails in the stage, as the local batch fails them
    digest = request_digest(EDITS_PATH if edit else GENERATIONS_PATH, model)
    return [{**row, "seed": seed} for seed in variant_seeds(digest, occurrence, model.seed, n)]


def _same(row: dict[str, Any]) -> bytes:
    """Equal for identical requests: what occurrences count."""
    return hashlib.sha256(repr(sorted(row.items())).encode()).digest()[:8]


def _scan_range(spec: dict[str, Any]) -> dict[str, Any]:
    """Pass 1 over a range: its lines, the first line of each kind, its keys and the
    8-byte hashes of its distinct requests with their counts."""
    import numpy as np  # noqa: PLC0415  (a dependency of Ray)

    rules: Callable[[], _Rules] = spec["rules"]
    lines = 0
    firsts: dict[str, tuple[int, str]] = {}
    keys: set[str] = set()
    counts: Counter[bytes] = Counter()
    with _working_directory(spec["cwd"]):
        for number, raw in enumerate(_range_lines(spec["uri"], spec["start"], spec["end"])):
            lines += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                firsts.setdefault("not utf-8", (number, str(exc)))
                continue
            if not line.strip():
                continue
            try:
                request = rules().parse(line, 1)  # alone: the line's own kind
            except FriendliValidationError:
                kind, request = _BAD_JSON, {"prompt": line}
            else:
                looks_json = line.lstrip().startswith("{")
                kind = (_EDIT if "image" in request else _JSON) if looks_json else _TEXT
            firsts.setdefault(kind, (number, line))
            row = _row(request)
            keys.update(row)
            counts[_same(row)] += 1
    hashes = np.frombuffer(b"".join(counts), dtype=np.uint64)
    return {
        "lines": lines,
        "requests": sum(counts.values()),
        "firsts": firsts,
        "keys": sorted(keys),
        "hashes": hashes,
        "counts": np.fromiter(counts.values(), dtype=np.int64, count=len(counts)),
    }


def _parse_ranges(
    batch: dict[str, Any], parts: list[dict[str, Any]], rules: Callable[[], _Rules]
) -> dict[str, list[Any]]:
    """Pass 2: the rows of each range (``n`` per line: its variants), with their index
    and their id."""
    columns: dict[str, list[Any]] = {}
    for part in batch["part"]:
        spec = parts[int(part)]
        parser = rules()
        parser.parse(spec["first_line"], spec["first_number"])  # the file's rules
        keys = spec["keys"]
        for key in (*keys, ID_COLUMN, LINE_COLUMN):
            columns.setdefault(key, [])
        index = spec["index"]
        earlier: dict[int, int] = spec["earlier"]
        seen: Counter[bytes] = Counter()
        with _working_directory(spec["cwd"]):
            lines = _range_lines(spec["uri"], spec["start"], spec["end"])
            for number, raw in enumerate(lines, start=spec["line"]):
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                request = parser.parse(line, number)
                row = _row(request)
                same = _same(row)
                occurrence = earlier.get(_hash_int(same), 0) + seen[same]
                for variant in _variants(request, row, occurrence, spec["n"]):
                    for key in keys:
                        columns[key].append(variant.get(key))
                    columns[ID_COLUMN].append(occurrence)
                    columns[LINE_COLUMN].append(index)
                    index += 1
                seen[same] += 1
    return columns


def _hash_int(same: bytes) -> int:
    return int.from_bytes(same, sys.byteorder)


# -- the driver's side: ranges, checks, occurrences --------------------------------------


def _ranges(uri: str, actors: int) -> list[tuple[int, int]]:
    import fsspec  # noqa: PLC0415  (the optional ray extra)

    fs, path = fsspec.core.url_to_fs(uri)
    size = int(fs.size(path))
    low, high = _RANGE_BYTES
    step = max(low, min(high, math.ceil(size / (4 * actors))))
    return [(start, min(size, start + step)) for start in range(0, size, step)] or [(0, 0)]


def _check_rules(scans: list[dict[str, Any]], rules: Callable[[], _Rules]) -> tuple[str, int]:
    """Check the first line of each kind, in file order, as the local batch checks every
    line (the first error is the file's first error); return the first request line and
    its number."""
    firsts: list[tuple[int, str, str]] = []
    before = 0
    for scan in scans:
        for kind, (number, line) in scan["firsts"].items():
            firsts.append((before + number + 1, kind, line))
        before += scan["lines"]
    checker = rules()
    first: tuple[str, int] | None = None
    for number, kind, line in sorted(firsts):
        if kind == "not utf-8":
            raise FriendliUsageError(
                f"INPUT line {number} is not UTF-8 ({line}); pass a UTF-8 file"
            )
        checker.parse(line, number)
        first = first or (line, number)
    return first or ("", 0)


def _occurrences_before(scans: list[dict[str, Any]]) -> list[dict[int, int]]:
    """For each range, how many of each of its requests the earlier ranges hold (only
    requests found in more than one range are listed)."""
    import numpy as np  # noqa: PLC0415  (a dependency of Ray)

    every = np.concatenate([scan["hashes"] for scan in scans])
    unique, ranges = np.unique(every, return_counts=True)
    shared = unique[ranges > 1]
    running: Counter[int] = Counter()
    before = []
    for scan in scans:
        mask = np.isin(scan["hashes"], shared)
        hashes = scan["hashes"][mask].tolist()
        before.append({value: running[value] for value in hashes})
        running.update(dict(zip(hashes, scan["counts"][mask].tolist(), strict=True)))
    return before


def _on_node(map_batches: Any, node_id: str) -> dict[str, Any]:
    """``map_batches`` options that run its tasks on the driver's node, where a local
    INPUT (and its images) are: a label selector (Ray 2.49+), else node affinity."""
    if "label_selector" in inspect.signature(map_batches).parameters:
        return {"label_selector": {"ray.io/node-id": node_id}}
    from ray.util.scheduling_strategies import (  # noqa: PLC0415
        NodeAffinitySchedulingStrategy,
    )

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def _dataset(
    ray: Any, uri: str, local: bool, rules: Callable[[], _Rules], *, actors: int, n: int
) -> tuple[Any, list[str], int]:
    """The rows of INPUT (``n`` variants per line) as a lazy Dataset, its request columns
    and its number of rows."""
    node = ray.get_runtime_context().get_node_id()
    common = {"uri": uri, "cwd": os.getcwd(), "rules": rules}
    specs = [{**common, "start": s, "end": e} for s, e in _ranges(uri, actors)]
    scan = ray.remote(_scan_range)
    if local:
        from ray.util.scheduling_strategies import (  # noqa: PLC0415
            NodeAffinitySchedulingStrategy,
        )

        scan = scan.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    scans = ray.get([scan.remote(spec) for spec in specs])
    first_line, first_number = _check_rules(scans, rules)
    keys = sorted({key for scan in scans for key in scan["keys"]} | ({"seed"} if n > 1 else set()))
    line = index = 0
    parts = []
    for spec, result, earlier in zip(specs, scans, _occurrences_before(scans), strict=True):
        if result["requests"]:
            parts.append(
                {
                    **spec,
                    "line": line + 1,
                    "index": index * n,
                    "n": n,
                    "earlier": earlier,
                    "keys": keys,
                    "first_line": first_line,
                    "first_number": first_number,
                }
            )
        line += result["lines"]
        index += result["requests"]
    rows = ray.data.range(len(parts), override_num_blocks=max(1, len(parts)))
    rows = rows.rename_columns({"id": "part"})
    rows = rows.map_batches(
        _parse_ranges,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"parts": parts, "rules": rules},
        **(_on_node(rows.map_batches, node) if local else {}),
    )
    return rows, keys, index * n


# -- the cluster ----------------------------------------------------------------------------


@contextlib.contextmanager
def _cluster(address: str | None) -> Iterator[Any]:
    """Ray, joined (``--address``, ``$RAY_ADDRESS``) or a local cluster of this command's
    own, stopped when the command ends, and by a watchdog when it is killed."""
    try:
        import ray  # noqa: PLC0415  (the optional ray extra)
    except ImportError as exc:
        raise FriendliUsageError(
            f"--ray needs Ray ({exc}): pip install 'friendli-image[ray]'"
        ) from None
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()
        return
    # Every process of the local cluster started from here on carries this mark in its
    # environment (Ray's agents excepted), so the watchdog also finds the workers Ray
    # starts later, which no list taken at the start holds.
    os.environ[_RUN_MARK] = secrets.token_hex(8)
    try:
        # More logical CPUs than cores: the actors wait on the network, not the CPU.
        ray.init(num_cpus=max(8, 2 * (os.cpu_count() or 1)), include_dashboard=False)
        with _watchdog(os.environ[_RUN_MARK]):
            try:
                yield ray
            finally:
                ray.shutdown()
    finally:
        os.environ.pop(_RUN_MARK, None)


#: The environment variable marking the processes of a command's local cluster.
_RUN_MARK: Final = "FRIENDLI_IMAGE_RAY_RUN"

#: The watchdog: reads "pid create_time" lines while the command runs; at end of input
#: (the command ended, however: even kill -9 closes the pipe) it stops those processes
#: and every process whose environment carries the run's mark (argv[2], under argv[3]).
_WATCHDOG: Final = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import psutil
processes = []
for line in sys.stdin:
    pid, created = line.split()
    try:
        process = psutil.Process(int(pid))
        if abs(process.create_time() - float(created)) < 0.01:
            processes.append(process)
    except psutil.Error:
        pass
listed = {process.pid for process in processes}
for process in psutil.process_iter():
    try:
        if process.pid not in listed and process.environ().get(sys.argv[3]) == sys.argv[2]:
            processes.append(process)
    except psutil.Error:
        pass
for process in processes:
    try:
        process.terminate()
    except psutil.Error:
        pass
gone, alive = psutil.wait_procs(processes, timeout=3)
for process in alive:
    try:
        process.kill()
    except psutil.Error:
        pass
"""


@contextlib.contextmanager
def _watchdog(mark: str) -> Iterator[None]:
    """Stop the local cluster's processes when the command ends, even by ``kill -9``.

    Ray stops its core processes with the driver, but not its agents, nor a worker it
    was still starting: a process of its own, in a session of its own, is told the ids
    of the processes started so far (the agents among them) and the run's ``mark``
    (which every later one carries in ``_RUN_MARK``), and stops them all when the
    command's end closes its pipe. (psutil, which Ray ships, finds them; without it, no
    watchdog.)
    """
    try:
        psutil = importlib.import_module("psutil")
    except ImportError:  # pragma: no cover - Ray ships psutil
        yield
        return
    where = str(Path(str(psutil.__file__)).parent.parent)
    watchdog = subprocess.Popen(  # noqa: S603  (this Python, a fixed script)
        [sys.executable, "-c", _WATCHDOG, where, mark, _RUN_MARK],
        env={name: value for name, value in os.environ.items() if name != _RUN_MARK},
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
    )
    assert watchdog.stdin is not None  # noqa: S101
    try:
        for process in psutil.Process().children(recursive=True):
            if process.pid != watchdog.pid:
                with contextlib.suppress(psutil.Error):
                    watchdog.stdin.write(f"{process.pid} {process.create_time()}\n")
        watchdog.stdin.flush()
        yield
    finally:
        watchdog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(10)


# -- the command ----------------------------------------------------------------------------


def _input_uri(value: str, spool: Path) -> tuple[str, bool]:
    """INPUT as a URI Ray tasks can read, and whether it is a local file; stdin is copied
    to ``spool`` first (streaming)."""
    if value == "-":
        with spool.open("wb") as target:
            shutil.copyfileobj(sys.stdin.buffer, target, 1 << 20)
        return str(spool), True
    uri = out_uri(value)
    if "://" in uri and not uri.startswith("file://"):
        return uri, False
    path = Path(uri.removeprefix("file://")).resolve()
    if not path.is_file():
        raise FriendliUsageError(f"cannot read INPUT {value!r}: no such file")
    return str(path), True


def _summary(manifest: str, fs: Any) -> tuple[Counter[str], list[dict[str, Any]]]:
    """The statuses of the manifest and its first failures (by index), read in batches."""
    import pyarrow.compute  # noqa: PLC0415
    import pyarrow.dataset  # noqa: PLC0415
    from pyarrow.fs import FSSpecHandler, PyFileSystem  # noqa: PLC0415

    data = pyarrow.dataset.dataset(
        manifest, filesystem=PyFileSystem(FSSpecHandler(fs)), format="parquet"
    )
    statuses: Counter[str] = Counter()
    failed: list[tuple[int, str, str]] = []
    columns = ["status", LINE_COLUMN, "error_type", "error"]
    # Read in this thread, with no read-ahead: batches and buffers pyarrow's I/O threads
    # still held at exit are freed during interpreter shutdown, where Arrow aborts the
    # process (apache/arrow#34314) after the summary has been printed.
    batches = data.to_batches(
        columns=columns,
        use_threads=False,
        batch_readahead=0,
        fragment_readahead=0,
        fragment_scan_options=pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False),
    )
    for batch in batches:
        statuses.update(batch.column(0).to_pylist())
        for row in batch.filter(pyarrow.compute.equal(batch.column(0), "failed")).to_pylist():
            entry = (-row[LINE_COLUMN], row["error_type"], row["error"])
            if len(failed) < _LISTED_FAILURES:
                heapq.heappush(failed, entry)
            else:
                heapq.heappushpop(failed, entry)
    first = sorted((-line, kind, error) for line, kind, error in failed)
    return statuses, [{LINE_COLUMN: n, "error_type": k, "error": e} for n, k, e in first]


def run_ray_batch(args: argparse.Namespace, rules: Callable[[], _Rules]) -> int:
    """Run the batch command on Ray; ``rules()`` parses INPUT lines as the local batch does."""
    if args.actors < 1:
        raise FriendliUsageError(f"--actors must be >= 1, got {args.actors}")
    import fsspec  # noqa: PLC0415  (the optional ray extra, checked by _cluster)

    from friendli_image.ray import generate_images  # noqa: PLC0415

    out_dir = out_uri(args.out_dir)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="friendli-ray-") as spool,
        _cluster(args.address) as ray,
    ):
        uri, local = _input_uri(args.input, Path(spool) / "stdin.txt")
        ray.data.DataContext.get_current().enable_progress_bars = (
            sys.stderr.isatty() if args.progress is None else args.progress
        )
        try:
            rows, keys, total = _dataset(ray, uri, local, rules, actors=args.actors, n=args.n)
        except OSError as exc:
            raise FriendliUsageError(
                f"cannot read INPUT {args.input!r}: {exc}; pass a UTF-8 text or JSONL file"
            ) from None
        timeout_ms = None if args.timeout is None else int(args.timeout * 1000)
        out = generate_images(
            rows,
            args.server_url,
            out_dir=out_dir,
            id_column=ID_COLUMN,
            columns={key: key for key in keys},
            num_actors=args.actors,
            per_endpoint_limit=args.concurrency,
            output_format=args.output_format,
            shard_size=args.shard_size,
            client_options={
                "timeout_ms": timeout_ms,
                "retries": args.retries,
                "token": token_from_args(args),
            },
        )
        images = [name for name in ("control_images",) if name in keys]
        out = out.drop_columns(images) if images else out
        fs, root = fsspec.core.url_to_fs(out_dir)
        from pyarrow.fs import FSSpecHandler, PyFileSystem  # noqa: PLC0415

        manifest = f"{root.rstrip('/')}/{MANIFEST_DIR}"
        if total:
            out.write_parquet(
                manifest, filesystem=PyFileSystem(FSSpecHandler(fs)), mode="overwrite"
            )
    statuses, failed = _summary(manifest, fs) if total else (Counter(), [])
    done = statuses["ok"] + statuses["resumed"]
    location = Location(out_dir, {})
    stored = (
        len(location.image_names())
        if args.output_format == "files"
        else sum(len(location.shard_records(name)) for name in location.shard_names())
    )
    unmatched = max(0, stored - done)
    elapsed = time.monotonic() - started
    lines = [
        "batch summary:",
        f"  {'items':<9} {total:,}",
        f"  {'ok':<9} {done:,} ({statuses['resumed']:,} from earlier runs)",
        f"  {'failed':<9} {statuses['failed']:,}",
        f"  {'elapsed':<9} {elapsed:.1f}s",
        f"  {'manifest':<9} {out_dir.rstrip('/')}/{MANIFEST_DIR}/ (parquet)",
    ]
    if unmatched:
        lines.append(
            f"  {'unmatched':<9} {unmatched:,} image(s) of earlier runs match no item of this "
            f"input: kept in {out_dir}"
        )
    lines.extend(
        f"  failed #{row[LINE_COLUMN]}: {row['error_type']}: {row['error']}" for row in failed
    )
    if statuses["failed"] > _LISTED_FAILURES:
        lines.append(f"  ... and {statuses['failed'] - _LISTED_FAILURES:,} more (see the manifest)")
    if statuses["failed"]:
        lines.append("  rerun the same command to retry what did not finish")
    if args.gallery:
        lines.append(_gallery_line(out_dir))
    print("\n".join(lines), file=sys.stdout)
    return EXIT_FAILED if statuses["failed"] else EXIT_OK


def _gallery_line(out_dir: str) -> str:
    location = Location(out_dir, {})
    if not location.local:
        return f"  {'gallery':<9} not written: the gallery needs a local --out-dir"
    return f"  {'gallery':<9} {write_gallery(location.root)}"
