"""Jupyter display: an ImageResult shows as its picture, a BatchResult as an HTML table."""

from __future__ import annotations

import base64
import re
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import pytest

from friendli_image import BatchItem, BatchResult, FriendliBadRequestError, ImageResult
from friendli_image._batch_models import NOTEBOOK_ROWS as MAX_ROWS


def _item(index: int, **fields: Any) -> BatchItem:
    values: dict[str, Any] = {
        "index": index,
        "id": "",
        "request": {"prompt": f"prompt {index}", "seed": index},
        "status": "ok",
    }
    values.update(fields)
    return BatchItem(**values)


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("png", "image/png"), ("jpeg", "image/jpeg"), ("gif", "image/gif"), ("webp", "image/webp")],
)
def test_an_image_result_displays_its_bytes_under_its_mime_type(
    fmt: str, mime: str, tiny_png: bytes
) -> None:
    """The bundle holds the base64 of the exact bytes under the format's MIME type."""
    result = ImageResult(data=tiny_png, format=fmt)
    bundle = result._repr_mimebundle_()
    assert set(bundle) == {"text/plain", mime}
    assert base64.b64decode(bundle[mime]) == tiny_png
    assert bundle["text/plain"] == repr(result)


def test_an_image_in_a_format_notebooks_cannot_draw_displays_as_text() -> None:
    """TIFF or unknown bytes fall back to the repr instead of a broken picture."""
    for fmt in ("tiff", "unknown"):
        result = ImageResult(data=b"II*\x00" + b"\x00" * 20, format=fmt)
        assert set(result._repr_mimebundle_()) == {"text/plain"}


def test_the_mimebundle_does_not_need_pillow(
    monkeypatch: pytest.MonkeyPatch, tiny_jpeg: bytes
) -> None:
    """With Pillow unimportable the image still displays."""
    monkeypatch.setitem(sys.modules, "PIL", None)
    bundle = ImageResult(data=tiny_jpeg, format="jpeg")._repr_mimebundle_()
    assert base64.b64decode(bundle["image/jpeg"]) == tiny_jpeg


def test_a_batch_result_is_a_compact_escaped_table_with_rounded_numbers(tiny_png: bytes) -> None:
    """A summary caption and a row per item; prompts and errors escaped, seconds rounded."""
    error = FriendliBadRequestError(
        "bad <prompt>", status=400, headers={}, body="", request_id=None
    )
    items = [
        _item(0, result=ImageResult(data=tiny_png, format="png", width=3, height=2)),
        _item(
            1,
            request={"prompt": "<script>alert(1)</script>"},
            status="failed",
            error=error,
            attempts=3,
            elapsed=1.23456789,
        ),
        _item(2, status="skipped", path=None),
    ]
    page = BatchResult(items=items, elapsed=12.3456)._repr_html_()
    assert page.startswith("<table")
    assert "3 items (1 failed, 1 ok, 1 skipped) in 12.35 s" in page
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "bad &lt;prompt&gt;" in page
    assert "<td>1.23</td>" in page
    assert "1.23456789" not in page
    assert "png 3x2 (" in page
    assert len(re.findall(r"<tr class=", page)) == 3


def test_a_large_batch_shows_the_first_rows_and_how_many_more() -> None:
    """A 1,000-item batch shows MAX_ROWS rows and says how many are left out."""
    page = BatchResult(items=[_item(i) for i in range(1000)], elapsed=1.0)._repr_html_()
    assert len(re.findall(r"<tr class=", page)) == MAX_ROWS
    assert f"{1000 - MAX_ROWS:,} more" in page


# -- in a real kernel ---------------------------------------------------------------------

NOTEBOOK_CELLS = [
    """
from friendli_image import SyncFriendli
from friendli_image.server import LocalServer, ServerConfig

server = LocalServer(ServerConfig(image_size=64)).start()
friendli = SyncFriendli(server_url=server.url)
""",
    'friendli.container.image.generate(prompt="a fox in snow", seed=1)',
    'friendli.container.image.generate(prompt="a fox in snow", seed=1, response_format="raw")',
    """
friendli.container.image.generate_batch(
    [{"prompt": "an owl <b>at night</b>", "seed": 2}, {"prompt": "a heron", "seed": 3}]
).collect()
""",
    "friendli.close()\nserver.close()",
]


@pytest.mark.long
def test_a_real_kernel_shows_images_and_a_batch_table(tmp_path: Path) -> None:
    """ipykernel + nbclient run a notebook: JPEG and PNG results, then a batch as text/html."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed")

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source.strip()) for source in NOTEBOOK_CELLS]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    client = nbclient.NotebookClient(
        notebook,
        timeout=120,
        startup_timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    outputs = [cell.outputs for cell in notebook.cells]
    errors = [o for cell in outputs for o in cell if o.output_type == "error"]
    assert errors == []
    # No FriendliUsageWarning (nor anything else) scolding the blocking calls of a cell.
    stderr = [o.text for cell in outputs for o in cell if o.get("name") == "stderr"]
    assert stderr == []
    (jpeg,) = [o for o in outputs[1] if o.output_type == "execute_result"]
    assert set(jpeg.data) == {"image/jpeg", "text/plain"}
    assert base64.b64decode(jpeg.data["image/jpeg"])[:3] == b"\xff\xd8\xff"
    (png,) = [o for o in outputs[2] if o.output_type == "execute_result"]
    assert set(png.data) == {"image/png", "text/plain"}
    assert base64.b64decode(png.data["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    (table,) = [o for o in outputs[3] if o.output_type == "execute_result"]
    assert "text/html" in table.data
    assert "2 items (2 ok)" in table.data["text/html"]
    assert "an owl &lt;b&gt;at night&lt;/b&gt;" in table.data["text/html"]
    nbformat.write(notebook, tmp_path / "executed.ipynb")


class _Shell:
    kernel = object()  # what an ipykernel shell has and a terminal IPython lacks


@pytest.mark.parametrize("kernel", [True, False], ids=["ipykernel", "plain-event-loop"])
async def test_the_in_loop_warning_is_kept_for_event_loop_code_only(
    monkeypatch: pytest.MonkeyPatch, kernel: bool
) -> None:
    """Inside a running loop: no warning in a notebook kernel, the warning elsewhere."""
    from friendli_image import FriendliUsageWarning, SyncFriendli
    from friendli_image.server import LocalServer, ServerConfig

    if kernel:
        fake_ipython = types.ModuleType("IPython")
        fake_ipython.get_ipython = _Shell  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
        monkeypatch.setitem(sys.modules, "IPython", fake_ipython)
    else:
        monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with (
            LocalServer(ServerConfig(image_size=16)) as local,
            SyncFriendli(server_url=local.url) as client,
        ):
            client.container.image.generate(prompt="in a cell")
    assert [w.category for w in caught] == ([] if kernel else [FriendliUsageWarning])
