"""The official friendli SDK (0.16.3) can use the bundled server for generate and edit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("official_sdk_check.py")


@pytest.mark.subprocess
def test_official_sdk_against_bundled_server() -> None:
    """generate and edit through the official SDK decode to images; a 422 raises its SDKError."""
    pytest.importorskip("friendli")
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "official SDK check: ok" in result.stdout
