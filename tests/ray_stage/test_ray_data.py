"""ImageStage on a local Ray cluster against three bundled servers on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("pyarrow", reason="the stage needs pyarrow: pip install 'friendli-image[ray]'")
ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'friendli-image[ray]'")

from friendli_image import AsyncFriendli  # noqa: E402
from friendli_image.ray import ImageStage, actor_pool, generate_images, seed_for  # noqa: E402
from friendli_image.server import Action, LocalServer  # noqa: E402

from .conftest import SMALL, image_of, prompts_seen, row_of, s3_options  # noqa: E402

STEPS = {"num_inference_steps": 2}
PER_ENDPOINT = 4

# Ray Data warns about its own deprecated settings when it reads its context.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")


@pytest.fixture(scope="module")
def servers() -> Iterator[list[LocalServer]]:
    """Three bundled servers in thread mode."""
    started = [LocalServer(SMALL).start() for _ in range(3)]
    try:
        yield started
    finally:
        for srv in started:
            srv.close()


async def _expected(url: str, rows: list[dict[str, Any]]) -> dict[int, bytes]:
    async with AsyncFriendli(server_url=url) as client:
        result = await client.container.image.generate_batch(
            ({"prompt": r["prompt"], "seed": seed_for(r["id"]), **STEPS} for r in rows),
            concurrency=16,
        )
    return {rows[item.index]["id"]: item.result.data for item in result}


def test_2000_rows_through_2_actors(
    ray_local: Any, servers: list[LocalServer], tmp_path: pathlib.Path
) -> None:
    """Every image matches its prompt, none is missing or doubled, the per-endpoint cap
    holds across actors, a refused row (422) is an error row, and a rerun sends nothing."""
    urls = [srv.url for srv in servers]
    for srv in servers:
        srv.reset_stats()
    servers[1].script("refuse", [Action.status(422, body={"detail": [{"msg": "refused"}]})])
    rows = [
        {
            "id": i,
            "prompt": f"a harbour at dusk no. {i}",
            "endpoint": urls[i % 3],
            "headers": {"x-test-id": "refuse"} if i == 7 else None,
        }
        for i in range(2000)
    ]
    ds = ray.data.from_items(rows, override_num_blocks=16)
    out_dir = tmp_path / "images"
    options = {
        "out_dir": str(out_dir),
        "per_endpoint_limit": PER_ENDPOINT,
        "columns": {"prompt": "prompt", "server_url": "endpoint", "http_headers": "headers"},
        "request": STEPS,
    }
    out = generate_images(ds, num_actors=2, calls_per_actor=2, batch_size=50, **options)
    result = out.take_all()
    assert sorted(r["id"] for r in result) == list(range(2000))
    by_id = {r["id"]: r for r in result}
    refused = by_id.pop(7)
    assert refused["status"] == "failed"
    assert refused["error_type"] == "FriendliUnprocessableEntityError"
    assert {r["status"] for r in by_id.values()} == {"ok"}
    assert {r["endpoint"] for r in by_id.values()} == set(urls)
    for srv in servers:
        assert 2 <= srv.stats.max_in_flight <= PER_ENDPOINT, srv.stats
    seen = prompts_seen(*servers)  # a scripted 422 is answered before the body is recorded
    assert len(seen) == 1999
    assert set(seen.values()) == {1}
    assert servers[1].stats.responses_by_status.get(422) == 1
    expected = asyncio.run(_expected(urls[0], [r for r in rows if r["id"] != 7]))
    for row_id, data in expected.items():
        assert image_of(out_dir, row_id).read_bytes() == data, row_id
    assert sorted(int(row_of(name)) for name in os.listdir(out_dir)) == sorted(expected)

    before = sum(srv.stats.total_requests for srv in servers)
    again = generate_images(ds, num_actors=2, calls_per_actor=2, batch_size=50, **options)
    statuses = [r["status"] for r in again.take_all()]
    assert statuses.count("resumed") == 1999
    # The refused row is asked again (it has no image); nothing else is.
    assert sum(srv.stats.total_requests for srv in servers) == before + 1


class CrashOnce(ImageStage):
    """Kills its actor's process once, after ``crash_after`` images exist in ``out_dir``."""

    def __init__(self, *, marker: str, crash_after: int, **options: Any) -> None:
        super().__init__(**options)
        self._marker = marker
        self._crash_after = crash_after
        self._dir = options["out_dir"]

    async def __call__(self, batch: Any) -> Any:
        task = asyncio.ensure_future(super().__call__(batch))
        while not task.done():
            await asyncio.sleep(0.002)
            written = [n for n in os.listdir(self._dir) if not n.startswith(".")]
            if len(written) >= self._crash_after:
                try:
                    fd = os.open(self._marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    continue
                os.write(fd, json.dumps(written).encode())
                os.close(fd)
                os._exit(1)
        return task.result()


def test_an_actor_killed_mid_run(
    ray_local: Any, servers: list[LocalServer], tmp_path: pathlib.Path
) -> None:
    """The job completes; images already written are not requested again; only the rows
    in flight on the dead actor are sent twice."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    srv = servers[0]
    srv.reset_stats()
    out_dir = tmp_path / "images"
    out_dir.mkdir()
    marker = tmp_path / "crashed.json"
    rows = [{"id": i, "prompt": f"a meadow no. {i}"} for i in range(400)]
    ds = ray.data.from_items(rows, override_num_blocks=8)
    kwargs = {
        "server_url": srv.url,
        "out_dir": str(out_dir),
        "per_endpoint_limit": PER_ENDPOINT,
        "num_actors": 2,
        "request": {"num_inference_steps": 10},
        "marker": str(marker),
        "crash_after": 100,
    }
    out = ds.map_batches(
        CrashOnce,
        fn_constructor_kwargs=kwargs,
        batch_size=25,
        batch_format="pyarrow",
        compute=actor_pool(2, 2),
    )
    result = out.take_all()
    assert marker.exists(), "the injected crash did not happen"
    assert sorted(r["id"] for r in result) == list(range(400))
    assert {r["status"] for r in result} <= {"ok", "resumed"}
    written_before = {int(row_of(name)) for name in json.loads(marker.read_text())}
    seen = prompts_seen(srv)
    assert len(seen) == 400
    assert all(seen[f"a meadow no. {i}"] == 1 for i in written_before)
    twice = [p for p, n in seen.items() if n > 1]
    assert max(seen.values()) <= 2
    # In flight on the dead actor: its share of the endpoint, plus images being written.
    assert len(twice) <= 2 * (PER_ENDPOINT // 2), twice


def test_a_fleet_fails_over_when_a_server_dies(ray_local: Any, tmp_path: pathlib.Path) -> None:
    """One server killed mid-run: the fleet client fails over and every row succeeds."""
    fleet = [LocalServer(SMALL).start() for _ in range(3)]
    try:
        urls = [srv.url for srv in fleet]
        rows = [{"id": i, "prompt": f"a reef no. {i}"} for i in range(600)]
        ds = ray.data.from_items(rows, override_num_blocks=8)
        out = generate_images(
            ds,
            urls,
            out_dir=str(tmp_path),
            per_endpoint_limit=PER_ENDPOINT,
            request={"num_inference_steps": 5},
        )
        iterator = iter(out.iter_rows())
        result = [next(iterator) for _ in range(100)]
        fleet[2].close()
        result.extend(iterator)
        assert sorted(r["id"] for r in result) == list(range(600))
        assert {r["status"] for r in result} == {"ok"}
    finally:
        for srv in fleet:
            srv.close()


def test_outputs_to_a_local_s3_under_ray(
    ray_local: Any, servers: list[LocalServer], s3_endpoint: str
) -> None:
    """Actors write to s3:// (moto) and a rerun finds every object."""
    fsspec = pytest.importorskip("fsspec")
    options = s3_options(s3_endpoint)
    fsspec.filesystem("s3", **options).mkdir("ray-out")
    ds = ray.data.from_items([{"id": i, "prompt": f"dunes {i}"} for i in range(60)])
    stage = {"out_dir": "s3://ray-out/x", "storage_options": options, "request": STEPS}
    first = generate_images(ds, servers[0].url, **stage).take_all()
    assert {r["status"] for r in first} == {"ok"}
    assert {row_of(r["uri"]) for r in first} == {str(i) for i in range(60)}
    assert all(r["uri"].startswith("s3://ray-out/x/") for r in first)
    again = generate_images(ds, servers[0].url, **stage).take_all()
    assert {r["status"] for r in again} == {"resumed"}


class CloseProbe(ImageStage):
    """Records, when Ray drops the stage, whether its client ended up closed."""

    def __init__(self, *, probe_dir: str, **options: Any) -> None:
        super().__init__(**options)
        self._probe_dir = probe_dir

    def __del__(self) -> None:
        client = self._client
        super().__del__()
        closed = None if client is None else client.closed
        path = pathlib.Path(self._probe_dir) / f"{os.getpid()}.json"
        path.write_text(json.dumps({"closed": closed}), encoding="utf-8")


def test_actors_close_their_client_when_they_stop(
    ray_local: Any, servers: list[LocalServer], tmp_path: pathlib.Path
) -> None:
    """When the pool scales down, each actor's client is closed on Ray's loop (and the
    workers' logs show no "Unclosed client session" / "Unclosed connector")."""
    import time

    from ray._private import worker

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    logs = pathlib.Path(worker._global_node.get_session_dir_path()) / "logs"
    ds = ray.data.from_items(
        [{"id": i, "prompt": f"a bay no. {i}"} for i in range(40)], override_num_blocks=4
    )
    out = ds.map_batches(
        CloseProbe,
        fn_constructor_kwargs={
            "server_url": servers[0].url,
            "request": STEPS,
            "probe_dir": str(tmp_path),
            "num_actors": 2,
        },
        batch_format="pyarrow",
        compute=actor_pool(2, 2),
    ).take_all()
    assert {r["status"] for r in out} == {"ok"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(tmp_path.glob("*.json"))) < 2:
        time.sleep(0.2)
    probes = [json.loads(p.read_text(encoding="utf-8"))["closed"] for p in tmp_path.glob("*.json")]
    # An actor that got no batch never opened a client (None).
    assert True in probes
    assert set(probes) <= {True, None}
    time.sleep(1.0)  # the workers flush their logs as they exit
    leaked = [
        path.name
        for path in logs.glob("worker-*")
        if "Unclosed" in path.read_text(encoding="utf-8", errors="replace")
    ]
    assert leaked == []
