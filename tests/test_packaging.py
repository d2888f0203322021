"""What the distribution carries: the licence, project URLs, and what the sdist's tests need."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_distribution_carries_the_apache_license() -> None:
    """The metadata declares Apache-2.0 and ships a LICENSE file holding that licence's text."""
    dist = importlib.metadata.distribution("friendli-image")
    assert dist.metadata["License-Expression"] == "Apache-2.0"
    (license_file,) = [f for f in dist.files or [] if f.name == "LICENSE"]
    text = license_file.read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_metadata_has_project_urls() -> None:
    """Project-URL entries exist, and each is an https URL."""
    urls = importlib.metadata.distribution("friendli-image").metadata.get_all("Project-URL")
    assert urls
    for entry in urls:
        _label, _, url = entry.partition(", ")
        assert url.startswith("https://"), entry


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is new in Python 3.11")
def test_the_sdist_includes_what_its_tests_read() -> None:
    """Every top-level file the repository tracks and the tests use is in the sdist's include."""
    import tomllib

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the sdist itself is what this test would check")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = set(config["tool"]["hatch"]["build"]["targets"]["sdist"]["include"])
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    top_level = {name.split("/", 1)[0] for name in tracked} - {".gitignore", "pyproject.toml"}
    assert top_level - include == set()
