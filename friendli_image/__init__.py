"""friendli_image: an async-first SDK for the Friendli Container image API.

>>> from friendli_image import AsyncFriendli
>>> async with AsyncFriendli() as client:  # doctest: +SKIP
...     result = await client.container.image.generate(prompt="a lighthouse at dawn", seed=7)
...     result.save("lighthouse")
"""

from ._batch import Batch
from ._batch_models import BatchItem, BatchOptions, BatchProgress, BatchResult, EndpointStats
from ._client import AsyncFriendli
from ._config import RetryConfig, Timeout
from ._exceptions import (
    FriendliAPIError,
    FriendliAPIStatusError,
    FriendliArgumentError,
    FriendliAuthenticationError,
    FriendliBadRequestError,
    FriendliBatchAborted,
    FriendliConnectionError,
    FriendliError,
    FriendliHTTPValidationError,
    FriendliInvalidValueError,
    FriendliNotFoundError,
    FriendliPayloadTooLargeError,
    FriendliPermissionDeniedError,
    FriendliRateLimitError,
    FriendliResponseError,
    FriendliResponseTooLarge,
    FriendliServerError,
    FriendliStatusCodeError,
    FriendliTimeoutError,
    FriendliUnprocessableEntityError,
    FriendliUsageError,
    FriendliUsageWarning,
    FriendliValidationError,
)
from ._fleet import Endpoint, FleetConfig
from ._gallery import write_gallery
from ._images import ImageInput
from ._requests import EditRequest, GenerateRequest
from ._results import ContainerImageGenerateSuccess, ImageResult
from ._sync import SyncBatch, SyncFriendli
from ._telemetry import ErrorEvent, Hooks, RequestEvent, ResponseEvent, RetryEvent, Telemetry
from ._version import __version__

APIConnectionError = FriendliConnectionError
"""openai-python's name for `FriendliConnectionError`: the server could not be reached."""
APITimeoutError = FriendliTimeoutError
"""openai-python's name for `FriendliTimeoutError`: an attempt or the call ran out of time."""
APIStatusError = FriendliAPIStatusError
"""openai-python's name for `FriendliAPIStatusError`: the server answered 4xx or 5xx."""
ResponseError = FriendliResponseError
"""The common client libraries' name for `FriendliResponseError`: a 2xx answer that is no
image (not JSON, no ``image`` field, bad base64, over the size cap)."""

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncFriendli",
    "Batch",
    "BatchItem",
    "BatchOptions",
    "BatchProgress",
    "BatchResult",
    "ContainerImageGenerateSuccess",
    "EditRequest",
    "Endpoint",
    "EndpointStats",
    "ErrorEvent",
    "FleetConfig",
    "FriendliAPIError",
    "FriendliAPIStatusError",
    "FriendliArgumentError",
    "FriendliAuthenticationError",
    "FriendliBadRequestError",
    "FriendliBatchAborted",
    "FriendliConnectionError",
    "FriendliError",
    "FriendliHTTPValidationError",
    "FriendliInvalidValueError",
    "FriendliNotFoundError",
    "FriendliPayloadTooLargeError",
    "FriendliPermissionDeniedError",
    "FriendliRateLimitError",
    "FriendliResponseError",
    "FriendliResponseTooLarge",
    "FriendliServerError",
    "FriendliStatusCodeError",
    "FriendliTimeoutError",
    "FriendliUnprocessableEntityError",
    "FriendliUsageError",
    "FriendliUsageWarning",
    "FriendliValidationError",
    "GenerateRequest",
    "Hooks",
    "ImageInput",
    "ImageResult",
    "RequestEvent",
    "ResponseError",
    "ResponseEvent",
    "RetryConfig",
    "RetryEvent",
    "SyncBatch",
    "SyncFriendli",
    "Telemetry",
    "Timeout",
    "__version__",
    "write_gallery",
]
