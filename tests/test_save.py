"""`ImageResult.save`: the file is what its name says, or nothing is written."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

from friendli_image import FriendliUsageError, ImageResult
from friendli_image._formats import sniff_format

pytest.importorskip("PIL")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("x.png", "png"), ("x.webp", "webp"), ("x.JPG", "jpeg"), ("x.bmp", "bmp")],
)
def test_save_converts_to_the_format_the_extension_names(
    tmp_path: pathlib.Path, tiny_jpeg: bytes, name: str, expected: str
) -> None:
    """A JPEG saved as x.png is a PNG on disk (converted with Pillow)."""
    written = ImageResult(data=tiny_jpeg).save(tmp_path / name)
    assert written == tmp_path / name
    assert sniff_format(written.read_bytes()) == expected


def test_save_converts_a_png_with_alpha_to_jpeg(tmp_path: pathlib.Path) -> None:
    """An RGBA PNG saved as .jpg loses its alpha instead of failing in Pillow."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(buffer, "PNG")
    written = ImageResult(data=buffer.getvalue()).save(tmp_path / "a.jpg")
    assert sniff_format(written.read_bytes()) == "jpeg"


def test_same_format_is_written_byte_for_byte(tmp_path: pathlib.Path, tiny_jpeg: bytes) -> None:
    """No conversion (and no quality loss) when the extension names the image's format."""
    assert ImageResult(data=tiny_jpeg).save(tmp_path / "a.jpeg").read_bytes() == tiny_jpeg


def test_without_pillow_a_conversion_is_refused_before_writing(
    tmp_path: pathlib.Path, tiny_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Pillow, x.png for a JPEG is a usage error naming the install, once."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "PIL" else real_find_spec(name, *args),
    )
    with pytest.raises(FriendliUsageError) as info:
        ImageResult(data=tiny_jpeg).save(tmp_path / "x.png")
    message = str(info.value)
    assert message.count("pip install 'friendli-image[pil]'") == 1
    assert "x.jpg" in message
    assert not (tmp_path / "x.png").exists()


def test_an_unknown_extension_is_refused(tmp_path: pathlib.Path, tiny_jpeg: bytes) -> None:
    """x.txt names no image format: refused, nothing written."""
    with pytest.raises(FriendliUsageError, match=r"'\.txt' names no image format"):
        ImageResult(data=tiny_jpeg).save(tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()


def test_a_missing_directory_is_refused(tmp_path: pathlib.Path, tiny_jpeg: bytes) -> None:
    """Saving into a directory that does not exist says so (not a bare OSError)."""
    with pytest.raises(FriendliUsageError, match="does not exist; create it first"):
        ImageResult(data=tiny_jpeg).save(tmp_path / "nope" / "x.jpg")
