"""A static HTML gallery of a batch's ``out_dir``: ``write_gallery(out_dir)``.

The page is one ``index.html`` beside the images, built from ``manifest.jsonl``: a tile per
item in input order (thumbnail, prompt, seed, attempts, elapsed time, file name), failed
and skipped items shown with their message, and a filter box. It needs no network and no
server: open it from disk. It stays light for tens of thousands of images: thumbnails
are files in ``.thumbs/`` (made once with Pillow, when it is installed), loaded lazily by
the browser, never inlined; tiles off screen are not laid out (``content-visibility``).
A run written as shards (``webdataset``, ``parquet``) is shown too: each shard is read
once and its images go into ``.thumbs/`` (as thumbnails, or as they are without Pillow).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import io
import os
import pathlib
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import IO, Any, Final

from ._exceptions import FriendliUsageError
from ._formats import image_dimensions, sniff_format
from ._store import (
    GALLERY_NAME,
    THUMBS_DIR,
    Directory,
    read_gallery_inputs,
    shard_images,
    stored_key,
    valid_name,
    valid_stored_name,
)

__all__ = ["GALLERY_NAME", "THUMBS_DIR", "write_gallery"]

#: Thumbnails fit in a square of this many pixels.
THUMB_SIZE: Final = 256
#: Formats every browser shows in an ``<img>`` (an original in these may stand in for its
#: thumbnail when it is already small).
_BROWSER_FORMATS: Final = frozenset({"jpeg", "png", "gif", "webp"})
#: Enough of a file's head to find its dimensions (a JPEG's SOF follows its metadata).
_HEAD_BYTES: Final = 64 * 1024
_PROMPT_CHARS: Final = 300

_SCRIPT: Final = """
(function () {
  var box = document.getElementById("filter");
  var status = document.getElementById("status");
  var count = document.getElementById("count");
  var tiles = Array.prototype.slice.call(document.querySelectorAll(".tile"));
  var keys = tiles.map(function (t) { return t.getAttribute("data-search"); });
  function apply() {
    var words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
    var wanted = status.value;
    var shown = 0;
    for (var i = 0; i < tiles.length; i++) {
      var ok = (!wanted || tiles[i].getAttribute("data-status") === wanted) &&
        words.every(function (w) { return keys[i].indexOf(w) !== -1; });
      tiles[i].hidden = !ok;
      if (ok) { shown++; }
    }
    count.textContent = shown + " of " + tiles.length + " shown";
  }
  var timer = null;
  box.addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(apply, 120);
  });
  status.addEventListener("change", apply);
  var match = /^#q=(.*)$/.exec(location.hash);
  if (match) { box.value = decodeURIComponent(match[1]); }
  apply();
})();
"""

_STYLE: Final = """
:root { color-scheme: light dark; --bg: #fafafa; --fg: #222; --card: #fff; --line: #ddd;
  --muted: #666; --bad: #b00020; --warn: #8a6d00; }
@media (prefers-color-scheme: dark) { :root { --bg: #121212; --fg: #eee; --card: #1e1e1e;
  --line: #333; --muted: #aaa; --bad: #ff6b81; --warn: #e0c060; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; background: var(--bg); color: var(--fg); }
header { position: sticky; top: 0; z-index: 1; padding: 12px 16px; background: var(--card);
  border-bottom: 1px solid var(--line); display: flex; flex-wrap: wrap; gap: 8px 16px;
  align-items: center; }
h1 { font-size: 18px; margin: 0; }
.summary, #count { color: var(--muted); }
input, select { font: inherit; padding: 4px 8px; }
#filter { min-width: 16em; flex: 1; max-width: 32em; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr));
  gap: 12px; padding: 16px; }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
  overflow: hidden; content-visibility: auto; contain-intrinsic-size: 220px 340px; }
.tile[hidden] { display: none; }
.pic { display: flex; align-items: center; justify-content: center; aspect-ratio: 1;
  background: repeating-conic-gradient(#8882 0 25%, transparent 0 50%) 0 0 / 16px 16px; }
.pic img { max-width: 100%; max-height: 100%; object-fit: contain; display: block; }
.pic .none { padding: 12px; text-align: center; font-weight: 600; }
.tile.failed .none { color: var(--bad); }
.tile.skipped .none, .tile.missing .none { color: var(--warn); }
.meta { padding: 8px 10px; }
.prompt { margin: 0 0 6px; overflow-wrap: anywhere; }
.facts { color: var(--muted); font-size: 12px; display: flex; flex-wrap: wrap; gap: 2px 10px; }
.error { color: var(--bad); font-size: 12px; margin: 6px 0 0; overflow-wrap: anywhere; }
.tile.skipped .error, .tile.missing .error { color: var(--warn); }
"""


def write_gallery(out_dir: str | os.PathLike[str], *, title: str | None = None) -> pathlib.Path:
    """Write ``out_dir/index.html``, a static page of the batch written into ``out_dir``.

    The page shows a tile per item of ``out_dir/manifest.jsonl`` in input order: the
    thumbnail with its prompt, seed, attempts, elapsed time and file name, or, for failed
    and skipped items, their status and message. A filter box narrows the tiles by text
    and status. Open the page from disk: it loads nothing from the network.

    Thumbnails are written once into ``out_dir/.thumbs/`` with Pillow when it is
    installed (``pip install 'friendli-image[pil]'``) and kept while newer than their
    image; without Pillow, or for an image already small, the page shows the original.
    Indices missing from the manifest (items a stopped batch never reached) are shown as
    one tile per run of them. Manifest lines that are not valid records, or name a file
    that is not a plain image name inside ``out_dir``, are left out; files are never
    read or written through symbolic links. Images of earlier runs that match no item
    of the latest run (``unmatched.jsonl``) are not shown. ``index.html#q=words`` opens
    the page with the filter set. Returns the path of the page.

    Raises `FriendliUsageError` when ``out_dir`` has no readable manifest or the page
    cannot be written.
    """
    directory = pathlib.Path(out_dir)
    records = read_gallery_inputs(directory)
    target = directory / GALLERY_NAME
    try:
        with Directory(directory) as folder:
            thumbs = _thumbnails(folder, records)
            name = directory.resolve().name or directory
            page = _render(title if title is not None else f"{name} gallery", records, thumbs)
            folder.write_atomic(GALLERY_NAME, page.encode("utf-8"))
    except OSError as exc:
        raise FriendliUsageError(
            f"cannot write {str(target)!r}: {exc}; check that the directory is writable"
        ) from exc
    return target


def _file_name(record: Mapping[str, Any]) -> str | None:
    """The record's image file name, if it is a plain image name inside the directory."""
    return valid_name(record.get("file"))


def _shown_name(record: Mapping[str, Any]) -> str | None:
    """What the page shows the record's image under: its file name, or for an item in
    a shard, ``<shard>#<key>`` (the key as a plain name, else None)."""
    name = _file_name(record)
    if name is not None:
        return name
    shard = valid_stored_name(record.get("file"))
    key = stored_key(dict(record))
    if shard is None or key is None or valid_name(key + ".jpg") is None:
        return None
    return f"{shard}#{key}"


# -- thumbnails ---------------------------------------------------------------------------


def _thumbnails(folder: Directory, records: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Map each image file name to the path the page shows for it (relative, ``/``-separated).

    Files that do not exist (or are not regular files) are left out. A ``.thumbs`` that
    is not a directory of its own (a link, a file) is not used: the originals show.
    """
    try:
        from PIL import Image  # noqa: PLC0415, F401  (Pillow is an optional extra)
    except ImportError:
        have_pillow = False
    else:
        have_pillow = True
    thumbs: Directory | None = None
    if have_pillow:
        try:
            thumbs = folder.subdirectory(THUMBS_DIR, create=True)
        except OSError:
            thumbs = None  # read-only, or not a plain directory: the originals still show
    try:
        shown: dict[str, str] = {}
        to_make: list[str] = []
        in_shards: dict[str, set[str]] = {}
        for record in records:
            name = _file_name(record)
            if name is None:
                wanted = _shown_name(record)
                if wanted is not None:
                    shard, _, key = wanted.partition("#")
                    in_shards.setdefault(shard, set()).add(key)
                continue
            if name in shown:
                continue
            source = folder.size_and_mtime(name)
            if source is None:
                continue
            shown[name] = name
            if thumbs is None:
                continue
            made = thumbs.size_and_mtime(f"{name}.jpg")
            if made is not None and made[1] >= source[1]:
                shown[name] = f"{THUMBS_DIR}/{name}.jpg"
            elif _needs_thumbnail(folder, name):
                to_make.append(name)
        if to_make and thumbs is not None:
            workers = min(4, os.cpu_count() or 1)
            target = thumbs
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                results = pool.map(lambda name: _make_thumbnail(folder, name, target), to_make)
                for name, made_one in zip(to_make, results, strict=True):
                    if made_one:
                        shown[name] = f"{THUMBS_DIR}/{name}.jpg"
        if in_shards:
            if thumbs is None:
                with contextlib.suppress(OSError):
                    thumbs = folder.subdirectory(THUMBS_DIR, create=True)
            if thumbs is not None:
                for shard, keys in in_shards.items():
                    shown.update(_from_shard(folder, shard, keys, thumbs, have_pillow=have_pillow))
    finally:
        if thumbs is not None:
            thumbs.close()
    return shown


def _from_shard(
    folder: Directory, shard: str, keys: set[str], thumbs: Directory, *, have_pillow: bool
) -> dict[str, str]:
    """``<shard>#<key>`` -> the path the page shows, for the wanted items of one shard:
    their thumbnails (or, without Pillow, the images themselves) written into ``.thumbs/``
    from one read of the shard, unless they are there already and newer than it."""
    source = folder.size_and_mtime(shard)
    if source is None:
        return {}
    shown: dict[str, str] = {}
    missing = set()
    for key in keys:
        made = next(
            (
                f"{key}{ext}"
                for ext in (".jpg", ".png", ".bin")
                if (found := thumbs.size_and_mtime(f"{key}{ext}")) is not None
                and found[1] >= source[1]
            ),
            None,
        )
        if made is None:
            missing.add(key)
        else:
            shown[f"{shard}#{key}"] = f"{THUMBS_DIR}/{made}"
    if not missing:
        return shown
    try:
        with folder.read(shard) as handle:
            for key, extension, image in shard_images(shard, handle):
                if key not in missing or valid_name(key + extension) is None:
                    continue
                thumbnail = _thumbnail(io.BytesIO(image)) if have_pillow else None
                name, data = (
                    (f"{key}.jpg", thumbnail) if thumbnail is not None else (key + extension, image)
                )
                thumbs.write_atomic(name, data)
                shown[f"{shard}#{key}"] = f"{THUMBS_DIR}/{name}"
    except (OSError, ValueError, EOFError, FriendliUsageError):
        pass  # a shard that does not read: its tiles say the image is not there
    return shown


def _needs_thumbnail(folder: Directory, name: str) -> bool:
    """False when the original is a browser format already within the thumbnail size."""
    try:
        with folder.read(name) as handle:
            head = handle.read(_HEAD_BYTES)
    except (OSError, FriendliUsageError):
        return False
    fmt = sniff_format(head)
    if fmt not in _BROWSER_FORMATS:
        return True
    size = image_dimensions(head, fmt)
    return size is None or max(size) > THUMB_SIZE


def _make_thumbnail(folder: Directory, name: str, thumbs: Directory) -> bool:
    """Write a JPEG thumbnail of the image ``name``; False if Pillow cannot read it."""

    try:
        with folder.read(name) as source:
            thumbnail = _thumbnail(source)
        if thumbnail is None:
            return False
        thumbs.write_atomic(f"{name}.jpg", thumbnail)
    except (OSError, FriendliUsageError):
        return False
    return True


def _thumbnail(source: IO[bytes]) -> bytes | None:
    """A JPEG thumbnail of the image read from ``source``; None if Pillow cannot read it."""
    from PIL import Image  # noqa: PLC0415  (only called when Pillow is installed)

    out = io.BytesIO()
    try:
        with Image.open(source) as opened:
            opened.draft("RGB", (THUMB_SIZE, THUMB_SIZE))  # JPEG: decode at a reduced scale
            opened.thumbnail((THUMB_SIZE, THUMB_SIZE))
            picture = opened
            if picture.mode not in ("RGB", "L"):
                rgba = picture.convert("RGBA")
                picture = Image.new("RGB", rgba.size, (255, 255, 255))
                picture.paste(rgba, mask=rgba.getchannel("A"))
            picture.save(out, "JPEG", quality=82)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return out.getvalue()


# -- the page -------------------------------------------------------------------------------


def _text(value: object) -> str:
    import html  # noqa: PLC0415  (its entity tables load when a gallery is written)

    return html.escape(str(value), quote=True)


def _seconds(value: object) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.2f} s" if value < 100 else f"{value:.0f} s"
    return None


def _tile(record: Mapping[str, Any], thumbs: Mapping[str, str]) -> str:
    index = record.get("index")
    status = record.get("status")
    status = status if isinstance(status, str) and status else "unknown"
    prompt = record.get("prompt")
    prompt = prompt if isinstance(prompt, str) else ""
    short = prompt if len(prompt) <= _PROMPT_CHARS else prompt[: _PROMPT_CHARS - 1] + "…"
    name = _file_name(record)
    in_shard = _shown_name(record) if name is None else None
    seed = record.get("seed")
    attempts = record.get("attempts")
    elapsed = _seconds(record.get("elapsed"))
    error = record.get("error")
    error_type = record.get("error_type")

    last = record.get("last")
    facts = [f"#{_text(index)}" + (f"-{_text(last)}" if last not in (None, index) else "")]
    if isinstance(seed, int) and not isinstance(seed, bool):
        facts.append(f"seed {seed}")
    if isinstance(attempts, int) and not isinstance(attempts, bool):
        facts.append(f"{attempts} attempt{'' if attempts == 1 else 's'}")
    if elapsed is not None:
        facts.append(elapsed)
    if name is not None:
        facts.append(_text(name))
    elif in_shard is not None:
        facts.append(_text(in_shard))

    shown = thumbs.get(name or in_shard or "")
    if shown is not None:
        # An image in a shard links to what was taken out of it (the tar or Parquet
        # file is no page for a browser).
        href = urllib.parse.quote(name) if name is not None else urllib.parse.quote(shown)
        picture = (
            f'<a href="{_text(href)}"><img loading="lazy" decoding="async" '
            f'src="{_text(urllib.parse.quote(shown))}" alt="{_text(short)}"></a>'
        )
    else:
        label = {
            "ok": "file missing",
            "missing": "not in the manifest",
        }.get(status, status)
        picture = f'<div class="none">{_text(label)}</div>'

    message = ""
    if status == "missing":
        message = "no line in manifest.jsonl: skipped when the batch stopped, or not run yet"
    elif isinstance(error, str) and error:
        message = f"{error_type}: {error}" if isinstance(error_type, str) else error
    elif status == "ok" and shown is None:
        message = (
            "the image file is not in the directory"
            if in_shard is None
            else "its shard is not in the directory"
        )
    error_html = f'<p class="error">{_text(message)}</p>' if message else ""

    search = " ".join(
        str(part)
        for part in (index, status, prompt, seed, name or in_shard, error_type, message)
        if part is not None
    ).lower()
    return (
        f'<article class="tile {_text(status)}" data-status="{_text(status)}" '
        f'data-search="{_text(search)}"><div class="pic">{picture}</div>'
        f'<div class="meta"><p class="prompt" title="{_text(prompt)}">{_text(short)}</p>'
        f'<div class="facts">{"".join(f"<span>{fact}</span>" for fact in facts)}</div>'
        f"{error_html}</div></article>"
    )


def _render(title: str, records: list[dict[str, Any]], thumbs: Mapping[str, str]) -> str:
    counts: dict[str, int] = {}
    for record in records:
        status = record.get("status")
        key = status if isinstance(status, str) and status else "unknown"
        counts[key] = counts.get(key, 0) + 1
    summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    options = "".join(
        f'<option value="{_text(status)}">{_text(status)}</option>' for status in sorted(counts)
    )
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    # The page only shows files of its own folder and runs its own script: the policy
    # keeps a hostile prompt from loading or running anything even if escaping failed.
    policy = (
        f"default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{script_hash}'"
    )
    tiles = "\n".join(_tile(record, thumbs) for record in records)
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_text(policy)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_text(title)}</title>\n<style>{_STYLE}</style></head>\n<body>\n"
        f"<header><h1>{_text(title)}</h1>"
        f'<span class="summary">{len(records)} items: {_text(summary or "none")}</span>'
        '<input id="filter" type="search" placeholder="Filter: prompt, seed, file, error"'
        ' aria-label="Filter">'
        f'<select id="status" aria-label="Status"><option value="">all</option>{options}'
        '</select><span id="count"></span></header>\n'
        f"<main>\n{tiles}\n</main>\n"
        f"<script>{_SCRIPT}</script>\n</body></html>\n"
    )
