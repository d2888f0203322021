"""Rich display in Jupyter: an `ImageResult` shows as its picture, a `BatchResult` as a table.

Both work without Pillow: the image bytes are handed to the front end under their own
MIME type, base64-encoded as the notebook format stores them.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ._batch import BatchItem, BatchResult
    from ._models import ImageResult

__all__ = ["batch_html", "image_mimebundle"]

#: Formats Jupyter front ends draw from a display bundle.
_NOTEBOOK_IMAGE_TYPES: Final = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
}
#: Rows shown for a large batch: the first ones, then a line saying how many more.
MAX_ROWS: Final = 20
_PROMPT_CHARS: Final = 80


def image_mimebundle(result: ImageResult) -> dict[str, str]:
    """The display bundle of an image: its bytes under its MIME type, and its repr."""
    bundle = {"text/plain": repr(result)}
    mime = _NOTEBOOK_IMAGE_TYPES.get(result.format)
    if mime is not None:
        bundle[mime] = base64.b64encode(result.image).decode("ascii")
    return bundle


def _cell(value: object) -> str:
    return f"<td>{html.escape(str(value), quote=True)}</td>"


def _prompt(item: BatchItem) -> str:
    prompt = item.request.get("prompt")
    if not isinstance(prompt, str):
        return ""
    return prompt if len(prompt) <= _PROMPT_CHARS else prompt[: _PROMPT_CHARS - 1] + "…"


def _outcome(item: BatchItem) -> str:
    if item.error is not None:
        return f"{type(item.error).__name__}: {item.error}"
    if item.path is not None:
        return str(item.path)
    if item.result is not None:
        width, height = item.result.width, item.result.height
        size = f"{width}x{height} " if width and height else ""
        return f"{item.result.format} {size}({len(item.result.image):,} bytes)"
    return ""


def _rows(items: Sequence[BatchItem]) -> list[str]:
    rows = []
    for item in items:
        seed = item.request.get("seed")
        rows.append(
            f'<tr class="{html.escape(item.status)}">'
            + _cell(item.index)
            + _cell(item.status)
            + _cell(_prompt(item))
            + _cell("" if seed is None else seed)
            + _cell(item.attempts)
            + _cell(f"{item.elapsed:.2f}")
            + _cell(_outcome(item))
            + "</tr>"
        )
    return rows


def batch_html(result: BatchResult) -> str:
    """A compact HTML table of a batch: a summary line, then one row per item (capped)."""
    items = result.items
    counts: dict[str, int] = {}
    for item in items:
        counts[item.status] = counts.get(item.status, 0) + 1
    summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    attempts = sum(item.attempts for item in items)
    caption = (
        f"BatchResult: {len(items)} items ({summary or 'none'}) in {result.elapsed:.2f} s, "
        f"{attempts} attempts"
    )
    if result.aborted is not None:
        caption += f"; stopped: {result.aborted}"
    body = _rows(items[:MAX_ROWS])
    if len(items) > MAX_ROWS:
        more = len(items) - MAX_ROWS
        body.append(f'<tr><td colspan="7">… {more:,} more (index the result to see them)</td></tr>')
    header = "".join(
        f"<th>{name}</th>"
        for name in ("index", "status", "prompt", "seed", "attempts", "elapsed s", "file / error")
    )
    return (
        '<table class="friendli-batch">'
        f'<caption style="text-align:left">{html.escape(caption)}</caption>'
        f"<thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )
