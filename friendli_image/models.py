"""The official SDK's ``friendli.models`` names that user code touches, mapped onto ours.

Code written for the official ``friendli`` SDK keeps working when
``from friendli import models`` becomes ``from friendli_image import models``:

- ``SDKError`` is `FriendliStatusCodeError`, the base of every error with an HTTP status:
  4xx/5xx answers and values the server would refuse with 422 (refused before sending
  here). It has ``status_code``, ``body``, ``headers``, ``message`` and ``raw_response``.
- ``FriendliCoreError`` is `FriendliStatusCodeError` too: the official base class of
  ``SDKError``, ``ResponseValidationError`` and ``HTTPValidationError``.
- ``HTTPValidationError`` is never raised by image calls, there or here.
- ``NoResponseError`` is `FriendliConnectionError` (no usable answer from the server).
- ``ResponseValidationError`` is `FriendliResponseError` (a 2xx body that is no image;
  an ``SDKError`` too, so a 200 that is not the API is caught where ported code looks).
- ``ContainerImageGenerationBody`` / ``ContainerImageEditBody`` are the request models
  (`GenerateRequest`, `EditRequest`), with ``model_dump()``; ``ValidationError`` is one
  entry of a 422's ``detail``.
- ``ContainerImageGenerateSuccess`` is `ImageResult`: ``image`` is the base64 text as
  bytes, as in the official SDK; ``data`` is the decoded image.
"""

from __future__ import annotations

from ._config import DEFAULT_SERVER_URL
from ._exceptions import FriendliConnectionError as NoResponseError
from ._exceptions import FriendliHTTPValidationError as HTTPValidationError
from ._exceptions import FriendliResponseError as ResponseValidationError
from ._exceptions import FriendliStatusCodeError as FriendliCoreError
from ._exceptions import FriendliStatusCodeError as SDKError
from ._images import ImageInput
from ._requests import (
    ContainerImageEditBodyImage,
    ContainerImageEditBodyImageTypedDict,
    ContainerImageEditBodyTypedDict,
    ContainerImageGenerateSuccessTypedDict,
    ContainerImageGenerationBodyTypedDict,
    HTTPValidationErrorData,
    ImageInputTypedDict,
    Loc,
    LocTypedDict,
    ResponseFormat,
    ValidationError,
    ValidationErrorTypedDict,
)
from ._requests import EditRequest as ContainerImageEditBody
from ._requests import GenerateRequest as ContainerImageGenerationBody
from ._results import ImageResult as ContainerImageGenerateSuccess

__all__ = [
    "CONTAINER_IMAGES_EDIT_OP_SERVERS",
    "CONTAINER_IMAGES_GENERATE_OP_SERVERS",
    "ContainerImageEditBody",
    "ContainerImageEditBodyImage",
    "ContainerImageEditBodyImageTypedDict",
    "ContainerImageEditBodyResponseFormat",
    "ContainerImageEditBodyTypedDict",
    "ContainerImageGenerateSuccess",
    "ContainerImageGenerateSuccessTypedDict",
    "ContainerImageGenerationBody",
    "ContainerImageGenerationBodyResponseFormat",
    "ContainerImageGenerationBodyTypedDict",
    "FriendliCoreError",
    "HTTPValidationError",
    "HTTPValidationErrorData",
    "ImageInput",
    "ImageInputTypedDict",
    "Loc",
    "LocTypedDict",
    "NoResponseError",
    "ResponseValidationError",
    "SDKError",
    "ValidationError",
    "ValidationErrorTypedDict",
]

#: The official default servers of the two operations (a container's default address).
CONTAINER_IMAGES_GENERATE_OP_SERVERS = [DEFAULT_SERVER_URL]
CONTAINER_IMAGES_EDIT_OP_SERVERS = [DEFAULT_SERVER_URL]

#: The ``response_format`` values of ``generate`` and ``edit``: ``"raw"`` or ``"jpeg"``.
ContainerImageGenerationBodyResponseFormat = ResponseFormat
ContainerImageEditBodyResponseFormat = ResponseFormat
