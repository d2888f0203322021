"""``friendli-image batch --ray``: the batch command on a Ray cluster (``friendli-image[ray]``).

The requests of INPUT become a Ray Dataset (one row each, its id the request's
occurrence among identical lines of INPUT, so that with the request's digest in the
image name an item is the same one wherever its line moves), `friendli_image.ray.ImageStage`
runs on an actor pool, images go to ``--out-dir`` (a path or any fsspec URI) and the
output rows to ``<out-dir>/manifest/`` as parquet. A rerun skips every request whose
image exists, so a killed job resumes, and an inserted or moved line costs nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Final

from friendli_image._exceptions import FriendliUsageError
from friendli_image._store import Location

from ._options import EXIT_FAILED, EXIT_OK, token_from_args

__all__ = ["add_ray_options", "run_ray_batch"]

#: The line column (its position in INPUT) and the id column (its occurrence among
#: identical lines): names no request field has.
LINE_COLUMN: Final = "_line"
ID_COLUMN: Final = "_item"
MANIFEST_DIR: Final = "manifest"
_LISTED_FAILURES: Final = 10
#: argparse's Path turns "s3://b/x" into "s3:/b/x"; the URI is put back together.
_COLLAPSED_URI: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--ray``, ``--address`` and ``--actors`` to the batch command."""
    group = parser.add_argument_group("Ray (pip install 'friendli-image[ray]')")
    group.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray Data; --out-dir may then be any fsspec URI (s3://, gs://...)",
    )
    group.add_argument(
        "--address",
        default=None,
        help="the Ray cluster to join (default: $RAY_ADDRESS, else a local one)",
    )
    group.add_argument(
        "--actors", type=int, default=2, metavar="N", help="actors making requests (2)"
    )


def _out_uri(value: object) -> str:
    return _COLLAPSED_URI.sub(r"\1://", str(value))


def _rows(requests: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    seen: Counter[bytes] = Counter()
    for index, request in enumerate(requests):
        row: dict[str, Any] = {}
        for key, value in request.items():
            row[key] = value.read_bytes() if isinstance(value, Path) else value
        same = hashlib.sha256(repr(sorted(row.items())).encode()).digest()
        row[ID_COLUMN] = seen[same]
        row[LINE_COLUMN] = index
        seen[same] += 1
        rows.append(row)
    keys = {key for row in rows for key in row}
    return [{key: row.get(key) for key in sorted(keys)} for row in rows]


def _start_ray(address: str | None) -> Any:
    try:
        import ray  # noqa: PLC0415  (the optional ray extra)
    except ImportError as exc:
        raise FriendliUsageError(
            f"--ray needs Ray ({exc}): pip install 'friendli-image[ray]'"
        ) from None
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=False)
    else:
        # More logical CPUs than cores: the actors wait on the network, not the CPU.
        ray.init(num_cpus=max(8, 2 * (os.cpu_count() or 1)), include_dashboard=False)
    return ray


def run_ray_batch(
    args: argparse.Namespace, read: Callable[[IO[str]], Iterator[dict[str, Any]]]
) -> int:
    """Run the batch command on Ray; ``read`` parses INPUT as the local batch does."""
    if args.actors < 1:
        raise FriendliUsageError(f"--actors must be >= 1, got {args.actors}")
    try:
        if args.input == "-":
            rows = _rows(read(sys.stdin))
        else:
            with open(args.input, encoding="utf-8") as stream:
                rows = _rows(read(stream))
    except (OSError, UnicodeDecodeError) as exc:
        raise FriendliUsageError(
            f"cannot read INPUT {args.input!r}: {exc}; pass a UTF-8 text or JSONL file"
        ) from None
    import fsspec  # noqa: PLC0415  (the optional ray extra, checked by _start_ray)
    import pyarrow  # noqa: PLC0415

    from friendli_image.ray import generate_images  # noqa: PLC0415

    out_dir = _out_uri(args.out_dir)
    started = time.monotonic()
    ray = _start_ray(args.address)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = (
            sys.stderr.isatty() if args.progress is None else args.progress
        )
        columns = {
            key: key for key in (rows[0] if rows else {}) if key not in (ID_COLUMN, LINE_COLUMN)
        }
        timeout_ms = None if args.timeout is None else int(args.timeout * 1000)
        out = generate_images(
            ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 64, 512))),
            args.server_url,
            out_dir=out_dir,
            id_column=ID_COLUMN,
            columns=columns,
            num_actors=args.actors,
            per_endpoint_limit=args.concurrency,
            client_options={
                "timeout_ms": timeout_ms,
                "retries": args.retries,
                "token": token_from_args(args),
            },
        )
        images = [name for name in ("control_images",) if name in columns]
        out = (out.drop_columns(images) if images else out).materialize()
        fs, root = fsspec.core.url_to_fs(out_dir)
        from pyarrow.fs import FSSpecHandler, PyFileSystem  # noqa: PLC0415

        manifest = f"{root.rstrip('/')}/{MANIFEST_DIR}"
        out.write_parquet(manifest, filesystem=PyFileSystem(FSSpecHandler(fs)), mode="overwrite")
        table = pyarrow.concat_tables(ray.get(out.to_arrow_refs()))
    finally:
        ray.shutdown()
    statuses = table.column("status").to_pylist()
    used = {uri.rsplit("/", 1)[-1] for uri in table.column("uri").to_pylist() if uri}
    unmatched = len(Location(out_dir, {}).image_names() - used)
    failed = [row for row in table.to_pylist() if row["status"] == "failed"]
    elapsed = time.monotonic() - started
    lines = [
        "batch summary:",
        f"  {'items':<9} {len(statuses):,}",
        f"  {'ok':<9} {len(statuses) - len(failed):,} "
        f"({statuses.count('resumed'):,} from earlier runs)",
        f"  {'failed':<9} {len(failed):,}",
        f"  {'elapsed':<9} {elapsed:.1f}s",
        f"  {'manifest':<9} {out_dir.rstrip('/')}/{MANIFEST_DIR}/ (parquet)",
    ]
    if unmatched:
        lines.append(
            f"  {'unmatched':<9} {unmatched:,} image(s) of earlier runs match no item of this "
            f"input: kept in {out_dir}"
        )
    lines.extend(
        f"  failed #{row[LINE_COLUMN]}: {row['error_type']}: {row['error']}"
        for row in failed[:_LISTED_FAILURES]
    )
    if len(failed) > _LISTED_FAILURES:
        lines.append(f"  ... and {len(failed) - _LISTED_FAILURES:,} more (see the manifest)")
    if failed:
        lines.append("  rerun the same command to retry what did not finish")
    print("\n".join(lines), file=sys.stdout)
    return EXIT_FAILED if failed else EXIT_OK
