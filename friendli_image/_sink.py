"""The ``out_dir`` sink of a batch: atomic image files, ``manifest.jsonl``, resume lookups.

Each image is written as it arrives (temporary file, then ``os.replace``) and dropped
from memory; ``manifest.jsonl`` gets one line per finished item, written with one
``write`` call per line and built by `manifest_record` alone. A rerun over the same
input and directory skips items whose line is in the manifest and whose file is present
with the recorded sha256, so a killed job resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import threading
from collections.abc import Mapping
from typing import Any, Final

import orjson

from ._exceptions import FriendliAPIError, FriendliError, FriendliUsageError
from ._formats import EXTENSIONS

__all__ = ["MANIFEST_NAME", "Sink", "file_name", "manifest_record"]

#: The manifest's file name inside ``out_dir``.
MANIFEST_NAME: Final = "manifest.jsonl"
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
        self._reader: Any = None
        self._reader_lock = threading.Lock()
        self._manifest: Any = None

    # -- opening and closing (blocking; run on a worker thread) ---------------------

    def open(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(f".*{_TEMP_SUFFIX}"):
                stale.unlink(missing_ok=True)
            if self._resume and self.manifest_path.exists():
                self._load()
                self._reader = self.manifest_path.open("rb")
            mode = "ab" if self._resume else "wb"
            self._manifest = self.manifest_path.open(mode, buffering=0)
        except OSError as exc:
            self.close()
            raise FriendliUsageError(
                f"cannot use out_dir {str(self.directory)!r}: {exc}; pass a writable directory"
            ) from exc

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
                if (
                    isinstance(record, dict)
                    and record.get("status") == "ok"
                    and isinstance(record.get("index"), int)
                    and length <= _MAX_LINE
                ):
                    self._done[record["index"]] = _pack(offset, length)
                offset += length

    def close(self) -> None:
        for handle in (self._manifest, self._reader):
            if handle is not None:
                handle.close()
        self._manifest = self._reader = None

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
        try:
            self._manifest.write(orjson.dumps(record) + b"\n")
        except OSError as exc:
            raise FriendliUsageError(
                f"cannot append to {str(self.manifest_path)!r}: {exc}; check that out_dir "
                "is writable and has space, then rerun"
            ) from exc


def _file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_name(index: int, item_id: str, fmt: str) -> str:
    """The file name of an item's image: input index, request id prefix, extension."""
    return f"{index:06d}-{item_id[:12]}{EXTENSIONS.get(fmt, '.bin')}"
