"""The official SDK's ``friendli.models`` names that user code touches, mapped onto ours.

Code written for the official ``friendli`` SDK keeps working when
``from friendli import models`` becomes ``from friendli_image import models``:

- ``SDKError`` is `FriendliStatusCodeError`, the base of every error with an HTTP status:
  4xx/5xx answers and values the server would refuse with 422 (refused before sending
  here). It has ``status_code``, ``body``, ``headers``, ``message`` and ``raw_response``.
- ``HTTPValidationError`` is never raised by image calls, there or here.
- ``NoResponseError`` is `FriendliConnectionError` (no usable answer from the server).
- ``ResponseValidationError`` is `FriendliResponseError` (a 2xx body that is no image).
- ``ContainerImageGenerateSuccess`` is `ImageResult`: ``image`` is the base64 text as
  bytes, as in the official SDK; ``data`` is the decoded image.
"""

from __future__ import annotations

from ._exceptions import FriendliConnectionError as NoResponseError
from ._exceptions import FriendliHTTPValidationError as HTTPValidationError
from ._exceptions import FriendliResponseError as ResponseValidationError
from ._exceptions import FriendliStatusCodeError as SDKError
from ._models import (
    ContainerImageEditBodyImage,
    ContainerImageEditBodyImageTypedDict,
    ImageInput,
    ImageInputTypedDict,
    ResponseFormat,
)
from ._models import ImageResult as ContainerImageGenerateSuccess

__all__ = [
    "ContainerImageEditBodyImage",
    "ContainerImageEditBodyImageTypedDict",
    "ContainerImageEditBodyResponseFormat",
    "ContainerImageGenerateSuccess",
    "ContainerImageGenerationBodyResponseFormat",
    "HTTPValidationError",
    "ImageInput",
    "ImageInputTypedDict",
    "NoResponseError",
    "ResponseValidationError",
    "SDKError",
]

#: The ``response_format`` values of ``generate`` and ``edit``: ``"raw"`` or ``"jpeg"``.
ContainerImageGenerationBodyResponseFormat = ResponseFormat
ContainerImageEditBodyResponseFormat = ResponseFormat
