"""CSV input of ``friendli-image batch``: a header row names the columns.

An INPUT whose name ends in ``.csv`` is read with the :mod:`csv` module, so a quoted
prompt may hold commas, quotes and line breaks. The header row names each column: a
``prompt`` column is required, every other column names a request field (``seed``,
``num_inference_steps``, ``image`` for edits, ...) and its cells are taken as the SDK
takes text for that field (``"7"`` is seed 7). An empty cell leaves its field out, so
the server's default applies. A column with an ``image`` makes the file a batch of
edits; image cells naming an existing file are read from it.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from typing import IO, Any, Final

import attrs

from friendli_image._config import CallOverrides
from friendli_image._exceptions import FriendliValidationError
from friendli_image._requests import EditRequest, GenerateRequest

__all__ = ["CsvInput", "is_csv"]

#: Per-call options a column may not set: they take numbers and mappings, not text.
_OPTIONS: Final = frozenset(field.name for field in attrs.fields(CallOverrides))


def is_csv(name: str) -> bool:
    """Whether INPUT ``name`` is read as CSV (its name ends in ``.csv``)."""
    return name != "-" and name.lower().endswith(".csv")


class CsvInput:
    """The requests of a CSV file, one per data row, checked against its header row.

    Reading the header happens here, so a file without a ``prompt`` column, or with a
    column that names no request field, is refused before anything is sent.
    """

    def __init__(self, stream: IO[str], images: Callable[[Any], Any]) -> None:
        self._reader = csv.reader(stream)
        self._images = images
        header = next(self._reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(self._reader, None)
        if header is None:
            raise FriendliValidationError(
                "INPUT", "is an empty CSV file; write a header row naming the columns first"
            )
        self.columns = [cell.strip() for cell in header]
        self.edits = "image" in self.columns
        model = EditRequest if self.edits else GenerateRequest
        known = {field.name for field in attrs.fields(model)}
        where = f"the CSV header (line {self._reader.line_num})"
        if "prompt" not in self.columns:
            raise FriendliValidationError(
                where,
                f"has no prompt column (it names {', '.join(map(repr, self.columns))}); "
                "name the column of prompts 'prompt'",
            )
        for column in self.columns:
            if self.columns.count(column) > 1:
                raise FriendliValidationError(where, f"names {column!r} twice")
            if column not in known:
                also = " (a per-call option: pass it on the command line)" * (column in _OPTIONS)
                raise FriendliValidationError(
                    where,
                    f"column {column!r} is no request field{also}; columns may be "
                    f"{', '.join(sorted(known))}",
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        width = len(self.columns)
        for row in self._reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != width:
                raise FriendliValidationError(
                    f"INPUT line {self._reader.line_num}",
                    f"has {len(row)} cells, but the header has {width} columns; quote "
                    'a cell that holds a comma ("a fox, at dawn")',
                )
            request: dict[str, Any] = {
                column: cell
                for column, cell in zip(self.columns, row, strict=True)
                if cell != "" or column == "prompt"
            }
            for key in ("image", "control_images"):
                if key in request:
                    request[key] = self._images(request[key])
            yield request
