"""`friendli-image batch` with CSV input: a header row names the columns."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from friendli_image._cli import main
from friendli_image._store import MANIFEST_NAME
from friendli_image.server import LocalServer, ServerConfig


@pytest.fixture
def server(tiny_jpeg: bytes) -> Iterator[LocalServer]:
    """A fast-mode bundled server on its own thread."""
    with LocalServer(ServerConfig(static_image=tiny_jpeg, max_concurrency=64)) as local:
        yield local


def _batch(source: Path, out: Path, server: LocalServer) -> int:
    return main(["batch", str(source), "--out-dir", str(out), "--server-url", server.url])


def _manifest(directory: Path) -> list[dict[str, Any]]:
    lines = (directory / MANIFEST_NAME).read_bytes().splitlines()
    return sorted((orjson.loads(line) for line in lines), key=lambda line: line["index"])


def test_a_csv_with_a_header_quoted_prompts_and_seeds(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The header names the columns (no image for it), quoted prompts keep their commas
    and line breaks, and each row's seed and steps are sent as numbers."""
    source = tmp_path / "prompts.csv"
    with source.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["prompt", "seed", "num_inference_steps"])
        writer.writerow(["a red fox, in snow", "7", "12"])
        writer.writerow(['an owl, "wise", at night', "8", ""])
        writer.writerow(["two lines\nof prompt", "9", "3"])
    out = tmp_path / "out"
    assert _batch(source, out, server) == 0
    assert "ok        3" in capsys.readouterr().out
    bodies = [dict(record.body or {}) for record in server.records]
    sent = sorted(bodies, key=lambda body: int(body["seed"]))
    assert [(body["prompt"], body["seed"]) for body in sent] == [
        ("a red fox, in snow", 7),
        ('an owl, "wise", at night', 8),
        ("two lines\nof prompt", 9),
    ]
    assert [body["num_inference_steps"] for body in sent] == [12, 20, 3]  # empty: the default
    assert [line["seed"] for line in _manifest(out)] == [7, 8, 9]


def test_a_csv_with_an_image_column_runs_edits(
    server: LocalServer, tmp_path: Path, tiny_png: bytes
) -> None:
    """An ``image`` column makes the file edits; a cell naming a file is read from it."""
    (tmp_path / "in.png").write_bytes(tiny_png)
    source = tmp_path / "edits.csv"
    source.write_text(f"image,prompt\n{tmp_path / 'in.png'},add a hat\n", encoding="utf-8")
    assert _batch(source, tmp_path / "out", server) == 0
    assert server.stats.requests_by_path == {"/v1/images/edits": 1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed,steps\n1,2\n", "has no prompt column"),
        ("prompt,colour\na fox,red\n", "column 'colour' is no request field"),
        ("prompt,seed\na fox, at dawn,3\n", "INPUT line 2"),
        ("", "empty CSV file"),
    ],
)
def test_a_csv_that_breaks_the_header_exits_2_unsent(
    server: LocalServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    message: str,
) -> None:
    """No prompt column, an unknown column, a row wider than the header, or no header at
    all: the command says which, and nothing is sent."""
    source = tmp_path / "bad.csv"
    source.write_text(text, encoding="utf-8")
    assert _batch(source, tmp_path / "out", server) == 2
    assert message in capsys.readouterr().err
    assert server.stats.total_requests == 0


def test_ray_refuses_csv_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The Ray batch splits INPUT by lines, which a quoted CSV cell may span: refused."""
    source = tmp_path / "prompts.csv"
    source.write_text("prompt\na fox\n", encoding="utf-8")
    assert main(["batch", str(source), "--out-dir", str(tmp_path / "out"), "--ray"]) == 2
    assert "--ray reads text or JSONL INPUT, not CSV" in capsys.readouterr().err


_CELL = st.text(alphabet=st.sampled_from("ab yz,\"\n;'é"), min_size=1, max_size=24).filter(
    lambda text: text.strip() == text
)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    rows=st.lists(
        st.tuples(_CELL, st.one_of(st.none(), st.integers(0, 2**31 - 1))), min_size=1, max_size=6
    )
)
def test_generated_csv_rows_reach_the_server_as_written(
    server: LocalServer, tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[str, Any]]
) -> None:
    """Whatever csv.writer writes (commas, quotes, line breaks in prompts; a seed or an
    empty cell), the server receives each row's prompt and seed once, as written."""
    directory = tmp_path_factory.mktemp("csv")
    source = directory / "prompts.csv"
    with source.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["prompt", "seed"])
        writer.writerows((prompt, "" if seed is None else str(seed)) for prompt, seed in rows)
    server.reset_stats()
    assert _batch(source, directory / "out", server) == 0
    sent = [(str(r.body["prompt"]), r.body.get("seed")) for r in server.records if r.body]
    assert sorted(sent, key=repr) == sorted(rows, key=repr)
