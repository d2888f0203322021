"""The official SDK's names and meanings: results, models, utils, errors, call arguments."""

from __future__ import annotations

import base64
import fractions
import json
import numbers
import pickle
import random
from typing import Any

import attrs
import pytest

from friendli_image import (
    FriendliConnectionError,
    FriendliInvalidValueError,
    FriendliServerError,
    FriendliStatusCodeError,
    FriendliUnprocessableEntityError,
    FriendliUsageError,
    FriendliValidationError,
    ImageResult,
    models,
    utils,
)
from friendli_image import RetryConfig as OurRetryConfig
from friendli_image._retry import backoff_delay
from friendli_image._serde import dumps_request
from friendli_image.models import SDKError
from friendli_image.utils import BackoffStrategy, RetryConfig


def test_image_is_base64_bytes_and_data_the_decoded_image(tiny_png: bytes) -> None:
    """res.image is the base64 text as bytes (official); res.data the image."""
    result = ImageResult(data=tiny_png, format="png")
    assert result.image == base64.b64encode(tiny_png)
    assert base64.b64decode(result.image) == tiny_png
    assert result.image is not result.image  # encoded on access, never cached


def test_generate_success_is_constructible_from_base64(tiny_png: bytes) -> None:
    """ContainerImageGenerateSuccess(image=...) takes base64 bytes or str and sniffs the rest."""
    encoded = base64.b64encode(tiny_png)
    for value in (encoded, encoded.decode()):
        result = models.ContainerImageGenerateSuccess(image=value)
        assert isinstance(result, ImageResult)
        assert result.data == tiny_png
        assert result.format == "png"
        assert (result.width, result.height) == (3, 2)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"data": b"x", "image": b"eA=="}, {"image": b"@@@"}, {"image": 3}, {"data": "text"}],
)
def test_bad_construction_is_refused(kwargs: dict[str, Any]) -> None:
    """Exactly one of data= and image= (valid base64) is needed."""
    with pytest.raises(FriendliUsageError):
        ImageResult(**kwargs)


def test_model_dump_matches_pydantic(tiny_png: bytes) -> None:
    """model_dump() / model_dump_json() give what pydantic gives for the official model."""
    result = ImageResult(data=tiny_png, format="png")
    text = base64.b64encode(tiny_png).decode()
    assert result.model_dump() == {"image": text.encode()}
    assert result.model_dump(mode="json") == {"image": text}
    assert result.model_dump_json() == '{"image":"' + text + '"}'
    assert result.model_dump_json(indent=2) == '{\n  "image": "' + text + '"\n}'
    assert models.ContainerImageGenerateSuccess.model_validate_json(result.model_dump_json()) == (
        result
    )


def test_evolve_keeps_the_decoded_bytes(tiny_png: bytes) -> None:
    """attrs.evolve (used for maybe_duplicated) rebuilds a result without re-decoding."""
    result = ImageResult(data=tiny_png, format="png", width=4, height=3)
    evolved = attrs.evolve(result, maybe_duplicated=True)
    assert evolved.data is result.data
    assert evolved.maybe_duplicated


def test_official_retry_config_maps_onto_our_policy() -> None:
    """Positional official arguments, in milliseconds, become our fields in seconds."""
    config = RetryConfig("backoff", BackoffStrategy(500, 60000, 1.5, 3600000), True)
    assert isinstance(config, OurRetryConfig)
    assert (config.initial_delay, config.max_delay, config.multiplier) == (0.5, 60.0, 1.5)
    assert config.max_elapsed == 3600.0
    assert config.jitter == 1.0
    assert config.max_attempts == 5
    assert 500 not in config.retry_statuses
    assert config.backoff is not None
    assert config.backoff.initial_interval == 500
    assert RetryConfig("none", BackoffStrategy(1, 1, 1, 1), False).max_attempts == 1
    override = RetryConfig("backoff", BackoffStrategy(1, 1, 1, 1), False, ["5XX", "429"])
    assert override.retry_statuses == frozenset({*range(500, 600), 429})


def test_official_retry_config_survives_evolve() -> None:
    """A per-call number of retries applied to an official config keeps its backoff."""
    config = RetryConfig("backoff", BackoffStrategy(10, 100, 3.0, 5000, jitter_ms=0), True)
    evolved = attrs.evolve(config, max_attempts=2)
    assert evolved.max_attempts == 2
    assert (evolved.initial_delay, evolved.multiplier, evolved.jitter) == (0.01, 3.0, 0.0)


@pytest.mark.parametrize(
    "args",
    [
        ("sometimes", BackoffStrategy(1, 1, 1, 1), True),
        ("backoff", "fast", True),
        ("backoff", BackoffStrategy(1, 1, 1, 1), "yes"),
        ("backoff", BackoffStrategy(1, 1, 1, 1), True, ["6XX"]),
    ],
)
def test_bad_official_retry_config_is_refused(args: tuple[Any, ...]) -> None:
    """An unknown strategy, a non-BackoffStrategy or a bad status pattern is refused."""
    with pytest.raises(FriendliValidationError):
        RetryConfig(*args)


def test_backoff_grows_by_the_multiplier() -> None:
    """The exponent of the official backoff is the growth factor of our delays."""
    config = OurRetryConfig(initial_delay=1.0, multiplier=3.0, max_delay=100.0, jitter=0.0)
    rng = random.Random(0)
    assert [backoff_delay(n, config, rng) for n in (1, 2, 3)] == [1.0, 3.0, 9.0]


def test_sdkerror_is_one_base_of_status_and_value_errors() -> None:
    """SDKError is our FriendliStatusCodeError: status errors and 422 values, not type errors."""
    assert SDKError is FriendliStatusCodeError
    assert issubclass(FriendliServerError, SDKError)
    assert issubclass(FriendliInvalidValueError, SDKError)
    assert issubclass(FriendliInvalidValueError, FriendliValidationError)
    assert not issubclass(FriendliValidationError, SDKError)
    assert not issubclass(models.HTTPValidationError, FriendliUnprocessableEntityError)
    assert models.NoResponseError is FriendliConnectionError
    assert issubclass(FriendliConnectionError, ConnectionError)
    assert utils.RetryConfig is RetryConfig


def test_status_error_offers_what_ported_code_reads() -> None:
    """status_code, body, case-insensitive headers, message and raw_response, also pickled."""
    error = FriendliServerError(
        "overloaded", status=503, headers={"Retry-After": "2"}, body='{"detail":"busy"}'
    )
    for candidate in (error, pickle.loads(pickle.dumps(error))):  # noqa: S301  (our own bytes)
        assert candidate.status_code == 503
        assert candidate.headers["retry-after"] == "2"
        assert candidate.message == "overloaded"
        raw = candidate.raw_response
        assert (raw.status_code, raw.headers["RETRY-AFTER"], raw.text) == (503, "2", error.body)
        assert raw.json() == {"detail": "busy"}
        assert raw.is_error
        assert not raw.is_success
        assert raw.reason_phrase == "Service Unavailable"


@pytest.mark.parametrize(
    ("kwargs", "loc"),
    [
        ({"num_inference_steps": 0}, ["body", "num_inference_steps"]),
        ({"num_inference_steps": 51}, ["body", "num_inference_steps"]),
        ({"guidance_scale": float("nan")}, ["body", "guidance_scale"]),
        (
            {"control_images": [b"\x89PNG\r\n\x1a\n" + bytes(40)], "controlnet_weights": [2]},
            ["body", "controlnet_weights", 0],
        ),
        ({"controlnet_weights": [0.5]}, ["body", "controlnet_weights"]),
        ({"control_images": ["data:image/png;base64,@@"]}, ["body", "control_images", 0]),
    ],
)
def test_values_the_server_refuses_are_sdkerror_422(kwargs: dict[str, Any], loc: list[Any]) -> None:
    """A value of the right type that the server refuses raises SDKError 422 before sending."""
    from friendli_image._requests import GenerateRequest as build_generate

    with pytest.raises(SDKError) as caught:
        build_generate(prompt="p", **kwargs)
    error = caught.value
    assert isinstance(error, FriendliValidationError)
    assert error.status_code == 422
    assert json.loads(error.body)["detail"][0]["loc"] == loc
    assert error.raw_response.json() == json.loads(error.body)


@pytest.mark.parametrize("kwargs", [{"num_inference_steps": "twenty"}, {"seed": 1.5}])
def test_wrong_types_are_not_sdkerror(kwargs: dict[str, Any]) -> None:
    """A wrong type (refused client-side by the official SDK too) is a plain validation error."""
    from friendli_image._requests import GenerateRequest as build_generate

    with pytest.raises(FriendliValidationError) as caught:
        build_generate(prompt="p", **kwargs)
    assert not isinstance(caught.value, SDKError)


_PNG_URI = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4z8DwHwAF"
    "AAH/q842AAAAAElFTkSuQmCC"
)


class _Count:
    """An integer type of a third-party library (as NumPy's are): numbers.Integral only."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value


numbers.Integral.register(_Count)


@pytest.mark.parametrize(
    ("kwargs", "sent"),
    [
        # A CSV cell or an environment variable is text.
        ({"seed": "7", "num_inference_steps": " 12 "}, {"seed": 7, "num_inference_steps": 12}),
        ({"guidance_scale": "3.5"}, {"guidance_scale": 3.5}),
        # A JSON or YAML config, or arithmetic, gives floats with no fractional part.
        ({"seed": 7.0, "num_inference_steps": 12.0}, {"seed": 7, "num_inference_steps": 12}),
        ({"seed": "7.0"}, {"seed": 7}),
        ({"seed": fractions.Fraction(14, 2)}, {"seed": 7}),
        (
            {"seed": _Count(7), "num_inference_steps": _Count(12)},
            {"seed": 7, "num_inference_steps": 12},
        ),
        (
            {"control_images": [_PNG_URI], "controlnet_weights": ["0.5"]},
            {"controlnet_weights": [0.5]},
        ),
    ],
)
def test_numbers_are_taken_as_the_official_sdk_takes_them(
    kwargs: dict[str, Any], sent: dict[str, Any]
) -> None:
    """What the official SDK's pydantic models accept for a number, ours send as that number:
    code fed from CSV files, configs or NumPy keeps working (a fraction stays refused)."""
    from friendli_image._requests import GenerateRequest as build_generate

    body = json.loads(dumps_request(build_generate(prompt="p", **kwargs)))
    assert {key: body[key] for key in sent} == sent
    assert all(type(body[key]) is type(value) for key, value in sent.items())


def test_numpy_numbers_are_taken() -> None:
    """NumPy scalars (a pandas row's values) are numbers to the official SDK, and to ours."""
    np = pytest.importorskip("numpy")
    from friendli_image._requests import GenerateRequest as build_generate

    request = build_generate(
        prompt="p", seed=np.int64(7), num_inference_steps=np.int32(12), guidance_scale=np.float32(2)
    )
    assert json.loads(dumps_request(request)) == {
        "prompt": "p",
        "seed": 7,
        "num_inference_steps": 12,
        "guidance_scale": 2.0,
    }
    with pytest.raises(FriendliValidationError, match="seed"):
        build_generate(prompt="p", seed=np.float64(1.5))


def test_none_optional_numbers_are_omitted() -> None:
    """num_inference_steps=None and guidance_scale=None leave the fields out of the body."""
    from friendli_image._requests import EditRequest as build_edit
    from friendli_image._requests import GenerateRequest as build_generate

    body = json.loads(
        dumps_request(build_generate(prompt="p", num_inference_steps=None, guidance_scale=None))
    )
    assert body == {"prompt": "p"}
    edit = build_edit(
        image="https://example.test/a.png",
        prompt="p",
        num_inference_steps=None,
        guidance_scale=None,
    )
    assert json.loads(dumps_request(edit)) == {
        "image": {"image": "https://example.test/a.png"},
        "prompt": "p",
    }


def test_generators_are_read_once_before_checking() -> None:
    """Generators for images and weights work; a wrong count names the real count."""
    from friendli_image._requests import EditRequest as build_edit
    from friendli_image._requests import GenerateRequest as build_generate

    url = "https://example.test/a.png"
    request = build_generate(
        prompt="p",
        control_images=({"image": url} for _ in range(2)),
        controlnet_weights=(w for w in (0.25, 1)),
    )
    assert request.controlnet_weights == [0.25, 1.0]
    assert request.control_images is not None
    assert len(request.control_images) == 2
    with pytest.raises(SDKError, match="has 2 values for 1 control images"):
        build_generate(prompt="p", control_images=[url], controlnet_weights=(w for w in (0.5, 0.5)))
    edit = build_edit(image=({"image": url} for _ in range(3)), prompt="p")
    assert isinstance(edit.image, list)
    assert len(edit.image) == 3
    assert build_edit(image=iter(()), prompt="p").image == []  # sent: the server judges it
