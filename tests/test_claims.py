"""A resume's claims, generated: the group claim's inline common case decides every item as
the general one-line claim does, over stores damaged in the ways a rerun meets (images
gone, rewritten or cut short, a shard lost, manifest lines edited in place with their
size and time put back, identities that no earlier run made)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from friendli_image import AsyncFriendli
from friendli_image._batch_models import OutputFormat
from friendli_image._store import MANIFEST_NAME, BatchStore, Occurrences
from friendli_image.server import LocalServer, ServerConfig

#: Requests of the earlier run: some identical, so items differ by occurrence only.
_REQUESTS = [{"prompt": f"a quay no. {i % 17}", "seed": i % 17} for i in range(24)]


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    """A bundled server rendering small pictures: each request has its own bytes."""
    with LocalServer(ServerConfig(image_size=16, max_concurrency=8)) as local:
        yield local


def _finish(url: str, out: Path, layout: OutputFormat) -> None:
    """A finished run into ``out``, with the index its rerun trusts (it names the
    manifest's inode: a copied run would be checked line by line instead)."""

    async def write() -> None:
        async with AsyncFriendli(server_url=url) as client:
            result = await client.container.image.generate_batch(
                _REQUESTS,
                out_dir=out,
                output_format=layout,
                shard_size=5,
            )
        assert len(result.succeeded) == len(_REQUESTS)

    asyncio.run(write())


def _edit_in_place(manifest: Path, number: int, how: str) -> None:
    """Edit line ``number`` to its own length and put the file's time back (the index then
    still trusts the manifest, and the claim must check the line it reads)."""
    info = manifest.stat()
    lines = manifest.read_bytes().splitlines(keepends=True)
    line = lines[number]
    record = orjson.loads(line)
    if how == "status":
        edited = line.replace(b'"status":"ok"', b'"status":"no"')
    elif how == "outside":
        edited = line.replace(record["file"].encode(), b"../" + record["file"][3:].encode())
    elif how == "identity":
        digit = record["id"][-1]
        other = "0" if digit != "0" else "1"
        edited = line.replace(record["id"].encode(), (record["id"][:-1] + other).encode())
    else:  # not JSON
        edited = b"[" + line[1:]
    assert len(edited) == len(line)
    lines[number] = edited
    with manifest.open("r+b") as handle:  # the same inode
        handle.write(b"".join(lines))
    os.utime(manifest, ns=(info.st_atime_ns, info.st_mtime_ns))


def _damage(out: Path, data: st.DataObject) -> None:
    records = [orjson.loads(line) for line in (out / MANIFEST_NAME).read_bytes().splitlines()]
    names = sorted({record["file"] for record in records})
    for name in data.draw(st.lists(st.sampled_from(names), max_size=4, unique=True)):
        target = out / name
        damage = data.draw(st.sampled_from(["remove", "rewrite", "cut", "grow"]))
        if damage == "remove":
            target.unlink()
        elif damage == "rewrite":  # the same size, another time: only its sha256 can tell
            size = target.stat().st_size
            target.write_bytes(bytes(size))
            os.utime(target, ns=(1, 10**18 + 1))
        elif damage == "cut":
            target.write_bytes(target.read_bytes()[:-1])
        else:
            target.write_bytes(target.read_bytes() + b"\0")
    edits = data.draw(
        st.lists(
            st.tuples(
                st.integers(0, len(records) - 1),
                st.sampled_from(["status", "outside", "identity", "json"]),
            ),
            max_size=4,
            unique_by=lambda edit: edit[0],
        )
    )
    for number, how in edits:
        _edit_in_place(out / MANIFEST_NAME, number, how)


def _claims_of(store: BatchStore, items: list[tuple[str, int, int, int]]) -> list[Any]:
    """What the store's one-line claim decides for each item (a line read on its own)."""
    return [store._claim_one(item, memoryview(b""), 0) for item in items]


def _comparable(claims: list[Any]) -> list[tuple[Any, bool, bytes, int]]:
    return [(record, checked, bytes(line), number) for record, checked, line, number in claims]


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_group_claim_decides_each_item_as_a_one_line_claim_does(
    server: LocalServer, data: st.DataObject
) -> None:
    layout: OutputFormat = data.draw(st.sampled_from(["files", "webdataset"]))
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out"
        _finish(server.url, out, layout)
        originals = [orjson.loads(line) for line in (out / MANIFEST_NAME).read_bytes().splitlines()]
        _damage(out, data)
        store = BatchStore(out, True, layout, 5)
        store.open()
        try:
            identities = [
                (record["id"], record["occurrence"], record.get("variant", 0))
                for record in originals
            ]
            identities += [("f" * 64, 0, 0), (originals[0]["id"], 9, 0)]  # never made
            order = data.draw(st.permutations(identities))
            items = [(*identity, store.earlier_at(*identity)) for identity in order]
            sizes = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=8))
            start = 0
            while start < len(items):
                group = items[start : start + sizes[start % len(sizes)]]
                start += len(group)
                assert _comparable(store.claim_group(group)) == _comparable(
                    _claims_of(store, group)
                )
        finally:
            store.close(complete=False)


@settings(max_examples=60, deadline=None)
@given(
    picks=st.lists(st.integers(0, 3000), max_size=3000),
    expected=st.integers(0, 6000),
)
def test_occurrences_number_requests_as_a_counter_does(picks: list[int], expected: int) -> None:
    """A resume sizes the occurrence table from the earlier run (`Occurrences(expected)`):
    whatever it expected, fewer or more, each request's occurrence is how many identical
    ones came before it (the table grows past its size, and is never wrong under it)."""
    digests = [hashlib.sha256(str(pick).encode()).hexdigest() for pick in picks]
    occurrences = Occurrences(expected)
    seen: Counter[str] = Counter()
    for digest in digests:
        assert occurrences.next(digest) == seen[digest]
        seen[digest] += 1
