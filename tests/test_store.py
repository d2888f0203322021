"""The output store: item identity across reruns, unmatched images, and a location that
holds planted links, hostile manifests and huge indices without touching anything else."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from friendli_image import AsyncFriendli, FriendliUsageError, write_gallery
from friendli_image._cli import main
from friendli_image._requests import EditRequest, GenerateRequest
from friendli_image._serde import canonical_request, unstructure_request
from friendli_image._store import (
    GALLERY_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    THUMBS_DIR,
    UNMATCHED_NAME,
    Directory,
    dataset_fields,
    read_gallery_inputs,
)
from friendli_image.server import LocalServer, ServerConfig


@pytest.fixture
def server() -> Iterator[LocalServer]:
    """A bundled server rendering small pictures: each request has its own bytes."""
    with LocalServer(ServerConfig(image_size=16, max_concurrency=16)) as local:
        yield local


@pytest.fixture
async def client(server: LocalServer) -> AsyncIterator[AsyncFriendli]:
    server.reset_stats()
    async with AsyncFriendli(server_url=server.url) as opened:
        yield opened


def _manifest(directory: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (directory / MANIFEST_NAME).read_bytes().splitlines()]


def _images(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jpg"))


def _requests(count: int, steps: int = 2) -> list[dict[str, Any]]:
    return [
        {"prompt": f"a harbour no. {i}", "seed": i, "num_inference_steps": steps}
        for i in range(count)
    ]


async def _check_images(client: AsyncFriendli, result: Any, requests: list[Any]) -> None:
    """Every item is ok or resumed, with the bytes the server returns for its request."""
    assert [item.index for item in result] == list(range(len(requests)))
    for item, request in zip(result, requests, strict=True):
        assert item.ok, item
        direct = await client.container.image.generate(**request)
        assert item.path.read_bytes() == direct.data, item.index


# -- identity ---------------------------------------------------------------------------------


@pytest.mark.scenario(50)
async def test_inserting_one_line_in_twenty_sends_one_request(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path
) -> None:
    requests = _requests(20)
    await client.container.image.generate_batch(requests, out_dir=tmp_path)
    assert server.stats.total_requests == 20
    server.reset_stats()
    inserted = [{"prompt": "a new first line", "seed": 99, "num_inference_steps": 2}, *requests]
    again = await client.container.image.generate_batch(inserted, out_dir=tmp_path)
    assert server.stats.total_requests == 1
    assert [item.status for item in again] == ["ok"] + ["resumed"] * 20
    assert again.unmatched == 0
    assert len(_images(tmp_path)) == 21
    assert sorted(line["index"] for line in _manifest(tmp_path)) == list(range(21))
    await _check_images(client, again, inserted)


@pytest.mark.scenario(50)
async def test_reordering_the_input_sends_nothing(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path
) -> None:
    requests = _requests(20)
    await client.container.image.generate_batch(requests, out_dir=tmp_path)
    server.reset_stats()
    shuffled = requests[::-1]
    again = await client.container.image.generate_batch(shuffled, out_dir=tmp_path)
    assert server.stats.total_requests == 0
    assert {item.status for item in again} == {"resumed"}
    lines = {line["index"]: line["prompt"] for line in _manifest(tmp_path)}
    assert lines == {i: request["prompt"] for i, request in enumerate(shuffled)}
    await _check_images(client, again, shuffled)


@pytest.mark.scenario(50)
async def test_changing_the_steps_regenerates_all_and_keeps_the_old_images_counted(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path
) -> None:
    first = await client.container.image.generate_batch(_requests(20), out_dir=tmp_path)
    old = {item.path: item.path.read_bytes() for item in first if item.path is not None}
    server.reset_stats()
    changed = _requests(20, steps=3)
    again = await client.container.image.generate_batch(changed, out_dir=tmp_path)
    assert server.stats.total_requests == 20
    assert {item.status for item in again} == {"ok"}
    assert again.unmatched == 20
    assert again.unmatched_listing == tmp_path / UNMATCHED_NAME
    assert all(path.read_bytes() == data for path, data in old.items())
    listed = [orjson.loads(line) for line in (tmp_path / UNMATCHED_NAME).read_bytes().splitlines()]
    assert sorted(tmp_path / line["file"] for line in listed) == sorted(old)
    assert len(_manifest(tmp_path)) == 20
    assert {line["file"] for line in _manifest(tmp_path)}.isdisjoint(p.name for p in old)
    await _check_images(client, again, changed)
    # Changing the steps back finds the first images again: nothing is sent.
    server.reset_stats()
    back = await client.container.image.generate_batch(_requests(20), out_dir=tmp_path)
    assert server.stats.total_requests == 0
    assert back.unmatched == 20


async def test_identical_requests_stay_distinct_and_resume_by_occurrence(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path
) -> None:
    requests = ["a heron", "a heron", "an owl", "a heron"]
    first = await client.container.image.generate_batch(requests, out_dir=tmp_path)
    assert [item.occurrence for item in first] == [0, 1, 0, 2]
    assert len({item.path for item in first}) == 4
    server.reset_stats()
    fewer = await client.container.image.generate_batch(["an owl", "a heron"], out_dir=tmp_path)
    assert server.stats.total_requests == 0
    assert fewer.unmatched == 2  # the second and third heron


def test_no_resume_keeps_its_meaning_on_the_command_line(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    out = tmp_path / "out"
    source.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in _requests(4)))
    arguments = ["batch", str(source), "--out-dir", str(out), "--server-url", server.url]
    assert main([*arguments, "--no-progress"]) == 0
    source.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in _requests(4, steps=3)))
    assert main([*arguments, "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "4 image(s) of earlier runs match no item of this input" in summary
    assert str(out / UNMATCHED_NAME) in summary
    server.reset_stats()
    assert main([*arguments, "--no-progress", "--no-resume"]) == 0
    assert server.stats.total_requests == 4
    aside = next(out.glob("previous-run-*"))
    assert len(list(aside.glob("*.jpg"))) == 8
    assert not (out / UNMATCHED_NAME).exists()
    assert len(list(out.glob("*.jpg"))) == 4


# -- a location that holds traps ------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file outside the location that nothing may change."""
    target = tmp_path / "outside.txt"
    target.write_text("precious\n")
    return target


def _untouched(target: Path) -> None:
    assert target.read_text() == "precious\n"


@pytest.mark.parametrize("name", [LOCK_NAME, MANIFEST_NAME])
@pytest.mark.parametrize("resume", [True, False])
@pytest.mark.scenario(49)
async def test_a_symlinked_lock_or_manifest_is_refused(
    client: AsyncFriendli, tmp_path: Path, outside: Path, name: str, resume: bool
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(outside)
    with pytest.raises(FriendliUsageError, match="symbolic link"):
        await client.container.image.generate_batch(["a"], out_dir=out, resume=resume)
    _untouched(outside)


@pytest.mark.scenario(49)
async def test_symlinked_thumbs_are_not_used(
    client: AsyncFriendli, tmp_path: Path, make_image: Any
) -> None:
    pytest.importorskip("PIL")
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / THUMBS_DIR).symlink_to(elsewhere)
    await client.container.image.generate_batch(["a", "b"], out_dir=out)
    page = write_gallery(out).read_text()
    assert list(elsewhere.iterdir()) == []
    assert THUMBS_DIR + "/" not in page


def _plant(directory: Path, *lines: dict[str, Any] | bytes) -> None:
    directory.mkdir(exist_ok=True)
    (directory / MANIFEST_NAME).write_bytes(
        b"".join(
            (line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines
        )
    )


def _ok(index: int, name: str, item_id: str = "0" * 64) -> dict[str, Any]:
    return {"index": index, "id": item_id, "status": "ok", "file": name, "sha256": "0" * 64}


@pytest.mark.parametrize(
    "name", ["../outside.txt", "/etc/passwd", "a/b.jpg", "x\u0000.jpg", "evil.html", ".hidden.jpg"]
)
@pytest.mark.scenario(49)
def test_a_manifest_naming_files_outside_or_not_images_is_ignored(
    tmp_path: Path, outside: Path, name: str
) -> None:
    out = tmp_path / "out"
    (tmp_path / "evil.html").write_text("<script>alert(1)</script>")
    _plant(out, _ok(0, name), _ok(1, "fine.jpg"))
    (out / "evil.html").write_text("<script>alert(1)</script>")
    entries = read_gallery_inputs(out)
    assert [entry.get("file") for entry in entries] == [None, "fine.jpg"]
    page = write_gallery(out).read_text()
    assert "evil.html" not in page
    assert "outside" not in page
    moved = main(
        [
            "batch",
            str(outside),
            "--out-dir",
            str(out),
            "--no-resume",
            "--server-url",
            "http://127.0.0.1:9",
            "--no-progress",
            "--retries",
            "0",
        ]
    )
    assert moved == 3
    _untouched(outside)
    assert (tmp_path / "evil.html").exists()


@pytest.mark.scenario(49)
def test_a_nul_byte_in_a_manifest_line_is_ignored(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _plant(out, b'{"index": 0, "status": "ok", "file": "a\\u0000b.jpg", "sha256": "x"}')
    assert write_gallery(out).stat().st_size < 20_000


@pytest.mark.scenario(49)
def test_a_huge_index_makes_a_small_page(tmp_path: Path) -> None:
    """One 50-byte line with index 1,000,000 once made a 407 MiB page."""
    out = tmp_path / "out"
    _plant(out, {"index": 1_000_000, "status": "failed", "error": "x"})
    entries = read_gallery_inputs(out)
    assert len(entries) == 2
    assert entries[0] == {"index": 0, "last": 999_999, "status": "missing"}
    assert write_gallery(out).stat().st_size < 20_000


@pytest.mark.scenario(50)
async def test_images_manifest_and_gallery_follow_the_umask(
    client: AsyncFriendli, tmp_path: Path
) -> None:
    previous = os.umask(0o022)
    try:
        out = tmp_path / "out"
        await client.container.image.generate_batch(["a", "b"], out_dir=out)
        await client.container.image.generate_batch(["c"], out_dir=out)  # and unmatched.jsonl
        write_gallery(out)
    finally:
        os.umask(previous)
    files = [*_images(out), out / MANIFEST_NAME, out / UNMATCHED_NAME, out / GALLERY_NAME]
    assert len(files) == 6
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]


@pytest.mark.scenario(49)
async def test_a_resumed_image_is_hashed_again_and_a_link_is_not_read(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path, outside: Path
) -> None:
    """An image replaced by a link to a file outside is regenerated, never read through."""
    first = await client.container.image.generate_batch(["a", "b"], out_dir=tmp_path / "out")
    path = first[0].path
    assert path is not None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.unlink()
    path.symlink_to(outside)
    server.reset_stats()
    again = await client.container.image.generate_batch(["a", "b"], out_dir=tmp_path / "out")
    assert [item.status for item in again] == ["ok", "resumed"]
    assert not path.is_symlink()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    _untouched(outside)


async def test_an_image_of_its_size_but_another_time_is_checked_by_its_sha256(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path
) -> None:
    """Resume trusts an image's recorded size and modification time; an image whose time
    differs (copied, touched or rewritten) is hashed: kept if its bytes are the same,
    made again if not."""
    out = tmp_path / "out"
    first = await client.container.image.generate_batch(["a", "b", "c"], out_dir=out)
    touched, rewritten = first[0].path, first[1].path
    assert touched is not None
    assert rewritten is not None
    data = rewritten.read_bytes()
    rewritten.write_bytes(bytes(len(data)))  # same size, other bytes
    for path in (touched, rewritten):
        info = path.stat()
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    server.reset_stats()
    again = await client.container.image.generate_batch(["a", "b", "c"], out_dir=out)
    assert [item.status for item in again] == ["resumed", "ok", "resumed"]
    assert server.stats.total_requests == 1
    assert rewritten.read_bytes() == data


# -- a kill while images and lines are written in groups ---------------------------------------


def _complete_lines(path: Path) -> list[dict[str, Any]]:
    """The lines a reader takes from a manifest: complete ones (a kill may cut the last)."""
    if not path.exists():
        return []
    body = path.read_bytes()
    return [orjson.loads(line) for line in body[: body.rfind(b"\n") + 1].splitlines()]


def _stored(out: Path) -> dict[str, dict[str, Any]]:
    """The ok lines (earlier runs', then this one's) by file, each checked against its image:
    no line may name an image that is missing or not the one it recorded."""
    stored = {}
    for line in [*_complete_lines(out / UNMATCHED_NAME), *_complete_lines(out / MANIFEST_NAME)]:
        if line["status"] == "ok":
            image = out / line["file"]
            assert image.exists(), f"{line['file']} is in the manifest but not in out_dir"
            assert hashlib.sha256(image.read_bytes()).hexdigest() == line["sha256"]
            stored[line["file"]] = line
    return stored


def _noise_jpeg(side: int) -> bytes:
    """A JPEG of random pixels: large enough that writing a group of them takes a while."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.long
@pytest.mark.scenario(50)
def test_a_kill_mid_group_leaves_no_line_without_its_image_and_a_rerun_completes_exactly(
    tmp_path: Path,
) -> None:
    """SIGKILL a ``batch`` process at several points while it writes images (~200 KB each,
    64 in flight) and their lines in groups: after each kill every complete manifest line
    names its image, whole; the run to the end then sends exactly the items not stored,
    and leaves one ok line per item with its image."""
    count = 500
    source = tmp_path / "prompts.txt"
    source.write_text("".join(f"a harbour no. {i}\n" for i in range(count)), encoding="utf-8")
    out = tmp_path / "out"
    config = ServerConfig(static_image=_noise_jpeg(256), max_concurrency=64)
    with LocalServer(config) as server:
        command = [
            sys.executable, "-m", "friendli_image", "batch", str(source), "--out-dir", str(out),
            "--server-url", server.url, "--concurrency", "64", "--no-progress",
        ]  # fmt: skip
        kills = 0
        for lines_before_the_kill in (1, 60, 150, 250):
            process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            manifest = out / MANIFEST_NAME
            deadline = time.monotonic() + 60
            while process.poll() is None and time.monotonic() < deadline:
                if manifest.exists() and manifest.stat().st_size > lines_before_the_kill * 400:
                    break
                time.sleep(0.001)
            kills += process.poll() is None
            process.send_signal(signal.SIGKILL)
            process.wait(30)
            _stored(out)
        assert kills >= 3, "the batch finished before it could be killed mid-run"
        stored = _stored(out)
        assert 0 < len(stored) < count
        server.reset_stats()
        finished = subprocess.run(command, capture_output=True, timeout=120, check=False)
        assert finished.returncode == 0, finished.stderr
        assert server.stats.total_requests == count - len(stored)
    lines = _complete_lines(out / MANIFEST_NAME)
    assert sorted(line["index"] for line in lines) == list(range(count))
    assert {line["status"] for line in lines} == {"ok"}
    assert len(_stored(out)) == count
    assert not (out / UNMATCHED_NAME).exists()


def _image_writes(
    monkeypatch: pytest.MonkeyPatch, delay: float = 0.0, *, busy: bool = False
) -> list[bool]:
    """Note, for each image the store writes, whether it was written on the calling
    (the event loop's) thread; each write first takes ``delay`` seconds (a slow disk),
    asleep, or ``busy`` computing (a file system that costs CPU)."""
    loop_thread = threading.get_ident()
    on_loop: list[bool] = []
    real = Directory.write_atomic

    def write(directory: Directory, name: str, *args: Any, **kwargs: Any) -> int:
        if name.endswith((".jpg", ".png")):
            on_loop.append(threading.get_ident() == loop_thread)
            if busy:
                until = time.perf_counter() + delay
                while time.perf_counter() < until:
                    pass
            else:
                time.sleep(delay)
        return real(directory, name, *args, **kwargs)

    monkeypatch.setattr(Directory, "write_atomic", write)
    return on_loop


async def test_tiny_images_are_written_on_the_loop_and_a_slow_disk_moves_them_off_it(
    client: AsyncFriendli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny images for a local directory are written on the event loop (a thread hop
    costs more than the write); once the disk was slow (30 ms an image asleep, or 2 ms
    computing, here), every later one goes to a worker thread, so the loop is not held
    again."""
    from friendli_image import _batch

    requests = _requests(40)
    on_loop = _image_writes(monkeypatch)
    with monkeypatch.context() as patched:  # a loaded machine's stall is not a slow disk
        patched.setattr(_batch, "_INLINE_SLOW", 60.0)
        patched.setattr(_batch, "_INLINE_SLOW_PER_IMAGE", 60.0)
        result = await client.container.image.generate_batch(requests, out_dir=tmp_path / "fast")
    await _check_images(client, result, requests)
    assert on_loop == [True] * 40

    # Asleep, the first group tells; computing, two groups in a row (one could be a
    # preemption). At most 8 images finish together here.
    for disk, delay, busy, inline_at_most in (("slow", 0.03, False, 8), ("busy", 0.002, True, 16)):
        on_loop = _image_writes(monkeypatch, delay, busy=busy)
        result = await client.container.image.generate_batch(
            requests, out_dir=tmp_path / disk, concurrency=8
        )
        await _check_images(client, result, requests)
        first_threaded = on_loop.index(False)
        assert 1 <= first_threaded <= inline_at_most, (disk, on_loop)
        assert on_loop[first_threaded:] == [False] * (40 - first_threaded), (disk, on_loop)


async def test_large_images_are_written_on_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group of images larger than 256 KiB in all never blocks the loop."""
    image = _noise_jpeg(700)
    assert len(image) > 256 * 1024
    on_loop = _image_writes(monkeypatch)
    with LocalServer(ServerConfig(static_image=image)) as server:
        async with AsyncFriendli(server_url=server.url) as client:
            result = await client.container.image.generate_batch(_requests(6), out_dir=tmp_path)
    assert [item.path.read_bytes() == image for item in result] == [True] * 6
    assert on_loop == [False] * 6


@pytest.mark.skipif(sys.platform == "win32", reason="directory descriptors are POSIX")
def test_a_location_is_written_through_its_directory_descriptor(tmp_path: Path) -> None:
    """Names resolve against the directory opened at the start, not its path: a location
    moved away mid-run keeps getting its files, and none land at the old path."""
    with Directory(tmp_path / "out", create=True) as folder:
        (tmp_path / "out").rename(tmp_path / "moved")
        folder.write_atomic("a.jpg", b"image")
    assert (tmp_path / "moved" / "a.jpg").read_bytes() == b"image"
    assert not (tmp_path / "out").exists()


@pytest.fixture(params=["unnamed", "temporary"])
def write_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way a written file takes its name: an unnamed file linked in (Linux), or a
    temporary file renamed (elsewhere, and where a file system has no unnamed files)."""
    if request.param == "unnamed":
        if sys.platform != "linux" or not hasattr(os, "O_TMPFILE"):
            pytest.skip("unnamed files (O_TMPFILE) are Linux's")
    else:
        monkeypatch.setattr("friendli_image._store._TMPFILE", 0)
    return str(request.param)


@pytest.mark.skipif(sys.platform == "win32", reason="links and modes are POSIX")
@pytest.mark.scenario(49)
def test_a_written_file_takes_its_name_whole(
    tmp_path: Path, outside: Path, write_path: str
) -> None:
    """A free name, a name holding an older file and a name holding a planted link all end
    up a regular file with the new bytes and the umask's mode; the link's target is never
    written; the returned time is the file's; nothing temporary is left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.jpg").write_bytes(b"an older image")
    (out / "link.jpg").symlink_to(outside)
    previous = os.umask(0o027)
    try:
        with Directory(out) as folder:
            times = {name: folder.write_atomic(name, name.encode()) for name in
                     ("free.jpg", "old.jpg", "link.jpg")}  # fmt: skip
    finally:
        os.umask(previous)
    for name, mtime in times.items():
        info = (out / name).lstat()
        assert stat.S_ISREG(info.st_mode), name
        assert stat.S_IMODE(info.st_mode) == 0o640, name
        assert info.st_mtime_ns == mtime, name
        assert (out / name).read_bytes() == name.encode()
    _untouched(outside)
    assert sorted(p.name for p in out.iterdir()) == ["free.jpg", "link.jpg", "old.jpg"]


@pytest.mark.scenario(49)
async def test_a_run_removes_the_temporary_files_a_killed_writer_left(
    client: AsyncFriendli, tmp_path: Path, outside: Path
) -> None:
    """A temporary file left by a killed writer is gone once the next run into the folder
    ends (it is removed when the run closes, so a folder of a million images is not listed
    before the first request); a link under such a name is removed, not followed."""
    out = tmp_path / "out"
    await client.container.image.generate_batch(["a"], out_dir=out)
    (out / ".a.jpg.0123456789ab0.part").write_bytes(b"half an image")
    (out / ".b.jpg.0123456789ab1.part").symlink_to(outside)
    result = await client.container.image.generate_batch(["a", "b"], out_dir=out)
    assert [item.status for item in result.items] == ["resumed", "ok"]
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]
    _untouched(outside)


def test_a_taken_temporary_name_is_not_written_through(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch, write_path: str
) -> None:
    """Temporary names are a random prefix and a counter: one planted at the next name
    (a link here) is left alone, and the write takes another prefix."""
    prefixes = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr("friendli_image._store.secrets.token_hex", lambda _n: next(prefixes))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.jpg").write_bytes(b"older")  # taken: the write goes through a temporary name
    planted = out / ".a.jpg.aaaaaaaaaaaa0.part"
    planted.symlink_to(outside)
    with Directory(out) as folder:
        folder.write_atomic("a.jpg", b"image")
        folder.write_atomic("b.jpg", b"other")
    assert (out / "a.jpg").read_bytes() == b"image"
    assert (out / "b.jpg").read_bytes() == b"other"
    assert planted.is_symlink()
    _untouched(outside)
    assert sorted(p.name for p in out.iterdir()) == [planted.name, "a.jpg", "b.jpg"]


@pytest.mark.skipif(
    sys.platform != "linux" or not hasattr(os, "O_TMPFILE"), reason="O_TMPFILE is Linux's"
)
def test_a_file_being_written_has_no_name_in_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Linux an image being written is an unnamed file: someone listing the folder (a
    watcher, a sync tool) sees only complete images, and a killed writer leaves nothing."""
    out = tmp_path / "out"
    out.mkdir()
    seen: list[list[str]] = []
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        seen.append(sorted(p.name for p in out.iterdir()))
        return real_write(fd, data)

    monkeypatch.setattr("friendli_image._store.os.write", write)
    with Directory(out) as folder:
        folder.write_atomic("a.jpg", b"image")
        folder.write_atomic("b.jpg", b"other")
    assert seen == [[], ["a.jpg"]]


@pytest.mark.skipif(
    sys.platform != "linux" or not hasattr(os, "O_TMPFILE"), reason="O_TMPFILE is Linux's"
)
def test_without_proc_a_file_is_written_through_a_temporary_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linking an unnamed file in goes through ``/proc``; where it is not mounted, the
    write still lands (a temporary file renamed), and later writes do not try again."""
    links: list[str] = []

    def no_proc(source: str, *_args: Any, **_kwargs: Any) -> None:
        links.append(source)
        raise FileNotFoundError(2, "No such file or directory", source)

    monkeypatch.setattr("friendli_image._store.os.link", no_proc)
    out = tmp_path / "out"
    out.mkdir()
    with Directory(out) as folder:
        folder.write_atomic("a.jpg", b"image")
        folder.write_atomic("b.jpg", b"other")
    assert (out / "a.jpg").read_bytes() == b"image"
    assert (out / "b.jpg").read_bytes() == b"other"
    assert len(links) == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize(
    ("request_model", "digested"),
    [
        (GenerateRequest(prompt="a lighthouse", seed=3), False),
        (GenerateRequest(prompt='say "data: x"', seed=3), False),
        (GenerateRequest(prompt="data:text/plain,hello"), True),
        (EditRequest(image="data:image/png;base64,iVBORw0KGgo=", prompt="p"), True),
        (EditRequest(image="https://example.com/a.png", prompt="data:, a prompt"), True),
    ],
)
def test_a_dataset_row_holds_the_request_with_local_images_digested(
    request_model: GenerateRequest | EditRequest, digested: bool
) -> None:
    """``request`` is the canonical JSON, where each string starting with ``data:`` is
    ``sha256:`` of its text (a local image is not copied into every row)."""
    text = dataset_fields(request_model)["request"]
    wire = unstructure_request(request_model)
    if digested:
        data_uris = [
            v
            for v in _strings(orjson.loads(canonical_request(request_model)))
            if v.startswith("data:")
        ]
        assert data_uris
        for uri in data_uris:
            assert uri not in text
            assert "sha256:" + hashlib.sha256(uri.encode()).hexdigest() in text
    else:
        assert text == orjson.dumps(wire, option=orjson.OPT_SORT_KEYS).decode()
    assert orjson.loads(text).keys() == wire.keys()


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


# -- the resume index a run leaves --------------------------------------------------------------


def _scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the earlier lines opening parses (`_scan_line`): none when it uses an index."""
    from friendli_image import _store

    calls: list[int] = []
    scan = _store._scan_line

    def counted(line: bytes, known: str = "") -> tuple[int, int, str | None]:
        calls.append(1)
        return scan(line, known)

    monkeypatch.setattr(_store, "_scan_line", counted)
    return calls


@pytest.mark.parametrize("output_format", ["files", "webdataset"])
async def test_a_rerun_opens_from_the_index_and_keeps_the_manifest_as_it_is(
    client: AsyncFriendli,
    server: LocalServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    output_format: str,
) -> None:
    """A finished run leaves the index of its manifest; a rerun of the same requests with
    more after them parses no earlier line to open, rewrites none of them (the manifest
    grows by the new items' lines only), sends only the new items, and leaves an index
    again. Each run's manifest has one ok line per item, and every resumed item is what
    the first run made."""
    from friendli_image import _store
    from friendli_image._store import INDEX_NAME

    requests = _requests(12)
    options: dict[str, Any] = {"out_dir": tmp_path, "output_format": output_format}
    options["shard_size"] = 5
    first = await client.container.image.generate_batch(requests, **options)
    assert (tmp_path / INDEX_NAME).exists()
    written = (tmp_path / MANIFEST_NAME).read_bytes()
    scans = _scans(monkeypatch)
    made_rows: list[int] = []
    row_of = _store._metadata_row

    def counted_row(record: dict[str, Any]) -> bytes:
        made_rows.append(1)
        return row_of(record)

    monkeypatch.setattr(_store, "_metadata_row", counted_row)
    server.reset_stats()
    more = [*requests, *_requests(15)[12:]]
    again = await client.container.image.generate_batch(more, **options)
    assert scans == []
    # files: the earlier metadata rows are copied; only the new items' rows are made.
    assert len(made_rows) == (3 if output_format == "files" else 0)
    assert server.stats.total_requests == 3
    assert [item.status for item in again] == ["resumed"] * 12 + ["ok"] * 3
    for before, after in zip(first, again, strict=False):
        assert (after.id, after.key, after.sha256, after.uri) == (
            before.id,
            before.key,
            before.sha256,
            before.uri,
        )
        assert after.path == before.path
    manifest = (tmp_path / MANIFEST_NAME).read_bytes()
    assert manifest.startswith(written)  # the earlier lines as they were, not rewritten
    assert sorted(line["index"] for line in _manifest(tmp_path)) == list(range(15))
    assert not (tmp_path / UNMATCHED_NAME).exists()
    assert (tmp_path / INDEX_NAME).exists()
    metadata = tmp_path / "metadata.jsonl"
    if output_format == "files":
        # The earlier rows reused, the new ones after them: what a full rewrite makes.
        assert metadata.read_bytes() == _rows_of_the_manifest(tmp_path)
        metadata.write_bytes(b"a row the batch did not write\n")  # not reused then
    server.reset_stats()
    third = await client.container.image.generate_batch(more, **options)
    assert scans == []
    assert server.stats.total_requests == 0
    assert [item.status for item in third] == ["resumed"] * 15
    if output_format == "files":
        assert metadata.read_bytes() == _rows_of_the_manifest(tmp_path)
        rows = [orjson.loads(row) for row in metadata.read_bytes().splitlines()]
        assert [row["file_name"] for row in rows] == [Path(item.uri or "").name for item in third]


def _rows_of_the_manifest(directory: Path) -> bytes:
    """metadata.jsonl as `_write_metadata` makes it of the manifest: a row per line, in
    index order."""
    from friendli_image._store import _metadata_row

    lines = sorted(_manifest(directory), key=lambda line: line["index"])
    return b"".join(_metadata_row(line) for line in lines)


@pytest.mark.parametrize(
    "change",
    ["missing", "manifest appended", "manifest replaced", "index cut", "index flipped"],
)
async def test_a_stale_or_damaged_index_is_not_used(
    client: AsyncFriendli,
    server: LocalServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: str,
) -> None:
    """An index that is gone, that another manifest now stands beside (appended to, or
    replaced by a copy), or whose bytes are cut or changed, is not used: opening scans
    the manifest as before, and the rerun resumes exactly what is stored."""
    from friendli_image._store import INDEX_NAME

    requests = _requests(8)
    await client.container.image.generate_batch(requests, out_dir=tmp_path)
    manifest, index = tmp_path / MANIFEST_NAME, tmp_path / INDEX_NAME
    lines = manifest.read_bytes().splitlines(keepends=True)
    if change == "missing":
        index.unlink()
    elif change == "manifest appended":  # a line of another run: its item is resumed too
        with manifest.open("ab") as handle:
            handle.write(lines[0])
    elif change == "manifest replaced":  # same bytes, another file; the first line dropped
        copy = tmp_path / "copy"
        copy.write_bytes(b"".join(lines[1:]))
        os.replace(copy, manifest)
    elif change == "index cut":
        index.write_bytes(index.read_bytes()[:-8])
    else:
        data = bytearray(index.read_bytes())
        data[-3] ^= 1
        index.write_bytes(bytes(data))
    scans = _scans(monkeypatch)
    server.reset_stats()
    again = await client.container.image.generate_batch(requests, out_dir=tmp_path)
    assert len(scans) == len(lines) - (change == "manifest replaced") + (
        change == "manifest appended"
    )
    # The line the replaced manifest dropped: its item is made again, over its own image.
    assert server.stats.total_requests == (change == "manifest replaced")
    assert sorted(line["index"] for line in _manifest(tmp_path)) == list(range(8))
    await _check_images(client, again, requests)


async def test_a_manifest_edited_to_its_size_and_time_is_checked_line_by_line(
    client: AsyncFriendli, server: LocalServer, tmp_path: Path
) -> None:
    """The index trusts the manifest's size, time and inode; a line edited in place to
    the same length with the time put back (naming a file outside, or another status)
    is still checked when it is read: its item is made again, nothing outside is read,
    and the rest resume."""
    requests = _requests(6)
    await client.container.image.generate_batch(requests, out_dir=tmp_path)
    manifest = tmp_path / MANIFEST_NAME
    info = manifest.stat()
    data = manifest.read_bytes()
    lines = data.splitlines(keepends=True)
    first = orjson.loads(lines[0])
    outside = "../" + first["file"][3:]  # same length
    (tmp_path.parent / first["file"][3:]).write_bytes(b"not an image of this batch")
    edited = lines[0].replace(first["file"].encode(), outside.encode())
    failed = lines[1].replace(b'"status":"ok"', b'"status":"no"')
    assert len(edited) == len(lines[0])
    assert len(failed) == len(lines[1])
    with manifest.open("r+b") as handle:  # in place: the same inode
        handle.write(edited + failed)
    os.utime(manifest, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert manifest.stat().st_size == info.st_size
    server.reset_stats()
    again = await client.container.image.generate_batch(requests, out_dir=tmp_path)
    assert server.stats.total_requests == 2
    edited_indices = {orjson.loads(line)["index"] for line in lines[:2]}
    assert [item.status for item in again] == [
        "ok" if index in edited_indices else "resumed" for index in range(6)
    ]
    assert all(Path(item.uri or "").parent == tmp_path for item in again)
    await _check_images(client, again, requests)


def test_a_kill_while_the_earlier_manifest_is_adopted_loses_nothing(
    server: LocalServer, tmp_path: Path
) -> None:
    """The rerun of a finished run appends its new lines to the earlier manifest
    (``unmatched.jsonl`` by then) and puts it in place of its own: SIGKILLed between the
    two (both files hold the new lines), the next run resumes every item, sends nothing,
    and leaves one line per item."""
    requests = _requests(10)
    script = (
        "import asyncio, os, signal, sys\n"
        "from friendli_image import AsyncFriendli\n"
        "real = os.replace\n"
        "def replace(src, dst, **kw):\n"
        "    if str(src).endswith('unmatched.jsonl') and str(dst).endswith('manifest.jsonl'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, dst, **kw)\n"
        "if sys.argv[4:] == ['kill']:\n"
        "    os.replace = replace\n"
        "async def run(url, out, count):\n"
        "    async with AsyncFriendli(server_url=url) as client:\n"
        "        requests = [{'prompt': f'a harbour no. {i}', 'seed': i,"
        " 'num_inference_steps': 2} for i in range(count)]\n"
        "        await client.container.image.generate_batch(requests, out_dir=out)\n"
        "asyncio.run(run(sys.argv[1], sys.argv[2], int(sys.argv[3])))\n"
    )
    command = [sys.executable, "-c", script, server.url, str(tmp_path)]
    subprocess.run([*command, "8"], check=True, timeout=60)
    killed = subprocess.run([*command, "10", "kill"], check=False, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    earlier = [orjson.loads(line) for line in (tmp_path / UNMATCHED_NAME).read_bytes().splitlines()]
    assert sorted(line["index"] for line in earlier) == list(range(10))  # 8 and the 2 new
    assert sorted(line["index"] for line in _manifest(tmp_path)) == [8, 9]
    server.reset_stats()
    subprocess.run([*command, "10"], check=True, timeout=60)
    assert server.stats.total_requests == 0
    assert sorted(line["index"] for line in _manifest(tmp_path)) == list(range(10))
    assert not (tmp_path / UNMATCHED_NAME).exists()
    assert len(_images(tmp_path)) == len(requests)
