"""The ``out_dir`` sink of a batch: atomic image files, ``manifest.jsonl``, resume lookups.

Each image is written as it arrives (temporary file, then ``os.replace``) and dropped
from memory; ``manifest.jsonl`` gets one line per finished item, written with one
``write`` call per line and built by `manifest_record` alone. A rerun over the same
input and directory skips items whose line is in the manifest and whose file is present
with the recorded sha256, so a killed job resumes where it stopped.

The manifest keeps one line per index: a resume compacts it (the latest line of an
index wins) when it opens and, if the run redid items that had a line, when it closes.
A batch holds an exclusive ``fcntl`` lock on ``out_dir/.friendli-batch.lock`` while it
runs, so a second batch on the same directory fails at once instead of doubling the
requests and the manifest lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import IO, Any, Final

if sys.platform != "win32":
    import fcntl

import orjson

from ._exceptions import FriendliAPIError, FriendliError, FriendliUsageError
from ._formats import EXTENSIONS

__all__ = ["LOCK_NAME", "MANIFEST_NAME", "Sink", "file_name", "manifest_record"]

#: The manifest's file name inside ``out_dir``.
MANIFEST_NAME: Final = "manifest.jsonl"
#: The lock file a running batch holds inside ``out_dir``.
LOCK_NAME: Final = ".friendli-batch.lock"
#: Manifest lines longer than this are not remembered for resuming (packing limit).
_MAX_LINE: Final = (1 << 24) - 1
_TEMP_SUFFIX: Final = ".part"


def manifest_record(
    *,
    index: int,
    item_id: str,
    prompt: object,
    seed: object,
    attempts: int,
    elapsed: float,
    request_id: str | None,
    file: str | None = None,
    fmt: str | None = None,
    size: int | None = None,
    sha256: str | None = None,
    maybe_duplicated: bool = False,
    error: FriendliError | None = None,
) -> dict[str, Any]:
    """One line of ``manifest.jsonl``: an ``ok`` item when ``error`` is None, else ``failed``."""
    return {
        "index": index,
        "id": item_id,
        "status": "ok" if error is None else "failed",
        "prompt": prompt if isinstance(prompt, str) else None,
        "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        "file": file,
        "format": fmt,
        "bytes": size,
        "sha256": sha256,
        "attempts": attempts,
        "elapsed": round(elapsed, 4),
        "request_id": request_id,
        "maybe_duplicated": maybe_duplicated,
        "error": None if error is None else str(error),
        "error_type": None if error is None else type(error).__name__,
        "maybe_processed": isinstance(error, FriendliAPIError) and error.maybe_processed,
    }


def _pack(offset: int, length: int) -> int:
    return (offset << 24) | length


class Sink:
    """Writes images into ``out_dir`` and keeps ``manifest.jsonl``; answers resume lookups."""

    def __init__(self, directory: pathlib.Path, resume: bool) -> None:
        self.directory = directory
        self.manifest_path = directory / MANIFEST_NAME
        self._resume = resume
        # index -> (offset << 24 | length) of its latest success line: ~100 bytes per
        # finished item, dropped as the run reaches the item.
        self._done: dict[int, int] = {}
        # Indexes that had a line when the run started: a new line for one of them
        # makes a duplicate, compacted at close.
        self._had_line: set[int] = set()
        self._duplicated = False
        self._reader: Any = None
        self._reader_lock = threading.Lock()
        self._manifest: Any = None
        self._lock: IO[bytes] | None = None

    # -- opening and closing (blocking; run on a worker thread) ---------------------

    def open(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._acquire_lock()
            for stale in self.directory.glob(f".*{_TEMP_SUFFIX}"):
                stale.unlink(missing_ok=True)
            if self._resume and self.manifest_path.exists():
                self._compact()
                self._load()
                self._reader = self.manifest_path.open("rb")
            mode = "ab" if self._resume else "wb"
            self._manifest = self.manifest_path.open(mode, buffering=0)
        except OSError as exc:
            self.close()
            raise FriendliUsageError(
                f"cannot use out_dir {str(self.directory)!r}: {exc}; pass a writable directory"
            ) from exc
        except BaseException:
            self.close()
            raise

    def _acquire_lock(self) -> None:
        if sys.platform == "win32":  # pragma: no cover - no fcntl: no lock
            return
        path = self.directory / LOCK_NAME
        handle = path.open("a+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(32).decode("ascii", "replace").strip()
            handle.close()
            raise FriendliUsageError(
                f"out_dir {str(self.directory)!r} is in use by another batch"
                f"{f' (process {holder})' if holder.isdigit() else ''}: two batches in one "
                "directory would send every request twice and interleave the manifest; "
                "wait for it to finish (then rerun to resume) or pass another out_dir"
            ) from None
        except BaseException:
            handle.close()
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()).encode())
        handle.flush()
        self._lock = handle

    def _lines(self, manifest: IO[bytes]) -> Iterator[tuple[int, bytes, Any]]:
        """(offset, line, parsed record or None) of each complete line."""
        offset = 0
        for line in manifest:
            if not line.endswith(b"\n"):
                return
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = None
            yield offset, line, record
            offset += len(line)

    def _compact(self) -> None:
        """Rewrite the manifest with one line per index (the latest), if it has more."""
        latest: dict[int, int] = {}
        lines = 0
        with self.manifest_path.open("rb") as manifest:
            for offset, _line, record in self._lines(manifest):
                lines += 1
                index = _index_of(record)
                if index is not None:
                    latest[index] = offset
            if lines == len(latest):
                return  # one line per index already (a partial last line is cut by _load)
            manifest.seek(0)
            fd, temp = tempfile.mkstemp(
                dir=self.directory, prefix=".manifest.", suffix=_TEMP_SUFFIX
            )
            try:
                with os.fdopen(fd, "wb") as out:
                    for offset, line, record in self._lines(manifest):
                        index = _index_of(record)
                        if index is not None and latest[index] == offset:
                            out.write(line)

                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temp, self.manifest_path)
            except BaseException:
                pathlib.Path(temp).unlink(missing_ok=True)
                raise

    def _load(self) -> None:
        with self.manifest_path.open("r+b") as manifest:
            offset = 0
            for line in manifest:
                length = len(line)
                if not line.endswith(b"\n"):
                    # A crash mid-append leaves one partial last line: cut it, so the
                    # next line does not get glued to it.
                    manifest.truncate(offset)
                    break
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    record = None
                index = _index_of(record)
                if index is not None:
                    self._had_line.add(index)
                    if record.get("status") == "ok" and length <= _MAX_LINE:
                        self._done[index] = _pack(offset, length)
                offset += length

    def close(self) -> None:
        for handle in (self._manifest, self._reader):
            if handle is not None:
                handle.close()
        self._manifest = self._reader = None
        try:
            if self._duplicated:
                self._duplicated = False
                with contextlib.suppress(OSError):
                    self._compact()
        finally:
            if self._lock is not None:
                self._lock.close()  # closing the file releases the lock
                self._lock = None

    # -- per item -------------------------------------------------------------------

    def has_previous(self, index: int) -> bool:
        return index in self._done

    def previous(self, index: int, item_id: str) -> dict[str, Any] | None:
        """The manifest record of an earlier success for this very request, if its file
        is intact (blocking: hashes the file)."""
        packed = self._done.pop(index, None)
        if packed is None or self._reader is None:
            return None
        offset, length = packed >> 24, packed & _MAX_LINE
        with self._reader_lock:
            self._reader.seek(offset)
            line = self._reader.read(length)
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(record, dict) or record.get("id") != item_id:
            return None
        name = record.get("file")
        if not isinstance(name, str) or pathlib.PurePath(name).name != name:
            return None
        try:
            digest = _file_sha256(self.directory / name)
        except OSError:
            return None
        return record if digest == record.get("sha256") else None

    def write_image(self, name: str, image: bytes | memoryview) -> str:
        """Write the image atomically; return its sha256 (blocking)."""
        target = self.directory / name
        try:
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.", suffix=_TEMP_SUFFIX)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(image)
                os.replace(temp, target)
            except BaseException:
                pathlib.Path(temp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise FriendliUsageError(
                f"cannot write {str(target)!r}: {exc}; check that out_dir is writable and "
                "has space, then rerun (finished items are kept)"
            ) from exc
        return hashlib.sha256(image).hexdigest()

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one manifest line with a single write (unbuffered)."""
        if record.get("index") in self._had_line:
            self._duplicated = True
        try:
            self._manifest.write(orjson.dumps(record) + b"\n")
        except OSError as exc:
            raise FriendliUsageError(
                f"cannot append to {str(self.manifest_path)!r}: {exc}; check that out_dir "
                "is writable and has space, then rerun"
            ) from exc


def _index_of(record: Any) -> int | None:
    if not isinstance(record, dict):
        return None
    index = record.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else None


def _file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_name(index: int, item_id: str, fmt: str) -> str:
    """The file name of an item's image: input index, request id prefix, extension."""
    return f"{index:06d}-{item_id[:12]}{EXTENSIONS.get(fmt, '.bin')}"
