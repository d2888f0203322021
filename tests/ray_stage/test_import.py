"""Importing the package costs nothing of the Ray stage (runs without the [ray] extra)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_package_does_not_import_ray_or_pyarrow() -> None:
    """`import friendli_image` stays light: Ray, pyarrow and fsspec load only with .ray."""
    code = (
        "import sys, friendli_image; "
        "print([m for m in ('ray', 'pyarrow', 'fsspec', 'friendli_image.ray') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
