"""An output location: item identity, images, the manifest, the lock and the gallery's inputs.

Every batch path writes through this module and no other: ``generate_batch`` /
``edit_batch`` (`BatchStore`), the ``batch`` command (`set_aside_previous_run`), the
gallery (`read_gallery_inputs`, `Directory`) and the Ray stage (`Location`).

**Identity.** An item is its request, not its position: `request_digest` is the sha256
of the route, a newline and the request's canonical JSON (`canonical_request`: every
wire field, keys sorted), and the item is that digest together with its *occurrence*,
how many identical requests came before it in the input (`Occurrences`). Duplicates
stay distinct; inserting, deleting or reordering other lines changes nothing. The index
is only the order. On Ray, where rows are spread over blocks, an item is its row id
together with the digest (`row_image_name`).

**Files.** Names written or read are plain names inside the location (`valid_name`: no
path separator, no NUL, no leading dot, an image extension). On a local file system
every file is opened relative to the location's directory descriptor with
``O_NOFOLLOW`` and checked to be a regular file, so a planted symbolic link is refused,
never followed; a write goes to a new file created with the mode the umask asks for,
then takes its name whole (`Directory.write_atomic`: on Linux an unnamed file linked in,
elsewhere a temporary one renamed). On object stores a write is one PUT.

**The manifest.** ``manifest.jsonl`` holds one line per item of the latest run (ok,
failed or resumed, with its index in that run). When a run starts, the lines of earlier
runs move to ``unmatched.jsonl``, where resume looks them up by identity; when the run
has seen its whole input, the lines no item claimed stay there, one per stored image
that matches no item, and the run reports how many (`BatchStore.close`).

Files are written in groups (`BatchStore.write_files`: a group's images, then their
lines in one append; the batch writes small groups on its event loop, others from a
worker thread), so a line is never written before its image is whole under its name: a
kill loses at most the group being written, whose images a rerun makes again. Lines of
resumed and failed items are appended in groups too; losing them loses nothing (the
earlier line is still in ``unmatched.jsonl``; a failure is retried). A resumed item at
the index it had keeps its earlier line as it is, written by no one until the run closes
(`BatchStore.carry`): when every earlier line was kept so, the earlier manifest takes
this run's lines after its own and replaces the manifest (a kill between the two leaves
both files, whose lines a rerun reads as before); otherwise the kept lines are appended.
Appends never cross a page boundary no line crosses, so a kill cuts at most the last
line, which readers skip.

**Resume** costs a few bytes per earlier item, not an object each: opening reads each
earlier line once and keeps an 8-byte key (the hash of the identity, id, occurrence and
variant, and the line number) in a sorted array (a finished run's manifest is renamed to
``unmatched.jsonl``, not copied); an item reads its line back only when it claims it.
A run that closes with its manifest as the only record leaves those keys and where each
line starts in ``.manifest.index`` (`_write_index`), named by the manifest's size,
modification time, inode and device and checked by a sha256: the next run opens from
it without reading a line, unless the manifest is not that file any more (then it reads
every line as before); a line read from such a manifest is checked when claimed. An
image counts as intact when its size and modification time are the ones recorded when it
was written; otherwise its sha256 decides (a copied or touched image is hashed once, a
rewritten one is made again). On a URL location a PUT is whole or absent, so the size
the location lists decides, without a download.

**Formats** (``output_format``). ``files``: one image file per item, named by its
identity, and a ``metadata.jsonl`` (``file_name`` and every field of each stored item)
rewritten when a run ends, so ``datasets.load_dataset("imagefolder", data_dir=...)``
loads the images with their fields. ``webdataset`` and ``parquet``: items are gathered
into shards of ``shard_size`` items (`Shard`): a tar with ``<key>.<ext>`` and
``<key>.json`` per item, or a Parquet file with the image bytes in a column that
``datasets`` reads as an ``Image`` feature. The key is the item's identity (`item_key`).
A shard's manifest lines are appended *before* the shard is published, and the shard
is then written atomically under a name no run reuses (``train-<time>-<random>-<n>``,
ordered by time), so a kill leaves no half shard visible and the lines of an unpublished
shard name a file that is absent: a rerun makes those items again, and an item never
lands in two shards. A kill loses at most the items of the open shard.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import hashlib
import io
import itertools
import os
import pathlib
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, Final, TypeVar

import orjson

from ._batch_models import OUTPUT_FORMATS
from ._exceptions import FriendliAPIError, FriendliError, FriendliUsageError
from ._formats import EXTENSIONS, FORMATS_BY_EXTENSION
from ._requests import plain_wire
from ._serde import canonical_request, canonical_wire, unstructure_request

if sys.platform != "win32":
    import fcntl

if TYPE_CHECKING:
    from ._requests import EditRequest, GenerateRequest

__all__ = [
    "GALLERY_NAME",
    "INDEX_NAME",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "METADATA_NAME",
    "OUTPUT_FORMATS",
    "RAY_INDEX_COLUMN",
    "RAY_MANIFEST_DIR",
    "THUMBS_DIR",
    "UNMATCHED_NAME",
    "BatchStore",
    "Directory",
    "Location",
    "Occurrences",
    "Shard",
    "StoredRecord",
    "Unmatched",
    "dataset_fields",
    "image_name",
    "item_key",
    "manifest_record",
    "plain_request_digest",
    "read_gallery_inputs",
    "read_records",
    "request_digest",
    "row_image_name",
    "row_key",
    "set_aside_previous_run",
    "shard_images",
    "shard_run_name",
    "stored_key",
    "valid_name",
    "valid_stored_name",
    "variant_seeds",
]

#: The manifest of the latest run, inside the location.
MANIFEST_NAME: Final = "manifest.jsonl"
#: Records of stored images that match no item of the latest complete run.
UNMATCHED_NAME: Final = "unmatched.jsonl"
#: The resume index of ``manifest.jsonl`` a run leaves when it closes (`_ManifestIndex`).
INDEX_NAME: Final = ".manifest.index"
#: The folder of parquet files ``batch --ray`` writes its manifest to, inside the location.
RAY_MANIFEST_DIR: Final = "manifest"
#: The column of that manifest with each request's index in INPUT.
RAY_INDEX_COLUMN: Final = "_line"
#: The lock file a running batch holds inside the location.
LOCK_NAME: Final = ".friendli-batch.lock"
#: The ``imagefolder`` metadata of a ``files`` location (``file_name`` and every field).
METADATA_NAME: Final = "metadata.jsonl"
#: The gallery page inside the location.
GALLERY_NAME: Final = "index.html"
#: The gallery's thumbnails live in this folder of the location.
THUMBS_DIR: Final = ".thumbs"

_T = TypeVar("_T")

_TEMP_SUFFIX: Final = ".part"
#: Random prefixes a temporary file's name is tried with before its write fails.
_TEMP_TRIES: Final = 4
#: The file extension of each shard format.
_SHARD_SUFFIX: Final = {"webdataset": ".tar", "parquet": ".parquet"}
_FORMAT_OF_SUFFIX: Final = {suffix: fmt for fmt, suffix in _SHARD_SUFFIX.items()}
#: Extensions an image (or a thumbnail) written by this package may have.
_IMAGE_SUFFIXES: Final = frozenset({*EXTENSIONS.values(), *FORMATS_BY_EXTENSION, ".bin"})
#: The endings of a stored name that is a shard (`_format_of`, for a `valid_stored_name`).
_SHARD_ENDINGS: Final = tuple(_SHARD_SUFFIX.values())
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY: Final = getattr(os, "O_DIRECTORY", 0)
_CREATE_NEW: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
#: An unnamed file in a directory (Linux): linked in once complete, it costs the kernel one
#: name instead of a temporary's and its rename (a third less system time per image), and
#: a killed writer leaves nothing behind.
_TMPFILE: Final = getattr(os, "O_TMPFILE", 0)
_UNNAMED: Final = _TMPFILE | os.O_WRONLY | _CLOEXEC
#: Relative opens through a directory descriptor (POSIX); elsewhere, joined paths.
#: ``os.replace`` takes ``src_dir_fd`` / ``dst_dir_fd`` as ``os.rename`` does, but only
#: ``os.rename`` is listed in ``supports_dir_fd``.
_AT: Final = os.open in os.supports_dir_fd and os.rename in os.supports_dir_fd
#: Manifest lines longer than this are not remembered for resuming (packing limit).
_MAX_LINE: Final = (1 << 24) - 1


# -- identity ---------------------------------------------------------------------------------


def request_digest(path: str, request: GenerateRequest | EditRequest) -> str:
    """The request's identity: sha256 of the route, a newline and its canonical JSON.

    Stable across runs, machines and versions (resume matches it against manifests).
    """
    return _canonical_digest(path, canonical_request(request))


#: sha256 of each route and its newline, copied for each request of the route.
_ROUTE_HASHES: dict[str, Any] = {}


def _canonical_digest(path: str, canonical: bytes) -> str:
    route = _ROUTE_HASHES.get(path)
    if route is None:
        route = _ROUTE_HASHES[path] = hashlib.sha256(path.encode() + b"\n")
    digest = route.copy()
    digest.update(canonical)
    return str(digest.hexdigest())


def plain_request_digest(
    path: str, model: type[GenerateRequest] | type[EditRequest], arguments: Mapping[str, Any]
) -> str | None:
    """`request_digest` of ``model(**arguments)`` without building the model, when the
    arguments are plain values (`plain_wire`); None when only the model can tell."""
    wire = plain_wire(model, arguments)
    if wire is None:
        return None
    try:
        canonical = canonical_wire(wire)
    except orjson.JSONEncodeError:  # text that is not UTF-8, an int beyond 64 bits
        return None
    return _canonical_digest(path, canonical)


class Occurrences:
    """Numbers identical requests in input order: 0 for the first, 1 for the next, ...

    Holds 8 bytes of each digest seen, in a flat open-addressing table (16 bytes an item,
    not a Python object each: a million items cost 16 MiB), and a count for repeated
    ones only. ``expected``: how many distinct digests are likely (the earlier run's items,
    on a resume), so the table is made at its size once instead of grown through every
    power of two (each growth re-inserts every digest: a second a million items).
    """

    __slots__ = ("_count", "_mask", "_repeats", "_table")

    def __init__(self, expected: int = 0) -> None:
        size = max(1024, 1 << (2 * expected).bit_length())  # at most half full
        self._table = array.array("Q", bytes(8 * size))
        self._mask = size - 1
        self._count = 0
        self._repeats: dict[str, int] = {}

    def next(self, digest: str) -> int:
        """The occurrence of this digest, counting it."""
        short = int(digest[:16], 16) | 1  # 0 marks a free slot
        table, mask = self._table, self._mask
        slot = short & mask
        while (held := table[slot]) != short:
            if not held:
                table[slot] = short
                self._count += 1
                if self._count * 2 > mask:
                    self._grow()
                return 0
            slot = (slot + 1) & mask
        occurrence = self._repeats.get(digest, 0) + 1
        self._repeats[digest] = occurrence
        return occurrence

    def _grow(self) -> None:
        old = self._table
        self._mask = mask = len(old) * 2 - 1
        self._table = table = array.array("Q", bytes(8 * (mask + 1)))
        for short in old:
            if short:
                slot = short & mask
                while table[slot]:
                    slot = (slot + 1) & mask
                table[slot] = short


def item_key(digest: str, occurrence: int, variant: int = 0) -> str:
    """A batch item's identity as a name: its digest's first 20 digits, its occurrence
    and, for variants after the first, the variant (``<digest20>-<occurrence>-<variant>``).

    The stem of its image file, its sample key in a WebDataset shard, its ``key`` column.
    """
    return f"{digest[:20]}-{occurrence}" + (f"-{variant}" if variant else "")


def image_name(digest: str, occurrence: int, fmt: str | None, variant: int = 0) -> str:
    """The file name of a batch item's image: its identity and the format's extension."""
    return item_key(digest, occurrence, variant) + EXTENSIONS.get(fmt or "", ".bin")


#: Derived seeds are in ``[0, 2**31 - 1]``: every server takes a non-negative int32.
_SEED_MASK: Final = 2**31 - 1
_VARIANT_SALT: Final = b"friendli-image/variant/"


def variant_seeds(digest: str, occurrence: int, seed: int | None, n: int) -> list[int]:
    """The seeds of a request's ``n`` variants, distinct: ``seed`` first when given, the
    others derived from the item's identity.

    Variant ``v``'s derived seed is the first 4 bytes (big-endian, top bit cleared) of
    ``sha256(b"friendli-image/variant/<digest>-<occurrence>-<v>")``, rehashed with a
    counter on the rare clash with an earlier variant's: the same item always gets the
    same seed, on every machine and version.
    """
    seeds: list[int] = []
    for variant in range(n):
        if variant == 0 and seed is not None:
            seeds.append(seed)
            continue
        text = f"{digest}-{occurrence}-{variant}".encode()
        derived = int.from_bytes(hashlib.sha256(_VARIANT_SALT + text).digest()[:4], "big")
        derived &= _SEED_MASK
        clash = 0
        while derived in seeds:
            clash += 1
            retry = hashlib.sha256(_VARIANT_SALT + text + b"/" + str(clash).encode()).digest()
            derived = int.from_bytes(retry[:4], "big") & _SEED_MASK
        seeds.append(derived)
    return seeds


def row_image_name(row_id: object, digest: str, response_format: object) -> str:
    """The file name of a Ray row's image: its id (quoted), its request digest, extension."""
    import urllib.parse  # noqa: PLC0415  (only the Ray stage names files by row)

    stem = urllib.parse.quote(str(row_id), safe="-_.")
    stem = stem if not stem.startswith(".") else "%2E" + stem[1:]
    extension = ".png" if response_format == "raw" else ".jpg"
    return f"{stem}-{digest[:16]}{extension}"


def row_key(row_id: object, digest: str) -> str:
    """A Ray row's key in a shard: its id (quoted, no dot: WebDataset splits a sample's
    key from its extension at the first dot) and its digest's first 16 digits."""
    import urllib.parse  # noqa: PLC0415  (only the Ray stage names samples by row)

    return f"{urllib.parse.quote(str(row_id), safe='-_')}-{digest[:16]}"


def valid_name(name: object) -> str | None:
    """``name`` if it is a plain image file name inside a location, else None.

    Refused: anything but text, a path separator, a NUL byte, a leading dot (hidden and
    temporary files, ``.``, ``..``), an extension that is not an image's (a manifest
    naming ``page.html`` is not linked).
    """
    if not isinstance(name, str) or not name or len(name) > 255:
        return None
    if "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        return None
    return name if _suffix(name).lower() in _IMAGE_SUFFIXES else None


def _suffix(name: str) -> str:
    """``PurePosixPath(name).suffix`` of a name without separators, at a tenth of its cost
    (resume checks a name per stored item)."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def valid_stored_name(name: object) -> str | None:
    """``name`` if a manifest may name it: a `valid_name` image or a plain shard name."""
    if valid_name(name) is not None:
        return name  # type: ignore[return-value]  # valid_name checked it is a str
    if not isinstance(name, str) or not name.startswith("train-") or len(name) > 255:
        return None
    if "/" in name or "\\" in name or "\0" in name:
        return None
    return name if _suffix(name) in _SHARD_SUFFIX.values() else None


def _format_of(name: str) -> str:
    """The output format that writes a stored file of this name."""
    return _FORMAT_OF_SUFFIX.get(_suffix(name), "files")


# -- one directory, opened safely -------------------------------------------------------------


def _check_regular(fd: int, where: str) -> None:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FriendliUsageError(
            f"{where} is not a regular file; remove it (a batch never writes through links "
            "or special files)"
        )


def _write_all(
    fd: int, data: bytes | memoryview | Iterable[bytes | memoryview], *, sync: bool
) -> int:
    """Write ``data`` (or each of its pieces) to ``fd``; return the file's modification
    time (ns)."""
    if isinstance(data, bytes | memoryview):
        # Unbuffered: an image is one write, not a buffered file object's work.
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    else:
        with os.fdopen(os.dup(fd), "wb") as handle:
            handle.writelines(data)
    if sync:
        os.fsync(fd)
    return os.fstat(fd).st_mtime_ns


class Directory:
    """A local directory whose files are opened relative to it, never through a link.

    On POSIX the directory is held open (``O_DIRECTORY``) and every name is resolved
    against that descriptor with ``O_NOFOLLOW``, so a link planted under a name (the
    lock, the manifest, ``.thumbs``) is refused instead of followed.
    """

    def __init__(self, path: pathlib.Path, *, create: bool = False, parent: int | None = None):
        self.path = path
        self._prefix = os.path.join(path, "")
        if create and parent is None:
            path.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        # Temporary names: this directory's random prefix and a counter, so writing a
        # file asks the kernel for no random bytes (one file per image).
        self._temp_prefix = secrets.token_hex(6)
        self._temps = itertools.count()
        # Unnamed files need a directory descriptor and Linux's O_TMPFILE.
        self._unnamed = bool(_TMPFILE) and _AT and sys.platform == "linux"
        if _AT:
            flags = os.O_RDONLY | _DIRECTORY | _CLOEXEC
            if parent is None:
                self._fd = os.open(path, flags)
            else:
                self._fd = os.open(path.name, flags | _NOFOLLOW, dir_fd=parent)
        elif parent is not None and path.is_symlink():  # pragma: no cover - not POSIX
            raise OSError(f"{path} is a symbolic link")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.close()

    def _at(self, name: str) -> tuple[str, dict[str, int]]:
        if self._fd is None:
            # A string join: a pathlib join per stored item costs more than its stat.
            return self._prefix + name, {}
        return name, {"dir_fd": self._fd}

    def subdirectory(self, name: str, *, create: bool = False) -> Directory:
        """A directory inside this one (never through a link); OSError if it cannot be."""
        target, at = self._at(name)
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(target, 0o777, **at)
        return Directory(self.path / name, parent=self._fd)

    def open(self, name: str, flags: int = os.O_RDONLY) -> int:
        """A descriptor of the regular file ``name`` (``O_NOFOLLOW``; mode from the umask)."""
        target, at = self._at(name)
        try:
            fd = os.open(target, flags | _NOFOLLOW | _CLOEXEC, 0o666, **at)
        except OSError as exc:
            if os.path.islink(self.path / name):
                raise FriendliUsageError(
                    f"{str(self.path / name)!r} is a symbolic link; remove it (a batch never "
                    "writes or reads through links)"
                ) from None
            raise exc from None
        _check_regular(fd, repr(str(self.path / name)))
        return fd

    def read(self, name: str) -> IO[bytes]:
        """The regular file ``name``, open for reading."""
        return os.fdopen(self.open(name), "rb")

    def size_and_mtime(self, name: str) -> tuple[int, int] | None:
        """Size and mtime (ns) of the regular file ``name``, None if it is not one."""
        target, at = self._at(name)
        try:
            info = os.stat(target, follow_symlinks=False, **at)
        except OSError:
            return None
        return (info.st_size, info.st_mtime_ns) if stat.S_ISREG(info.st_mode) else None

    def identity(self, name: str) -> tuple[int, int, int, int] | None:
        """(size, mtime ns, inode, device) of the regular file ``name``, None if it is
        not one: what tells whether a file is still the one something was computed from."""
        target, at = self._at(name)
        try:
            info = os.stat(target, follow_symlinks=False, **at)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        return info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev

    def write_atomic(
        self,
        name: str,
        data: bytes | memoryview | Iterable[bytes | memoryview],
        *,
        sync: bool = False,
    ) -> int:
        """Write ``name`` completely or not at all, and return the file's modification
        time (ns), which naming it keeps.

        ``data`` is the content, or an iterable of its pieces (written as they come, so
        a large listing is never whole in memory).

        The new file has the mode the umask asks for and is never a link's target: on
        Linux an unnamed file (``O_TMPFILE``) is linked in under ``name`` when ``name``
        is free, else (``name`` taken, a link planted there included, or no unnamed files
        here) a temporary file created exclusively (``O_EXCL | O_NOFOLLOW``) replaces it.
        """
        if self._unnamed and isinstance(data, bytes | memoryview):
            fd = self._open_unnamed()
            if fd is not None:
                try:
                    mtime = _write_all(fd, data, sync=sync)
                    if self._link_unnamed(fd, name):
                        return mtime
                finally:
                    os.close(fd)
        # O_EXCL with O_CREAT never opens what exists (a link included), so the file is
        # the new regular file this call made, with no fstat to check it.
        temp, temp_fd = self._new_temporary(
            name, lambda path, at: os.open(path, _CREATE_NEW, 0o666, **at)
        )
        try:
            try:
                mtime = _write_all(temp_fd, data, sync=sync)
            finally:
                os.close(temp_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                self.remove(temp)
            raise
        self._replace_with(temp, name)
        return mtime

    def _open_unnamed(self) -> int | None:
        """A descriptor of a new unnamed file in this directory; None (and no more tries)
        where the file system or the kernel has none."""
        try:
            return os.open(".", _UNNAMED, 0o666, dir_fd=self._fd)
        except OSError:
            self._unnamed = False
            return None

    def _link_unnamed(self, fd: int, name: str) -> bool:
        """Give the complete unnamed file ``fd`` its ``name``: linked in if ``name`` is
        free, else linked under a temporary name that then replaces ``name``. False (and
        no more tries) if it cannot be linked at all (no ``/proc``): the caller writes a
        temporary file instead."""
        source = f"/proc/self/fd/{fd}"
        try:
            os.link(source, name, dst_dir_fd=self._fd, follow_symlinks=True)
        except FileExistsError:
            pass
        except OSError:
            self._unnamed = False
            return False
        else:
            return True
        temp, _ = self._new_temporary(
            name, lambda path, _at: os.link(source, path, dst_dir_fd=self._fd, follow_symlinks=True)
        )
        self._replace_with(temp, name)
        return True

    def _temporary_name(self, name: str) -> str:
        """A new hidden name for ``name`` while it is written (``remove_temporaries``)."""
        return f".{name}.{self._temp_prefix}{next(self._temps):x}{_TEMP_SUFFIX}"

    def _new_temporary(
        self, name: str, create: Callable[[str, dict[str, int]], _T]
    ) -> tuple[str, _T]:
        """A new temporary file for ``name``, made by ``create(path, open keywords)``,
        which must fail with FileExistsError on a name already taken (``O_EXCL``, a
        link): its name and what ``create`` returned. A taken name (planted, or left by a
        killed writer) draws a new random prefix."""
        for _ in range(_TEMP_TRIES - 1):
            temp = self._temporary_name(name)
            try:
                return temp, create(*self._at(temp))
            except FileExistsError:
                self._temp_prefix = secrets.token_hex(6)
        temp = self._temporary_name(name)
        return temp, create(*self._at(temp))

    def _replace_with(self, temp: str, name: str) -> None:
        """Rename the complete temporary file ``temp`` over ``name`` (a link planted
        there is replaced, never written through); ``temp`` is removed if that fails."""
        try:
            self.rename(temp, name)
        except BaseException:
            with contextlib.suppress(OSError):
                self.remove(temp)
            raise

    def rename(self, name: str, to: str) -> None:
        """Rename ``name`` to ``to`` in this directory, replacing what ``to`` is."""
        source, at = self._at(name)
        target, _ = self._at(to)
        if at:
            os.replace(source, target, src_dir_fd=at["dir_fd"], dst_dir_fd=at["dir_fd"])
        else:
            os.replace(source, target)

    def move(self, name: str, into: Directory) -> bool:
        """Move ``name`` into another directory (same name); False if it is not there."""
        source, at = self._at(name)
        target, into_at = into._at(name)
        try:
            if at:
                os.replace(source, target, src_dir_fd=at["dir_fd"], dst_dir_fd=into_at["dir_fd"])
            else:
                os.replace(source, target)
        except FileNotFoundError:
            return False
        return True

    def remove(self, name: str) -> None:
        """Delete ``name`` if it is there (a link is removed, not followed)."""
        target, at = self._at(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target, **at)

    def remove_temporaries(self) -> None:
        """Delete temporary files a killed writer left behind.

        Reads the listing as it goes: a folder of a million images is a million names,
        which a list would hold at once."""
        with os.scandir(self._fd if self._fd is not None else self.path) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") and name.endswith(_TEMP_SUFFIX):
                    target, at = self._at(name)
                    with contextlib.suppress(OSError):
                        os.unlink(target, **at)

    def sha256(self, name: str) -> str | None:
        """The sha256 of the regular file ``name``, None if it is missing or not one."""
        try:
            with self.read(name) as handle:
                digest = hashlib.sha256()
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
                return digest.hexdigest()
        except (OSError, FriendliUsageError):
            return None


def _usage(where: pathlib.Path | str, exc: OSError, what: str) -> FriendliUsageError:
    return FriendliUsageError(
        f"cannot {what} {str(where)!r}: {exc}; check that the directory is writable and "
        "has space, then rerun (finished items are kept)"
    )


# -- manifest records -------------------------------------------------------------------------


def manifest_record(
    *,
    index: int,
    item_id: str,
    occurrence: int,
    prompt: object,
    seed: object,
    attempts: int,
    elapsed: float,
    request_id: str | None,
    file: str | None = None,
    fmt: str | None = None,
    size: int | None = None,
    sha256: str | None = None,
    variant: int = 0,
    maybe_duplicated: bool = False,
    error: FriendliError | None = None,
    fields: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One line of ``manifest.jsonl``: an ``ok`` item when ``error`` is None, else ``failed``.

    ``fields`` (`dataset_fields`) adds the request's fields, which the dataset formats
    carry with each image.
    """
    return {
        "index": index,
        "id": item_id,
        "occurrence": occurrence,
        "variant": variant,
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
        **(fields or {}),
    }


#: The request fields a dataset row has as columns of their own.
_REQUEST_COLUMNS: Final = (
    "prompt",
    "model",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "response_format",
)
#: A dataset row's fields besides the image, in column order.
_ROW_FIELDS: Final = (
    "key",
    "id",
    "occurrence",
    "variant",
    *_REQUEST_COLUMNS,
    "request",
    "format",
    "bytes",
    "sha256",
    "attempts",
    "elapsed",
    "request_id",
    "maybe_duplicated",
)


def _digest_local_images(value: Any) -> Any:
    if isinstance(value, str):
        if value.startswith("data:"):
            return "sha256:" + hashlib.sha256(value.encode()).hexdigest()
        return value
    if isinstance(value, list):
        return [_digest_local_images(item) for item in value]
    if isinstance(value, dict):
        return {key: _digest_local_images(item) for key, item in value.items()}
    return value


def dataset_fields(request: GenerateRequest | EditRequest) -> dict[str, Any]:
    """The request as a dataset row holds it: its scalar fields as columns of their own,
    and the whole request (wire fields, keys sorted) as JSON text in ``request``, where
    a local image (a ``data:`` URI) is replaced by ``sha256:<hex>`` of its text."""
    fields: dict[str, Any] = {name: getattr(request, name) for name in _REQUEST_COLUMNS}
    wire = unstructure_request(request)
    text = orjson.dumps(wire, option=orjson.OPT_SORT_KEYS)
    # Only a string value can start a data: URI, and orjson writes it as '"data:': the
    # walk over every field is for the requests that carry one.
    if b'"data:' in text:
        text = orjson.dumps(_digest_local_images(wire), option=orjson.OPT_SORT_KEYS)
    fields["request"] = text.decode()
    return fields


def _dataset_row(record: Mapping[str, Any]) -> dict[str, Any]:
    row = {name: record.get(name) for name in _ROW_FIELDS}
    row["variant"] = variant = record.get("variant", 0)
    # A Ray row's key is its id with its digest (`row_key`); a batch item's, its identity.
    row["key"] = record.get("key") or item_key(record["id"], record.get("occurrence", 0), variant)
    return row


StoredRecord = dict[str, Any]
#: What `BatchStore.claim_group` answers per item: (its earlier record, checked, the
#: record's line, the line's number in ``unmatched.jsonl``), (None, True, b"", -1) if none.
Claim = tuple[StoredRecord | None, bool, "bytes | memoryview", int]
#: The claim of an item no earlier run holds (or whose image is gone).
_NO_CLAIM: Final[Claim] = (None, True, b"", -1)


def _valid_record(line: bytes) -> StoredRecord | None:
    """The record of a manifest line, or None when it is not a valid one.

    Valid: a JSON object with a non-negative int ``index``; an ``ok`` record also names
    a `valid_name` file and a sha256. Anything else is ignored, as if absent.
    """
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    index = record.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        return None
    if record.get("status") == "ok" and (
        valid_stored_name(record.get("file")) is None or not isinstance(record.get("sha256"), str)
    ):
        return None
    return record


def _identity(record: StoredRecord) -> tuple[str, int, int] | None:
    """(id, occurrence, variant) of a record, None unless all are valid."""
    item_id = record.get("id")
    if not isinstance(item_id, str) or not item_id:
        return None
    occurrence, variant = record.get("occurrence", 0), record.get("variant", 0)
    for number in (occurrence, variant):
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            return None
    return item_id, occurrence, variant


def read_records(handle: IO[bytes]) -> Iterator[tuple[int, bytes, StoredRecord | None]]:
    """(offset, line, valid record or None) of each complete line of a manifest."""
    offset = 0
    for line in handle:
        if not line.endswith(b"\n"):
            return  # cut short by a crash mid-append
        yield offset, line, _valid_record(line)
        offset += len(line)


def _parquet_schema() -> Any:
    """The Parquet schema of a shard, with the ``huggingface`` metadata that makes
    ``datasets`` read ``image`` as an ``Image`` feature."""
    import pyarrow as pa  # noqa: PLC0415  (only the parquet format needs it)

    types = {
        "occurrence": pa.int64(),
        "variant": pa.int64(),
        "num_inference_steps": pa.int64(),
        "guidance_scale": pa.float64(),
        "seed": pa.int64(),
        "bytes": pa.int64(),
        "attempts": pa.int64(),
        "elapsed": pa.float64(),
        "maybe_duplicated": pa.bool_(),
    }
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [pa.field("image", image)]
    fields += [pa.field(name, types.get(name, pa.string())) for name in _ROW_FIELDS]
    names = {"int64": "int64", "double": "float64", "bool": "bool", "string": "string"}
    features: dict[str, Any] = {"image": {"_type": "Image"}}
    for field in fields[1:]:
        features[field.name] = {"dtype": names[str(field.type)], "_type": "Value"}
    info = orjson.dumps({"info": {"features": features}})
    return pa.schema(fields, metadata={b"huggingface": info})


class _NotPlain(Exception):
    """A value `_parquet_table` leaves to ``pyarrow.table`` (and its conversions)."""


#: What each Arrow type of a shard's columns is packed as (`_parquet_column`).
_PACKED: Final = {"int64": "q", "double": "d"}


def _parquet_table(
    schema: Any, images: Sequence[tuple[str, bytes]], rows: list[dict[str, Any]]
) -> Any:
    """The shard's table built from Arrow buffers, for rows of plain values (ints of
    64 bits, floats, bools, text; None anywhere); `_NotPlain` for any other value.

    ``pyarrow.table`` (``pyarrow.array``) of Python lists asks whether each is a pandas
    object, which imports pandas when it is installed (``datasets`` installs it): 45 MiB
    of a resume's peak for a shard of a hundred rows. Buffers ask nothing.
    """
    import pyarrow as pa  # noqa: PLC0415  (only the parquet format needs it)

    image_type = schema.field("image").type
    image = pa.StructArray.from_arrays(
        [
            _parquet_column(pa, image_type.field("bytes").type, [data for _n, data in images]),
            _parquet_column(pa, image_type.field("path").type, [name for name, _d in images]),
        ],
        fields=list(image_type),
    )
    arrays = [image]
    arrays += [
        _parquet_column(pa, schema.field(name).type, [row[name] for row in rows])
        for name in _ROW_FIELDS
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _parquet_column(pa: Any, arrow_type: Any, values: list[Any]) -> Any:
    """One column of `_parquet_table` (`_NotPlain` unless every value is plain)."""
    count = len(values)
    valid = bytearray((count + 7) // 8)
    nulls = 0
    name = str(arrow_type)
    if name in ("string", "binary"):
        text = str if name == "string" else bytes
        offsets = array.array("i", [0])
        data = bytearray()
        for number, value in enumerate(values):
            if value is None:
                nulls += 1
            elif type(value) is text:
                data += value.encode() if isinstance(value, str) else value
                valid[number >> 3] |= 1 << (number & 7)
            else:
                raise _NotPlain
            offsets.append(len(data))
        if len(data) >= 1 << 31:
            raise _NotPlain  # large for 32-bit offsets: pyarrow chunks it
        buffers = [offsets.tobytes(), bytes(data)]
    elif name == "bool":
        bits = bytearray((count + 7) // 8)
        for number, value in enumerate(values):
            if value is None:
                nulls += 1
                continue
            if type(value) is not bool:
                raise _NotPlain
            valid[number >> 3] |= 1 << (number & 7)
            if value:
                bits[number >> 3] |= 1 << (number & 7)
        buffers = [bytes(bits)]
    else:
        code = _PACKED[name]
        number_type = int if code == "q" else float
        packed: array.array[Any] = array.array(code)
        for number, value in enumerate(values):
            if value is None:
                nulls += 1
                packed.append(0)
            elif type(value) is number_type:
                valid[number >> 3] |= 1 << (number & 7)
                try:
                    packed.append(value)
                except OverflowError:
                    raise _NotPlain from None
            else:
                raise _NotPlain
        buffers = [packed.tobytes()]
    validity = pa.py_buffer(bytes(valid)) if nulls else None
    return pa.Array.from_buffers(
        arrow_type, count, [validity, *map(pa.py_buffer, buffers)], null_count=nulls
    )


def shard_run_name() -> str:
    """A prefix no other writer uses for its shards: ``train-<time>-<random>``, so shard
    names sort by the time they were started (the order readers take them in)."""
    return f"train-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


class Shard:
    """A shard being filled: its items' images and manifest records, as they finish."""

    __slots__ = ("images", "name", "output_format", "records")

    def __init__(self, name: str, output_format: str) -> None:
        self.name = name
        self.output_format = output_format
        self.images: list[tuple[str, bytes]] = []
        self.records: list[dict[str, Any]] = []

    @classmethod
    def numbered(cls, run_name: str, number: int, output_format: str) -> Shard:
        """The shard ``number`` of a writer whose `shard_run_name` is ``run_name``."""
        return cls(f"{run_name}-{number:05d}{_SHARD_SUFFIX[output_format]}", output_format)

    def __len__(self) -> int:
        return len(self.records)

    def build(self) -> bytes | memoryview:
        """The shard's bytes: a tar (``<key><ext>`` and ``<key>.json`` per item, in the
        order they finished) or a Parquet file (one row per item)."""
        rows = [_dataset_row(record) for record in self.records]
        if self.output_format == "parquet":
            import pyarrow as pa  # noqa: PLC0415
            import pyarrow.parquet as pq  # noqa: PLC0415

            schema = _parquet_schema()
            try:
                table = _parquet_table(schema, self.images, rows)
            except _NotPlain:
                columns: dict[str, list[Any]] = {
                    "image": [{"bytes": data, "path": name} for name, data in self.images]
                }
                for name in _ROW_FIELDS:
                    columns[name] = [row[name] for row in rows]
                table = pa.table(columns, schema=schema)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, row_group_size=256)
            return memoryview(sink.getvalue())
        import tarfile  # noqa: PLC0415

        # The bytes tarfile.open(mode="w").addfile would write (headers from TarInfo,
        # bodies padded to blocks, two zero blocks, the record padded), without its
        # file object copies, which cost a third of a shard.
        parts: list[bytes] = []
        now = int(time.time())
        size = 0
        for (name, data), row in zip(self.images, rows, strict=True):
            for member, body in ((name, data), (row["key"] + ".json", orjson.dumps(row))):
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode = len(body), now, 0o644
                header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
                padding = bytes(-len(body) % tarfile.BLOCKSIZE)
                parts += (header, body, padding)
                size += len(header) + len(body) + len(padding)
        size += 2 * tarfile.BLOCKSIZE
        parts.append(bytes(2 * tarfile.BLOCKSIZE + -size % tarfile.RECORDSIZE))
        return b"".join(parts)


# -- the store of a batch ---------------------------------------------------------------------


class Unmatched:
    """What a finished batch left in its location that no item of it claimed."""

    __slots__ = ("count", "listing")

    def __init__(self, count: int, listing: pathlib.Path | str) -> None:
        self.count = count
        self.listing = listing


#: Manifest writes never cross a page boundary that no line crosses: a SIGKILL can cut a
#: write between two pages, and a cut line is only ever the last one.
_PAGE: Final = 4096
#: Buffered manifest lines (resumed and failed items) are written once they reach this.
_FLUSH_BYTES: Final = 1 << 16
#: A claimed group's lines are read at once when they span at most this many bytes.
_GROUP_READ: Final = 1 << 23
#: An index key: the identity hash's top bits, then the line number in ``unmatched.jsonl``.
_LINE_BITS: Final = 28
_LINE_MASK: Final = (1 << _LINE_BITS) - 1
_MASK64: Final = (1 << 64) - 1
_GOLDEN: Final = 0x9E3779B97F4A7C15
#: Another odd constant for the variant, so (occurrence 1, variant 0) and (0, 1) differ.
_VARIANT_MIX: Final = 0xC2B2AE3D27D4EB4F
#: `_Earlier.claimed` of a line claimed by the item of its own index: kept as it is.
_CARRIED: Final = 2
#: A span (`BatchStore._note_span`) of a line carried from ``unmatched.jsonl``.
_EARLIER_SPAN: Final = 1 << 39
#: `_record_key` of a line that has no identity: the manifest gets no index.
_UNKEYED: Final = -2
#: The first line of an index file (`_write_index`).
_INDEX_MAGIC: Final = b"friendli-image manifest index 1\n"


def _identity_hash(item_id: str, occurrence: int, variant: int) -> int:
    """64 bits of an identity (ValueError when ``item_id`` is not hexadecimal)."""
    return (int(item_id[:16], 16) ^ (occurrence * _GOLDEN) ^ (variant * _VARIANT_MIX)) & _MASK64


def _record_key(record: Mapping[str, Any]) -> int:
    """A written line's key (the top bits of its identity hash, `_Earlier`) if it is an
    ``ok`` one, -1 for a line of another status, `_UNKEYED` for one without an identity."""
    if record.get("status") != "ok":
        return -1
    identity = _identity(record)  # type: ignore[arg-type]
    if identity is None:
        return _UNKEYED
    try:
        return _identity_hash(*identity) >> _LINE_BITS << _LINE_BITS
    except ValueError:
        return _UNKEYED


def _scan_line(line: bytes, known: str = "") -> tuple[int, int, str | None]:
    """(state, identity hash, stored file) of an earlier manifest line: state 1 for a
    valid ``ok`` line, 2 for another valid line of an identity, 0 for one to ignore.

    ``known`` is a name `valid_stored_name` accepted (the previous line's shard, say):
    the checks `_valid_record` and `_identity` make, without their calls, for the lines
    this package writes (orjson gives exact types: ``type(x) is int`` is no bool).
    """
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return 0, 0, None
    if type(record) is dict:
        index, item_id = record.get("index"), record.get("id")
        occurrence, variant = record.get("occurrence", 0), record.get("variant", 0)
        if (
            type(index) is int
            and type(item_id) is str
            and type(occurrence) is int
            and type(variant) is int
            and index >= 0
            and occurrence >= 0
            and variant >= 0
            and item_id
        ):
            try:
                identity_hash = _identity_hash(item_id, occurrence, variant)
            except ValueError:
                return 0, 0, None
            if record.get("status") != "ok":
                return 2, identity_hash, None
            file = record.get("file")
            if ((known and file == known) or valid_stored_name(file) is not None) and type(
                record.get("sha256")
            ) is str:
                return 1, identity_hash, file
            return 0, 0, None
    return _scan_record(line)


def _scan_record(line: bytes) -> tuple[int, int, str | None]:
    """`_scan_line` through `_valid_record` and `_identity` (what it must agree with)."""
    record = _valid_record(line)
    identity = None if record is None else _identity(record)
    if identity is None:
        return 0, 0, None
    assert record is not None  # noqa: S101
    try:
        identity_hash = _identity_hash(*identity)
    except ValueError:
        return 0, 0, None
    if record.get("status") != "ok":
        return 2, identity_hash, None
    return 1, identity_hash, record["file"]


class _Earlier:
    """What `BatchStore.open` gathered of the earlier runs into ``unmatched.jsonl``.

    ``keys`` holds, sorted, the identity hash's top bits and the line number of each
    line (8 bytes a line, whatever the line's length), ``offsets`` where each line starts
    (and where the last ends), and ``claimed`` marks the lines this run's items claimed
    (`_CARRIED`: claimed by the item of the same index, so the line stays as it is).
    ``checked``: open checked every line (`_scan_line`); else the lines come from an
    index (`_read_index`), and a claim checks the line it reads.
    """

    __slots__ = ("_shift", "_starts", "carried", "checked", "claimed", "keys", "offsets")

    def __init__(
        self, keys: array.array[int], offsets: array.array[int], *, checked: bool = True
    ) -> None:
        self.keys = keys
        self.offsets = offsets
        self.checked = checked
        self.claimed = bytearray(len(offsets) - 1)
        self.carried = 0
        # Where the keys of each value of their top bits start (a bucket of some 16
        # keys): a lookup bisects one bucket, not the whole array.
        bits = max(1, min(20, len(keys).bit_length() - 4))
        self._shift = 64 - bits
        self._starts = array.array(
            "Q", (bisect.bisect_left(keys, top << self._shift) for top in range(1 << bits))
        )
        self._starts.append(len(keys))

    def __len__(self) -> int:
        return len(self.claimed)

    def forget_lookups(self) -> None:
        """Free the lookups once no item will be looked up, and the keys (16 bytes an
        earlier line) unless lines were carried (`BatchStore.carry` needs them)."""
        if not self.carried:
            self.keys = self.offsets = array.array("Q")
        self._starts, self._shift = array.array("Q", [0, 0]), 64

    def find(self, item_id: str, occurrence: int, variant: int) -> int:
        """Where the keys of this identity's hash start (`lines_of`), -1 if it has none."""
        keys = self.keys
        identity_hash = _identity_hash(item_id, occurrence, variant)
        top = identity_hash >> _LINE_BITS
        bucket = identity_hash >> self._shift
        starts = self._starts
        at = bisect.bisect_left(keys, top << _LINE_BITS, starts[bucket], starts[bucket + 1])
        return at if at < len(keys) and keys[at] >> _LINE_BITS == top else -1

    def lines_of(self, at: int) -> Iterator[int]:
        """The lines that may hold the identity `find` found at ``at`` (a hash match: the
        caller checks)."""
        keys = self.keys
        if at < 0:
            return
        top = keys[at] >> _LINE_BITS
        while at < len(keys) and keys[at] >> _LINE_BITS == top:
            yield keys[at] & _LINE_MASK
            at += 1

    def span(self, line: int) -> tuple[int, int]:
        """(offset, length) of a line."""
        start = self.offsets[line]
        return start, self.offsets[line + 1] - start


class BatchStore:
    """A batch's output directory: lock, images, ``manifest.jsonl`` and resume lookups.

    `open` takes the lock and moves the earlier runs' lines to ``unmatched.jsonl`` (the
    latest line of each identity), which `claim` answers from; `append` adds this
    run's lines to a fresh ``manifest.jsonl``; `close` releases the lock and, when the
    run saw its whole input, leaves in ``unmatched.jsonl`` only the images no item
    claimed. With a shard ``output_format``, images go to `add_to_shard` instead of
    `write_files`, and `publish` writes each full shard.

    Memory does not grow with the earlier runs' items but by a few bytes each: the
    lookups are a sorted array of 8-byte keys (`_Earlier`), and each line is read back
    from ``unmatched.jsonl`` only when an item claims it.
    """

    def __init__(
        self,
        directory: pathlib.Path | str,
        resume: bool,
        output_format: str = "files",
        shard_size: int = 1000,
        *,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        # A URL: images and shards go to the location (`Location`: one PUT each on an
        # object store), the manifests live in a private local folder during the run
        # (`_pull`, `_push`). A local path: everything is in the directory.
        self._remote: Location | None = None
        if isinstance(directory, str):
            try:
                location = Location(directory, storage_options or {})
            except (ImportError, ValueError) as exc:
                raise FriendliUsageError(
                    f"cannot open out_dir {directory!r}: {exc}; a URL needs fsspec and the "
                    "package of its file system (pip install fsspec s3fs, gcsfs, adlfs...)"
                ) from None
            if location.local:
                directory = pathlib.Path(location.root)
            else:
                self._remote = location
                directory = pathlib.Path()
        self.directory = directory
        self._uri_prefix = str(directory / "_")[:-1]
        self._located: tuple[str, pathlib.Path | None, str] = ("", None, "")
        # Name -> size of each file in a URL location (listed once, then kept current).
        self._remote_sizes: dict[str, int] = {}
        # The private local folder of a URL location's run (`_pull`), removed at close.
        self._staging: pathlib.Path | None = None
        self.output_format = output_format
        self._shard_size = shard_size
        self._shard: Shard | None = None
        self._shards = 0
        self._run_name = ""
        # Shard name -> its size on disk (None: absent), looked up once per run.
        self._shard_sizes: dict[str, int | None] = {}
        self._earlier_formats: set[str] = set()
        self._resume = resume
        self._dir: Directory | None = None
        self._lock: int | None = None
        self._manifest: IO[bytes] | None = None
        self._reader: IO[bytes] | None = None
        self._reader_lock = threading.Lock()
        self._earlier: _Earlier | None = None
        # The manifest: its size, lines waiting to be written, and where each ok line of
        # this run is (offset << 24 | length, by index; 0: none), for metadata.jsonl.
        self._write_lock = threading.Lock()
        # Writes under way (`write_files`, `publish`): close waits for those
        # under way, publishes the full shards whose turn never came, and refuses
        # later ones. A stopped batch cancels its items, not the threads writing them.
        self._writes = threading.Condition()
        self._writing = 0
        self._closing = False
        self._full: list[Shard] = []
        self._size = 0
        self._pending: list[tuple[int, bytes, int]] = []
        self._pending_bytes = 0
        self._spans = array.array("Q")
        self._last_span = -1  # the highest index with a span
        self._settled = False
        # The resume index of this run's manifest (`_write_index`), kept as lines are
        # written: the key of each ok line, where each line starts. False once a line
        # cannot be keyed; never on a URL location (its manifest is copied in and out).
        self._keys = array.array("Q")
        self._starts = array.array("Q")
        self._indexed = self._remote is None
        # Where this run's own lines are in the manifest once an earlier one was adopted
        # in front of them (`carry`): how far they moved.
        self._moved = 0
        # pathlib's join parses and normalises the name (3 µs an item); a stored name is
        # plain (`valid_stored_name`), which needs none of it.
        self._child = directory.__truediv__
        # The latest stored name `_valid_ok` accepted (the shard of the next item, often),
        # and the latest shard (name, size) `_shard_present` found.
        self._valid_file: object = None
        self._present_shard: tuple[object, object] = (None, None)
        # What the index said of the earlier metadata.jsonl (`_write_index`), and this
        # run's (its identity, its last index), for the next index.
        self._earlier_metadata: Any = None
        self._metadata: tuple[tuple[int, int, int, int], int] | None = None

    @property
    def manifest_path(self) -> pathlib.Path:
        return self.directory / MANIFEST_NAME

    @property
    def where(self) -> str:
        """The location as the user gave it: a path or a URL."""
        return str(self.directory) if self._remote is None else self._remote.uri

    @property
    def local(self) -> bool:
        """True for a directory of this machine, False for a URL location (fsspec)."""
        return self._remote is None

    @property
    def resuming(self) -> bool:
        """True when an earlier run's items may be resumed (open found some)."""
        return self._resume and self._earlier is not None

    @property
    def earlier_items(self) -> int:
        """How many lines of earlier runs a resume may claim (0 when not resuming)."""
        return len(self._earlier) if self.resuming and self._earlier is not None else 0

    @property
    def closed(self) -> bool:
        """True once `close` has begun: nothing more is added."""
        return self._closing

    @property
    def sharded(self) -> bool:
        """True when images go into shards (`add_to_shard`), not files."""
        return self.output_format != "files"

    # -- opening and closing (blocking; run on a worker thread) ---------------------

    def open(self) -> None:
        try:
            if self._remote is not None:
                self._pull()
            self._dir = Directory(self.directory, create=True)
            self._acquire_lock()
            self._gather_earlier()
            self._check_format()
            self._run_name = shard_run_name()
            self._dir.write_atomic(MANIFEST_NAME, b"", sync=True)
            appending = self._dir.open(MANIFEST_NAME, os.O_WRONLY | os.O_APPEND)
            self._manifest = os.fdopen(appending, "wb", 0)
            if self._earlier is not None:
                self._reader = self._dir.read(UNMATCHED_NAME)
        except OSError as exc:
            self.close(complete=False)
            raise FriendliUsageError(
                f"cannot use out_dir {self.where!r}: {exc}; pass a writable location"
            ) from exc
        except BaseException:
            self.close(complete=False)
            raise

    def _check_format(self) -> None:
        others = self._earlier_formats - {self.output_format}
        if others:
            raise FriendliUsageError(
                f"out_dir {self.where!r} holds a batch written as "
                f"output_format={sorted(others)[0]!r}; rerun with that format to resume it, "
                "or pass another out_dir"
            )
        if self.sharded and not self._resume and self._earlier is not None:
            raise FriendliUsageError(
                f"resume=False into {self.where!r} would put items that are already "
                "in its shards into new shards too; move the earlier run aside "
                "('friendli-image batch --no-resume' does) or pass another out_dir"
            )

    def _acquire_lock(self) -> None:
        assert self._dir is not None  # noqa: S101
        fd = self._dir.open(LOCK_NAME, os.O_RDWR | os.O_CREAT)
        if sys.platform == "win32":  # pragma: no cover - no fcntl: no lock
            self._lock = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise FriendliUsageError(
                f"out_dir {str(self.directory)!r} is in use by another batch"
                f"{f' (process {holder})' if holder.isdigit() else ''}: two batches in one "
                "directory would send every request twice and interleave the manifest; "
                "wait for it to finish (then rerun to resume) or pass another out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock = fd

    def _gather_earlier(self) -> None:
        """Move every earlier line (unmatched.jsonl, then the manifest) into unmatched.jsonl,
        the latest line of each identity, ok ones only; index them (`_Earlier`).

        A finished run left the index of its manifest (`_read_index`): when it is still
        the manifest's, nothing is read but the index. Otherwise one pass reads each line
        once, keeping 17 bytes of it (where it starts, its identity hash, whether it is
        ok); the latest line of each identity is then found by sorting the keys. A
        finished run (one manifest, every line the latest of its identity) is renamed,
        not copied.
        """
        assert self._dir is not None  # noqa: S101
        found = _read_index(self._dir)
        # The index describes the manifest as it is now, and the manifest is about to
        # move: the index goes first, so no later state of the location pairs with it.
        self._dir.remove(INDEX_NAME)
        if found is not None:
            order, starts, formats, self._earlier_metadata = found
            self._earlier_formats.update(formats)
            end = starts.pop()
            live = None  # every line of the index is the latest ok line of its identity
            if len(order) < len(starts):  # and the others are failed lines
                live = bytearray(len(starts))
                for key in order:
                    live[key & _LINE_MASK] = 1
            self._keep_earlier([(MANIFEST_NAME, end)], starts, order, live, checked=False)
            return
        starts = array.array("Q")
        hashes = array.array("Q")
        states = bytearray()
        keys = array.array("Q")
        sources: list[tuple[str, int]] = []  # (name, end of its complete lines)
        known = ""  # the latest stored file named: checked, its format noted
        for name in (UNMATCHED_NAME, MANIFEST_NAME):
            try:
                handle = self._dir.read(name)
            except FileNotFoundError:
                continue
            offset = 0
            number = len(states)
            with handle:
                for line in handle:
                    if line[-1:] != b"\n":
                        break  # cut short by a crash mid-append
                    state, identity_hash, file = _scan_line(line, known)
                    starts.append(offset)
                    hashes.append(identity_hash)
                    states.append(state)
                    if state:
                        keys.append(identity_hash >> _LINE_BITS << _LINE_BITS | number)
                    if file is not None and file != known:
                        known = file
                        self._earlier_formats.add(_format_of(file))
                    offset += len(line)
                    number += 1
            sources.append((name, offset))
        if len(states) > _LINE_MASK:
            raise FriendliUsageError(
                f"out_dir {str(self.directory)!r} holds more than {_LINE_MASK:,} manifest "
                "lines; move the earlier runs aside ('friendli-image batch --no-resume')"
            )
        order = _sorted(keys)
        del keys
        live = _latest_ok(order, hashes, states)
        del hashes, states
        self._keep_earlier(sources, starts, order, live, checked=True)

    def _keep_earlier(
        self,
        sources: list[tuple[str, int]],
        starts: array.array[int],
        order: array.array[int],
        live: bytearray | None,
        *,
        checked: bool,
    ) -> None:
        """Make ``unmatched.jsonl`` of the ``live`` lines of ``sources`` (``starts``: where
        each line starts; ``order``: the sorted keys of the lines that may be live) and
        index it. ``live`` None: every line is live."""
        assert self._dir is not None  # noqa: S101
        count = len(starts) if live is None else sum(live)
        if not count:
            self._dir.remove(UNMATCHED_NAME)
            return
        if len(sources) == 1 and count == len(starts):
            # One source whose every line is kept: it becomes unmatched.jsonl as it is.
            name, end = sources[0]
            self._rename_to_unmatched(name, end)
            starts.append(end)
            self._earlier = _Earlier(order, starts, checked=checked)
            return
        if live is None:
            live = bytearray(b"\x01") * len(starts)
        renumbered = array.array("Q", bytes(8 * len(starts)))
        offsets = array.array("Q")

        def kept() -> Iterator[bytes]:
            assert self._dir is not None  # noqa: S101
            number = written = 0
            for name, _end in sources:
                with self._dir.read(name) as handle:
                    for line in handle:
                        if not line.endswith(b"\n"):
                            break  # the line a crash cut short
                        if live[number]:
                            renumbered[number] = len(offsets)
                            offsets.append(written)
                            written += len(line)
                            yield line
                        number += 1
            offsets.append(written)

        self._dir.write_atomic(UNMATCHED_NAME, kept(), sync=True)
        index = array.array(
            "Q",
            (
                key & ~_LINE_MASK | renumbered[key & _LINE_MASK]
                for key in order
                if live[key & _LINE_MASK]
            ),
        )
        self._earlier = _Earlier(index, offsets, checked=checked)

    def _rename_to_unmatched(self, name: str, end: int) -> None:
        assert self._dir is not None  # noqa: S101
        found = self._dir.size_and_mtime(name)
        if found is not None and found[0] != end:
            fd = self._dir.open(name, os.O_WRONLY)
            try:
                os.ftruncate(fd, end)  # drop a line a crash cut short
            finally:
                os.close(fd)
        if name != UNMATCHED_NAME:
            self._dir.rename(name, UNMATCHED_NAME)

    def close(self, *, complete: bool) -> Unmatched | None:
        """Publish the open shard and release everything; with ``complete`` (the run saw
        its whole input), keep in ``unmatched.jsonl`` only the stored images no item
        claimed and report them. A ``files`` location gets its ``metadata.jsonl``."""
        with self._writes:
            self._closing = True
            self._writes.wait_for(lambda: not self._writing)
            shards, self._full = self._full, []
        shard, self._shard = self._shard, None
        if shard is not None:
            shards.append(shard)
        opened = self._manifest is not None
        if self._earlier is not None:
            self._earlier.forget_lookups()  # no claim follows: only what was claimed counts
        try:
            if self._manifest is not None:
                self.flush()
                for shard in shards:
                    self._publish(shard)
                self.carry()
        finally:
            unmatched = self._close(complete=complete)
            if self._remote is not None:
                self._push(opened)
        if unmatched is not None and self._remote is not None:
            unmatched = Unmatched(unmatched.count, self.uri_of(UNMATCHED_NAME))
        return unmatched

    def _close(self, *, complete: bool) -> Unmatched | None:
        opened = self._manifest is not None
        for handle in (self._manifest, self._reader):
            if handle is not None:
                handle.close()
        self._manifest = self._reader = None
        unmatched = None
        try:
            if complete and self._dir is not None:
                with contextlib.suppress(OSError, FriendliUsageError):
                    unmatched = self._settle()
            if opened and self._dir is not None and not self.sharded:
                with contextlib.suppress(OSError, FriendliUsageError):
                    self._write_metadata()
            if opened and self._dir is not None:
                with contextlib.suppress(OSError, FriendliUsageError):
                    self._leave_index()
                # Under the lock, every write of this run done: what is left is a killed
                # run's. Not at open: listing a million images delays the first request.
                with contextlib.suppress(OSError):
                    self._dir.remove_temporaries()
        finally:
            if self._lock is not None:
                os.close(self._lock)  # closing the descriptor releases the lock
                self._lock = None
            if self._dir is not None:
                self._dir.close()
                self._dir = None
        return unmatched

    def carry(self) -> None:
        """Put the carried lines (`append_resumed`) into the manifest (blocking).

        When every earlier line was carried (a rerun of the same input, with or without
        items after it), ``unmatched.jsonl`` is the front of the manifest as it is: this
        run's lines are appended to it, and it replaces the manifest; nothing else is
        written. A kill before the replace leaves both files, whose lines a rerun reads
        (the same line twice is one item). Otherwise the carried lines are appended to
        the manifest like any resumed item's.
        """
        earlier = self._earlier
        if earlier is None or not earlier.carried or self._manifest is None:
            return
        try:
            self.flush()
            if earlier.carried == len(earlier) and len(earlier) + len(self._starts) <= _LINE_MASK:
                self._adopt(earlier)
            else:
                self._copy_carried(earlier)
        except BaseException:
            # Not in the manifest: they stay earlier lines (unclaimed), which close keeps.
            for number, claimed in enumerate(earlier.claimed):
                if claimed == _CARRIED:
                    earlier.claimed[number] = 0
            earlier.carried = 0
            self._indexed = False
            raise

    def _adopt(self, earlier: _Earlier) -> None:
        assert self._dir is not None  # noqa: S101
        front = earlier.offsets[-1]
        appending = self._dir.open(UNMATCHED_NAME, os.O_WRONLY | os.O_APPEND)
        with os.fdopen(appending, "wb", 0) as out, self._dir.read(MANIFEST_NAME) as own:
            size, rest = front, b""
            while chunk := own.read(1 << 20):
                chunk = rest + chunk
                cut = chunk.rfind(b"\n") + 1
                size, rest = _write_paged(out, size, chunk[:cut]), chunk[cut:]
        self._dir.rename(UNMATCHED_NAME, MANIFEST_NAME)
        # The manifest is now the earlier lines, then this run's: keys and starts follow.
        moved = len(earlier)
        self._keys = _merged(earlier.keys, array.array("Q", (key + moved for key in self._keys)))
        starts = earlier.offsets
        starts.pop()
        starts.extend(start + front for start in self._starts)
        self._starts = starts
        self._size += front
        self._moved = front
        self._earlier = None  # no unmatched.jsonl: every earlier line is this run's

    def _copy_carried(self, earlier: _Earlier) -> None:
        assert self._dir is not None  # noqa: S101
        tops = array.array("Q", bytes(8 * len(earlier)))
        for key in earlier.keys:
            tops[key & _LINE_MASK] = key & ~_LINE_MASK
        claimed = earlier.claimed
        with self._dir.read(UNMATCHED_NAME) as handle:
            for number, line in enumerate(handle):
                if number >= len(claimed):
                    break
                if claimed[number] == _CARRIED:
                    index = orjson.loads(line)["index"]
                    self._pending.append((index, line, tops[number]))
                    self._pending_bytes += len(line)
                    if self._pending_bytes >= _FLUSH_BYTES:
                        self.flush()
        self.flush()
        earlier.carried = 0

    def _leave_index(self) -> None:
        """Write the resume index of the manifest (`_write_index`) for the next run, when
        every line of it is keyed and the manifest is all there is to resume from."""
        assert self._dir is not None  # noqa: S101
        if not self._indexed or self._dir.identity(UNMATCHED_NAME) is not None:
            return
        manifest = self._dir.identity(MANIFEST_NAME)
        if manifest is None or manifest[0] != self._size or len(self._starts) > _LINE_MASK:
            return
        self._starts.append(self._size)
        keys, self._keys = self._keys, array.array("Q")
        if not self._moved:
            keys = _sorted(keys)
        formats = {self.output_format} if keys else set()
        _write_index(self._dir, manifest, keys, self._starts, formats, metadata=self._metadata)

    def _unclaimed(self, *, present: bool) -> Iterator[tuple[bytes, StoredRecord]]:
        """The lines of ``unmatched.jsonl`` no item of this run claimed (with ``present``,
        only those whose stored file is there)."""
        assert self._dir is not None  # noqa: S101
        earlier = self._earlier
        if earlier is None:
            return
        with self._dir.read(UNMATCHED_NAME) as handle:
            for number, line in enumerate(handle):
                if not self._settled and (number >= len(earlier) or earlier.claimed[number]):
                    continue
                record = _valid_record(line)
                if record is None or record.get("status") != "ok":
                    continue
                if present and self._stored_size(record["file"]) is None:
                    continue
                yield line, record

    def _settle(self) -> Unmatched | None:
        assert self._dir is not None  # noqa: S101
        if self._earlier is None:
            return None
        count = 0

        def kept() -> Iterator[bytes]:
            nonlocal count
            for line, _record in self._unclaimed(present=True):
                count += 1
                yield line

        self._dir.write_atomic(UNMATCHED_NAME, kept(), sync=True)
        self._settled = True
        if not count:
            self._dir.remove(UNMATCHED_NAME)
            self._earlier = None
            return None
        return Unmatched(count, self.directory / UNMATCHED_NAME)

    def _write_metadata(self) -> None:
        """Rewrite ``metadata.jsonl``: one row per stored image (``file_name`` and every
        field), this run's items in input order first, then the kept earlier images."""
        assert self._dir is not None  # noqa: S101

        reused = self._reusable_metadata()

        def rows() -> Iterator[bytes]:
            assert self._dir is not None  # noqa: S101
            if reused:
                # The earlier rows, as the earlier run wrote them: the same lines.
                with self._dir.read(METADATA_NAME) as earlier:
                    while chunk := earlier.read(1 << 20):
                        yield chunk
            with self._dir.read(MANIFEST_NAME) as manifest:
                for span in self._spans:
                    if span:
                        offset = span >> 24
                        if offset & _EARLIER_SPAN:  # a carried line, at the front (`carry`)
                            if reused or not self._moved:
                                continue  # its row is above; or an earlier line below
                            offset ^= _EARLIER_SPAN
                        else:
                            offset += self._moved
                        # This run's own lines, each written whole: no need to check them.
                        yield _metadata_row(
                            orjson.loads(os.pread(manifest.fileno(), span & _MAX_LINE, offset))
                        )
            # Earlier lines name images that may be gone (unless close settled them).
            for _line, record in self._unclaimed(present=not self._settled):
                yield _metadata_row(record)

        self._dir.write_atomic(METADATA_NAME, rows())
        identity = self._dir.identity(METADATA_NAME)
        if identity is not None and not self._unclaimed_rows():
            self._metadata = identity, self._last_span

    def _unclaimed_rows(self) -> bool:
        """True if metadata.jsonl may hold rows of earlier lines no item claimed."""
        return self._earlier is not None

    def _reusable_metadata(self) -> bool:
        """True when metadata.jsonl is the earlier run's, unchanged, and this run's rows
        are those rows followed by rows of higher indices: every earlier line was kept at
        its index (`carry` adopted them all) and the earlier index vouches for the file."""
        assert self._dir is not None  # noqa: S101
        known = self._earlier_metadata
        if not self._moved or not isinstance(known, list) or len(known) != 2:
            return False
        identity, last = known
        found = self._dir.identity(METADATA_NAME)
        if found is None or list(found) != identity or not isinstance(last, int):
            return False
        for index, span in enumerate(self._spans):
            if span and not (span >> 24) & _EARLIER_SPAN and index <= last:
                return False  # a new row among the earlier ones
        return True

    # -- per item -------------------------------------------------------------------

    def has_earlier(self, item_id: str, occurrence: int, variant: int = 0) -> bool:
        """True if an earlier run may have this item (so `claim` is worth calling)."""
        return self.earlier_at(item_id, occurrence, variant) >= 0

    def earlier_at(self, item_id: str, occurrence: int, variant: int = 0) -> int:
        """Where the item's lines may start in the index of the earlier runs, -1 if no
        earlier run has it; `claim_line` takes it, to look the item up once."""
        earlier = self._earlier
        return -1 if earlier is None else earlier.find(item_id, occurrence, variant)

    def claim(
        self, item_id: str, occurrence: int, variant: int = 0
    ) -> tuple[StoredRecord | None, bool]:
        """Claim the identity for this run: (its earlier record, checked) when resuming
        and its image is there, else (None, True).

        Checked is False when only `verify` can tell (a file of the right size whose
        modification time is not the one recorded: copied, touched, or rewritten).
        Blocking, but short: a read of the line and a stat of its file (a shard's stat
        is cached).
        """
        record, checked, _line = self.claim_line(
            item_id, occurrence, variant, self.earlier_at(item_id, occurrence, variant)
        )
        return record, checked

    def claim_line(
        self, item_id: str, occurrence: int, variant: int, at: int
    ) -> tuple[StoredRecord | None, bool, bytes]:
        """`claim`, given where `earlier_at` found the item, with the line of the record
        it returns (for `append_resumed`)."""
        record, checked, line, _number = self.claim_group([(item_id, occurrence, variant, at)])[0]
        return record, checked, bytes(line)

    def claim_group(self, items: Sequence[tuple[str, int, int, int]]) -> list[Claim]:
        """`claim_line` of each (id, occurrence, variant, `earlier_at`) of a group, with
        the number of the earlier line its record is (for `append_resumed`; -1: none).

        The group's lines are read with one ``pread`` when they lie together in
        ``unmatched.jsonl``, as the items of a rerun of the same input do.
        """
        earlier = self._earlier
        if earlier is None or self._reader is None or self._dir is None:
            return [(None, True, b"", -1)] * len(items)
        keys, offsets = earlier.keys, earlier.offsets
        low, high, total = 1 << 62, 0, 0
        for _id, _occurrence, _variant, at in items:
            if at >= 0:
                number = keys[at] & _LINE_MASK
                start = offsets[number]
                end = offsets[number + 1]
                total += end - start
                # Not min() and max(): two calls a line cost more than the comparisons.
                if start < low:  # noqa: PLR1730
                    low = start
                if end > high:  # noqa: PLR1730
                    high = end
        block = memoryview(b"")
        if total and high - low <= min(2 * total + _PAGE, _GROUP_READ):
            block = memoryview(os.pread(self._reader.fileno(), high - low, low))
        # The common case inline (a resume claims every finished item, and the calls of
        # `_claim_one` cost more than the parse): the item's first line is in the block
        # and holds its identity. Anything else goes through `_claim_one`'s search.
        claims: list[Claim] = []
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        claim_found, claim_one = self._claim_found, self._claim_one
        high = low + len(block)
        for item in items:
            item_id, occurrence, variant, at = item
            if at < 0:
                claims.append(_NO_CLAIM)
                continue
            number = keys[at] & _LINE_MASK
            start = offsets[number]
            end = offsets[number + 1]
            record = None
            if low <= start and end <= high:
                line = block[start - low : end - low]
                try:
                    record = loads(line)
                except decode_error:
                    record = None
            if (
                type(record) is dict
                and record.get("id") == item_id
                and record.get("occurrence", 0) == occurrence
                and record.get("variant", 0) == variant
            ):
                claims.append(claim_found(record, line, number))
            else:
                claims.append(claim_one(item, block, low))
        return claims

    def _claim_one(self, item: tuple[str, int, int, int], block: memoryview, low: int) -> Claim:
        """`claim_group` of one item; ``block`` holds the lines from offset ``low`` on."""
        item_id, occurrence, variant, at = item
        earlier = self._earlier
        assert earlier is not None  # noqa: S101
        assert self._reader is not None  # noqa: S101
        assert self._dir is not None  # noqa: S101
        keys, offsets = earlier.keys, earlier.offsets
        if at < 0:
            return None, True, b"", -1
        top = keys[at] >> _LINE_BITS
        while True:
            number = keys[at] & _LINE_MASK
            start = offsets[number]
            end = offsets[number + 1]
            if low <= start and end - low <= len(block):
                line: bytes | memoryview = block[start - low : end - low]
            else:
                line = os.pread(self._reader.fileno(), end - start, start)
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = None  # only a line of an index's manifest is not checked yet
            if (
                type(record) is dict
                and record.get("id") == item_id
                and record.get("occurrence", 0) == occurrence
                and record.get("variant", 0) == variant
            ):
                break
            at += 1  # another identity with the same hash bits
            if at >= len(keys) or keys[at] >> _LINE_BITS != top:
                return None, True, b"", -1
        return self._claim_found(record, line, number)

    def _claim_found(self, record: StoredRecord, line: bytes | memoryview, number: int) -> Claim:
        """Claim earlier line ``number``, found to hold the item's identity: its record
        when the line is a valid ``ok`` one and its image is there."""
        earlier = self._earlier
        assert earlier is not None  # noqa: S101
        assert self._dir is not None  # noqa: S101
        earlier.claimed[number] = 1
        if not earlier.checked and not self._valid_ok(record):
            return None, True, b"", -1
        if not self._resume:
            return None, True, b"", -1
        name = record["file"]
        if name.endswith(_SHARD_ENDINGS):
            # The items of a shard follow one another: its answer is kept.
            shard = (name, record.get("shard_bytes"))
            if shard != self._present_shard:
                if not self._shard_present(record):
                    return None, True, b"", -1
                self._present_shard = shard
            return record, True, line, number
        if self._remote is not None:
            # A PUT is whole or absent: the recorded size is enough, no download.
            if self._remote_sizes.get(name) != record.get("bytes"):
                return None, True, b"", -1
            return record, True, line, number
        found = self._dir.size_and_mtime(name)
        if found is None or found[0] != record.get("bytes", found[0]):
            return None, True, b"", -1
        return record, found[1] == record.get("mtime_ns"), line, number

    def _valid_ok(self, record: StoredRecord) -> bool:
        """True if a record read from an index's manifest is an ``ok`` one `_scan_line`
        would have kept (the index was made from lines this package wrote, but the
        manifest may have been edited since without changing its size or time)."""
        file = record.get("file")
        if record.get("status") != "ok" or type(record.get("sha256")) is not str:
            return False
        if file == self._valid_file:
            return True
        if valid_stored_name(file) is None:
            return False
        self._valid_file = file
        return True

    def verify(self, record: StoredRecord) -> bool:
        """True if the record's image file has its recorded sha256 (blocking: reads it)."""
        assert self._dir is not None  # noqa: S101
        return bool(self._dir.sha256(record["file"]) == record["sha256"])

    def _shard_present(self, record: StoredRecord) -> bool:
        """True if the record's shard was published (present with its recorded size)."""
        name = record["file"]
        with self._reader_lock:
            if name not in self._shard_sizes:
                self._shard_sizes[name] = self._stored_size(name)
            size = self._shard_sizes[name]
        return size is not None and bool(size == record.get("shard_bytes"))

    def _stored_size(self, name: str) -> int | None:
        """The size of the stored image or shard ``name``, None if it is absent."""
        if self._remote is not None:
            return self._remote_sizes.get(name)
        assert self._dir is not None  # noqa: S101
        found = self._dir.size_and_mtime(name)
        return None if found is None else found[0]

    def path_of(self, name: str) -> pathlib.Path | None:
        """The local path of the stored file ``name`` (None on a URL location)."""
        return None if self._remote is not None else self._child(name)

    def uri_of(self, name: str) -> str:
        """Where the stored file ``name`` is: a local path, or the location's URL."""
        if self._remote is not None:
            return f"{self._remote.uri}/{name}"
        # ``str(directory / name)`` for a plain name, at a tenth of its cost.
        return self._uri_prefix + name

    def located(self, name: str) -> tuple[pathlib.Path | None, str]:
        """(`path_of`, `uri_of`) the stored file ``name``; the latest is remembered, as
        the items of a shard ask for it one after the other."""
        if self._located[0] != name:
            self._located = (name, self.path_of(name), self.uri_of(name))
        return self._located[1], self._located[2]

    # -- a URL location (blocking) --------------------------------------------------

    def _pull(self) -> None:
        """Make a private local folder with the location's manifests, and add to its
        ``unmatched.jsonl`` the items of every published shard no manifest names (a
        killed run's): they are stored, and must not be made again."""
        assert self._remote is not None  # noqa: S101
        import tempfile  # noqa: PLC0415

        self._staging = self.directory = pathlib.Path(tempfile.mkdtemp(prefix="friendli-batch-"))
        remote = self._remote
        self._remote_sizes = remote.files()
        known: set[str] = set()
        with Directory(self.directory) as folder:
            for name in (MANIFEST_NAME, UNMATCHED_NAME):
                if name not in self._remote_sizes:
                    continue
                data = remote.read(name)
                folder.write_atomic(name, data)
                for line in data.splitlines():
                    record = _valid_record(line)
                    if record is not None and record.get("status") == "ok":
                        known.add(record["file"])
            found: list[bytes] = []
            for name, size in sorted(self._remote_sizes.items()):
                if name not in known and _format_of(name) != "files" and valid_stored_name(name):
                    found.extend(
                        orjson.dumps({**record, "shard_bytes": size}) + b"\n"
                        for record in remote.shard_records(name)
                    )
            if found:
                with contextlib.suppress(FileNotFoundError), folder.read(UNMATCHED_NAME) as old:
                    found.insert(0, old.read())
                folder.write_atomic(UNMATCHED_NAME, b"".join(found))

    def _push(self, opened: bool) -> None:
        """Write the run's manifests to the location (one PUT each) and remove the
        local folder."""
        assert self._remote is not None  # noqa: S101
        import shutil  # noqa: PLC0415

        folder, self._staging = self._staging, None
        if folder is None:
            return
        try:
            if opened:
                for name in (MANIFEST_NAME, UNMATCHED_NAME, METADATA_NAME):
                    try:
                        data = (folder / name).read_bytes()
                    except FileNotFoundError:
                        if name == UNMATCHED_NAME and name in self._remote_sizes:
                            self._remote.remove(name)
                        continue
                    self._remote.write(name, data)
        except OSError as exc:
            raise FriendliUsageError(
                f"cannot write the manifest to {self._remote.uri!r}: {exc}; the published "
                "shards are kept and a rerun finds their items again"
            ) from exc
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def write_files(
        self, group: Sequence[tuple[str, bytes | memoryview, dict[str, Any]]]
    ) -> list[str]:
        """Write each image of a group atomically, then their manifest lines in one append
        (blocking); return their sha256s. Fills each record's ``file``, ``sha256`` and
        ``mtime_ns`` (what resume checks first).

        A line is written only once its image is complete under its name, so a kill
        leaves at most images without lines (made again by a rerun), never a line
        without its image.
        """
        with self._write_turn():
            return self._write_files(group)

    def _write_files(
        self, group: Sequence[tuple[str, bytes | memoryview, dict[str, Any]]]
    ) -> list[str]:
        digests: list[str] = []
        lines: list[tuple[int, bytes, int]] = []
        try:
            for (name, image, record), mtime in zip(group, self._write_group(group), strict=True):
                digest = hashlib.sha256(image).hexdigest()
                record["file"], record["sha256"] = name, digest
                if mtime is not None:
                    record["mtime_ns"] = mtime
                lines.append((record["index"], orjson.dumps(record) + b"\n", _record_key(record)))
                digests.append(digest)
        finally:
            if lines:
                self._write_lines(lines)
        return digests

    def _write_group(
        self, group: Sequence[tuple[str, bytes | memoryview, dict[str, Any]]]
    ) -> Iterator[int | None]:
        """Write a group's images, yielding each one's modification time (None on a URL)
        once it is complete. On a URL location the PUTs run at once (`Location.write_many`),
        and yield after the last: a PUT costs a round trip, one after the other would
        bound the batch by its latency."""
        if self._remote is not None and len(group) > 1:
            files = {name: bytes(image) for name, image, _record in group}
            try:
                self._remote.write_many(files)
            except OSError as exc:
                raise _usage(self.where, exc, "write to") from exc
            self._remote_sizes.update((name, len(data)) for name, data in files.items())
            yield from (None for _name in files)
            return
        name = ""
        try:
            for name, image, _record in group:
                yield self._write_stored(name, image)
        except OSError as exc:
            raise _usage(self.uri_of(name), exc, "write") from exc

    def _write_stored(self, name: str, data: bytes | memoryview) -> int | None:
        """Write an image or a shard atomically: into the directory (returns its
        modification time, ns), or one PUT (returns None)."""
        if self._remote is not None:
            self._remote.write(name, bytes(data))
            self._remote_sizes[name] = len(data)
            return None
        assert self._dir is not None  # noqa: S101
        return self._dir.write_atomic(name, data)

    def add_to_shard(
        self, key: str, image: bytes | memoryview, extension: str, record: dict[str, Any]
    ) -> tuple[str, str, Shard | None]:
        """Put an item into the open shard (no I/O): fills the record's ``file`` and
        ``sha256``; returns them and, when the shard is now full, the shard to `publish`."""
        shard = self._shard
        if shard is None:
            shard = self._shard = Shard.numbered(self._run_name, self._shards, self.output_format)
            self._shards += 1
        digest = hashlib.sha256(image).hexdigest()
        record["file"], record["sha256"] = shard.name, digest
        shard.images.append((key + extension, bytes(image)))
        shard.records.append(record)
        if len(shard) < self._shard_size:
            return shard.name, digest, None
        self._shard = None
        with self._writes:
            self._full.append(shard)
        return shard.name, digest, shard

    def publish(self, shard: Shard) -> None:
        """Write a full shard from `add_to_shard` (blocking): its manifest lines first,
        then the shard atomically, so a kill between the two leaves lines that name an
        absent shard, never a shard whose items the manifest does not know. Once the
        store is closing, `close` publishes it instead."""
        with self._writes:
            if self._closing or shard not in self._full:
                return
            self._full.remove(shard)
            self._writing += 1
        try:
            self._publish(shard)
        finally:
            self._end_write()

    @contextlib.contextmanager
    def _write_turn(self) -> Iterator[None]:
        """Count a write under way (a worker thread's, or the loop's), which `close`
        waits for."""
        with self._writes:
            if self._closing:
                raise FriendliUsageError(
                    f"out_dir {self.where!r} was closed while this write waited: the batch "
                    "stopped; rerun it to make what is missing"
                )
            self._writing += 1
        try:
            yield
        finally:
            self._end_write()

    def _end_write(self) -> None:
        with self._writes:
            self._writing -= 1
            self._writes.notify_all()

    def _publish(self, shard: Shard) -> None:
        try:
            data = shard.build()
            size = len(data)
            self._write_lines(
                [
                    (-1, orjson.dumps({**r, "shard_bytes": size}) + b"\n", _record_key(r))
                    for r in shard.records
                ]
            )
            self._write_stored(shard.name, data)
        except OSError as exc:
            raise _usage(self.directory / shard.name, exc, "write") from exc

    def append_resumed(
        self, index: int, record: StoredRecord, line: bytes | memoryview, number: int = -1
    ) -> None:
        """`append` the line of a resumed item: its earlier ``line`` (from `claim_group`,
        line ``number`` of ``unmatched.jsonl``) with its ``index`` in this run,
        ``{**record, "index": index}``.

        When the index is the earlier one, the line is that line as it is: nothing is
        written now; `carry` keeps it when the run closes (a kill before loses nothing,
        the line is still in ``unmatched.jsonl``). Otherwise, a line this package wrote
        starts with its index: only that is rewritten, instead of the whole record
        serialized again.
        """
        earlier = self._earlier
        if number >= 0 and earlier is not None and record.get("index") == index:
            earlier.claimed[number] = _CARRIED
            earlier.carried += 1
            start = earlier.offsets[number]
            length = earlier.offsets[number + 1] - start
            if length <= _MAX_LINE and not self.sharded:
                with self._write_lock:  # the file writer's thread notes spans too
                    self._note_span(index, start | _EARLIER_SPAN, length)
            return
        line = bytes(line)
        if line.startswith(b'{"index":') and line.find(b'"index":', 9) < 0:
            comma = line.find(b",", 9)
            if comma > 0 and line[9:comma].isdigit():
                line = b'{"index":%d%s' % (index, line[comma:])
                self._pending.append((index, line, _record_key(record)))
                self._pending_bytes += len(line)
                if self._pending_bytes >= _FLUSH_BYTES:
                    self.flush()
                return
        self.append({**record, "index": index})

    def append(self, record: Mapping[str, Any]) -> None:
        """Add a manifest line of an item that wrote nothing now (resumed or failed).

        Such lines are written in groups (`flush`): a kill that loses one loses nothing
        a rerun needs (a resumed item's earlier line is still in ``unmatched.jsonl``; a
        failed item is tried again).
        """
        line = orjson.dumps(record) + b"\n"
        ok = record.get("status") == "ok"
        self._pending.append((record["index"] if ok else -1, line, _record_key(record)))
        self._pending_bytes += len(line)
        if self._pending_bytes >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the lines `append` holds (blocking, but short: one append of 64 KiB)."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if pending:
            self._write_lines(pending)

    def _write_lines(self, lines: Sequence[tuple[int, bytes, int]]) -> None:
        """Append lines (with the index of each ok one, else -1, and its key, `_record_key`),
        whole lines per write and no write across a page boundary that no line crosses."""
        assert self._manifest is not None  # noqa: S101
        with self._write_lock:
            data = b"".join(line for _index, line, _key in lines)
            offset = self._size
            keys, starts = self._keys, self._starts
            spans = not self.sharded  # for metadata.jsonl
            for index, line, key in lines:
                if spans and index >= 0 and len(line) <= _MAX_LINE:
                    self._note_span(index, offset, len(line))
                if key >= 0:
                    keys.append(key | len(starts))
                elif key == _UNKEYED:
                    self._indexed = False
                starts.append(offset)
                offset += len(line)
            try:
                self._size = _write_paged(self._manifest, self._size, data)
            except OSError as exc:
                self._indexed = False
                raise _usage(self.manifest_path, exc, "append to") from exc

    def _note_span(self, index: int, offset: int, length: int) -> None:
        spans = self._spans
        if index >= len(spans):
            spans.frombytes(bytes(8 * (max(index + 1, 2 * len(spans)) - len(spans))))
        spans[index] = offset << 24 | length
        self._last_span = max(self._last_span, index)


def _write_paged(handle: IO[bytes], size: int, data: bytes) -> int:
    """Append whole lines to ``handle`` (a file of ``size`` bytes), no write across a page
    boundary that no line crosses; return the new size."""
    start = 0
    view = memoryview(data)
    while start < len(view):
        room = _PAGE - size % _PAGE
        end = min(start + room, len(view))
        if end < len(view):
            cut = data.rfind(b"\n", start, end) + 1
            end = cut if cut > start else data.index(b"\n", end - 1) + 1
        part = view[start:end]
        while part:
            part = part[handle.write(part) or 0 :]
        size += end - start
        start = end
    return size


#: `_sorted` sorts keys in this many buckets of their top bits, one at a time.
_BUCKET_BITS: Final = 10


def _sorted(keys: array.array[int]) -> array.array[int]:
    """``keys`` sorted, into an array, by buckets of their top bits: never more than a
    bucket's keys as Python ints (sorting a million keys at once would hold 44 MB of them).
    ``keys`` is emptied once they are in their buckets (never twice in memory at once
    beside the result)."""
    shift = 64 - _BUCKET_BITS
    buckets = [array.array("Q") for _ in range(1 << _BUCKET_BITS)]
    for key in keys:
        buckets[key >> shift].append(key)
    del keys[:]
    ordered = array.array("Q")
    for bucket in buckets:
        ordered.extend(sorted(bucket))
        del bucket[:]
    return ordered


def _merged(keys: array.array[int], more: array.array[int]) -> array.array[int]:
    """Sorted ``keys`` with ``more`` (unsorted) among them."""
    if len(more) > 4096:
        return _sorted(keys + more)
    for key in more:
        keys.insert(bisect.bisect(keys, key), key)
    return keys


def _latest_ok(order: array.array[int], hashes: array.array[int], states: bytearray) -> bytearray:
    """Which lines to keep: of each identity (the keys sorted, so its lines are adjacent
    and in file order), the last line, if it is ok."""
    live = bytearray(len(states))
    count = len(order)
    at = 0
    while at < count:
        key = order[at]
        top = key >> _LINE_BITS
        after = at + 1
        while after < count and order[after] >> _LINE_BITS == top:
            after += 1
        if after == at + 1:
            number = key & _LINE_MASK
            live[number] = states[number] == 1
        else:  # several lines share these bits: the last of each full hash decides
            last = {hashes[k & _LINE_MASK]: k & _LINE_MASK for k in order[at:after]}
            for number in last.values():
                live[number] = states[number] == 1
        at = after
    return live


def _write_index(
    folder: Directory,
    manifest: tuple[int, int, int, int],
    keys: array.array[int],
    offsets: array.array[int],
    formats: Iterable[str],
    *,
    metadata: tuple[tuple[int, int, int, int], int] | None,
) -> None:
    """Write the resume index of the manifest whose `Directory.identity` is ``manifest``:
    its keys (sorted, as `_Earlier` holds them) and where each line starts (and the last
    ends), after a header that names the manifest and a sha256 of the arrays, and
    ``metadata``: the identity of the ``metadata.jsonl`` that holds a row for each ok
    line in index order and nothing else, with the last index it has a row for."""
    body = hashlib.sha256(memoryview(keys).cast("B"))
    body.update(memoryview(offsets).cast("B"))
    header = {
        "manifest": list(manifest),
        "keys": len(keys),
        "lines": len(offsets) - 1,
        "byteorder": sys.byteorder,
        "formats": sorted(formats),
        "sha256": body.hexdigest(),
        "metadata": None if metadata is None else [list(metadata[0]), metadata[1]],
    }
    header_line = orjson.dumps(header) + b"\n"
    # The arrays as they are in memory, not copies (16 bytes a line).
    arrays = [memoryview(keys).cast("B"), memoryview(offsets).cast("B")]
    folder.write_atomic(INDEX_NAME, [_INDEX_MAGIC, header_line, *arrays])


def _read_index(
    folder: Directory,
) -> tuple[array.array[int], array.array[int], list[str], Any] | None:
    """The keys, line starts (and end) and formats of ``manifest.jsonl`` from the index
    its run left (`_write_index`), None unless the index is whole and the manifest is
    still the file it was made from (size, modification time, inode and device), with
    no ``unmatched.jsonl`` beside it (the index covers the manifest only)."""
    if folder.identity(UNMATCHED_NAME) is not None:
        return None
    manifest = folder.identity(MANIFEST_NAME)
    try:
        handle = folder.read(INDEX_NAME)
    except (OSError, FriendliUsageError):
        return None
    with handle:
        try:
            if handle.readline(len(_INDEX_MAGIC)) != _INDEX_MAGIC:
                return None
            header = orjson.loads(handle.readline(1 << 16))
            if (
                not isinstance(header, dict)
                or manifest is None
                or header.get("manifest") != list(manifest)
                or header.get("byteorder") != sys.byteorder
                or not isinstance(header.get("formats"), list)
            ):
                return None
            keys, offsets = array.array("Q"), array.array("Q")
            keys.fromfile(handle, header["keys"])
            offsets.fromfile(handle, header["lines"] + 1)
            if handle.read(1):
                return None
        except (OSError, EOFError, ValueError, TypeError, KeyError, OverflowError):
            return None  # orjson.JSONDecodeError is a ValueError
    body = hashlib.sha256(memoryview(keys).cast("B"))
    body.update(memoryview(offsets).cast("B"))
    if body.hexdigest() != header.get("sha256") or offsets[0] != 0 or offsets[-1] != manifest[0]:
        return None
    if len(offsets) - 1 > _LINE_MASK or len(keys) > len(offsets) - 1:
        return None
    formats = [name for name in header["formats"] if name in OUTPUT_FORMATS]
    return keys, offsets, formats, header.get("metadata")


def _metadata_row(record: StoredRecord) -> bytes:
    return orjson.dumps({"file_name": record["file"], **_dataset_row(record)}) + b"\n"


# -- the gallery's inputs ---------------------------------------------------------------------


def read_gallery_inputs(directory: pathlib.Path) -> list[StoredRecord]:
    """The manifest's valid records in input order, the last line of an index winning,
    with each run of absent indices as one ``missing`` entry (``index`` to ``last``).

    The list has at most twice as many entries as the manifest has valid lines, however
    large an index is. Raises `FriendliUsageError` when there is no readable manifest.
    """
    path = directory / MANIFEST_NAME
    latest: dict[int, StoredRecord] = {}
    try:
        with Directory(directory) as folder, folder.read(MANIFEST_NAME) as handle:
            for _offset, _line, record in read_records(handle):
                if record is not None:
                    latest[record["index"]] = record
    except FileNotFoundError:
        if (directory / RAY_MANIFEST_DIR).is_dir():
            return _with_missing(_ray_records(directory / RAY_MANIFEST_DIR))
        raise FriendliUsageError(
            f"{str(path)!r} does not exist; pass the out_dir of a batch "
            "(generate_batch(..., out_dir=...) or 'friendli-image batch --out-dir')"
        ) from None
    except OSError as exc:
        raise FriendliUsageError(f"cannot read {str(path)!r}: {exc}") from exc
    return _with_missing(latest)


def _with_missing(latest: Mapping[int, StoredRecord]) -> list[StoredRecord]:
    entries: list[StoredRecord] = []
    expected = 0
    for index in sorted(latest):
        if index > expected:
            entries.append({"index": expected, "last": index - 1, "status": "missing"})
        entries.append(latest[index])
        expected = index + 1
    return entries


def _ray_records(manifest: pathlib.Path) -> dict[int, StoredRecord]:
    """The records of a ``batch --ray`` manifest (parquet), as manifest.jsonl has them."""
    try:
        import pyarrow.dataset  # noqa: PLC0415  (the optional ray extra)
    except ImportError as exc:
        raise FriendliUsageError(
            f"{str(manifest)!r} is the parquet manifest of 'batch --ray'; reading it needs "
            f"pyarrow ({exc}): pip install 'friendli-image[ray]'"
        ) from None
    try:
        data = pyarrow.dataset.dataset(str(manifest), format="parquet")
        names = set(data.schema.names)
        wanted = ["status", "prompt", "seed", "uri", "key", "attempts", "latency_s", "error"]
        columns = [name for name in (*wanted, "error_type", RAY_INDEX_COLUMN) if name in names]
        latest: dict[int, StoredRecord] = {}
        for position, row in enumerate(data.to_table(columns=columns).to_pylist()):
            index = row.get(RAY_INDEX_COLUMN, position)
            uri = row.get("uri")
            status = row.get("status")
            latest[index] = {
                "index": index,
                "status": "ok" if status == "resumed" else status,
                "prompt": row.get("prompt"),
                "seed": row.get("seed"),
                "file": valid_stored_name(uri.rsplit("/", 1)[-1]) if isinstance(uri, str) else None,
                "key": row.get("key"),
                "attempts": row.get("attempts"),
                "elapsed": row.get("latency_s"),
                "error": row.get("error"),
                "error_type": row.get("error_type"),
            }
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise FriendliUsageError(f"cannot read {str(manifest)!r}: {exc}") from exc
    return latest


# -- --no-resume ------------------------------------------------------------------------------


def set_aside_previous_run(directory: pathlib.Path) -> tuple[pathlib.Path, int] | None:
    """Move an earlier run's manifests, images and gallery into ``previous-run-<time>/``.

    Only the files the manifests name (and the gallery) move; anything else in the
    directory is left alone. Returns the folder and the number of images moved, None
    when there is no earlier run.
    """
    try:
        with Directory(directory) as folder:
            names: set[str] = set()
            listings = []
            for listing in (MANIFEST_NAME, UNMATCHED_NAME):
                try:
                    handle = folder.read(listing)
                except FileNotFoundError:
                    continue
                listings.append(listing)
                with handle:
                    names.update(
                        record["file"]
                        for _o, _l, record in read_records(handle)
                        if record is not None and record.get("status") == "ok"
                    )
            if not listings:
                return None
            stamp = time.strftime("%Y%m%d-%H%M%S")
            target = f"previous-run-{stamp}"
            suffix = 1
            while (directory / target).exists():
                suffix += 1
                target = f"previous-run-{stamp}-{suffix}"
            with folder.subdirectory(target, create=True) as aside:
                moved = sum(folder.move(name, aside) for name in sorted(names))
                for extra in (GALLERY_NAME, THUMBS_DIR, METADATA_NAME, INDEX_NAME, *listings):
                    folder.move(extra, aside)
    except OSError as exc:
        raise FriendliUsageError(
            f"--no-resume cannot move the earlier run in {str(directory)!r} aside: {exc}; "
            "move or delete it yourself, or pass another --out-dir"
        ) from None
    return directory / target, moved


# -- any fsspec location (the Ray stage) ------------------------------------------------------

#: The hidden list of a shard's keys the Ray stage writes before it (`publish_shard`).
_KEYS_SUFFIX: Final = ".keys"
#: Protocols whose single PUT is atomic: an object is complete or absent.
_ATOMIC_PUT: Final = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})


class Location:
    """An output location on any fsspec file system: complete-or-absent image objects.

    A local path (``file``) goes through `Directory` (``O_NOFOLLOW``, the umask's mode);
    an object store gets one PUT per image; other file systems a temporary object, then
    a move.
    """

    def __init__(self, uri: str, storage_options: Mapping[str, Any]) -> None:
        import fsspec  # noqa: PLC0415  (the optional ray extra)

        fs, root = fsspec.core.url_to_fs(uri, **storage_options)
        self.fs = fs
        self.root = root.rstrip("/")
        self.uri = uri.rstrip("/")
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        self.local = "file" in protocols or "local" in protocols
        self.atomic_put = bool(protocols & _ATOMIC_PUT)
        self._made = False

    def complete(self, name: str) -> bool:
        """True if the image exists (blocking). Writes are atomic, so present is complete."""
        if self.local:
            with contextlib.suppress(OSError), Directory(pathlib.Path(self.root)) as folder:
                size = folder.size_and_mtime(name)
                return size is not None and size[0] > 0
            return False
        try:
            info = self.fs.info(f"{self.root}/{name}")
        except FileNotFoundError:
            return False
        return info.get("type") == "file" and int(info.get("size") or 0) > 0

    def write(self, name: str, data: bytes) -> None:
        """Write atomically (blocking): one PUT on object stores, temp-then-rename elsewhere."""
        if self.local:
            with Directory(pathlib.Path(self.root), create=True) as folder:
                folder.write_atomic(name, data)
            return
        self._make_root()
        target = f"{self.root}/{name}"
        if self.atomic_put:
            self.fs.pipe_file(target, data)
            return
        temp = f"{self.root}/.{name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}"
        try:
            self.fs.pipe_file(temp, data)
            self.fs.mv(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.rm_file(temp)
            raise

    def write_many(self, files: Mapping[str, bytes]) -> None:
        """Write each file atomically (blocking). On an object store the PUTs run
        concurrently (fsspec's bulk ``pipe``); after an error, some may be written."""
        if self.local or not self.atomic_put:
            for name, data in files.items():
                self.write(name, data)
            return
        self._make_root()
        self.fs.pipe({f"{self.root}/{name}": data for name, data in files.items()})

    def _make_root(self) -> None:
        if not self._made:
            self.fs.makedirs(self.root, exist_ok=True)
            self._made = True

    def files(self) -> dict[str, int]:
        """Name -> size of every file directly in the location (blocking; one listing)."""
        try:
            listed = self.fs.ls(self.root, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        except TypeError:  # a file system whose ls takes no refresh
            listed = self.fs.ls(self.root, detail=True)
        files = {}
        for info in listed:
            if info.get("type") == "file":
                name = str(info.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
                files[name] = int(info.get("size") or 0)
        return files

    def image_names(self) -> set[str]:
        """The image files directly in the location (blocking)."""
        return {name for name in self.files() if valid_name(name) is not None}

    def shard_names(self, files: Mapping[str, int] | None = None) -> dict[str, int]:
        """Name -> size of the published shards directly in the location (blocking),
        from ``files`` when given (a `files` listing)."""
        return {
            name: size
            for name, size in (self.files() if files is None else files).items()
            if valid_stored_name(name) is not None and _format_of(name) != "files"
        }

    def publish_shard(self, shard: Shard) -> None:
        """Write a shard whole (blocking), after a small hidden list of its keys
        (``.<shard>.keys``, which readers of the dataset skip): whoever lists the shard
        finds its keys without reading its images."""
        keys = [str(record.get("key") or "") for record in shard.records]
        self.write(f".{shard.name}{_KEYS_SUFFIX}", orjson.dumps(keys))
        self.write(shard.name, bytes(shard.build()))

    def shard_keys(self, name: str, files: Mapping[str, int]) -> list[str]:
        """The keys of the published shard ``name`` (blocking): from its list of keys
        when ``files`` (a `files` listing) has it, else from the shard itself."""
        if f".{name}{_KEYS_SUFFIX}" in files:
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                keys = orjson.loads(self.read(f".{name}{_KEYS_SUFFIX}"))
                if isinstance(keys, list):
                    return [key for key in keys if isinstance(key, str)]
        return [
            record["key"]
            for record in self.shard_records(name)
            if isinstance(record.get("key"), str)
        ]

    def read(self, name: str) -> bytes:
        """The whole file ``name`` (blocking)."""
        if self.local:
            with Directory(pathlib.Path(self.root)) as folder, folder.read(name) as handle:
                return handle.read()
        data: bytes = self.fs.cat_file(f"{self.root}/{name}")
        return data

    def remove(self, name: str) -> None:
        """Delete ``name`` if it is there (blocking)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(f"{self.root}/{name}")

    def shard_records(self, name: str) -> list[StoredRecord]:
        """The manifest records of the items in the published shard ``name`` (blocking),
        from the shard itself: a ``<key>.json`` per sample of a tar, or the columns
        (not the images) of a Parquet file. Empty if it does not read to its end."""
        try:
            if name.endswith(_SHARD_SUFFIX["parquet"]):
                rows = _parquet_rows(self.fs, f"{self.root}/{name}")
            else:
                rows = _tar_rows(self.read(name))
        except (OSError, ValueError, EOFError, orjson.JSONDecodeError):
            return []  # a PUT is whole or absent: only a file someone else wrote gets here
        records = []
        for row in rows:
            record = {**row, "index": 0, "status": "ok", "file": name}
            if _identity(record) is not None and isinstance(record.get("sha256"), str):
                records.append(record)
        return records


def shard_images(name: str, handle: IO[bytes]) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, image) of each sample of the shard ``name`` read from ``handle``
    (a tar's ``<key>.<ext>`` image members; a Parquet file's ``key`` and ``image``)."""
    if name.endswith(_SHARD_SUFFIX["parquet"]):
        import pyarrow.parquet as pq  # noqa: PLC0415  (only the parquet format needs it)

        table = pq.read_table(handle, columns=["key", "image"])
        for row in table.to_pylist():
            image = row["image"] or {}
            path = str(image.get("path") or "")
            yield (
                row["key"],
                pathlib.PurePosixPath(path).suffix or ".bin",
                image.get("bytes") or b"",
            )
        return
    import tarfile  # noqa: PLC0415

    with tarfile.open(fileobj=handle, mode="r|") as tar:
        for member in tar:
            key, dot, extension = member.name.partition(".")
            if member.isfile() and dot and extension != "json":
                data = tar.extractfile(member)
                if data is not None:
                    yield key, "." + extension, data.read()


def stored_key(record: StoredRecord) -> str | None:
    """The key of a record's item (its sample in a shard), None if it has none."""
    key = record.get("key")
    if isinstance(key, str):
        return key
    identity = _identity(record)
    return None if identity is None else item_key(*identity)


def _parquet_rows(fs: Any, path: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq  # noqa: PLC0415  (only the parquet format needs it)

    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        columns = [name for name in _ROW_FIELDS if name in parquet.schema_arrow.names]
        rows: list[dict[str, Any]] = parquet.read(columns=columns).to_pylist()
    return rows


def _tar_rows(data: bytes) -> list[dict[str, Any]]:
    import tarfile  # noqa: PLC0415

    rows = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                handle = tar.extractfile(member)
                if handle is not None:
                    row = orjson.loads(handle.read())
                    if isinstance(row, dict):
                        rows.append(row)
    return rows
