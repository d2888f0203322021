"""The resume's fast paths agree with the slow ones they replace.

A resume identifies every finished item from its arguments (`plain_request_digest`)
instead of building its model, scans each earlier manifest line with inline checks
(`_scan_line`), and writes a resumed item's line by rewriting only its index
(`append_resumed`). Each is checked here against the full pipeline over generated inputs:
generate and edit requests, values the models convert (text numbers, ints for floats,
bools, local images, data URIs, URLs with spaces) and values they refuse.
"""

from __future__ import annotations

import asyncio
import base64
import os
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from friendli_image import (
    AsyncFriendli,
    FriendliAuthenticationError,
    FriendliBatchAborted,
    FriendliUsageError,
    ImageResult,
    _batch,
)
from friendli_image._batch import Batch, BatchOperation, _Deferred
from friendli_image._batch_models import BatchItem, BatchOptions
from friendli_image._request_path import RequestPath
from friendli_image._requests import EditRequest, GenerateRequest, RequestModel
from friendli_image._store import (
    MANIFEST_NAME,
    BatchStore,
    _scan_line,
    _scan_record,
    manifest_record,
    plain_request_digest,
    request_digest,
)
from friendli_image.server import LocalServer, ServerConfig

GENERATE = "/v1/images/generations"
EDIT = "/v1/images/edits"

# A 1x1 PNG: a valid image for the local-image and data: URI inputs.
_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
_LOCAL_IMAGE = Path(__file__).with_name("_resume_identity_image.png")

_text = st.one_of(st.text(max_size=12), st.sampled_from(["", " x ", "\ud800", "é"]))
_numbers = st.one_of(
    st.integers(-3, 60),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([20.0, 7.5, 0.0, -0.0, 2**70, True, False, "7", " 3 ", "3.5", b"4"]),
)
_images = st.one_of(
    st.sampled_from(
        [
            "https://example.com/a.png",
            "HTTP://example.com/b.png",
            " https://example.com/c.png",
            "https://example.com/d.png\n",
            "ftp://example.com/e.png",
            "data:image/png;base64," + base64.b64encode(_PNG).decode(),
            base64.b64encode(_PNG).decode(),
            str(_LOCAL_IMAGE),
            "not an image",
        ]
    ),
    st.just(_PNG),
    st.just({"image": "https://example.com/f.png"}),
    st.lists(st.just("https://example.com/g.png"), max_size=2),
)


def _values(name: str) -> st.SearchStrategy[Any]:
    plain = {
        "prompt": _text,
        "model": st.one_of(_text, st.none()),
        "num_inference_steps": st.one_of(_numbers, st.none()),
        "guidance_scale": st.one_of(_numbers, st.none()),
        "seed": st.one_of(_numbers, st.integers(), st.none()),
        "response_format": st.sampled_from(["raw", "jpeg", "png", None, 1]),
        "image": st.one_of(_images, st.none()),
        "control_images": st.one_of(st.none(), st.lists(_images, max_size=2)),
        "controlnet_weights": st.one_of(st.none(), st.lists(_numbers, max_size=2)),
        "retries": st.just(1),  # a per-call option, not an argument
        "colour": st.just("red"),  # no argument at all
    }
    return plain[name]


_GENERATE_KEYS = [
    "prompt",
    "model",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "response_format",
    "control_images",
    "controlnet_weights",
    "retries",
    "colour",
]
_EDIT_KEYS = ["image", *_GENERATE_KEYS[:6], "retries", "colour"]


@st.composite
def _requests(draw: st.DrawFn) -> tuple[str, type[RequestModel], dict[str, Any]]:
    edit = draw(st.booleans())
    keys = _EDIT_KEYS if edit else _GENERATE_KEYS
    # Mostly the required arguments (so most requests are valid), some of the others.
    chosen = [
        key for key in keys if draw(st.integers(0, 9)) < (8 if key in {"prompt", "image"} else 3)
    ]
    spec = {key: draw(_values(key)) for key in chosen}
    return (EDIT, EditRequest, spec) if edit else (GENERATE, GenerateRequest, spec)


def _full_digest(path: str, model: type[RequestModel], spec: dict[str, Any]) -> str | None:
    """The id the batch gives the request through its model; None when it is invalid."""
    try:
        return request_digest(path, model(**spec))
    except (ValueError, TypeError):  # FriendliValidationError is a ValueError
        return None


@pytest.fixture(scope="module", autouse=True)
def _local_image() -> Any:
    _LOCAL_IMAGE.write_bytes(_PNG)
    yield
    _LOCAL_IMAGE.unlink(missing_ok=True)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests())
@example((GENERATE, GenerateRequest, {"prompt": "a lighthouse at dawn", "seed": 3}))
@example((EDIT, EditRequest, {"prompt": "a", "image": "https://example.com/x.png"}))
@example((GENERATE, GenerateRequest, {"prompt": "a", "guidance_scale": 3}))
@example((GENERATE, GenerateRequest, {"prompt": "a", "num_inference_steps": None}))
@example((GENERATE, GenerateRequest, {"prompt": "a", "seed": True}))
@example((GENERATE, GenerateRequest, {"prompt": "\ud800"}))
@example((EDIT, EditRequest, {"prompt": "a", "image": str(_LOCAL_IMAGE)}))
def test_plain_digest_is_the_models_or_none(
    request_: tuple[str, type[RequestModel], dict[str, Any]],
) -> None:
    """Whenever the fast identity answers, the request is valid and it is the model's."""
    path, model, spec = request_
    fast = plain_request_digest(path, model, spec)
    if fast is not None:
        assert fast == _full_digest(path, model, spec)


@pytest.mark.parametrize(
    ("path", "model", "spec"),
    [
        (GENERATE, GenerateRequest, {"prompt": "a lighthouse", "seed": 3}),
        (
            GENERATE,
            GenerateRequest,
            {
                "prompt": "",
                "model": "m",
                "num_inference_steps": 50,
                "guidance_scale": 7.5,
                "seed": -1,
                "response_format": "raw",
                "control_images": None,
            },
        ),
        (EDIT, EditRequest, {"prompt": "add a car", "image": "https://example.com/x.png"}),
    ],
)
def test_plain_digest_answers_the_common_requests(
    path: str, model: type[RequestModel], spec: dict[str, Any]
) -> None:
    """The fast identity is taken for what resumes mostly meet (else it would be unused)."""
    assert plain_request_digest(path, model, spec) == _full_digest(path, model, spec) is not None


_names = st.sampled_from(
    [
        "ab12-0.jpg",
        "ab12-0.JPG",
        "train-20261202T000000-abcdef-00000.tar",
        "train-x.parquet",
        "train-x.zip",
        ".hidden.jpg",
        "dir/a.jpg",
        "",
        "a.html",
    ]
)
_field_values = st.one_of(
    st.integers(-2, 3),
    st.booleans(),
    st.none(),
    st.sampled_from(["", "ok", "failed", "a" * 64, "zz", "0x1f", 1.5]),
    _names,
)


@st.composite
def _lines(draw: st.DrawFn) -> bytes:
    record = manifest_record(
        index=draw(st.integers(0, 5)),
        item_id=draw(st.sampled_from(["ab" * 32, "0f" * 32])),
        occurrence=draw(st.integers(0, 2)),
        prompt="p",
        seed=1,
        attempts=1,
        elapsed=0.0,
        request_id=None,
        variant=draw(st.integers(0, 2)),
        file=draw(_names),
        sha256="cd" * 32,
    )
    for key in draw(st.lists(st.sampled_from(sorted(record)), max_size=3)):
        if draw(st.booleans()):
            record.pop(key, None)
        else:
            record[key] = draw(_field_values)
    line = orjson.dumps(record)
    if draw(st.integers(0, 9)) == 0:
        line = draw(st.sampled_from([b"[1]", b"not json", b"{}", b'{"index": -1}', line[:-3]]))
    return line + b"\n"


@settings(max_examples=500, deadline=None)
@given(_lines(), st.sampled_from(["", "train-x.parquet", "ab12-0.jpg", "train-x.zip"]))
def test_scan_line_agrees_with_the_record_checks(line: bytes, previous: str) -> None:
    """The inline scan of an earlier line keeps exactly what `_valid_record` and
    `_identity` keep (``previous`` stands for an earlier line's file, already checked)."""
    slow = _scan_record(line)
    if previous and previous != "train-x.zip" and previous.endswith((".parquet", ".jpg")):
        assert _scan_line(line, previous) == slow
    assert _scan_line(line) == slow


@st.composite
def _earlier_lines(draw: st.DrawFn) -> bytes:
    prompt = draw(_text)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in prompt):
        prompt = draw(st.sampled_from(['"index":1', "p"]))
    record = manifest_record(
        index=draw(st.integers(0, 10**12)),
        item_id="ab" * 32,
        occurrence=draw(st.integers(0, 3)),
        prompt=prompt,
        seed=draw(st.one_of(st.integers(-(2**63), 2**63 - 1), st.none())),
        attempts=1,
        elapsed=draw(st.floats(0, 1e9)),
        request_id=None,
        file="ab-0.jpg",
        sha256="cd" * 32,
    )
    if draw(st.booleans()):  # a line written by another tool: other order, spaces
        record = {"id": record.pop("id"), **record}
        return orjson.dumps(record).replace(b'":', b'": ') + b"\n"
    return orjson.dumps(record) + b"\n"


# A run's indices are its positions, 0 to N - 1, and the store notes where each line is in
# an array by index: a drawn index of 10**9 would allocate gigabytes no run ever does.
@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**5), _earlier_lines()), min_size=1, max_size=20))
def test_a_resumed_line_is_its_record_with_the_new_index(
    tmp_path_factory: pytest.TempPathFactory, resumed: list[tuple[int, bytes]]
) -> None:
    """`append_resumed` writes what ``{**record, "index": index}`` serializes to."""
    directory = tmp_path_factory.mktemp("resumed")
    store = BatchStore(directory, resume=True)
    store.open()
    try:
        for index, line in resumed:
            store.append_resumed(index, orjson.loads(line), line)
        store.flush()
        written = (directory / MANIFEST_NAME).read_bytes()
    finally:
        store.close(complete=False)
    expected = [orjson.loads(line) for _index, line in resumed]
    assert [orjson.loads(line) for line in written.splitlines()] == [
        {**record, "index": index} for (index, _line), record in zip(resumed, expected, strict=True)
    ]
    ours = b"".join(
        orjson.dumps({**record, "index": index}) + b"\n"
        for (index, _line), record in zip(resumed, expected, strict=True)
    )
    if all(line.startswith(b'{"index":') for _index, line in resumed):
        assert written == ours  # byte for byte, where the line was this package's


# -- through a batch -------------------------------------------------------------------------


@pytest.fixture
def server() -> Any:
    with LocalServer(ServerConfig(image_size=16, max_concurrency=8)) as local:
        yield local


async def test_a_known_item_whose_image_is_gone_is_made_again(
    server: LocalServer, tmp_path: Path
) -> None:
    """An item identified from its arguments whose image was deleted gets its model built
    and is sent again; prompt strings, mappings and models resume alike."""
    requests: list[Any] = [
        "a lighthouse",
        {"prompt": "a harbour", "seed": 1, "num_inference_steps": 2},
        GenerateRequest(prompt="a ship", seed=2, num_inference_steps=2),
        {"prompt": "a harbour", "seed": 1, "num_inference_steps": 2},  # occurrence 1
        {"prompt": "a mill", "seed": "3", "num_inference_steps": 2},  # converted: not plain
    ]
    async with AsyncFriendli(server_url=server.url) as client:
        first = await client.container.image.generate_batch(requests, out_dir=tmp_path)
        assert [item.status for item in first.items] == ["ok"] * 5
        gone = first.items[3]
        assert gone.path is not None
        assert gone.occurrence == 1
        os.remove(gone.path)
        server.reset_stats()
        again = await client.container.image.generate_batch(requests, out_dir=tmp_path)
    assert [item.status for item in again.items] == [
        "resumed",
        "resumed",
        "resumed",
        "ok",
        "resumed",
    ]
    assert server.stats.total_requests == 1
    assert [(item.id, item.occurrence, item.key, item.sha256) for item in again.items[:3]] == [
        (item.id, item.occurrence, item.key, item.sha256) for item in first.items[:3]
    ]
    assert (again.items[3].id, again.items[3].occurrence) == (gone.id, 1)
    lines = [orjson.loads(line) for line in (tmp_path / MANIFEST_NAME).read_bytes().splitlines()]
    assert sorted(line["index"] for line in lines) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "request_",
    [
        {"prompt": "a lighthouse", "seed": 3},
        {"prompt": "a lighthouse", "http_headers": {"Authorization": "Bearer hidden"}},
    ],
)
def test_a_resumed_item_is_the_item_batchitem_makes(request_: dict[str, Any]) -> None:
    """`resumed_item` sets the slots directly: every field as ``BatchItem(...)`` has it
    (a field added to BatchItem and not to it fails here), the credential hidden alike."""
    import attrs

    from friendli_image._batch_models import BatchItem, resumed_item

    given: dict[str, Any] = {
        "index": 7,
        "occurrence": 1,
        "variant": 2,
        "key": "abc-1-2",
        "path": Path("/x/abc-1-2.jpg"),
        "uri": "/x/abc-1-2.jpg",
        "sha256": "0" * 64,
        "request_id": "req-1",
    }
    fast = resumed_item(item_id="ab" * 32, request=request_, fmt="jpeg", **given)
    made = BatchItem(
        id="ab" * 32, request=request_, format="jpeg", status="resumed", attempts=0, **given
    )
    for field in attrs.fields(BatchItem):
        # A hidden credential is a new secret each time: equal as it is shown.
        assert repr(getattr(fast, field.name)) == repr(getattr(made, field.name)), field.name
    assert repr(fast) == repr(made)
    assert "hidden" not in repr(fast.request)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        fast.index = 8  # type: ignore[misc]


# -- the claims a resume defers -----------------------------------------------------------


@st.composite
def _plain_requests(draw: st.DrawFn) -> tuple[str, type[RequestModel], dict[str, Any]]:
    """Requests `plain_request_digest` mostly answers: text of any code point, floats
    of every size and sign, the full int range, None for optional fields, in any order."""
    values: dict[str, st.SearchStrategy[Any]] = {
        "prompt": st.text(),
        "model": st.one_of(st.text(max_size=8), st.none()),
        "num_inference_steps": st.one_of(st.integers(1, 50), st.none()),
        "guidance_scale": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.none()),
        "seed": st.one_of(st.integers(-(2**63), 2**64), st.none()),
        "response_format": st.sampled_from(["raw", "jpeg", None]),
    }
    edit = draw(st.booleans())
    if edit:
        values["image"] = st.sampled_from(["https://example.com/a.png", "http://h/b c.jpg"])
    keys = draw(st.permutations(list(values)))
    chosen = [key for key in keys if key in {"prompt", "image"} or draw(st.booleans())]
    spec = {key: draw(values[key]) for key in chosen}
    return (EDIT, EditRequest, spec) if edit else (GENERATE, GenerateRequest, spec)


class DeferredQueue(RuleBasedStateMachine):
    """`_Deferred` against a deque: first in, first out, and each plain request comes back
    equal, with the same types and key order (``repr``), from memory and from disk."""

    rolled_over = False

    def __init__(self) -> None:
        super().__init__()
        self.queue = _Deferred()
        self.model: deque[tuple[int, dict[str, Any], str, int, int]] = deque()
        self.index = 0

    @rule(
        requests=st.lists(st.one_of(_plain_requests(), _requests()), max_size=8),
        occurrence=st.integers(0, 3),
        at=st.integers(0, 2**40),
    )
    def add(
        self,
        requests: list[tuple[str, type[RequestModel], dict[str, Any]]],
        occurrence: int,
        at: int,
    ) -> None:
        for path, model, spec in requests:
            digest = plain_request_digest(path, model, spec)
            if digest is None:
                continue  # only plain requests are deferred
            completed = self.queue.add(self.index, spec, digest, occurrence, at)
            self.model.append((self.index, spec, digest, occurrence, at))
            self.index += 1
            assert completed == (len(self.model) % _batch._CLAIM_GROUP == 0) or not completed

    @rule()
    def take(self) -> None:
        if not self.queue:
            assert not self.model
            return
        group = self.queue.take()
        assert group
        DeferredQueue.rolled_over |= bool(self.queue._file._rolled)  # type: ignore[attr-defined]
        for index, request, known, at in group:
            expected_index, spec, digest, occurrence, expected_at = self.model.popleft()
            assert (index, at, known.at) == (expected_index, expected_at, expected_at)
            assert (known.id, known.occurrence, known.variant) == (digest, occurrence, 0)
            assert request is known.request
            assert repr(request) == repr(spec)

    @invariant()
    def holds_what_was_added_and_not_taken(self) -> None:
        assert self.queue.count == len(self.model)
        assert bool(self.queue) == bool(self.model)

    def teardown(self) -> None:
        self.queue.close()


def test_deferred_claims_come_back_in_order_and_equal(monkeypatch: pytest.MonkeyPatch) -> None:
    # Groups of three, and a disk file past 300 bytes: both paths in a few steps.
    monkeypatch.setattr(_batch, "_CLAIM_GROUP", 3)
    monkeypatch.setattr(_batch, "_DEFERRED_IN_MEMORY", 300)
    DeferredQueue.rolled_over = False
    run = DeferredQueue.TestCase
    run.settings = settings(
        max_examples=60, stateful_step_count=20, deadline=None, derandomize=True, database=None
    )
    run("runTest").runTest()
    assert DeferredQueue.rolled_over  # the disk file was read, not only memory


class _Sent:
    """A request path that answers at once (or, ``refused``, 401s every request) and
    notes, at each send, how many items the consumer had seen by then."""

    def __init__(self, *, refused: bool = False) -> None:
        self.refused = refused
        self.seen = 0
        self.sends: list[tuple[int, int | None]] = []  # (items seen, seed)
        client = AsyncFriendli(server_url="http://127.0.0.1:9", token="")
        self.resolve = client._resolve

    async def send(self, path: str, model: Any, options: Any, gate: Any) -> ImageResult:
        self.sends.append((self.seen, model.seed))
        if self.refused:
            raise FriendliAuthenticationError("the token was refused", status=401)
        ticket = await gate.acquire()
        await asyncio.sleep(0)
        gate.release(ticket, "ok")
        return ImageResult(data=b"\xff\xd8\xff\xe0" + bytes(16))

    async def run(
        self, requests: list[Any], out_dir: Path, *, source: str = "list", **options: Any
    ) -> list[BatchItem]:
        """Run the requests as a batch, given as a list or an async generator (``source``:
        the two ways a batch reads its input)."""

        async def generated() -> AsyncIterator[Any]:
            for request in requests:
                yield request

        batch = Batch(
            RequestPath(send=self.send, resolve=self.resolve),
            BatchOperation(GENERATE, GenerateRequest, accepts_prompt=True),
            requests if source == "list" else generated(),
            BatchOptions(out_dir=out_dir, concurrency=8, **options),
        )
        items = []
        async for item in batch:
            self.seen += 1
            items.append(item)
        return items


@pytest.mark.parametrize("source", ["list", "async generator"])
async def test_a_resume_sends_its_new_requests_before_it_reports_the_finished_ones(
    tmp_path: Path, source: str
) -> None:
    """Unordered, a rerun's first new request goes out before any finished item is claimed
    and yielded (a million claims would delay it by seconds); every finished item is then
    resumed with its request as given, and a third run finds all of them stored."""
    finished: list[Any] = [{"prompt": "a lighthouse", "seed": seed} for seed in range(700)]
    finished += ["a harbour", "a harbour", {"prompt": "a lighthouse", "seed": 0}]  # repeats
    new: list[Any] = [{"prompt": "a mill", "seed": seed} for seed in range(5)]
    first = _Sent()
    assert {item.status for item in await first.run(finished, tmp_path)} == {"ok"}

    again = _Sent()
    items = await again.run(finished + new, tmp_path, source=source)
    assert again.sends[0][0] == 0  # nothing was yielded before the first new request
    assert sorted(seed for _seen, seed in again.sends) == list(range(5))
    by_index = {item.index: item for item in items}
    assert sorted(by_index) == list(range(len(finished) + len(new)))
    for index, spec in enumerate(finished + new):
        item = by_index[index]
        assert item.status == ("resumed" if index < len(finished) else "ok")
        given = {"prompt": spec} if isinstance(spec, str) else spec
        assert repr(item.request) == repr(given)
    assert [by_index[i].occurrence for i in (700, 701, 702)] == [0, 1, 1]

    third = _Sent()
    items = await third.run(finished + new, tmp_path)
    assert {item.status for item in items} == {"resumed"}
    assert third.sends == []
    lines = [orjson.loads(line) for line in (tmp_path / MANIFEST_NAME).read_bytes().splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(len(finished) + len(new)))


async def test_requests_in_flight_finish_while_a_resume_claims(tmp_path: Path) -> None:
    """New requests sent before a long run of finished items are answered and yielded
    while those are identified and claimed, not after the last claim."""
    finished = [{"prompt": "a lighthouse", "seed": seed} for seed in range(2000)]
    await _Sent().run(finished, tmp_path)
    new = [{"prompt": "a mill", "seed": seed} for seed in range(3)]
    items = await _Sent().run(new + finished, tmp_path)
    statuses = [item.status for item in items]
    assert sorted(statuses) == ["ok"] * 3 + ["resumed"] * 2000
    last_resumed = len(statuses) - 1 - statuses[::-1].index("resumed")
    assert statuses.index("ok") < last_resumed


async def test_an_ordered_resume_yields_in_input_order(tmp_path: Path) -> None:
    """Ordered iteration claims as it goes: the window keeps its order."""
    finished = [{"prompt": "a lighthouse", "seed": seed} for seed in range(600)]
    await _Sent().run(finished, tmp_path)
    specs = [*finished[:300], {"prompt": "a mill"}, *finished[300:]]
    items = await _Sent().run(specs, tmp_path, ordered=True)
    assert [item.index for item in items] == list(range(601))
    assert [item.status for item in items] == ["resumed"] * 300 + ["ok"] + ["resumed"] * 300


async def test_no_room_for_the_deferred_claims_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A temporary folder that cannot take the deferred claims stops the resume with a
    `FriendliUsageError` that says what to do; a rerun with room resumes every item."""
    out = tmp_path / "out"
    finished = [{"prompt": "a lighthouse", "seed": seed} for seed in range(600)]
    await _Sent().run(finished, out)
    monkeypatch.setattr(_batch, "_DEFERRED_IN_MEMORY", 1000)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(FriendliUsageError, match="TMPDIR"):
        await _Sent().run(finished, out)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    again = _Sent()
    items = await again.run(finished, out)
    assert again.sends == []
    assert sorted(item.index for item in items if item.status == "resumed") == list(range(600))


async def test_a_resume_stopped_by_a_fatal_error_reports_every_item_once(tmp_path: Path) -> None:
    """A rerun whose new request meets an error every request would meet stops: the
    finished items it identified by then are still reported ``resumed``, the rest
    ``skipped``, each item once; nothing stored is lost, and a rerun that works makes
    only the new ones."""
    finished = [{"prompt": "a lighthouse", "seed": seed} for seed in range(600)]
    await _Sent().run(finished, tmp_path)
    specs = [
        *finished[:300],
        {"prompt": "a mill"},
        *finished[300:],
        {"prompt": "a mill", "seed": 1},
    ]
    refused = _Sent(refused=True)
    items = await refused.run(specs, tmp_path)
    assert sorted(item.index for item in items) == list(range(len(specs)))
    by_index = {item.index: item for item in items}
    assert by_index[300].status == "failed"
    assert isinstance(by_index[300].error, FriendliAuthenticationError)
    for index, item in by_index.items():
        if index != 300:
            assert item.status in {"resumed", "skipped"}, (index, item.status)
        if item.status == "skipped":
            assert isinstance(item.error, FriendliBatchAborted)
        if item.status == "resumed":
            assert item.request == specs[index]
    assert len(refused.sends) == 1
    again = _Sent()
    items = await again.run(specs, tmp_path)
    assert len(again.sends) == 2
    assert {seed for _seen, seed in again.sends} == {None, 1}
    assert [item.index for item in items if item.status == "ok"] in ([300, 601], [601, 300])
    assert sum(item.status == "resumed" for item in items) == 600
