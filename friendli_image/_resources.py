"""The API namespaces, shaped like the official SDK: ``client.container.image``.

Resources only validate arguments into a request model and hand it to the client's one
request path; they hold no state and no logic of their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import TYPE_CHECKING

from ._batch import Batch, BatchOperation, BatchProgress, RequestSpec
from ._exceptions import FriendliValidationError
from ._images import ImageSource, coerce_image
from ._models import (
    EditRequest,
    GenerateRequest,
    ImageInput,
    ImageResult,
    ResponseFormat,
    as_list,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Callable

    from ._client import AsyncFriendli
    from ._config import RetryConfig

__all__ = ["Container", "Image", "build_edit", "build_generate"]

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"


def _image_list(value: object, field: str) -> list[ImageInput]:
    items = as_list(value, field, "images")
    return [ImageInput(coerce_image(item, f"{field}[{index}]")) for index, item in enumerate(items)]


def _is_image_list(value: object) -> bool:
    """True for a list, tuple, generator, ... of images; False for one image."""
    if isinstance(value, list | tuple):
        return True
    return not (
        isinstance(value, str | bytes | bytearray | memoryview | Mapping | os.PathLike)
        or hasattr(value, "read")
        or not isinstance(value, Iterable)
    )


def build_generate(
    *,
    prompt: str,
    model: str | None = None,
    num_inference_steps: int | None = 20,
    guidance_scale: float | None = 0.0,
    seed: int | None = None,
    response_format: ResponseFormat | None = None,
    control_images: Iterable[ImageSource] | None = None,
    controlnet_weights: Iterable[float] | None = None,
) -> GenerateRequest:
    """Validate ``generate`` arguments into the request model (raises before any I/O)."""
    return GenerateRequest(
        prompt=prompt,
        model=model,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        response_format=response_format,
        control_images=None
        if control_images is None
        else _image_list(control_images, "control_images"),
        # Checked (and copied into a list of floats) by the model.
        controlnet_weights=controlnet_weights,  # type: ignore[arg-type]
    )


def build_edit(
    *,
    image: ImageSource | Iterable[ImageSource],
    prompt: str,
    model: str | None = None,
    num_inference_steps: int | None = 20,
    guidance_scale: float | None = 0.0,
    seed: int | None = None,
    response_format: ResponseFormat | None = None,
) -> EditRequest:
    """Validate ``edit`` arguments into the request model (raises before any I/O)."""
    if image is None:
        raise FriendliValidationError("image", "is required: pass the image(s) to edit")
    # A list or tuple is several images; anything else is one, sent as one object, as
    # the official SDK does.
    images: ImageInput | list[ImageInput] = (
        _image_list(image, "image")
        if _is_image_list(image)
        else ImageInput(coerce_image(image, "image"))
    )
    return EditRequest(
        image=images,
        prompt=prompt,
        model=model,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        response_format=response_format,
    )


_GENERATE_BATCH = BatchOperation(
    GENERATIONS_PATH, build_generate, GenerateRequest, accepts_prompt=True
)
_EDIT_BATCH = BatchOperation(EDITS_PATH, build_edit, EditRequest)


class Image:
    """Image generation and editing: ``client.container.image``."""

    def __init__(self, client: AsyncFriendli) -> None:
        self._client = client

    async def generate(
        self,
        *,
        prompt: str,
        model: str | None = None,
        num_inference_steps: int | None = 20,
        guidance_scale: float | None = 0.0,
        seed: int | None = None,
        response_format: ResponseFormat | None = None,
        control_images: Iterable[ImageSource] | None = None,
        controlnet_weights: Iterable[float] | None = None,
        retries: RetryConfig | int | None = None,
        server_url: str | None = None,
        timeout_ms: int | None = None,
        http_headers: Mapping[str, str] | None = None,
    ) -> ImageResult:
        """Generate an image from a text prompt (``POST /v1/images/generations``).

        Args:
            prompt: what the image should show.
            model: routes the request to a specific adapter.
            num_inference_steps: denoising steps, in [1, 50]; None leaves it to the server.
            guidance_scale: how closely to follow the prompt (0 lets the model choose;
                None leaves it to the server).
            seed: an int in [0, 2**32 - 1] for reproducible images.
            response_format: ``"jpeg"`` or ``"raw"`` (PNG); None for the server default.
            control_images: ControlNet conditioning images (URL, data: URI, base64,
                bytes, path, binary file, PIL image or ``{"image": ...}``).
            controlnet_weights: one weight in [0, 1] per control image.
            retries: this call's retry policy (a ``RetryConfig``, or a number of retries).
            server_url: this call's server, overriding the client's.
            timeout_ms: this call's per-attempt timeout in milliseconds.
            http_headers: extra headers for this call.

        Returns:
            The decoded image with its format, size, request id, attempts and timing.

        Raises:
            FriendliValidationError: an argument is invalid (nothing was sent).
            FriendliAPIError: the server could not be reached or refused the request.
        """
        request = build_generate(
            prompt=prompt,
            model=model,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            response_format=response_format,
            control_images=control_images,
            controlnet_weights=controlnet_weights,
        )
        options = self._client._options(
            retries=retries, server_url=server_url, timeout_ms=timeout_ms, http_headers=http_headers
        )
        return await self._client.request(GENERATIONS_PATH, request, options)

    async def edit(
        self,
        *,
        image: ImageSource | Iterable[ImageSource],
        prompt: str,
        model: str | None = None,
        num_inference_steps: int | None = 20,
        guidance_scale: float | None = 0.0,
        seed: int | None = None,
        response_format: ResponseFormat | None = None,
        retries: RetryConfig | int | None = None,
        server_url: str | None = None,
        timeout_ms: int | None = None,
        http_headers: Mapping[str, str] | None = None,
    ) -> ImageResult:
        """Edit an image as a text prompt describes (``POST /v1/images/edits``).

        Args:
            image: the image to edit, or a list (any iterable) of images. Each may be a URL (passed
                to the server, never fetched here), data: URI, base64 text, bytes, a
                path, a binary file object, a PIL image or ``{"image": ...}``.
            prompt: the change to make.
            model: routes the request to a specific adapter.
            num_inference_steps: denoising steps, in [1, 50]; None leaves it to the server.
            guidance_scale: how closely to follow the prompt (None: the server default).
            seed: an int in [0, 2**32 - 1] for reproducible images.
            response_format: ``"jpeg"`` or ``"raw"`` (PNG); None for the server default.
            retries: this call's retry policy (a ``RetryConfig``, or a number of retries).
            server_url: this call's server, overriding the client's.
            timeout_ms: this call's per-attempt timeout in milliseconds.
            http_headers: extra headers for this call.

        Returns:
            The decoded image with its format, size, request id, attempts and timing.

        Raises:
            FriendliValidationError: an argument is invalid (nothing was sent).
            FriendliAPIError: the server could not be reached or refused the request.
        """
        request = build_edit(
            image=image,
            prompt=prompt,
            model=model,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            response_format=response_format,
        )
        options = self._client._options(
            retries=retries, server_url=server_url, timeout_ms=timeout_ms, http_headers=http_headers
        )
        return await self._client.request(EDITS_PATH, request, options)

    def generate_batch(
        self,
        requests: Iterable[RequestSpec] | AsyncIterable[RequestSpec],
        *,
        concurrency: int = 16,
        rps: float | None = None,
        ordered: bool = False,
        reorder_window: int | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        resume: bool = True,
        on_progress: Callable[[BatchProgress], object] | None = None,
        stop_on_fatal: bool = True,
        total: int | None = None,
        retries: RetryConfig | int | None = None,
        server_url: str | None = None,
        timeout_ms: int | None = None,
        http_headers: Mapping[str, str] | None = None,
    ) -> Batch:
        """Generate many images, fanned out inside the event loop.

        ``async for item in image.generate_batch(prompts): ...`` or
        ``result = await image.generate_batch(prompts)``.

        Args:
            requests: an iterable or async iterable, read lazily (a generator of a
                million requests is fine), of mappings of this method's single-call
                keyword arguments (``retries``, ``server_url``, ``timeout_ms`` and
                ``http_headers`` included, overriding the batch's), ``GenerateRequest``
                models, or prompt strings.
            concurrency: the most requests in flight at once (also bounded by the
                client's ``max_connections``). After 429s the batch lowers its limit
                and raises it back by one per round of successes.
            rps: a ceiling on requests sent per second (None: no ceiling).
            ordered: ``async for`` yields items in input order instead of as they
                finish; up to ``reorder_window`` finished items then wait for a slower
                earlier one, and dispatch pauses while that window is full.
            reorder_window: see ``ordered`` (default ``max(4 * concurrency, 64)``).
            out_dir: write each image to this directory as it arrives (the items then
                hold the path, not the bytes) and record every finished item in its
                ``manifest.jsonl``. One batch at a time per directory.
            resume: with ``out_dir``, skip items an earlier run over the same input
                already finished (same index and request id, file present with the
                recorded sha256); False starts the manifest over.
            on_progress: called with a `BatchProgress` at most ten times a second and
                once at the end, on the event loop: keep it quick.
            stop_on_fatal: after an error every remaining item would meet (401, 403,
                404, a redirect, the server unreachable after retries), send nothing
                more and report the rest as skipped with `FriendliBatchAborted`.
            total: the number of requests, for the ETA, when ``requests`` has no len().
            retries, server_url, timeout_ms, http_headers: defaults for every item,
                as for a single call. Rate-limited (429) items are retried by the batch
                under the same policy, after the server's ``Retry-After``.

        Returns:
            A `Batch`: ``async for item in batch`` yields each `BatchItem` as it
            finishes; ``await batch`` returns a `BatchResult` in input order. Item
            failures are captured on the items, never raised.

        Raises:
            FriendliValidationError: a batch argument is invalid (nothing was sent).
            FriendliUsageError: ``out_dir`` cannot be created or written.
        """
        return Batch(
            self._client,
            _GENERATE_BATCH,
            requests,
            concurrency=concurrency,
            rps=rps,
            ordered=ordered,
            reorder_window=reorder_window,
            out_dir=out_dir,
            resume=resume,
            on_progress=on_progress,
            stop_on_fatal=stop_on_fatal,
            total=total,
            retries=retries,
            server_url=server_url,
            timeout_ms=timeout_ms,
            http_headers=http_headers,
        )

    def edit_batch(
        self,
        requests: Iterable[RequestSpec] | AsyncIterable[RequestSpec],
        *,
        concurrency: int = 16,
        rps: float | None = None,
        ordered: bool = False,
        reorder_window: int | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        resume: bool = True,
        on_progress: Callable[[BatchProgress], object] | None = None,
        stop_on_fatal: bool = True,
        total: int | None = None,
        retries: RetryConfig | int | None = None,
        server_url: str | None = None,
        timeout_ms: int | None = None,
        http_headers: Mapping[str, str] | None = None,
    ) -> Batch:
        """Edit many images, fanned out inside the event loop.

        Takes the same arguments as `generate_batch`; each request is a mapping of
        ``edit`` arguments (``image``, ``prompt``, ...) or an ``EditRequest``.
        """
        return Batch(
            self._client,
            _EDIT_BATCH,
            requests,
            concurrency=concurrency,
            rps=rps,
            ordered=ordered,
            reorder_window=reorder_window,
            out_dir=out_dir,
            resume=resume,
            on_progress=on_progress,
            stop_on_fatal=stop_on_fatal,
            total=total,
            retries=retries,
            server_url=server_url,
            timeout_ms=timeout_ms,
            http_headers=http_headers,
        )


class Container:
    """The Friendli Container API: ``client.container``."""

    def __init__(self, client: AsyncFriendli) -> None:
        self._client = client

    @cached_property
    def image(self) -> Image:
        """Image generation and editing."""
        return Image(self._client)
