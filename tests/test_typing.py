"""The typed delegation keeps mypy's checks: tests/typing files are type-checked here."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

TYPING = pathlib.Path(__file__).with_name("typing")


def _mypy(path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the test group)")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir=/dev/null",
            "--python-version=3.10",
            "--show-error-codes",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.subprocess
def test_correct_calls_type_check() -> None:
    """Calls through both clients, with every option group, pass mypy --strict."""
    result = _mypy(TYPING / "calls_ok.py")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.subprocess
def test_misspelt_and_mistyped_keywords_are_type_errors() -> None:
    """Each marked call (a misspelt or mistyped keyword, a wrong result type) is an error."""
    path = TYPING / "calls_fail.py"
    expected = {
        number
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if line.rstrip().endswith("# E")
    }
    result = _mypy(path)
    reported = {
        int(match.group(1)) for match in re.finditer(r"calls_fail\.py:(\d+): error", result.stdout)
    }
    assert result.returncode == 1, result.stdout + result.stderr
    assert reported == expected, result.stdout
