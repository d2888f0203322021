"""Image inputs (every accepted and refused form) and the ImageResult a call returns."""

from __future__ import annotations

import base64
import gc
import io
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
from PIL import Image

from friendli_image import (
    ContainerImageGenerateSuccess,
    FriendliValidationError,
    ImageInput,
    ImageResult,
)
from friendli_image._config import MAX_IMAGE_BYTES
from friendli_image._images import coerce_image

URL = "https://Example.com/images/Cat.png?size=512&token=a%20b#frag"


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def wire_image(capture_client: Any, capture_server: Any) -> Callable[[object], Awaitable[str]]:
    """Send ``edit(image=value)`` through the client; return the image string on the wire."""

    async def send(value: object) -> str:
        await capture_client.container.image.edit(image=value, prompt="p")
        return str(capture_server.requests[-1].json["image"]["image"])

    return send


# -- accepted inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("url", [URL, "http://127.0.0.1:9/x.jpg"])
async def test_http_url_passes_through_untouched(wire_image: Any, url: str) -> None:
    """An http(s) URL is sent as is (the server fetches it; the SDK never does)."""
    assert await wire_image(url) == url


async def test_data_uri_passes_through(wire_image: Any, tiny_png: bytes) -> None:
    """A data: URI is checked and sent unchanged."""
    uri = _data_uri(tiny_png, "image/png")
    assert await wire_image(uri) == uri


async def test_base64_text_passes_through(wire_image: Any, tiny_jpeg: bytes) -> None:
    """Bare base64 image text is checked and sent unchanged."""
    text = base64.b64encode(tiny_jpeg).decode()
    assert await wire_image(text) == text


async def test_png_bytes_become_a_png_data_uri(wire_image: Any, tiny_png: bytes) -> None:
    """bytes are sent as a data: URI with the sniffed MIME type image/png."""
    assert await wire_image(tiny_png) == _data_uri(tiny_png, "image/png")


async def test_jpeg_bytearray_becomes_a_jpeg_data_uri(wire_image: Any, tiny_jpeg: bytes) -> None:
    """A bytearray is sent as a data: URI with the sniffed MIME type image/jpeg."""
    assert await wire_image(bytearray(tiny_jpeg)) == _data_uri(tiny_jpeg, "image/jpeg")


async def test_memoryview_becomes_a_data_uri(wire_image: Any, tiny_jpeg: bytes) -> None:
    """A memoryview is sent as a data: URI of its bytes."""
    assert await wire_image(memoryview(tiny_jpeg)) == _data_uri(tiny_jpeg, "image/jpeg")


async def test_pathlib_path_is_read(
    wire_image: Any, tiny_png: bytes, tmp_path: pathlib.Path
) -> None:
    """A pathlib.Path is read and sent as a data: URI."""
    path = tmp_path / "in.png"
    path.write_bytes(tiny_png)
    assert await wire_image(path) == _data_uri(tiny_png, "image/png")


async def test_str_path_of_an_existing_file_is_read(
    wire_image: Any, tiny_jpeg: bytes, tmp_path: pathlib.Path
) -> None:
    """A str naming an existing file is read (the MIME type comes from the bytes, not the name)."""
    path = tmp_path / "misnamed.png"
    path.write_bytes(tiny_jpeg)
    assert await wire_image(str(path)) == _data_uri(tiny_jpeg, "image/jpeg")


async def test_binary_file_object_is_read(
    wire_image: Any, tiny_png: bytes, tmp_path: pathlib.Path
) -> None:
    """A file opened with 'rb' is read and sent as a data: URI."""
    path = tmp_path / "in.png"
    path.write_bytes(tiny_png)
    with path.open("rb") as stream:
        assert await wire_image(stream) == _data_uri(tiny_png, "image/png")


async def test_bytesio_is_read(wire_image: Any, tiny_jpeg: bytes) -> None:
    """An in-memory binary stream is read like a file."""
    assert await wire_image(io.BytesIO(tiny_jpeg)) == _data_uri(tiny_jpeg, "image/jpeg")


async def test_pil_image_is_encoded_as_png(wire_image: Any) -> None:
    """A PIL image is encoded losslessly as PNG and sent as an image/png data: URI."""
    picture = Image.new("RGB", (5, 4), (1, 2, 3))
    sent = await wire_image(picture)
    assert sent.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(sent.split(",", 1)[1])))
    assert decoded.size == (5, 4)
    assert decoded.convert("RGB").getpixel((0, 0)) == (1, 2, 3)


async def test_image_dict_is_unwrapped(wire_image: Any, tiny_png: bytes) -> None:
    """{"image": ...} (the official SDK's form) is accepted, its value coerced like any input."""
    assert await wire_image({"image": URL}) == URL
    assert await wire_image({"image": tiny_png}) == _data_uri(tiny_png, "image/png")


async def test_image_input_object_is_accepted(wire_image: Any) -> None:
    """An ImageInput is sent as its image string."""
    assert await wire_image(ImageInput(URL)) == URL


async def test_control_images_accept_mixed_forms(
    capture_client: Any, capture_server: Any, tiny_png: bytes
) -> None:
    """control_images takes a list mixing URLs, bytes and dicts, sent in order."""
    await capture_client.container.image.generate(
        prompt="p", control_images=[URL, tiny_png, {"image": URL}]
    )
    assert capture_server.requests[0].json["control_images"] == [
        {"image": URL},
        {"image": _data_uri(tiny_png, "image/png")},
        {"image": URL},
    ]


def test_exactly_50_mib_is_accepted() -> None:
    """An image of exactly 50 MiB is at the limit and accepted."""
    data = b"\x89PNG\r\n\x1a\n" + bytes(MAX_IMAGE_BYTES - 8)
    assert coerce_image(data, "image").startswith("data:image/png;base64,iVBORw0KGgo")


# -- refused inputs -----------------------------------------------------------------------


def _refused(value: object, match: str) -> FriendliValidationError:
    with pytest.raises(FriendliValidationError, match=match) as caught:
        coerce_image(value, "image")
    assert caught.value.field == "image"
    return caught.value


def test_empty_bytes_are_refused() -> None:
    """0 bytes is not an image."""
    _refused(b"", "empty")


def test_non_image_bytes_are_refused() -> None:
    """Bytes without an image signature are refused."""
    _refused(b"just some text, not a picture", "not an image")


@pytest.mark.parametrize("mode", ["CMYK", "F"])
def test_a_pil_mode_png_cannot_hold_is_refused_with_the_convert_hint(mode: str) -> None:
    """A CMYK or float image cannot be sent as PNG: the error says to convert it."""
    error = _refused(Image.new(mode, (4, 4)), f"of mode {mode}")
    assert "image.convert('RGB')" in str(error)


def test_over_50_mib_is_refused() -> None:
    """One byte over 50 MiB is refused before anything is encoded."""
    error = _refused(b"\x89PNG\r\n\x1a\n" + bytes(MAX_IMAGE_BYTES - 8 + 1), "at most 50 MiB")
    assert len(str(error)) < 200


def test_over_50_mib_file_is_refused_without_reading_it(tmp_path: pathlib.Path) -> None:
    """A file over 50 MiB is refused from its size (a sparse file: nothing is read)."""
    path = tmp_path / "huge.png"
    with path.open("wb") as stream:
        stream.write(b"\x89PNG\r\n\x1a\n")
        stream.truncate(MAX_IMAGE_BYTES + 1)
    _refused(path, "at most 50 MiB")


def test_data_uri_with_bad_base64_is_refused() -> None:
    """A data: URI whose payload is not base64 is refused."""
    _refused("data:image/png;base64,@@not-base64@@", "base64")


def test_data_uri_without_base64_marker_is_refused() -> None:
    """A data: URI that is not ';base64,' encoded is refused with the expected shape."""
    _refused("data:image/png,rawtext", "data:image/png;base64")


def test_data_uri_of_non_image_is_refused() -> None:
    """A well-formed data: URI of bytes that are not an image is refused."""
    _refused(_data_uri(b"hello world!", "image/png"), "not an image")


def test_missing_path_is_refused(tmp_path: pathlib.Path) -> None:
    """A pathlib.Path that does not exist is refused with its name."""
    _refused(tmp_path / "nope.png", "nope.png")


def test_missing_str_path_is_refused(tmp_path: pathlib.Path) -> None:
    """A str that is neither a URL, base64 nor an existing file is refused."""
    _refused(str(tmp_path / "nope.png"), "existing file")


def test_text_mode_file_is_refused(tmp_path: pathlib.Path, tiny_png: bytes) -> None:
    """A file opened in text mode is refused with the fix ('rb')."""
    path = tmp_path / "in.png"
    path.write_bytes(b"GIF89a" + b"x" * 40)
    with path.open(encoding="latin-1") as stream:
        _refused(stream, "'rb'")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png"])
def test_non_http_urls_are_refused(url: str) -> None:
    """file:// and ftp:// URLs are refused (the SDK reads no local file through a URL)."""
    _refused(url, "not accepted")


@pytest.mark.parametrize("value", [3.5, object(), None, 12])
def test_wrong_types_are_refused(value: object) -> None:
    """Values of other types are refused naming what is accepted."""
    _refused(value, "expected a URL")


def test_dict_with_other_keys_is_refused() -> None:
    """A dict must have exactly the key 'image'."""
    _refused({"image": URL, "mask": URL}, "exactly one key")


async def test_refused_input_sends_nothing(
    capture_client: Any, capture_server: Any, tiny_png: bytes
) -> None:
    """A bad image in a list names its index, and no request is sent."""
    with pytest.raises(FriendliValidationError) as caught:
        await capture_client.container.image.edit(image=[tiny_png, b""], prompt="p")
    assert caught.value.field == "image[1]"
    assert capture_server.requests == []
    assert base64.b64encode(tiny_png).decode() not in str(caught.value)


# -- results ------------------------------------------------------------------------------


async def test_result_image_is_the_decoded_bytes(
    capture_client: Any, capture_server: Any, tiny_png: bytes
) -> None:
    """result.data is the image itself; result.image is its base64 text as bytes (official)."""
    result = await capture_client.container.image.generate(prompt="p")
    assert result.data == tiny_png
    assert result.image == base64.b64encode(tiny_png)
    assert base64.b64decode(result.image) == tiny_png
    assert result.request_id == capture_server.requests[0].headers["X-Request-ID"]
    assert result.attempts == 1
    assert result.elapsed > 0
    assert result.content_type == "image/png"


@pytest.mark.parametrize(
    ("pil_format", "save_args", "expected"),
    [
        ("png", {}, "png"),
        ("jpeg", {}, "jpeg"),
        ("jpeg", {"progressive": True}, "jpeg"),
        ("webp", {}, "webp"),
        ("webp", {"lossless": True}, "webp"),
        ("gif", {}, "gif"),
        ("bmp", {}, "bmp"),
    ],
)
async def test_result_format_and_size_are_read_from_the_header(
    capture_client: Any,
    capture_server: Any,
    pil_format: str,
    save_args: dict[str, Any],
    expected: str,
) -> None:
    """Format and width/height are read from real images of every supported format."""
    buffer = io.BytesIO()
    Image.new("RGB", (37, 21), (9, 99, 199)).save(buffer, format=pil_format.upper(), **save_args)
    capture_server.image = buffer.getvalue()
    result = await capture_client.container.image.generate(prompt="p")
    assert (result.format, result.width, result.height) == (expected, 37, 21)


async def test_webp_extended_header_size(capture_client: Any, capture_server: Any) -> None:
    """A WebP with alpha (VP8X header) reports its size too."""
    buffer = io.BytesIO()
    Image.new("RGBA", (300, 17), (1, 2, 3, 4)).save(buffer, format="WEBP")
    assert buffer.getvalue()[12:16] == b"VP8X"
    capture_server.image = buffer.getvalue()
    result = await capture_client.container.image.generate(prompt="p")
    assert (result.format, result.width, result.height) == ("webp", 300, 17)


async def test_unknown_format_has_no_size(capture_client: Any, capture_server: Any) -> None:
    """Bytes of no known format give format 'unknown' and no dimensions, but still return."""
    capture_server.image = b"\x00\x01 definitely not an image"
    result = await capture_client.container.image.generate(prompt="p")
    assert (result.format, result.width, result.height) == ("unknown", None, None)
    assert result.content_type == "application/octet-stream"


def test_save_adds_the_extension_when_missing(tmp_path: pathlib.Path, tiny_jpeg: bytes) -> None:
    """save("out") writes out.jpg for a JPEG and returns that path."""
    result = ImageResult(data=tiny_jpeg, format="jpeg")
    written = result.save(tmp_path / "out")
    assert written == tmp_path / "out.jpg"
    assert written.read_bytes() == tiny_jpeg
    assert not (tmp_path / "out").exists()


def test_save_keeps_an_explicit_extension(tmp_path: pathlib.Path, tiny_jpeg: bytes) -> None:
    """An explicit extension is kept as given, even when it differs from the format."""
    result = ImageResult(data=tiny_jpeg, format="jpeg")
    written = result.save(str(tmp_path / "picture.jpeg"))
    assert written == tmp_path / "picture.jpeg"
    assert written.read_bytes() == tiny_jpeg


def test_save_png_extension(tmp_path: pathlib.Path, tiny_png: bytes) -> None:
    """save() adds .png for a PNG."""
    assert ImageResult(data=tiny_png, format="png").save(tmp_path / "a").name == "a.png"


def test_to_pil_round_trip(tiny_png: bytes) -> None:
    """to_pil() opens the image with its size and pixels."""
    picture = ImageResult(data=tiny_png, format="png", width=3, height=2).to_pil()
    assert picture.size == (3, 2)
    assert picture.convert("RGB").getpixel((2, 1)) == (200, 30, 30)


def test_repr_is_one_short_line_even_for_a_big_image() -> None:
    """repr of a 5 MB result is one line under 200 characters, without base64 or bytes."""
    image = b"\x89PNG\r\n\x1a\n" + bytes(5 * 1024 * 1024)
    result = ImageResult(
        data=image, format="png", width=4096, height=4096, request_id="r" * 32, attempts=3
    )
    text = repr(result)
    assert "\n" not in text
    assert len(text) < 200
    assert "iVBORw0KGgo" not in text
    assert "\\x00" not in text
    assert "png" in text
    assert "4096x4096" in text
    assert str(result) == text


def test_result_does_not_keep_the_base64_text() -> None:
    """The result holds the decoded bytes only: no field and no referent is base64 text."""
    image = b"\x89PNG\r\n\x1a\n" + bytes(1000)
    encoded = base64.b64encode(image)
    result = ImageResult(data=image, format="png")
    assert {field.name for field in attrs.fields(ImageResult)} == {
        "data",
        "format",
        "width",
        "height",
        "request_id",
        "attempts",
        "elapsed",
        "maybe_duplicated",
        "endpoint",
    }
    assert not hasattr(result, "__dict__")
    for referent in gc.get_referents(result):
        assert referent != encoded
        assert referent != encoded.decode()


def test_official_sdk_alias_is_the_result_class() -> None:
    """ContainerImageGenerateSuccess (the official SDK's name) is ImageResult."""
    assert ContainerImageGenerateSuccess is ImageResult


def test_result_is_immutable(tiny_png: bytes) -> None:
    """A result cannot be modified (it may be shared between tasks and threads)."""
    result = ImageResult(data=tiny_png, format="png")
    with pytest.raises(AttributeError):
        result.data = b""  # type: ignore[misc]
