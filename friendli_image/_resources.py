"""The API namespaces, shaped like the official SDK: ``client.container.image``.

Resources only validate arguments into a request model and hand it to the client's one
request path (`RequestPath`); they hold no state and no logic of their own. Batch
methods take their options from `BatchOptions`, their one definition.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeAlias, TypeVar

import attrs

from ._batch import Batch, BatchOperation
from ._batch_models import BatchOptions
from ._config import NO_OVERRIDES, UNSET, CallOverrides, Unset
from ._exceptions import FriendliArgumentError
from ._request_path import RequestPath
from ._requests import EditRequest, GenerateRequest, RequestSpec, ResponseFormat
from ._results import ImageResult

if TYPE_CHECKING:
    from ._config import RetryConfig
    from ._images import ImageSource

__all__ = ["EDITS_PATH", "GENERATIONS_PATH", "BatchRequests", "Container", "Image"]

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"

#: What a batch method takes as its first argument.
BatchRequests: TypeAlias = "Iterable[RequestSpec] | AsyncIterable[RequestSpec]"

_P = ParamSpec("_P")
_T = TypeVar("_T")
_CALL_OPTIONS = frozenset(field.name for field in attrs.fields(CallOverrides))

_BATCH_DOC = """{summary}

``async for item in image.{name}(requests): ...`` yields each `BatchItem` as it
finishes; ``result = await image.{name}(requests)`` returns a `BatchResult` in input
order. Item failures are captured on the items, never raised.

Args:
    requests: an iterable or async iterable, read lazily (a generator of a million
        requests is fine), of {items}.
        An item's own ``retries``, ``server_url``, ``timeout_ms`` and ``http_headers``
        override the batch's.
    options: keyword arguments of `BatchOptions`, checked here, before anything is sent:
{options}
Returns:
    A `Batch`, run when it is iterated or awaited.

Raises:
    FriendliValidationError: a batch option is invalid (nothing was sent).
    FriendliUsageError: ``out_dir`` cannot be created or written (when the batch runs).
"""


def _options_doc() -> str:
    text = inspect.cleandoc(BatchOptions.__doc__ or "")
    attributes = text.split("Attributes:", 1)[-1].strip("\n")
    return "\n".join("    " + line if line else "" for line in attributes.splitlines())


def _batch_method(
    operation: BatchOperation, options: Callable[_P, BatchOptions], summary: str, items: str
) -> Callable[Concatenate[Image, BatchRequests, _P], Batch]:
    """A batch method whose keyword arguments are the fields of ``options``."""

    def method(
        self: Image, requests: BatchRequests, /, *args: _P.args, **kwargs: _P.kwargs
    ) -> Batch:
        return Batch(self._path, operation, requests, options(*args, **kwargs))

    name = "generate_batch" if operation.path == GENERATIONS_PATH else "edit_batch"
    method.__name__ = method.__qualname__ = name
    method.__qualname__ = f"Image.{name}"
    method.__doc__ = _BATCH_DOC.format(
        summary=summary, name=name, items=items, options=_options_doc()
    )
    own = inspect.signature(method).parameters
    method.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            own["self"],
            inspect.Parameter("requests", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            # The batch's own options first, then the per-call ones it passes on.
            *sorted(
                inspect.signature(options).parameters.values(),
                key=lambda parameter: parameter.name in _CALL_OPTIONS,
            ),
        ],
        return_annotation="Batch",
    )
    return method


def _overrides(
    retries: RetryConfig | int | Unset | None,
    server_url: str | None,
    timeout_ms: float | None,
    http_headers: Mapping[str, str] | None,
) -> CallOverrides:
    if retries is UNSET and server_url is None and timeout_ms is None and http_headers is None:
        return NO_OVERRIDES  # the common case skips four validators per call
    return CallOverrides(
        retries=retries, server_url=server_url, timeout_ms=timeout_ms, http_headers=http_headers
    )


def _keyword_hints(
    **hints: str,
) -> Callable[[Callable[_P, Awaitable[_T]]], Callable[_P, Awaitable[_T]]]:
    """Turn an unexpected keyword into a `FriendliArgumentError` saying where it belongs.

    Python's own ``TypeError`` names the keyword but not the method that takes it; the
    signature, the docs and mypy's checks stay those of the method.
    """

    def decorate(method: Callable[_P, Awaitable[_T]]) -> Callable[_P, Awaitable[_T]]:
        accepted = frozenset(inspect.signature(method).parameters)

        @functools.wraps(method)
        async def checked(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            for name in kwargs.keys() - accepted:
                takes = ", ".join(sorted(accepted - {"self"}))
                raise FriendliArgumentError(
                    name,
                    f"is not an argument of {method.__name__}()"
                    + hints.get(name, f"; it takes {takes}"),
                )
            return await method(*args, **kwargs)

        return checked

    return decorate


class Image:
    """Image generation and editing: ``client.container.image``."""

    def __init__(self, path: RequestPath) -> None:
        self._path = path

    @_keyword_hints(
        image="; to edit an image use edit(image=...), to guide a generation with it "
        "pass control_images=[...]"
    )
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
        retries: RetryConfig | int | Unset | None = UNSET,
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
            retries: this call's retry policy (a ``RetryConfig``, or a number of retries);
                None: no retries, as in the official SDK; not given: the client's.
            server_url: this call's server, overriding the client's.
            timeout_ms: this call's per-attempt timeout in milliseconds.
            http_headers: extra headers for this call.

        Returns:
            The decoded image with its format, size, request id, attempts and timing.

        Raises:
            FriendliValidationError: an argument is invalid (nothing was sent).
            FriendliAPIError: the server could not be reached or refused the request.
        """
        request = GenerateRequest(
            prompt=prompt,
            model=model,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            response_format=response_format,
            control_images=control_images,
            controlnet_weights=controlnet_weights,
        )
        options = self._path.resolve(_overrides(retries, server_url, timeout_ms, http_headers))
        return await self._path.send(GENERATIONS_PATH, request, options, None)

    @_keyword_hints(
        control_images="; ControlNet images guide generate(), edit() changes the image= it is given"
    )
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
        retries: RetryConfig | int | Unset | None = UNSET,
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
            retries: this call's retry policy (a ``RetryConfig``, or a number of retries);
                None: no retries, as in the official SDK; not given: the client's.
            server_url: this call's server, overriding the client's.
            timeout_ms: this call's per-attempt timeout in milliseconds.
            http_headers: extra headers for this call.

        Returns:
            The decoded image with its format, size, request id, attempts and timing.

        Raises:
            FriendliValidationError: an argument is invalid (nothing was sent).
            FriendliAPIError: the server could not be reached or refused the request.
        """
        request = EditRequest(
            image=image,
            prompt=prompt,
            model=model,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            response_format=response_format,
        )
        options = self._path.resolve(_overrides(retries, server_url, timeout_ms, http_headers))
        return await self._path.send(EDITS_PATH, request, options, None)

    generate_batch = _batch_method(
        BatchOperation(GENERATIONS_PATH, GenerateRequest, accepts_prompt=True),
        BatchOptions,
        "Generate many images, fanned out inside the event loop.",
        "mappings of `generate`'s keyword arguments, `GenerateRequest` models, or prompt strings",
    )
    edit_batch = _batch_method(
        BatchOperation(EDITS_PATH, EditRequest),
        BatchOptions,
        "Edit many images, fanned out inside the event loop.",
        "mappings of `edit`'s keyword arguments\n        (``image``, ``prompt``, ...) or "
        "`EditRequest` models",
    )


class Container:
    """The Friendli Container API: ``client.container``."""

    def __init__(self, path: RequestPath) -> None:
        self._path = path

    @functools.cached_property
    def image(self) -> Image:
        """Image generation and editing."""
        return Image(self._path)
