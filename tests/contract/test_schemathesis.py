"""schemathesis against the bundled server, over the OpenAPI file.

``schemathesis run`` (the version ``nox -s contract`` pins) generates bodies from the
file, positive and negative, through its examples, coverage and fuzzing phases, and
checks every answer: no 5xx, a declared status and content type, a body matching the
response schema, schema-invalid bodies refused, and spec-valid bodies accepted
(``positive_data_within_stated_limits``, see schemathesis_hooks.py). Deterministic:
``--generation-deterministic`` fixes the generated cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from friendli_image.server import Action, LocalServer, ServerConfig

from .conftest import SPEC
from .schemathesis_hooks import stated_limit, unexplained_rejection

pytestmark = pytest.mark.contract

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is not installed: run `nox -s contract`"
)

#: Every check of the pinned schemathesis but ``positive_data_acceptance``, whose place
#: ``positive_data_within_stated_limits`` (a registered custom check, so in "all") takes.
EXCLUDED_CHECKS = ("positive_data_acceptance",)


def _run(url: str, workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        str(SPEC),
        "--url",
        url,
        "--checks",
        "all",
        "--exclude-checks",
        ",".join(EXCLUDED_CHECKS),
        "--generation-deterministic",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--no-color",
        "--continue-on-failure",
        *extra,
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    return subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    """The bundled server as `friendli-image serve` runs it, with small images."""
    with LocalServer(ServerConfig(image_size=32, fetch_timeout_s=2)) as srv:
        yield srv


def test_schemathesis_finds_nothing(server: LocalServer, tmp_path: Path) -> None:
    """Every check passes over every phase, 500 cases per operation and phase at most."""
    run = _run(server.url, tmp_path, "--max-examples", "500")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-8000:]
    assert "2 selected / 2 total" in output, output[-3000:]
    # The run tested something: every phase ran on both operations.
    for phase in ("Examples", "Coverage", "Fuzzing"):
        assert f"✅  {phase}" in output, output[-3000:]
    assert server.stats.total_requests > 100


def test_schemathesis_reports_a_broken_answer(server: LocalServer, tmp_path: Path) -> None:
    """The same run fails when the server's answers break the spec (the checks are live)."""
    server.script(None, [Action.status(200, body={"img": "x"})] * 20)
    try:
        run = _run(server.url, tmp_path, "--max-examples", "5", "--phases", "examples")
    finally:
        server.clear_scripts()
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    assert "Response violates schema" in output, output[-3000:]


@pytest.mark.parametrize(
    ("detail", "stated"),
    [
        ({"loc": ["body", "num_inference_steps"], "type": "less_than_equal"}, True),
        ({"loc": ["body", "num_inference_steps"], "type": "int_type"}, False),
        ({"loc": ["body", "seed"], "type": "greater_than_equal"}, True),
        ({"loc": ["body", "seed"], "type": "int_type"}, False),
        ({"loc": ["body", "controlnet_weights", 0], "type": "value_error"}, True),
        ({"loc": ["body", "control_images", 1, "image"], "type": "value_error"}, True),
        ({"loc": ["body", "image", "image"], "type": "value_error"}, True),
        ({"loc": ["body", "image"], "type": "model_type"}, False),
        ({"loc": ["body", "prompt"], "type": "string_type"}, False),
        ({"loc": ["body", "guidance_scale"], "type": "float_type"}, False),
    ],
)
def test_stated_limits_are_exactly_the_documented_ones(
    detail: dict[str, object], stated: bool
) -> None:
    """The exemption covers the prose limits and nothing else (a type error is a finding)."""
    assert stated_limit(detail) is stated


def test_a_rejection_for_another_reason_is_reported() -> None:
    """One unexplained error among stated ones, or a status other than 422, is a finding."""
    steps = '{"loc": ["body", "num_inference_steps"], "msg": "", "type": "less_than_equal"}'
    seed = '{"loc": ["body", "seed"], "msg": "", "type": "int_type"}'
    assert unexplained_rejection(422, f'{{"detail": [{steps}]}}') is None
    assert unexplained_rejection(422, f'{{"detail": [{steps}, {seed}]}}') is not None
    assert unexplained_rejection(400, "{}") is not None
    assert unexplained_rejection(422, "not json") is not None
