"""The same stage core under Dask: ``map_partitions`` with ``ImageStage.run``."""

from __future__ import annotations

import pathlib

import pytest

dd = pytest.importorskip(
    "dask.dataframe", reason="Dask is not installed: pip install 'dask[dataframe]'"
)
pandas = pytest.importorskip("pandas")

from friendli_image.ray import ImageStage  # noqa: E402
from friendli_image.server import LocalServer  # noqa: E402

from .conftest import prompts_seen  # noqa: E402


def images(partition: pandas.DataFrame, url: str, out_dir: str) -> pandas.DataFrame:
    """What a Dask user writes: one stage per partition, its result as pandas."""
    stage = ImageStage(url, out_dir=out_dir, num_actors=4, request={"num_inference_steps": 2})
    return stage.run(partition).select(["id", "status", "uri"]).to_pandas()


def test_dask_map_partitions_runs_the_stage(server: LocalServer, tmp_path: pathlib.Path) -> None:
    """Each partition runs ImageStage.run (a private loop per call); images land in
    out_dir, a second compute resumes them all without a request."""
    frame = pandas.DataFrame({"id": range(60), "prompt": [f"a pier no. {i}" for i in range(60)]})
    ddf = dd.from_pandas(frame, npartitions=4)
    meta = pandas.DataFrame({"id": pandas.Series(dtype="int64"), "status": "str", "uri": "str"})
    run = ddf.map_partitions(images, server.url, str(tmp_path), meta=meta)
    first = run.compute(scheduler="threads")
    assert sorted(first["id"]) == list(range(60))
    assert set(first["status"]) == {"ok"}
    assert len(list(tmp_path.glob("*.jpg"))) == 60
    again = ddf.map_partitions(images, server.url, str(tmp_path), meta=meta).compute(
        scheduler="threads"
    )
    assert set(again["status"]) == {"resumed"}
    assert set(prompts_seen(server).values()) == {1}
