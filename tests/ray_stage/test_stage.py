"""ImageStage without Ray: the rows, the outputs on any file system, resuming, seeds."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import threading

import pytest

import friendli_image
from friendli_image import AsyncFriendli
from friendli_image.server import Action, LocalServer

from .conftest import SMALL, image_of, prompts_seen, row_of, s3_options

pa = pytest.importorskip(
    "pyarrow", reason="the stage needs pyarrow: pip install 'friendli-image[ray]'"
)
fsspec = pytest.importorskip(
    "fsspec", reason="the stage needs fsspec: pip install 'friendli-image[ray]'"
)

from friendli_image.ray import OUTPUT_SCHEMA, ClientSpec, ImageStage, seed_for  # noqa: E402

STEPS = {"num_inference_steps": 2}


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table(
        {
            "id": list(range(start, start + n)),
            "prompt": [f"a lake no. {i}" for i in range(start, start + n)],
        }
    )


async def _direct(url: str, prompt: str, seed: int) -> bytes:
    async with AsyncFriendli(server_url=url) as client:
        result = await client.container.image.generate(prompt=prompt, seed=seed, **STEPS)
    return result.data


def test_seed_for_is_stable_and_in_range() -> None:
    """The derived seed depends only on the id (a fixed value, the same in every process)."""
    documented = hashlib.sha256(b"friendli-image/seed/7").digest()[:4]
    assert seed_for(7) == seed_for("7") == int.from_bytes(documented, "big")
    assert len({seed_for(i) for i in range(1000)}) == 1000
    assert all(0 <= seed_for(i) < 2**32 for i in range(1000))


def test_memory_out_dir_writes_each_image_and_a_rerun_sends_nothing(server: LocalServer) -> None:
    """Images land under <id>-<digest>.jpg in memory://, match a direct call with the
    derived seed, and the same rows run again are all 'resumed' with no request sent."""
    stage = ImageStage(server.url, out_dir="memory://stage-a/out", request=STEPS)
    out = stage.run(_table(30))
    assert out.column("status").to_pylist() == ["ok"] * 30
    uris = out.column("uri").to_pylist()
    assert [row_of(uri) for uri in uris] == [str(i) for i in range(30)]
    assert all(uri.startswith("memory://stage-a/out/") and uri.endswith(".jpg") for uri in uris)
    assert "image" not in out.column_names
    fs = fsspec.filesystem("memory")
    assert asyncio.run(_direct(server.url, "a lake no. 3", seed_for(3))) == fs.cat_file(
        uris[3].removeprefix("memory:/")
    )
    assert out.column("seed").to_pylist() == [seed_for(i) for i in range(30)]
    assert server.stats.total_requests == 31
    again = stage.run(_table(40))
    assert again.column("status").to_pylist() == ["resumed"] * 30 + ["ok"] * 10
    assert again.column("endpoint").to_pylist() == [None] * 30 + [server.url] * 10
    assert server.stats.total_requests == 41


def test_local_out_dir_is_written_atomically(server: LocalServer, tmp_path: pathlib.Path) -> None:
    """A local out_dir gets complete files only (no .part left); an empty file is redone."""
    target = tmp_path / "images"
    stage = ImageStage(server.url, out_dir=str(target), request=STEPS)
    out = stage.run(_table(10))
    assert sorted(int(row_of(p.name)) for p in target.iterdir()) == list(range(10))
    assert out.column("uri").to_pylist()[0] == str(image_of(target, 0))
    image_of(target, 4).write_bytes(b"")  # a zero-length leftover is not a finished image
    again = stage.run(_table(10))
    assert again.column("status").to_pylist()[4] == "ok"
    assert again.column("status").to_pylist().count("resumed") == 9
    assert image_of(target, 4).read_bytes()[:2] == b"\xff\xd8"


def test_bytes_without_out_dir_and_given_seeds_win(server: LocalServer) -> None:
    """Without out_dir the image bytes are a column; a seed column is used as given."""
    table = pa.table({"prompt": ["fox", "owl"], "seed": [5, None], "steps": [2, 3]})
    stage = ImageStage(
        server.url, columns={"prompt": "prompt", "seed": "seed", "num_inference_steps": "steps"}
    )
    out = stage.run(table)
    assert out.column("status").to_pylist() == ["ok", "ok"]
    assert out.column("seed").to_pylist() == [5, None]  # no id, no seed: the server picks
    assert out.column("image").to_pylist()[0] == asyncio.run(_direct(server.url, "fox", 5))
    assert out.schema.field("image").type == pa.binary()
    assert sorted(r.body["num_inference_steps"] for r in server.records[:2]) == [2, 3]


def test_bad_rows_become_error_rows(server: LocalServer, tmp_path: pathlib.Path) -> None:
    """A 422, a missing prompt and an out-of-range value are error rows; the rest succeed."""
    server.script("refuse", [Action.status(422, body={"detail": [{"msg": "no"}]})])
    table = pa.table(
        {
            "id": [1, 2, 3, 4],
            "prompt": ["ok one", "refused", None, "too many steps"],
            "steps": [2, 2, 2, 99],
            "headers": [None, {"x-test-id": "refuse"}, None, None],
        }
    )
    stage = ImageStage(
        server.url,
        out_dir=str(tmp_path),
        columns={"prompt": "prompt", "num_inference_steps": "steps", "http_headers": "headers"},
    )
    out = stage.run(table).to_pylist()
    assert [row["status"] for row in out] == ["ok", "failed", "failed", "failed"]
    assert out[1]["error_type"] == "FriendliUnprocessableEntityError"
    assert out[1]["attempts"] == 1
    assert out[2]["error_type"] == "FriendliValidationError"
    assert "prompt" in out[2]["error"]
    assert out[3]["error_type"] == "FriendliInvalidValueError"
    assert [row_of(name) for name in os.listdir(tmp_path)] == ["1"]


def test_a_mapped_column_the_data_lacks_fails_the_batch_before_any_request(
    server: LocalServer,
) -> None:
    """A wrong columns= mapping is the job's error, raised at once, not a million failed rows."""
    stage = ImageStage(server.url, columns={"prompt": "prompt", "seed": "my_seed"})
    with pytest.raises(friendli_image.FriendliUsageError, match="my_seed"):
        stage.run(_table(3))
    assert server.stats.total_requests == 0


def test_output_rows_keep_input_columns_and_follow_the_schema(server: LocalServer) -> None:
    """Input columns come first (an input 'seed' is replaced by the seed used), then the
    output columns of OUTPUT_SCHEMA; keep_columns=False keeps only the id."""
    table = _table(3).append_column("seed", pa.array([None, 9, None], pa.int64()))
    out = ImageStage(server.url, out_dir="memory://stage-b", request=STEPS).run(table)
    expected = ["id", "prompt"] + [n for n in OUTPUT_SCHEMA.names if n != "image"]
    assert out.column_names == expected
    assert out.column("seed").to_pylist() == [seed_for(0), 9, seed_for(2)]
    slim = ImageStage(server.url, out_dir="memory://stage-c", keep_columns=False, request=STEPS)
    assert slim.run(_table(2)).column_names[0:2] == ["id", "status"]


def test_edits_take_image_bytes_from_a_column(server: LocalServer, tiny_png: bytes) -> None:
    """With an image column the stage sends edits (bytes from a binary column)."""
    table = pa.table({"id": ["a"], "prompt": ["make it snow"], "image": [tiny_png]})
    out = ImageStage(server.url, request=STEPS).run(table).to_pylist()
    assert out[0]["status"] == "ok", out[0]
    assert server.records[0].path == "/v1/images/edits"


def test_pandas_and_dicts_are_accepted(server: LocalServer) -> None:
    """map_batches' other batch formats work too (what Dask's map_partitions passes)."""
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"id": [1, 2], "prompt": ["x", "y"]})
    assert (
        ImageStage(server.url, request=STEPS).run(frame).column("status").to_pylist() == ["ok"] * 2
    )
    batch = {"id": [3], "prompt": ["z"]}
    assert ImageStage(server.url, request=STEPS).run(batch).column("status").to_pylist() == ["ok"]


def test_per_endpoint_limit_is_divided_across_actors(server: LocalServer) -> None:
    """Each actor holds at most per_endpoint_limit // num_actors requests on the endpoint."""
    slow = LocalServer(SMALL.__class__(image_size=64, step_latency_ms=20.0, max_concurrency=16))
    with slow:
        ImageStage(slow.url, per_endpoint_limit=12, num_actors=4, request=STEPS).run(_table(40))
        assert slow.stats.max_in_flight == 3
        slow.reset_stats()
        ImageStage(slow.url, per_endpoint_limit=3, num_actors=8, request=STEPS).run(_table(10))
        assert slow.stats.max_in_flight == 1


def test_per_row_endpoints_each_get_the_full_share() -> None:
    """Rows sent to several endpoints (a server_url column) get the per-endpoint share on
    each one, not one share in total."""
    config = SMALL.__class__(image_size=64, step_latency_ms=20.0, max_concurrency=16)
    with LocalServer(config) as one, LocalServer(config) as two:
        urls = [one.url, two.url]
        table = _table(40).append_column("endpoint", pa.array([urls[i % 2] for i in range(40)]))
        stage = ImageStage(
            per_endpoint_limit=3,
            columns={"prompt": "prompt", "server_url": "endpoint"},
            request=STEPS,
        )
        out = stage.run(table)
        assert out.column("endpoint").to_pylist() == [urls[i % 2] for i in range(40)]
        assert one.stats.max_in_flight == two.stats.max_in_flight == 3


@pytest.mark.parametrize("joined", [True, False], ids=["comma-joined", "list"])
def test_a_fleet_gets_the_actor_share_on_each_endpoint(joined: bool) -> None:
    """A fleet (the CLI's comma-joined server_url, or a list) holds each endpoint to the
    actor's share, and every endpoint gets it: the stage runs at the configured rate,
    not at one endpoint's share for the whole fleet."""
    config = SMALL.__class__(image_size=64, step_latency_ms=20.0, max_concurrency=16)
    with LocalServer(config) as one, LocalServer(config) as two, LocalServer(config) as three:
        fleet = [one, two, three]
        urls = [srv.url for srv in fleet]
        stage = ImageStage(
            ",".join(urls) if joined else urls,
            per_endpoint_limit=8,
            num_actors=2,
            request=STEPS,
        )
        out = stage.run(_table(120))
        assert out.column("status").to_pylist() == ["ok"] * 120
        assert {srv.stats.max_in_flight for srv in fleet} == {4}
        assert set(out.column("endpoint").to_pylist()) == set(urls)


def test_a_client_factory_gets_the_options_unchanged_and_the_actor_share(
    server: LocalServer,
) -> None:
    """server_url (a list too) and client_options reach the factory as given, with this
    actor's share of the per-endpoint limit."""
    specs: list[ClientSpec] = []

    def factory(spec: ClientSpec) -> AsyncFriendli:
        specs.append(spec)
        return AsyncFriendli(server_url=server.url)

    fleet = ("http://10.0.0.1:8000", "http://10.0.0.2:8000")
    stage = ImageStage(
        fleet,
        per_endpoint_limit=10,
        num_actors=3,
        client_options={"retries": 2},
        client_factory=factory,
        request=STEPS,
    )
    assert stage.run(_table(2)).column("status").to_pylist() == ["ok", "ok"]
    options = {"retries": 2, "server_url": list(fleet)}
    assert specs == [ClientSpec(client_options=options, per_endpoint=3, endpoints=2)]


def test_the_client_is_closed_on_its_loop_when_the_stage_is_dropped(server: LocalServer) -> None:
    """As in a Ray actor: the UDF runs on a loop thread; __del__ closes the client there."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        stage = ImageStage(server.url, request=STEPS)
        out = asyncio.run_coroutine_threadsafe(stage(_table(2)), loop).result(30)
        assert out.column("status").to_pylist() == ["ok", "ok"]
        client = stage._client
        assert client is not None
        assert not client.closed
        stage.__del__()
        assert client.closed
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_bad_options_fail_at_construction() -> None:
    """Limits are checked where the user builds the stage, before any actor starts."""
    with pytest.raises(friendli_image.FriendliValidationError, match="num_actors"):
        ImageStage("http://127.0.0.1:1", num_actors=0)
    with pytest.raises(friendli_image.FriendliValidationError, match="per_endpoint_limit"):
        ImageStage("http://127.0.0.1:1", per_endpoint_limit=True)


def test_s3_out_dir_on_a_local_object_store(server: LocalServer, s3_endpoint: str) -> None:
    """s3:// outputs are single PUTs; a rerun finds them and sends no request."""
    options = s3_options(s3_endpoint)
    fs = fsspec.filesystem("s3", **options)
    fs.mkdir("images-a")
    stage = ImageStage(
        server.url, out_dir="s3://images-a/run", storage_options=options, request=STEPS
    )
    out = stage.run(_table(12))
    assert out.column("status").to_pylist() == ["ok"] * 12
    fs.invalidate_cache()
    listed = {int(row_of(name)): name for name in fs.ls("images-a/run")}
    assert sorted(listed) == list(range(12))
    assert fs.cat_file(listed[5]) == asyncio.run(_direct(server.url, "a lake no. 5", seed_for(5)))
    before = server.stats.total_requests
    again = ImageStage(
        server.url, out_dir="s3://images-a/run", storage_options=options, request=STEPS
    )
    assert again.run(_table(12)).column("status").to_pylist() == ["resumed"] * 12
    assert server.stats.total_requests == before
    assert prompts_seen(server)["a lake no. 0"] == 1


@pytest.mark.scenario(57)
def test_changed_parameters_are_regenerated(server: LocalServer) -> None:
    """A row is its id with its request: other steps make other images, sent again."""
    out_dir = "memory://stage-params/out"
    ImageStage(server.url, out_dir=out_dir, request=STEPS).run(_table(8))
    before = server.stats.total_requests
    changed = ImageStage(server.url, out_dir=out_dir, request={"num_inference_steps": 3})
    out = changed.run(_table(8))
    assert out.column("status").to_pylist() == ["ok"] * 8
    assert server.stats.total_requests == before + 8
    fs = fsspec.filesystem("memory")
    assert len(fs.ls("/stage-params/out")) == 16


@pytest.mark.scenario(57)
def test_two_rows_with_one_id_and_two_prompts_get_two_correct_images(
    server: LocalServer, tmp_path: pathlib.Path
) -> None:
    table = pa.table({"id": [1, 1], "prompt": ["a red kite", "a blue kite"]})
    out = ImageStage(server.url, out_dir=str(tmp_path), request=STEPS).run(table).to_pylist()
    assert [row["status"] for row in out] == ["ok", "ok"]
    assert out[0]["uri"] != out[1]["uri"]
    for row in out:
        direct = asyncio.run(_direct(server.url, row["prompt"], seed_for(1)))
        assert pathlib.Path(row["uri"]).read_bytes() == direct


def test_a_text_seed_is_taken_as_the_batch_takes_it_or_fails_its_row_only(
    server: LocalServer, tmp_path: pathlib.Path
) -> None:
    """A CSV's "1" is seed 1; "x" fails its row; neither fails the block (ArrowInvalid)."""
    table = pa.table({"id": [1, 2, 3], "prompt": ["a", "b", "c"], "seed": ["1", "x", None]})
    stage = ImageStage(server.url, out_dir=str(tmp_path), request=STEPS)
    for _ in range(2):  # the rerun too
        out = stage.run(table).to_pylist()
        assert [row["status"] in ("ok", "resumed") for row in out] == [True, False, True]
        assert [row["seed"] for row in out] == [1, None, seed_for(3)]
        assert out[1]["error_type"] == "FriendliValidationError"
        assert "seed" in out[1]["error"]
    image = pathlib.Path(out[0]["uri"]).read_bytes()
    assert image == asyncio.run(_direct(server.url, "a", 1))
